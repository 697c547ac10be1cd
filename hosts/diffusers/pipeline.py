"""A regulated img2img edit with a diffusers UNet: Euler sampling in ComfyUI's conventions, the keep region
and latent refinement, all from the core (no diffusers import: the UNet is called like any module).

Per step, in k-diffusion form ``x = x0 + σ·ε`` (the same arithmetic as ComfyUI's ``euler`` sampler behind
``KSamplerX0Inpaint``, so a ComfyUI edit and this one follow the same rules):

- keep region (``edit_mask``, 1 = may change): the UNet sees the source noised to the *current* sigma
  outside the edit region, ``x_in = m·x + (1 − m)·(x_src + σ·noise)``, and the prediction there is the
  source, ``D = m·D + (1 − m)·x_src``; so outside the region the carried latent is the source noised to the
  current sigma, and it ends at the source. Cells the mask keeps in full (``m = 0`` after ComfyUI's bilinear
  resize to the latent) are pasted bit for bit at the end, as Paste Keep Region does;
- refinement (optional, inside its window): the core's loop (:func:`...attention.refinement.refine_step`) down
  the attention-concentration energy, read from the encoder's cross-attention at ``latent / grid_factor`` by an
  energy probe that stops the UNet after its last layer; the gradient is masked to the edit region;
- classifier-free guidance on the denoised predictions: ``D = D_u + g·(D_c − D_u)`` (negative rows first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...attention.layer_call import COND, UNCOND
from ...attention.refinement import Energy, Refinement, grid_at, refine_step, refine_window
from ...attention.run_record import RefineStep, RunRecord
from ...attention.schedule import DiscreteSchedule, max_denoise, noised
from ...errors import CXRInputError
from .processors import EnergyProbe, EnergyProbeDone, Regulation


@dataclass
class EditResult:
    """The edited latent (model space, as the UNet sees it) and what the run recorded."""

    latent: torch.Tensor
    refine: list[RefineStep] = field(default_factory=list)
    record: RunRecord = field(default_factory=RunRecord)


def energy_layers(unet, latent: tuple[int, int], grid_factor: int) -> tuple[tuple[str, ...], tuple[int, int]]:
    """Names of the encoder cross-attention layers whose grid is ``ceil(latent / grid_factor)`` (down blocks;
    else the middle block), from the UNet's structure (its downsamplers), and that grid."""
    target = (-(-latent[0] // grid_factor), -(-latent[1] // grid_factor))
    names: list[str] = []
    level = 0
    for i, block in enumerate(unet.down_blocks):
        if grid_at(latent, level) == target:
            for j, att in enumerate(getattr(block, "attentions", None) or []):
                names += [f"down_blocks.{i}.attentions.{j}.transformer_blocks.{t}.attn2"
                          for t in range(len(att.transformer_blocks))]
        level += 1 if getattr(block, "downsamplers", None) else 0
    mid_attentions = getattr(getattr(unet, "mid_block", None), "attentions", None)
    if not names and grid_at(latent, level) == target and mid_attentions:
        names = [f"mid_block.attentions.0.transformer_blocks.{t}.attn2"
                 for t in range(len(mid_attentions[0].transformer_blocks))]
    if not names:
        raise CXRInputError(f"the UNet's encoder has no cross-attention at the {target[0]}×{target[1]} grid.",
                            input_name="grid_factor", fix="Pick another grid_factor (2 or 4 for SD).")
    return tuple(names), target


def latent_mask(edit_mask: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The edit mask ``[H, W]`` / ``[B, H, W]`` / ``[B, 1, H, W]`` resized to the latent (``[B, C, h, w]``) the way
    ComfyUI resizes a noise mask (``comfy.utils.reshape_mask``: bilinear, repeated over channels)."""
    m = edit_mask.float().reshape(-1, 1, *edit_mask.shape[-2:]).to(latent.device)
    m = F.interpolate(m, size=tuple(latent.shape[-2:]), mode="bilinear")
    if m.shape[0] not in (1, latent.shape[0]):
        raise CXRInputError(f"{m.shape[0]} edit masks for {latent.shape[0]} latents.", input_name="edit_mask",
                            fix="Give one mask, or one per latent.")
    return m.expand(latent.shape[0], latent.shape[1], -1, -1)


class _Editor:
    """One edit's fixed inputs and its model calls."""

    def __init__(self, regulation: Regulation, schedule: DiscreteSchedule, source: torch.Tensor, noise: torch.Tensor,
                 cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float, mask: torch.Tensor | None):
        self.reg, self.schedule, self.source, self.noise = regulation, schedule, source, noise
        self.cond, self.uncond, self.guidance, self.mask = cond, uncond, guidance_scale, mask
        self.latent_hw = (int(source.shape[-2]), int(source.shape[-1]))

    def model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """What the UNet sees: the source noised to ``sigma`` outside the edit region (KSamplerX0Inpaint)."""
        if self.mask is None:
            return x
        return x * self.mask + noised(self.source, self.noise, sigma) * (1 - self.mask)

    def unet(self, x_in: torch.Tensor, sigma: float, context: torch.Tensor, chunks: tuple[int, ...]) -> torch.Tensor:
        """The UNet's eps for ``x_in`` at ``sigma`` (ComfyUI's c_in scaling and nearest timestep)."""
        unet = self.reg.unet
        t = torch.full((x_in.shape[0],), float(self.schedule.timestep(sigma)), device=x_in.device)
        c_in = 1.0 / math.sqrt(sigma**2 + 1.0)
        with self.reg.step(self.latent_hw, sigma, chunks):
            out = unet((x_in * c_in).to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype))
        return (out.sample if hasattr(out, "sample") else out[0]).float()

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        x_in = self.model_input(x, sigma)
        if self.uncond is None or self.guidance == 1.0:  # as ComfyUI at cfg 1: the negative pass is skipped
            den = x_in - self.unet(x_in, sigma, self.cond, (COND,)) * sigma
        else:
            eps = self.unet(torch.cat([x_in, x_in]), sigma, torch.cat([self.uncond, self.cond]), (UNCOND, COND))
            den_u, den_c = (x_in - e * sigma for e in eps.chunk(2))
            den = den_u + (den_c - den_u) * self.guidance
        if self.mask is not None:
            den = den * self.mask + self.source * (1 - self.mask)
        return den

    def energy(self, refine: Refinement, sigma: float) -> Energy:
        """The refinement energy at ``sigma``: the positive prompt's pathology maps at the energy layers."""
        names, _ = energy_layers(self.reg.unet, self.latent_hw, refine.grid_factor)

        def energy(x: torch.Tensor) -> torch.Tensor:
            probe = EnergyProbe(names, refine.columns)
            self.reg.probe = probe
            try:
                self.unet(self.model_input(x, sigma), sigma, self.cond, (COND,))
            except EnergyProbeDone:
                pass
            finally:
                self.reg.probe = None
            return refine.energy(probe.maps, x.shape[0], self.latent_hw)
        return energy


def img2img(regulation: Regulation, source: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor,
            noise: torch.Tensor, *, uncond: torch.Tensor | None = None, guidance_scale: float = 7.5,
            edit_mask: torch.Tensor | None = None, refine: Refinement | None = None,
            schedule: DiscreteSchedule | None = None,
            callback: Callable[[int, float, torch.Tensor], None] | None = None) -> EditResult:
    """Edit ``source`` with the regulated UNet: Euler steps along ``sigmas``, keep region, refinement.

    Args:
        regulation: the CXR processors on the UNet (:func:`.processors.install_regulation`; empty
            ``stages`` for a plain or refinement-only edit).
        source: the radiograph's latent in model space (``vae.encode(x).latent_dist.mean · scaling_factor``).
        cond, uncond: prompt embeddings ``[B, T, C]`` (``uncond`` None = no guidance).
        sigmas: the descending schedule ending at 0 (:meth:`.schedule.DiscreteSchedule.normal_sigmas`).
        noise: standard normal, the latent's shape (seeded by the caller).
        edit_mask: where the edit may change the image (1), on the image's or the latent's grid; None = all.
        refine: latent refinement settings (None = plain Euler).
        schedule: the model's sigma table (default: the regulation's, from the pipeline's scheduler).
        callback: called ``(step, sigma, x)`` with the latent the sampler carries at the start of each step.

    Returns:
        :class:`EditResult` with the edited latent (model space) and the refinement and regulation records.
    """
    schedule = schedule or regulation.schedule
    if schedule is None:
        raise CXRInputError("no noise schedule: the regulation was installed without a scheduler.",
                            input_name="schedule", fix="Pass schedule=DiscreteSchedule.from_scheduler(pipe.scheduler).")
    values = [float(s) for s in sigmas.flatten()]
    if len(values) < 2 or values[-1] != 0.0 or any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise CXRInputError("sigmas must descend strictly and end at 0.", input_name="sigmas",
                            fix="Use schedule.normal_sigmas(steps, denoise).")
    source = source.float()
    mask = None if edit_mask is None else latent_mask(edit_mask, source)
    ed = _Editor(regulation, schedule, source, noise.float().to(source.device), cond, uncond, guidance_scale, mask)
    result = EditResult(source, record=regulation.new_run())
    window = None if refine is None else refine_window(refine.config, schedule.percent_to_sigma, values)
    if refine is not None:
        refine.check_batch(int(source.shape[0]))  # one target per image of the batch, or one all share
    if refine is not None and window is not None and window.steps:  # refuse a target off the grid before sampling
        refine.cells(energy_layers(regulation.unet, ed.latent_hw, refine.grid_factor)[1], ed.latent_hw)
    x = noised(source, ed.noise, values[0], max_denoise(schedule, values[0]))
    for i, (sigma, nxt) in enumerate(zip(values, values[1:], strict=False)):
        if callback is not None:
            callback(i, sigma, x)
        if refine is not None and window is not None and i in window.steps:
            x, entry = refine_step(ed.energy(refine, sigma), x, sigma, refine.config, step=i,
                                   stop=window.stop_at(sigma), edit_mask=mask, model_input="unet")
            result.refine.append(entry)
        denoised = ed.denoise(x, sigma)
        x = x + (x - denoised) / sigma * (nxt - sigma)
    if mask is not None:  # cells kept in full get the source bit for bit (ComfyUI: Paste Keep Region)
        x = torch.where(mask == 0, source, x)
    result.latent = x
    return result


__all__ = ["EditResult", "energy_layers", "img2img", "latent_mask"]

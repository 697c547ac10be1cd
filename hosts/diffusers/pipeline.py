"""A regulated img2img edit with a diffusers UNet: Euler sampling in ComfyUI's conventions, the keep region
and latent refinement, all from the core (no diffusers import: the UNet is called like any module).

Per step, in k-diffusion form ``x = x0 + σ·ε`` (the same arithmetic as ComfyUI's ``euler`` sampler behind
``KSamplerX0Inpaint``, so a ComfyUI edit and this one follow the same rules):

- keep region (``edit_mask``, 1 = may change): the UNet sees the source noised to the *current* sigma
  outside the edit region, ``x_in = m·x + (1 − m)·(x_src + σ·noise)``, and the prediction there is the
  source, ``D = m·D + (1 − m)·x_src``; so outside the region the carried latent is the source noised to the
  current sigma, and it ends at the source. Cells the mask keeps in full (``m = 0`` after ComfyUI's bilinear
  resize to the latent) are pasted bit for bit at the end, as Paste Keep Region does;
- refinement (optional, inside its window): gradient steps on ``x`` down the attention-concentration energy
  of :mod:`.refinement`, read from the encoder's cross-attention at ``latent / grid_factor`` by an energy
  probe that stops the UNet after its last layer; the gradient is masked to the edit region;
- classifier-free guidance on the denoised predictions: ``D = D_u + g·(D_c − D_u)`` (negative rows first).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...attention.layer_call import COND, UNCOND
from ...attention.organs import OrganMasks
from ...attention.refinement import RefineConfig, concentration_energy, grid_at, refinement_step
from ...attention.regions import coverage
from ...attention.schedule import DiscreteSchedule, max_denoise, noised
from ...errors import CXRInputError
from .processors import EnergyProbe, EnergyProbeDone, Regulation

logger = logging.getLogger("cxr_counterfactual")


@dataclass(frozen=True)
class Refinement:
    """Latent refinement settings (as the CXR Refinement Sampler node): ``positions`` of the pathology words,
    the one-region ``target`` (:func:`.diffusers_stages.target_region`), the energy grid ``latent / grid_factor``."""

    config: RefineConfig
    target: OrganMasks
    positions: Mapping[str, tuple[int, ...]]
    cond_len: int = 77
    grid_factor: int = 4

    def columns(self, context_len: int) -> torch.Tensor:
        reps = context_len // self.cond_len
        return torch.tensor([p + self.cond_len * j for idx in self.positions.values() for p in idx
                             for j in range(reps)], dtype=torch.long)


@dataclass
class EditResult:
    """The edited latent (model space, as the UNet sees it) and what the run recorded."""

    latent: torch.Tensor
    refine: list[dict] = field(default_factory=list)
    record: dict = field(default_factory=dict)


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

    def energy(self, refine: Refinement, x: torch.Tensor, sigma: float, grad: bool):
        """The refinement energy ``[B]`` at ``x`` (positive rows only) and, with ``grad``, ``∂E/∂x`` masked."""
        names, grid = energy_layers(self.reg.unet, self.latent_hw, refine.grid_factor)
        inside = coverage(refine.target, refine.target.names, grid[0], grid[1], latent=self.latent_hw)
        if not inside.any():
            raise CXRInputError(f"the target covers no cell of the {grid[0]}×{grid[1]} energy grid.",
                                input_name="target",
                                fix="Use a larger target, a smaller grid_factor or a larger image.")
        c = refine.config
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            xg = x.detach().clone().requires_grad_(grad)
            probe = EnergyProbe(names, refine.columns)
            self.reg.probe = probe
            try:
                self.unet(self.model_input(xg, sigma), sigma, self.cond, (COND,))
            except EnergyProbeDone:
                pass
            finally:
                self.reg.probe = None
            maps = torch.stack(probe.maps).mean(0).float()  # [B, h, w], over the layers
            e = concentration_energy(maps, inside.to(maps.device), smoothing=c.smoothing,
                                     extent_weight=c.extent_weight, extent_threshold=c.extent_threshold,
                                     extent_sharpness=c.extent_sharpness)
            if not grad:
                return e.detach(), None
            (g,) = torch.autograd.grad(e.sum(), xg)
        if not torch.isfinite(g).all():
            raise CXRInputError("the energy has no usable gradient with respect to the latent.", input_name="unet",
                                fix="Use a float16/32 SD-family UNet, or refine with 0 iterations.")
        return e.detach(), (g if self.mask is None else g * self.mask).detach()

    def refine_step(self, refine: Refinement, x: torch.Tensor, sigma: float, stop: float | None, i: int) -> tuple:
        x_before = x
        energies: list[float] = []
        done, current = 0, False
        for _ in range(refine.config.iterations):
            e, g = self.energy(refine, x, sigma, grad=True)
            energies.append(float(e.mean()))
            if stop is not None and energies[-1] <= stop:
                current = True
                break
            x = refinement_step(x, g, sigma, refine.config.step_size).to(x.dtype)
            done += 1
        if not current:  # the energy after the last step (or, at 0 iterations, of the unrefined latent)
            energies.append(float(self.energy(refine, x, sigma, grad=False)[0].mean()))
        logger.debug("CXR refinement step %d (sigma %.3f): energy %.4f → %.4f", i, sigma, energies[0], energies[-1])
        return x, {"step": i, "sigma": sigma, "energies": energies, "before": energies[0], "after": energies[-1],
                   "iterations": done, "latent_before": x_before.detach().cpu(), "latent_after": x.detach().cpu()}


def img2img(regulation: Regulation, source: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor,
            noise: torch.Tensor, *, uncond: torch.Tensor | None = None, guidance_scale: float = 7.5,
            edit_mask: torch.Tensor | None = None, refine: Refinement | None = None,
            schedule: DiscreteSchedule | None = None,
            callback: Callable[[int, float, torch.Tensor], None] | None = None) -> EditResult:
    """Edit ``source`` with the regulated UNet: Euler steps along ``sigmas``, keep region, refinement.

    Args:
        regulation: the CXR processors on the UNet (:func:`.host_diffusers.install_regulation`; empty
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
    window, stops = [], []
    if refine is not None:
        c = refine.config
        hi, lo = schedule.percent_to_sigma(c.start_percent), schedule.percent_to_sigma(c.end_percent)
        window = [i for i in range(len(values) - 1) if lo <= values[i] <= hi]
        stops = [(schedule.percent_to_sigma(p), e) for p, e in c.thresholds]
    x = noised(source, ed.noise, values[0], max_denoise(schedule, values[0]))
    for i, (sigma, nxt) in enumerate(zip(values, values[1:], strict=False)):
        if callback is not None:
            callback(i, sigma, x)
        if refine is not None and i in window:
            stop = next((e for s, e in reversed(stops) if sigma <= s), None)
            x, entry = ed.refine_step(refine, x, sigma, stop, i)
            result.refine.append(entry)
        denoised = ed.denoise(x, sigma)
        x = x + (x - denoised) / sigma * (nxt - sigma)
    if mask is not None:  # cells kept in full get the source bit for bit (ComfyUI: Paste Keep Region)
        x = torch.where(mask == 0, source, x)
    result.latent = x
    return result


__all__ = ["EditResult", "Refinement", "energy_layers", "img2img", "latent_mask"]

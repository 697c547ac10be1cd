"""Latent refinement by attention-concentration energy: the ``sampler_function`` behind CXR Refinement Sampler.

A MODEL patch cannot change the latent the sampler carries, so refinement is a sampler of our own: Euler
steps (``sample_euler`` without churn, so 0 iterations is exactly plain Euler) and, at the steps whose
sigma lies in the window, gradient steps on the latent that lower the energy of ``attention/refinement.py``.

The gradient pass (cond only) differentiates through the UNet's encoder up to the last cross-attention
layer at the energy's grid and no further: our own capture replaces sit on those layers (wrapping
whatever replace was there, ours or another pack's) and raise ``_Stop`` after the last one. ComfyUI
runs nodes under ``torch.inference_mode()``, and its loaded weights are inference tensors autograd cannot
save, so the pass runs with ``inference_mode(False)`` + ``enable_grad()`` and ``torch.func.functional_call``
substitutes clones of only the weights on that path. The clones are made at the first refined step and
dropped when the window ends (never alive after sampling); their size goes to the run's record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.samplers
import comfy.utils
import torch
from comfy.k_diffusion.sampling import to_d
from tqdm.auto import trange

from ..attention.kernels import to_heads
from ..attention.layer_call import active_stages, cross_bias, pathology_maps
from ..attention.organs import OrganMasks
from ..attention.refinement import RefineConfig, concentration_energy, grid_at, refinement_step
from ..attention.regions import coverage
from ..attention.run_state import Key, ResultStore, latent_fingerprint
from ..errors import CXRInputError
from ..hosts.comfy.patch import HOLDER_KEY, CXRReplace
from ..hosts.comfy.unet_layout import grid_factor_keys

logger = logging.getLogger("cxr_counterfactual")
TITLE = "CXR Refinement Sampler (Euler)"


class _Stop(Exception):
    """Raised after the last layer the energy needs: the rest of the UNet is not run."""


def energy_keys(dm, grid_factor: int) -> list[Key]:
    """The encoder cross-attention layers the energy reads: the input blocks at the grid latent ÷ ``grid_factor``,
    else the middle block at that grid (SD1.5's latent ÷ 8). One rule, applied by CXR Refinement Sampler when it
    executes with the model connected and again when sampling starts (the model the sampler really got).

    Raises:
        CXRInputError: neither exists (input ``grid_factor``).
    """
    try:
        return grid_factor_keys(dm, grid_factor, TITLE, blocks=("input",), where="UNet's encoder")
    except CXRInputError as err:
        if err.input_name != "grid_factor":
            raise
        try:
            return grid_factor_keys(dm, grid_factor, TITLE, blocks=("middle",), where="UNet's middle block")
        except CXRInputError:
            raise err from None  # the encoder's grids are the ones to name


def energy_layers(dm, latent: tuple[int, int], grid_factor: int) -> tuple[list[Key], tuple[int, int]]:
    """:func:`energy_keys` and their grid for this latent, ``ceil(latent / grid_factor)``."""
    keys = energy_keys(dm, grid_factor)
    return keys, grid_at(latent, grid_factor.bit_length() - 1)


def path_parameters(dm, keys: list[Key]) -> dict[str, torch.Tensor]:
    """Clones (ordinary tensors, no grad) of the weights the encoder runs up to the last of ``keys``."""
    last = max(k[1] for k in keys if k[0] == "input") if keys[0][0] == "input" else len(dm.input_blocks) - 1
    prefixes = ("time_embed.", "label_emb.", *(f"input_blocks.{i}." for i in range(last + 1)))
    if keys[0][0] == "middle":
        prefixes += ("middle_block.",)
    with torch.inference_mode(False):
        return {f"dm.{n}": p.detach().clone() for n, p in dm.named_parameters() if n.startswith(prefixes)}


class _Runner(torch.nn.Module):
    """Holds the UNet so functional_call can substitute its path weights while ``fn`` runs."""

    def __init__(self, dm: torch.nn.Module) -> None:
        super().__init__()
        self.dm = dm  # registered as a submodule: its parameter names get the prefix "dm."

    def forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()


class _Capture:
    """A cross-attention replace for one energy layer: records the pathology map, then attends as before."""

    def __init__(self, key: Key, inner, columns: Callable[[int], torch.Tensor], maps: list, last: bool):
        self.key, self.inner, self.columns, self.maps, self.last = key, inner, columns, maps, last

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        heads = extra["n_heads"]
        h, w = (int(n) for n in extra["activations_shape"][-2:])
        bias = None
        if isinstance(self.inner, CXRReplace):  # boosted/gated models: the maps the model really uses
            sigma = float(extra["sigmas"].max())
            latent = tuple(int(n) for n in extra["original_shape"][-2:])
            active = active_stages(self.inner.stages, self.key, sigma)
            bias = cross_bias(active, h, w, latent, k.shape[1], q.device)
        self.maps.append(pathology_maps(to_heads(q, heads), to_heads(k, heads), bias, self.columns(k.shape[1]), h, w))
        if self.last:
            raise _Stop
        if self.inner is not None:  # attend exactly as the model would (our gate/boost, or another pack's)
            return self.inner(q, k, v, extra)
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"),
                                                   transformer_options=extra)


class RefinementSampler:
    """The ``sampler_function`` of our KSAMPLER: Euler steps with energy refinement inside the window."""

    def __init__(self, config: RefineConfig, target: OrganMasks, positions: dict[str, tuple[int, ...]],
                 cond_len: int, grid_factor: int) -> None:
        self.config, self.target, self.positions = config, target, positions
        self.cond_len, self.grid_factor = cond_len, grid_factor
        self.store = ResultStore()
        self._inside: dict = {}

    def __deepcopy__(self, memo: dict) -> RefinementSampler:
        return self  # immutable settings; the store is shared on purpose

    def columns(self, context_len: int) -> torch.Tensor:
        reps = context_len // self.cond_len
        return torch.tensor([p + self.cond_len * j for idx in self.positions.values() for p in idx
                             for j in range(reps)], dtype=torch.long)

    def inside(self, grid: tuple[int, int], latent: tuple[int, int]) -> torch.Tensor:
        key = (grid, latent)
        if key not in self._inside:
            cells = coverage(self.target, self.target.names, grid[0], grid[1], latent=latent)
            if not cells.any():
                raise CXRInputError(f"the target covers no cell of the {grid[0]}×{grid[1]} energy grid.", node=TITLE,
                                    input_name="target_organs",
                                    fix="Use a larger target, a smaller grid_factor, or a larger image.")
            self._inside[key] = cells
        return self._inside[key]

    def energy(self, model_k, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict, params: dict | None):
        """Energy ``[B]`` at ``x`` (and its gradient when ``params``, the path weight clones, are given)."""
        guider = model_k.inner_model
        base, dm = guider.inner_model, guider.inner_model.diffusion_model
        keys, grid = energy_layers(dm, tuple(x.shape[-2:]), self.grid_factor)
        opts = comfy.model_patcher.create_model_options_clone(extra_args.get("model_options", {}))
        to = opts.setdefault("transformer_options", {})
        # A probe, not a model call of the run: without the per-run holder, the stages still regulate attention
        # but captures and the trace do not record it (a capture under grad would also keep this pass's graph,
        # and with it the weight clones, alive in the run's record).
        to.pop(HOLDER_KEY, None)
        replace = dict(to.get("patches_replace", {}))
        attn2 = dict(replace.get("attn2", {}))
        maps: list[torch.Tensor] = []
        for key in keys:
            attn2[key] = _Capture(key, attn2.get(key) or attn2.get(key[:2]), self.columns, maps, key == keys[-1])
        replace["attn2"] = attn2
        to["patches_replace"] = replace
        mask = extra_args.get("denoise_mask")
        c = self.config
        with torch.inference_mode(False), torch.set_grad_enabled(params is not None):
            xg = x.detach().clone().requires_grad_(params is not None)
            s = sigma.detach().clone() * x.new_ones([x.shape[0]])
            xin = xg
            if mask is not None:  # what KSamplerX0Inpaint feeds the model: the kept region from the source
                # The mask, noise and source come from the sampler's inference-mode setup: autograd may not save
                # inference tensors, so it gets plain copies (latent-sized, freed with this call).
                mask = mask.clone()
                src = base.scale_latent_inpaint(x=xg, sigma=s, noise=model_k.noise.clone(),
                                                latent_image=model_k.latent_image.clone())
                xin = xg * mask + src * (1 - mask)

            def run():
                return comfy.samplers.calc_cond_batch(base, [guider.conds.get("positive")], xin, s, opts)
            try:
                try:
                    torch.func.functional_call(_Runner(dm), params or {}, (run,), strict=False)
                except _Stop:
                    pass
                if not maps:
                    raise RuntimeError("no pathology attention map was produced")
                m = torch.stack(maps).mean(0)
                m = m.reshape(-1, x.shape[0], *grid).mean(0)  # several cond chunks: average them
                e = concentration_energy(m, self.inside(grid, tuple(x.shape[-2:])).to(m.device),
                                         smoothing=c.smoothing, extent_weight=c.extent_weight,
                                         extent_threshold=c.extent_threshold, extent_sharpness=c.extent_sharpness)
                if params is None:
                    return e.detach(), None
                (grad,) = torch.autograd.grad(e.sum(), xg, allow_unused=True)
            except RuntimeError as err:  # (CXRInputError is a ValueError: it passes through)
                raise CXRInputError(f"the model cannot be differentiated for refinement ({err}).", node=TITLE,
                                    input_name="model", fix="Use a float16/32 checkpoint without patches that keep "
                                    "inference tensors, or set iterations to 0.") from None
        if grad is None or not torch.isfinite(grad).all():  # e.g. maps that do not depend on the latent
            raise CXRInputError("the energy has no usable gradient with respect to the latent.", node=TITLE,
                                input_name="model", fix="Use an SD-family UNet checkpoint, or set iterations to 0.")
        grad = grad if mask is None else grad * mask  # refine only where the sampler may change the latent
        return e.detach(), grad.detach()

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        """Euler (as ``sample_euler`` without churn) with refinement before each step inside the window."""
        extra_args, c = ({} if extra_args is None else extra_args), self.config
        base = model.inner_model.inner_model
        sampling = base.model_sampling
        hi, lo = float(sampling.percent_to_sigma(c.start_percent)), float(sampling.percent_to_sigma(c.end_percent))
        stops = [(float(sampling.percent_to_sigma(p)), e) for p, e in c.thresholds]
        window = [i for i in range(len(sigmas) - 1) if lo <= float(sigmas[i]) <= hi]
        # Settings that cannot work are refused here, before the first model call of this run: the grid (the
        # node checks it too when its model input is connected) and a window that holds none of the steps.
        energy_keys(base.diffusion_model, self.grid_factor)
        if c.iterations and not window:
            raise CXRInputError(
                f"the window {c.start_percent:g}–{c.end_percent:g} (sigma {hi:.4g} down to {lo:.4g}) holds none of the "
                f"sampler's {len(sigmas) - 1} steps (sigma {float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}).",
                node=TITLE, input_name="end_percent",
                fix="Widen the window so it overlaps the steps (e.g. after an inversion that starts at 0.5, "
                "end_percent above 0.5), or set iterations to 0.")
        record = self.store.new_run()
        record["refine"] = []  # also shared with the model's RunState record, when the model has one
        state = extra_args.get("model_options", {}).get("transformer_options", {}).get(HOLDER_KEY)
        if state is not None:
            state.record["refine"] = record["refine"]
        bar = comfy.utils.ProgressBar(c.iterations * len(window)) if c.iterations and window else None
        params = None
        s_in = x.new_ones([x.shape[0]])
        for i in trange(len(sigmas) - 1, disable=disable):
            sigma = sigmas[i]
            if i in window:
                if params is None and c.iterations:
                    dm = base.diffusion_model
                    params = path_parameters(dm, energy_layers(dm, tuple(x.shape[-2:]), self.grid_factor)[0])
                    record["weights_copied_mb"] = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
                x = self._refine(model, x, sigma, extra_args, params, record, i, stops, bar)
            elif params is not None and i > window[-1]:
                params = None  # the window is over: drop the weight clones
            denoised = model(x, sigma * s_in, **extra_args)
            d = to_d(x, sigma, denoised)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma, "denoised": denoised})
            x = x + d * (sigmas[i + 1] - sigma)
        del params
        out = base.process_latent_out(sampling.inverse_noise_scaling(sigmas[-1], x).to(torch.float32))
        record["latent"] = latent_fingerprint(out)  # the preview finds this run by the latent it produced
        return x

    def _refine(self, model, x, sigma, extra_args, params, record, i, stops, bar) -> torch.Tensor:
        c, x_before, stop = self.config, x, None
        for s_sig, e in stops:
            if float(sigma) <= s_sig:
                stop = e
        energies: list[float] = []
        done, current = 0, False  # current: energies[-1] was measured at this x
        for _ in range(c.iterations):
            e, grad = self.energy(model, x, sigma, extra_args, params)
            energies.append(float(e.mean()))
            if stop is not None and energies[-1] <= stop:
                current = True
                break
            # the step follows the gradient whatever the energy does next: no search, nothing discarded
            x = refinement_step(x, grad, float(sigma), c.step_size).to(x.dtype)
            done += 1
            if bar is not None:
                bar.update(1)
        if bar is not None and done < c.iterations:
            bar.update(c.iterations - done)
        if not current:  # the energy after the last step (or, at 0 iterations, of the unrefined latent)
            energies.append(float(self.energy(model, x, sigma, extra_args, None)[0].mean()))
        record["refine"].append({"step": i, "sigma": float(sigma), "energies": energies, "before": energies[0],
                                 "after": energies[-1], "iterations": done,
                                 "latent_before": x_before.detach().cpu(), "latent_after": x.detach().cpu()})
        logger.debug("CXR refinement step %d (sigma %.3f): energy %.4f → %.4f", i, float(sigma), energies[0],
                     energies[-1])
        return x

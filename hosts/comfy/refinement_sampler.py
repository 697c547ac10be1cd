"""Latent refinement by attention-concentration energy in ComfyUI: the ``sampler_function`` behind CXR Refinement
Sampler (the node is :mod:`..nodes.refinement`; the loop, its window and its record are the core's,
:mod:`...attention.refinement`).

A MODEL patch cannot change the latent the sampler carries, so refinement is a sampler of our own: Euler
steps (``sample_euler`` without churn, so 0 iterations is exactly plain Euler) and, at the steps whose
sigma lies in the window, the core's :func:`~...attention.refinement.refine_step` on the latent.

The energy pass (cond only) differentiates through the UNet's encoder up to the last cross-attention
layer at the energy's grid and no further: our own capture replaces sit on those layers (wrapping
whatever replace was there, ours or another pack's) and raise ``_Stop`` after the last one. ComfyUI
runs nodes under ``torch.inference_mode()``, and its loaded weights are inference tensors autograd cannot
save, so ``torch.func.functional_call`` substitutes clones of only the weights on that path. The clones are
made at the first refined step and dropped when the window ends (never alive after sampling); their size goes
to the run's record.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.samplers
import comfy.utils
import torch
from comfy.k_diffusion.sampling import to_d
from tqdm.auto import trange

from ...attention.kernels import to_heads
from ...attention.layer_call import probe_map
from ...attention.refinement import Energy, Refinement, grid_at, refine_step, refine_window
from ...attention.run_record import RunRecord
from ...attention.run_state import ResultStore, latent_fingerprint
from ...attention.stages import Key
from ...errors import CXRInputError
from .patch import HOLDER_KEY, CXRReplace
from .unet_layout import grid_factor_keys

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
        latent = (int(extra["original_shape"][-2]), int(extra["original_shape"][-1]))
        # boosted/gated models: the maps the model really uses (the biases of our stages active here)
        stages = self.inner.stages if isinstance(self.inner, CXRReplace) else ()
        self.maps.append(probe_map(stages, self.key, float(extra["sigmas"].max()), to_heads(q, heads),
                                   to_heads(k, heads), h, w, latent, self.columns(k.shape[1])))
        if self.last:
            raise _Stop
        if self.inner is not None:  # attend exactly as the model would (our gate/boost, or another pack's)
            return self.inner(q, k, v, extra)
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"),
                                                   transformer_options=extra)


class RefinementSampler:
    """The ``sampler_function`` of our KSAMPLER: Euler steps with energy refinement inside the window."""

    def __init__(self, refinement: Refinement) -> None:
        self.refinement = refinement
        self.store = ResultStore()

    def __deepcopy__(self, memo: dict) -> RefinementSampler:
        return self  # immutable settings; the store is shared on purpose

    def energy(self, model_k, sigma: torch.Tensor, extra_args: dict, params: dict | None) -> Energy:
        """The energy at ``sigma`` of this sampler's model: the positive prompt's pathology maps at the energy
        layers, read through the path weight clones ``params`` when the latent requires grad."""
        guider = model_k.inner_model
        base, dm = guider.inner_model, guider.inner_model.diffusion_model
        ref = self.refinement
        opts = comfy.model_patcher.create_model_options_clone(extra_args.get("model_options", {}))
        to = opts.setdefault("transformer_options", {})
        # A probe, not a model call of the run: without the per-run holder, the stages still regulate attention
        # but captures and the trace do not record it (a capture under grad would also keep this pass's graph,
        # and with it the weight clones, alive in the run's record).
        to.pop(HOLDER_KEY, None)
        denoise_mask = extra_args.get("denoise_mask")

        def energy(x: torch.Tensor) -> torch.Tensor:
            latent = (int(x.shape[-2]), int(x.shape[-1]))
            keys, _ = energy_layers(dm, latent, ref.grid_factor)
            replace = dict(to.get("patches_replace", {}))
            attn2 = dict(replace.get("attn2", {}))
            maps: list[torch.Tensor] = []
            for key in keys:
                attn2[key] = _Capture(key, attn2.get(key) or attn2.get(key[:2]), ref.columns, maps, key == keys[-1])
            call_opts = {**opts, "transformer_options": {**to, "patches_replace": {**replace, "attn2": attn2}}}
            s = sigma.detach().clone() * x.new_ones([x.shape[0]])
            xin = x
            if denoise_mask is not None:  # what KSamplerX0Inpaint feeds the model: the kept region from the source
                # The mask, noise and source come from the sampler's inference-mode setup: autograd may not save
                # inference tensors, so it gets plain copies (latent-sized, freed with this call).
                mask = denoise_mask.clone()
                src = base.scale_latent_inpaint(x=x, sigma=s, noise=model_k.noise.clone(),
                                                latent_image=model_k.latent_image.clone())
                xin = x * mask + src * (1 - mask)

            def run():
                return comfy.samplers.calc_cond_batch(base, [guider.conds.get("positive")], xin, s, call_opts)
            try:
                torch.func.functional_call(_Runner(dm), (params if x.requires_grad else None) or {}, (run,),
                                           strict=False)
            except _Stop:
                pass
            return ref.energy(maps, x.shape[0], latent, TITLE)
        return energy

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        """Euler (as ``sample_euler`` without churn) with refinement before each step inside the window."""
        extra_args, ref = ({} if extra_args is None else extra_args), self.refinement
        c = ref.config
        base = model.inner_model.inner_model
        sampling = base.model_sampling
        window = refine_window(c, sampling.percent_to_sigma, [float(s) for s in sigmas])
        # Settings that cannot work are refused here, before the first model call of this run: the grid (the
        # node checks it too when its model input is connected) and a window that holds none of the steps.
        energy_keys(base.diffusion_model, ref.grid_factor)
        if window.steps:  # and a target that covers no cell of the energy grid
            latent = (int(x.shape[-2]), int(x.shape[-1]))
            ref.cells(energy_layers(base.diffusion_model, latent, ref.grid_factor)[1], latent, TITLE)
        if c.iterations and not window.steps:
            raise CXRInputError(
                f"the window {c.start_percent:g}–{c.end_percent:g} (sigma {window.sigma_start:.4g} down to "
                f"{window.sigma_end:.4g}) holds none of the sampler's {len(sigmas) - 1} steps (sigma "
                f"{float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}).", node=TITLE, input_name="end_percent",
                fix="Widen the window so it overlaps the steps (e.g. after an inversion that starts at 0.5, "
                "end_percent above 0.5), or set iterations to 0.")
        record = self.store.new_run()
        record.refine = []  # also shared with the model's RunState record, when the model has one
        state = extra_args.get("model_options", {}).get("transformer_options", {}).get(HOLDER_KEY)
        if state is not None:
            state.record.refine = record.refine
        bar = comfy.utils.ProgressBar(c.iterations * len(window.steps)) if c.iterations and window.steps else None
        params = None
        s_in = x.new_ones([x.shape[0]])
        for i in trange(len(sigmas) - 1, disable=disable):
            sigma = sigmas[i]
            if i in window.steps:
                if params is None and c.iterations:
                    dm = base.diffusion_model
                    params = path_parameters(dm, energy_layers(dm, tuple(x.shape[-2:]), ref.grid_factor)[0])
                    record.weights_copied_mb = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
                x = self._refine(model, x, sigma, extra_args, params, record, i, window, bar)
            elif params is not None and i > window.steps[-1]:
                params = None  # the window is over: drop the weight clones
            denoised = model(x, sigma * s_in, **extra_args)
            d = to_d(x, sigma, denoised)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma, "denoised": denoised})
            x = x + d * (sigmas[i + 1] - sigma)
        del params
        out = base.process_latent_out(sampling.inverse_noise_scaling(sigmas[-1], x).to(torch.float32))
        record.latent = latent_fingerprint(out)  # the preview finds this run by the latent it produced
        return x

    def _refine(self, model, x, sigma, extra_args, params, record: RunRecord, i: int, window, bar) -> torch.Tensor:
        x, step = refine_step(self.energy(model, sigma, extra_args, params), x, float(sigma), self.refinement.config,
                              step=i, stop=window.stop_at(float(sigma)), edit_mask=extra_args.get("denoise_mask"),
                              progress=None if bar is None else bar.update, node=TITLE)
        assert record.refine is not None
        record.refine.append(step)
        return x

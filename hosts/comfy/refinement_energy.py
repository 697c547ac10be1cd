"""The refinement's energy pass in ComfyUI: the positive prompt's pathology maps at the energy layers, and their
energy as a differentiable function of the latent (the loop that steps down it is the core's
:func:`...attention.refinement.refine_step`; the sampler that calls it is :mod:`.refinement_sampler`).

The pass (cond only) differentiates through the UNet's encoder up to the last cross-attention layer at the energy's
grid and no further: our own capture replaces sit on those layers (wrapping whatever replace was there, ours or
another pack's) and raise ``_Stop`` after the last one. ComfyUI runs nodes under ``torch.inference_mode()``, and
its loaded weights are inference tensors autograd cannot save, so ``torch.func.functional_call`` substitutes clones
of only the weights on that path (:func:`path_parameters`).

ControlNet: ComfyUI runs a ControlNet (``cond["control"]``, and its ``previous_controlnet`` chain) on the same latent
before the UNet, so under grad its inference-tensor weights would be saved for backward and the pass would fail. Its
residuals enter an SD UNet only after the middle block and in the decoder's skip connections (``apply_control(...,
"middle" / "output")``), never in the encoder or the middle block's attention, which is all the energy reads. So
:func:`energy_function` by default computes them as constants (``control="constant"``: at the detached latent, no
grad), which gives the same gradient without a graph through the ControlNet; ``control="differentiate"`` runs it on
clones of its weights (:func:`control_parameters`), kept to measure that claim (benchmarks/controlnet_gradient.py).

A diffusion transformer's pass is :mod:`.dit_refinement` (the same four functions, over its joint blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.samplers
import torch

from ...attention.field import row_fields
from ...attention.kernels import to_heads
from ...attention.layer_call import active_stages, per_sample, probe_map
from ...attention.refinement import Energy, Refinement, grid_at
from ...attention.stages import Key
from ...errors import CXRInputError
from .cond_areas import HOLDER_KEY, chunk_fields
from .replace import CXRReplace
from .unet_layout import grid_factor_keys

TITLE = "CXR Refinement Sampler"

#: How the gradient pass treats a ControlNet's residuals (see the module docstring).
CONTROL_MODES = ("constant", "differentiate")


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


#: Storage dtypes ComfyUI can load UNet weights in (``UNETLoader`` weight_dtype, ``--fp8_*-unet``) that the gradient
#: pass does not compute with: their clones are upcast (:func:`path_parameters`).
FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


def path_parameters(dm, keys: list[Key], compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Clones (ordinary tensors, no grad) of the weights the encoder runs up to the last of ``keys``; float8 ones
    upcast to ``compute_dtype`` (the model's ``manual_cast_dtype``; None: float32).

    Why upcast fp8: ComfyUI's ops cast each fp8 weight to the compute dtype per call anyway (exactly: every float8
    value is representable in float16/bfloat16/float32), so the gradient pass sees the same weights; but with
    ``fp8_e4m3fn_fast`` (``comfy.ops.fp8_ops``) a Linear whose weight is float8 runs ``torch._scaled_mm``, which
    autograd cannot differentiate, while ``fp8_linear`` returns None for any other weight dtype and the layer takes
    the cast path. Under a partial (low-VRAM) load the clones of modules left offloaded are the unpatched weights:
    their ``weight_function`` (LoRA patches, ``comfy.model_patcher.LowVramPatch``) still applies to the clone in
    ComfyUI's per-layer cast, after the cast to the compute dtype, as in the sampling pass.
    """
    last = max(k[1] for k in keys if k[0] == "input") if keys[0][0] == "input" else len(dm.input_blocks) - 1
    prefixes = ("time_embed.", "label_emb.", *(f"input_blocks.{i}." for i in range(last + 1)))
    if keys[0][0] == "middle":
        prefixes += ("middle_block.",)
    upcast = compute_dtype or torch.float32
    with torch.inference_mode(False):
        return {f"dm.{n}": p.detach().to(upcast) if p.dtype in FP8_DTYPES else p.detach().clone()
                for n, p in dm.named_parameters() if n.startswith(prefixes)}


def control_models(conds: list[dict] | None) -> list[torch.nn.Module]:
    """The networks of every ControlNet in ``conds``' control chains (``cond["control"]`` and its
    ``previous_controlnet``s), each once, in chain order. T2I-Adapters have none: their residuals depend on the hint
    only."""
    nets: list[torch.nn.Module] = []
    for cond in conds or ():
        control = cond.get("control")
        while control is not None:
            net = getattr(control, "control_model", None)
            if isinstance(net, torch.nn.Module) and all(net is not n for n in nets):
                nets.append(net)
            control = getattr(control, "previous_controlnet", None)
    return nets


def control_parameters(model_k) -> dict[str, torch.Tensor]:
    """Clones (ordinary tensors, no grad) of the weights of every ControlNet on the positive prompt of the sampler's
    model ``model_k``, named as :func:`energy_function` substitutes them with ``control="differentiate"``. Like
    :func:`path_parameters`: made when the refinement window starts, dropped when it ends."""
    nets = control_models(model_k.inner_model.conds.get("positive"))
    with torch.inference_mode(False):
        return {f"controls.{i}.{n}": p.detach().clone() for i, net in enumerate(nets)
                for n, p in net.named_parameters()}


class _ConstantControl:
    """A ControlNet seen by the gradient pass: its residuals computed at the detached latent without grad."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        with torch.no_grad():
            return self.inner.get_control(x_noisy.detach(), t, cond, batched_number, transformer_options)


class _Runner(torch.nn.Module):
    """Holds the UNet (and the ControlNets) so functional_call can substitute weight clones while ``fn`` runs."""

    def __init__(self, dm: torch.nn.Module, controls: list[torch.nn.Module]) -> None:
        super().__init__()
        self.dm = dm  # registered as a submodule: its parameter names get the prefix "dm."
        self.controls = torch.nn.ModuleList(controls)  # "controls.<i>.", as control_parameters names them

    def forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()


class _Capture:
    """A cross-attention replace for one energy layer: records the pathology map, then attends as before."""

    def __init__(self, key: Key, inner, columns: Callable[[int], torch.Tensor], maps: list, last: bool):
        self.key, self.inner, self.columns, self.maps, self.last = key, inner, columns, maps, last

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        heads = extra["n_heads"]
        h, w = (int(n) for n in extra["activations_shape"][-2:])
        # boosted/gated models: the maps the model really uses (the biases of our stages active here), each row
        # with its field by the rule of the sampling pass (this pass has no per-run holder: the input is its own
        # latent, and row r of a chunk is image r % per where a stage holds one mask set per image)
        stages = self.inner.stages if isinstance(self.inner, CXRReplace) else ()
        sigma = float(extra["sigmas"].max())
        active = active_stages(stages, self.key, sigma)
        fields = row_fields(chunk_fields(extra), q.shape[0], per_sample(active))
        self.maps.append(probe_map(stages, self.key, sigma, to_heads(q, heads), to_heads(k, heads), h, w, fields,
                                   self.columns(k.shape[1])))
        if self.last:
            raise _Stop
        if self.inner is not None:  # attend exactly as the model would (our gate/boost, or another pack's)
            return self.inner(q, k, v, extra)
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"),
                                                   transformer_options=extra)



def energy_function(ref: Refinement, model_k, sigma: torch.Tensor, extra_args: dict, params: dict | None,
                    control: str = "constant") -> Energy:
    """The energy at ``sigma`` of the sampler's model ``model_k`` (the sampler function's model): the positive
    prompt's pathology maps at the energy layers of refinement ``ref``, read through the path weight clones
    ``params`` when the latent requires grad. ``control`` (:data:`CONTROL_MODES`): a ControlNet's residuals as
    constants, or differentiated through the clones of its weights, which ``params`` must then hold too
    (:func:`control_parameters`)."""
    if control not in CONTROL_MODES:
        raise ValueError(f"control must be one of {CONTROL_MODES}, not {control!r}")
    guider = model_k.inner_model
    positive = guider.conds.get("positive")
    nets = control_models(positive)
    # T2I-Adapters' residuals come from the hint alone (no latent, nothing to differentiate), but they are computed
    # at their first call, which may be this pass: under grad their inference-tensor weights would be saved for
    # backward. So they are constants in either mode; ControlNets too unless differentiated.
    positive = [{**c, "control": _ConstantControl(c["control"])}
                if c.get("control") is not None and (control == "constant" or not control_models([c])) else c
                for c in positive or ()]
    dm = guider.inner_model.diffusion_model
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
        probe_pass(model_k, positive, x, sigma, call_opts, params, denoise_mask, nets)
        return ref.energy(maps, x.shape[0], latent, TITLE)
    return energy


def probe_pass(model_k, positive: list, x: torch.Tensor, sigma: torch.Tensor, call_opts: dict, params: dict | None,
               denoise_mask: torch.Tensor | None, nets: list[torch.nn.Module]) -> None:
    """One positive-prompt model call of an energy pass (UNet or DiT) on the sampler's latent ``x``: the input
    KSamplerX0Inpaint would feed the model (the kept region from the source), through ``calc_cond_batch`` with
    ``call_opts`` (the captures), under ``functional_call`` with the path's weight clones ``params`` when ``x``
    requires grad; a capture's ``_Stop`` ends it after the last energy layer."""
    base = model_k.inner_model.inner_model
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
        return comfy.samplers.calc_cond_batch(base, [positive], xin, s, call_opts)
    try:
        torch.func.functional_call(_Runner(base.diffusion_model, nets), (params if x.requires_grad else None) or {},
                                   (run,), strict=False)
    except _Stop:
        pass

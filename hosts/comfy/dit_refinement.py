"""The refinement's energy pass on a diffusion transformer (MMDiT/SD3.5, Flux): the DiT counterpart of
:mod:`.refinement_energy`, with the same four functions (:func:`energy_keys`, :func:`energy_layers`,
:func:`path_parameters`, :func:`energy_function`) so the sampler and the node pick one module by the model
(:func:`energy_pass`).

Energy layers: the **first half of the joint (double) blocks**, ``max(1, n // 2)`` of ``n`` (SD3.5 Medium: 12 of
24; Flux: 9 of 19; the tiny test model: block 0 of 2), the analogue of a UNet's encoder, which the UNet's energy
reads. Each reads its joint call's image → text pathology map (the softmax over the text keys only, with the biases
of the stages active there: the maps the regulated model uses, as the DiT capture records them); the energy
averages them. Flux's single blocks come after every double block and are never read. The grid is the patch grid
(``grid_factor`` must equal the patch size, refused otherwise by :func:`.dit_stages.check_stage_on_dit`), and the
target's cells are the patches' (:meth:`...attention.refinement.Refinement.cells` with ``patch``).

The pass, as the UNet's: the positive prompt alone through ``comfy.samplers.calc_cond_batch`` under
``torch.func.functional_call`` with clones of only the weights on the path, the embedders and the blocks up to the
last energy block (:func:`path_parameters`: ComfyUI's weights are inference tensors autograd cannot save, so any
weight the gradient would need and that is not cloned fails the pass loudly rather than being skipped). A
:class:`_Capture` is the outermost ``optimized_attention_override``: it reads each energy block's joint call and
raises ``_Stop`` after the last one, before that block's outputs, so nothing after it runs. The model's own
:class:`.dit.BlockReplace` tags (the stages') stay; a model without them gets bare ones (:func:`.dit.install` with
no stage: every call stock), so the capture knows the block and where text ends.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from types import ModuleType

import comfy.model_patcher
import comfy.samplers
import torch

from ...attention.field import row_fields
from ...attention.kernels import to_heads
from ...attention.layer_call import active_stages, per_sample, probe_map
from ...attention.patch_grid import patch_grid
from ...attention.refinement import Energy, Refinement
from . import refinement_energy
from .cond_areas import HOLDER_KEY, chunk_fields
from .dit import CALL_KEY, DitCall, dit_family, install
from .dit_stages import block_counts, check_stage_on_dit, regulate
from .refinement_energy import FP8_DTYPES, TITLE, _ConstantControl, _Stop, probe_pass

Block = tuple[str, int]


def is_dit(dm) -> bool:
    """True for a supported diffusion transformer, False for a UNet.

    Raises:
        CXRInputError: neither (naming the supported families).
    """
    if hasattr(dm, "input_blocks") or hasattr(dm, "middle_block"):
        return False
    dit_family(dm)
    return True


def energy_pass(dm) -> ModuleType:
    """The module whose ``energy_keys`` / ``energy_layers`` / ``path_parameters`` / ``energy_function`` fit ``dm``:
    this one for a DiT, :mod:`.refinement_energy` for a UNet (whose behaviour stays its own)."""
    return sys.modules[__name__] if is_dit(dm) else refinement_energy


def energy_keys(dm, grid_factor: int) -> list[Block]:
    """The energy blocks (module docstring): ``("double_block", i)`` for the first half of the joint blocks.

    Raises:
        CXRInputError: ``grid_factor`` is not the model's patch size (input ``grid_factor``).
    """
    check_stage_on_dit(dm, TITLE, grid_factor=grid_factor)
    blocks, _ = block_counts(dm)
    return [("double_block", i) for i in range(max(1, blocks // 2))]


def energy_layers(dm, latent: tuple[int, int], grid_factor: int) -> tuple[list[Block], tuple[int, int]]:
    """:func:`energy_keys` and their grid for this latent: the patch grid ``ceil(latent / patch)``."""
    return energy_keys(dm, grid_factor), patch_grid(latent, int(dm.patch_size))


def path_parameters(dm, keys: list[Block], compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Clones (ordinary tensors, no grad) of the weights the DiT runs up to the last of ``keys``: every weight but
    the later joint/double blocks', Flux's single blocks' and the final layer's (fp8 ones upcast as for the UNet,
    :func:`.refinement_energy.path_parameters`)."""
    last = max(i for _, i in keys)
    blocks, _ = block_counts(dm)
    name = "joint_blocks" if dit_family(dm) == "mmdit" else "double_blocks"
    later = (*(f"{name}.{i}." for i in range(last + 1, blocks)), "single_blocks.", "final_layer.")
    upcast = compute_dtype or torch.float32
    with torch.inference_mode(False):
        return {f"dm.{n}": p.detach().to(upcast) if p.dtype in FP8_DTYPES else p.detach().clone()
                for n, p in dm.named_parameters() if not n.startswith(later)}


class _Capture:
    """The outermost attention override of the energy pass: records each energy block's pathology map from its
    joint call, raises ``_Stop`` after the last one, and hands every call on to the override below (ours, with
    the stages, or another pack's) so the blocks before attend exactly as the model would."""

    def __init__(self, blocks: list[Block], inner, columns, maps: list):
        self.blocks, self.inner, self.columns, self.maps = set(blocks), inner, columns, maps
        self.last = max(blocks, key=lambda b: b[1])

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        call = options.get(CALL_KEY)
        if isinstance(call, DitCall) and call.block in self.blocks and kwargs.get("mask") is None:
            q, k = args[:2]
            heads_layout = bool(kwargs.get("skip_reshape", False))
            if (q.shape[2] if heads_layout else q.shape[1]) == call.text_len + call.image_len:  # the joint call
                heads = args[3] if len(args) > 3 else kwargs["heads"]
                qh, kh = (x if heads_layout else to_heads(x.reshape(x.shape[0], x.shape[1], -1), heads)
                          for x in (q, k))
                self._record(call, options, qh, kh)
                if call.block == self.last:
                    raise _Stop
        return self.inner(func, *args, **kwargs)

    def _record(self, call: DitCall, options: dict, qh: torch.Tensor, kh: torch.Tensor) -> None:
        # the key and fields by dit_stages.regulate's rule: the maps the regulated model uses at this call
        key = (*call.block, 0)
        sigma = float(options["sigmas"].max())
        active = active_stages(call.stages, key, sigma)
        fields = [replace(f, patch=call.patch)
                  for f in row_fields(chunk_fields(options), qh.shape[0], per_sample(active))]
        h, w = patch_grid(fields[0].size, call.patch)
        t, i = call.layout.text, call.layout.image
        self.maps.append(probe_map(call.stages, key, sigma, qh[:, :, i], kh[:, :, t], h, w, fields,
                                   self.columns(call.text_len)))


class _Unchecked:
    """The energy pass's outermost replace of an MMDiT joint block up to the last energy block: the block replaces
    below it (ours, another pack's) run as they would, but ComfyUI's own block at the end of the chain runs without
    gradient checkpointing. ComfyUI 0.3.64 runs a *replaced* joint block through ``JointBlock.forward``'s default
    ``use_checkpoint=True`` (``mmdit.py`` ``block_wrap`` and ``block_mixing``; an unreplaced block gets the model's
    ``use_checkpoint``, False), which under grad recomputes the block in the backward pass, after
    ``functional_call`` has put ComfyUI's inference-tensor weights back: the pass would fail. The outputs are the
    same; only what autograd keeps differs."""

    def __init__(self, block: torch.nn.Module, inner):
        self.block, self.inner = block, inner

    def __call__(self, args: dict, extra: dict) -> dict:
        def original(a: dict) -> dict:
            txt, img = self.block(a["txt"], a["img"], c=a["vec"], use_checkpoint=False,
                                  transformer_options=a["transformer_options"])
            return {"txt": txt, "img": img}
        return self.inner(args, {**extra, "original_block": original})


def _unchecked(to: dict, dm, keys: list[Block]) -> dict:
    """``transformer_options`` whose MMDiT joint blocks up to the last of ``keys`` run as :class:`_Unchecked`
    (Flux's blocks never checkpoint: unchanged)."""
    if dit_family(dm) != "mmdit":
        return to
    replaces = dict(to.get("patches_replace", {}))
    dit = dict(replaces.get("dit", {}))
    for i in range(max(i for _, i in keys) + 1):
        dit[("double_block", i)] = _Unchecked(dm.joint_blocks[i], dit[("double_block", i)])
    return {**to, "patches_replace": {**replaces, "dit": dit}}


def energy_function(ref: Refinement, model_k, sigma: torch.Tensor, extra_args: dict, params: dict | None,
                    control: str = "constant") -> Energy:
    """The energy at ``sigma`` of the sampler's DiT model ``model_k``, as :func:`.refinement_energy.energy_function`
    for a UNet. A ControlNet's residuals are constants (computed at the detached latent): a DiT ControlNet adds them
    to the blocks' image tokens, so ``control="differentiate"`` is not offered here (ValueError)."""
    if control != "constant":
        raise ValueError("a diffusion transformer's refinement treats ControlNet residuals as constants")
    guider = model_k.inner_model
    positive = [{**c, "control": _ConstantControl(c["control"])} if c.get("control") is not None else c
                for c in guider.conds.get("positive") or ()]
    dm = guider.inner_model.diffusion_model
    blocks, singles = block_counts(dm)
    opts = comfy.model_patcher.create_model_options_clone(extra_args.get("model_options", {}))
    # bare block tags where the model has none (a stock model); ours with their stages stay as they are
    opts = install(opts, blocks, regulate, singles, patch=int(dm.patch_size))
    to = opts["transformer_options"]
    to.pop(HOLDER_KEY, None)  # a probe, not a model call of the run (see refinement_energy.energy_function)
    denoise_mask = extra_args.get("denoise_mask")

    def energy(x: torch.Tensor) -> torch.Tensor:
        latent = (int(x.shape[-2]), int(x.shape[-1]))
        keys, _ = energy_layers(dm, latent, ref.grid_factor)
        maps: list[torch.Tensor] = []
        # the rows' field is the input's own latent (no per-run holder), which a DiT does not hand its blocks
        call_to = {**_unchecked(to, dm, keys), "original_shape": list(x.shape),
                   "optimized_attention_override": _Capture(keys, to["optimized_attention_override"], ref.columns,
                                                            maps)}
        call_opts = {**opts, "transformer_options": call_to}
        probe_pass(model_k, positive, x, sigma, call_opts, params, denoise_mask, [])
        return ref.energy(maps, x.shape[0], latent, TITLE, patch=int(dm.patch_size))
    return energy

"""Checks of the ControlNets / T2I-Adapters in a run's conditioning that must hold before sampling starts.

Called with the guider's conds when a run of a model that carries our stages starts (``outer_sample_wrapper`` in
:mod:`.patch`) and by the refinement sampler, so a control that cannot act on this model as the user expects is a
clear error before the first model call instead of a failure or a silent no-op mid-sampling. Each check is its own
function; :func:`check_controls` runs them all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ...errors import CXRInputError

#: ComfyUI's node that attaches a ControlNet or T2I-Adapter (``ControlNetApplyAdvanced``), as its menu names it.
APPLY_CONTROLNET = "Apply ControlNet"
CONTROL_INPUT = "control_net"


def check_controls(conds: Mapping[str, Sequence[dict]] | None, latent_shape: Sequence[int], diffusion_model) -> None:
    """Every check of the controls in ``conds`` (the guider's ``{"positive": [...], "negative": [...]}``) against the
    latent (``[B, C, H, W]``) and the model's UNet ``diffusion_model``, before sampling starts.

    Raises:
        CXRInputError: the first control that cannot work as the user expects.
    """
    check_controlnet_hints(conds, latent_shape)
    for control in _controls(conds):
        check_t2i_adapter_fits(control, diffusion_model)


def _controls(conds: Mapping[str, Sequence[dict]] | None) -> Iterator[object]:
    """Every control object of every cond (each chain walked through ``previous_controlnet``), each once."""
    seen: list[object] = []
    for cond_list in (conds or {}).values():
        for cond in cond_list or ():
            control = cond.get("control") if isinstance(cond, Mapping) else None
            while control is not None:
                if all(control is not c for c in seen):
                    seen.append(control)
                    yield control
                control = getattr(control, "previous_controlnet", None)


# --------------------------------------------------------------------------------------------------
# ControlNet
def _centre_crop(hint: tuple[int, int], image: tuple[int, int]) -> tuple[int, int]:
    """Pixels ComfyUI's ``common_upscale(..., "center")`` cuts from each side of a ``hint`` (height, width) resized to
    ``image``: ``(rows, columns)``, its own formula."""
    (hh, hw), (ih, iw) = hint, image
    old, new = hw / hh, iw / ih
    if old > new:
        return 0, round((hw - hw * (new / old)) / 2)
    if old < new:
        return round((hh - hh * (old / new)) / 2), 0
    return 0, 0


def check_controlnet_hints(conds: Mapping[str, Sequence[dict]] | None, latent_shape: Sequence[int]) -> None:
    """Refuse a ControlNet whose hint image ComfyUI would centre-crop to the latent's image size.

    ComfyUI resizes the hint to the latent's image (latent × the ControlNet's compression ratio, × its VAE's when it
    encodes the hint) with a centre crop when the aspect ratios differ: the anatomy the ControlNet sees then no longer
    lies under the organ masks. A hint of the same aspect at another resolution is only rescaled (aligned) and passes.

    Raises:
        CXRInputError: naming ComfyUI's "Apply ControlNet" node and its ``image`` input.
    """
    import comfy.controlnet

    latent = (int(latent_shape[-2]), int(latent_shape[-1]))
    for control in _controls(conds):
        hint = getattr(control, "cond_hint_original", None)
        if not isinstance(control, comfy.controlnet.ControlNet) or hint is None or hint.ndim < 4:
            continue
        ratio = int(control.compression_ratio)
        if control.vae is not None:
            ratio *= int(control.vae.spacial_compression_encode())
        image = (latent[0] * ratio, latent[1] * ratio)
        size = (int(hint.shape[-2]), int(hint.shape[-1]))
        rows, cols = _centre_crop(size, image)
        if rows or cols:
            cut = f"{2 * rows} rows" if rows else f"{2 * cols} columns"
            raise CXRInputError(
                f"the ControlNet's hint image is {size[1]}×{size[0]} px but the latent's image is "
                f"{image[1]}×{image[0]} px: ComfyUI would centre-crop {cut} off the hint to fit, so the anatomy it "
                "conditions on would no longer lie under the organ masks.", node=APPLY_CONTROLNET, input_name="image",
                fix="Give Apply ControlNet the radiograph as CXR Fit Radiograph outputs it (the image the latent was "
                "encoded from), or a hint made from that image at its size or the same aspect ratio.")


# --------------------------------------------------------------------------------------------------
# T2I-Adapter
def adapter_feature_points(adapter: Any) -> tuple[list[tuple[int, int, int]], tuple[int, int] | None]:
    """Where ``comfy.t2i_adapter.adapter.Adapter`` adds its features: ``[(input block, channels, grid factor)]``
    and the middle block's ``(channels, grid factor)`` (``None`` for the SD1.5 form).

    As ``Adapter.forward`` builds its list: per level one feature (after ``nums_rb`` res blocks) preceded by
    placeholders, so the SD1.5 form puts level ``i`` at input block ``3i + 2``; the SDXL form (``xl``) at blocks
    3, 5, 8 and its last level in the middle block. ``apply_control`` pops the list from the end, which is the
    forward's order. Grid factor = the hint's pixel-unshuffle (÷ 8 is latent ÷ 1) times the res blocks' downsampling.
    """
    levels: list[tuple[int, int]] = []  # (channels, grid factor) of each level's feature
    sequence: list[int | None] = []  # the forward's list: a level's index where its feature is, else None
    factor = adapter.unshuffle_amount // 8
    for level, channels in enumerate(adapter.channels):
        factor *= 2 if adapter.body[level * adapter.nums_rb].down else 1
        levels.append((int(channels), factor))
        if adapter.xl:
            sequence += [None] * (3 if level == 0 else 2 if level == 2 else 1)
        else:
            sequence += [None, None]
        sequence.append(level)
    middle = None
    if adapter.xl:  # forward returns {"input": features[1:], "middle": features[:1]} of the reversed list
        last = sequence.pop()
        middle = levels[last] if last is not None else None
    points = [(block, *levels[level]) for block, level in enumerate(sequence) if level is not None]
    return points, middle


def unet_block_outputs(diffusion_model: Any) -> list[tuple[int, int]]:
    """``(channels, grid factor)`` of each input block's output in a ComfyUI ``UNetModel``."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    out, factor = [], 1
    for block in diffusion_model.input_blocks:
        factor *= 2 if any(isinstance(m, Downsample) for m in block.modules()) else 1
        out.append((int(block[0].out_channels), factor))
    return out


def check_t2i_adapter_fits(control: Any, diffusion_model: Any) -> None:
    """Refuse a T2I-Adapter whose features do not match the UNet's input blocks where they are added.

    ComfyUI's ``apply_control`` catches the shape error of such an addition and only logs a warning, so a
    misfit adapter would silently do nothing (or part of what it should) in every step.
    """
    import comfy.controlnet
    import comfy.t2i_adapter.adapter as t2i

    if not isinstance(control, comfy.controlnet.T2IAdapter) or not isinstance(control.t2i_model, t2i.Adapter):
        return  # Adapter_light and Stable Cascade controls add elsewhere; not checked here
    adapter = control.t2i_model
    points, middle = adapter_feature_points(adapter)
    want = ", ".join(f"{c} at latent ÷ {f}" for _, c, f in points)
    kind = "an SDXL" if adapter.xl else "an SD1.x/SD2.x"
    fix = (f"load a T2I-Adapter made for this model's family, or use this adapter with {kind} model "
           f"(its UNet needs {want} channels at input blocks {', '.join(str(b) for b, _, _ in points)}).")
    if not hasattr(diffusion_model, "input_blocks"):
        raise CXRInputError(f"a T2I-Adapter adds its features to a UNet's input blocks; this model "
                            f"({type(diffusion_model).__name__}) has none.", node=APPLY_CONTROLNET,
                            input_name=CONTROL_INPUT, fix=fix)
    blocks = unet_block_outputs(diffusion_model)
    misfits = []
    for block, channels, factor in points:
        if block >= len(blocks):
            misfits.append(f"input block {block} (the model has {len(blocks)}) for {channels} channels")
        elif blocks[block] != (channels, factor):
            have = blocks[block]
            misfits.append(f"input block {block}: adapter {channels} channels at latent ÷ {factor}, "
                           f"model {have[0]} at ÷ {have[1]}")
    if middle is not None and blocks and blocks[-1] != middle:
        misfits.append(f"middle block: adapter {middle[0]} channels at latent ÷ {middle[1]}, model {blocks[-1][0]} "
                       f"at ÷ {blocks[-1][1]}")
    if misfits:
        raise CXRInputError(f"this T2I-Adapter ({adapter.channels[0]}-channel {'SDXL' if adapter.xl else 'SD1.x'} "
                            f"form) does not fit the model's UNet: {'; '.join(misfits)}. ComfyUI would skip those "
                            "additions with a warning, so the adapter would not act.", node=APPLY_CONTROLNET,
                            input_name=CONTROL_INPUT, fix=fix)


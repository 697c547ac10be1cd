"""Checks of the ControlNets / T2I-Adapters in a run's conditioning that must hold before sampling starts.

Called with the guider's conds when a run of a model that carries our stages starts (``outer_sample_wrapper`` in
:mod:`.patch`) and by the refinement sampler; each check is its own function, :func:`check_controls` runs them all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from ...errors import CXRInputError

#: ComfyUI's node that attaches a ControlNet (``ControlNetApplyAdvanced``), as its menu names it.
APPLY_CONTROLNET = "Apply ControlNet"


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


def check_controls(conds: Mapping[str, Sequence[dict]] | None, latent_shape: Sequence[int], diffusion_model) -> None:
    """Every check of the controls in ``conds`` (the guider's ``{"positive": [...], "negative": [...]}``) against the
    latent (``[B, C, H, W]``) and the model's UNet ``diffusion_model``, before sampling starts.

    Raises:
        CXRInputError: the first control that cannot work as the user expects.
    """
    check_controlnet_hints(conds, latent_shape)

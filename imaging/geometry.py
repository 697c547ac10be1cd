"""Native radiograph geometry and the reversible fit to the model's resolution.

A radiograph of native size ``H×W`` is scaled (aspect ratio kept) so it fits inside a target box, then
padded to multiples of 8 (the VAE's factor) with the border value; :class:`FitRecord` remembers the scale
and the padding so an edit, a mask or a metric map can be brought back to native size exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

from ..errors import CXRInputError

LATENT_FACTOR = 8


@dataclass(frozen=True)
class NativeGeometry:
    """What the pack knows about a radiograph's native form. Holds no patient identifier, by design.

    Attributes:
        height, width: native pixel size.
        pixel_spacing_mm: (row, column) spacing in mm when the source states it, else None.
        bits_stored: bit depth of the stored samples (8 for PNG/JPEG, 12–16 for most DICOM).
        photometric: DICOM photometric interpretation of the source ("MONOCHROME1"/"MONOCHROME2"), or
            None for an ordinary image file.
        source: "dicom" or "image".
        source_path: the DICOM file the radiograph was read from, so an export can copy its header; left
            out of comparisons and of the repr (a file name may name the patient).
    """

    height: int
    width: int
    pixel_spacing_mm: tuple[float, float] | None = None
    bits_stored: int = 8
    photometric: str | None = None
    source: str = "image"
    source_path: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class FitRecord:
    """How a native ``H×W`` image was brought to the model grid, and how to go back.

    ``resized_height × resized_width`` is the scaled image; ``pad_*`` pixels of border surround it to make
    ``height × width`` (multiples of 8).
    """

    native_height: int
    native_width: int
    resized_height: int
    resized_width: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    geometry: NativeGeometry | None = None

    @property
    def height(self) -> int:
        return self.resized_height + self.pad_top + self.pad_bottom

    @property
    def width(self) -> int:
        return self.resized_width + self.pad_left + self.pad_right


def plan_fit(native_height: int, native_width: int, max_side: int, multiple: int = LATENT_FACTOR) -> FitRecord:
    """Scale so the longer side is ``max_side`` (kept aspect), then pad each side up to ``multiple``.

    Padding is split evenly (the extra pixel goes to the bottom/right), so the chest stays centred.
    """
    if native_height < 1 or native_width < 1:
        raise CXRInputError(f"the image is empty ({native_height}×{native_width}).", fix="Load a radiograph.")
    if max_side < multiple or max_side % multiple:
        raise CXRInputError(
            f"the target size {max_side} is not a positive multiple of {multiple}.",
            input_name="max_side",
            fix=f"Use a multiple of {multiple}, e.g. 512 for SD1.5.",
        )
    scale = max_side / max(native_height, native_width)
    rh = max(1, round(native_height * scale))
    rw = max(1, round(native_width * scale))
    ph = (-rh) % multiple
    pw = (-rw) % multiple
    return FitRecord(native_height, native_width, rh, rw, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)


def _resize(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Resize ``[B, C, H, W]``; area for shrinking images, bilinear for growing, nearest-exact for labels.

    A half-precision input is resized in float32 and cast back: the same result as its float32 copy resized and cast
    (older torch has no Half kernels for these resizes on the CPU: "not implemented for 'Half'").
    """
    if x.shape[-2:] == (height, width):
        return x
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if mode == "image":
        shrinking = height <= x.shape[-2] and width <= x.shape[-1]
        if shrinking:
            y = F.interpolate(y, size=(height, width), mode="area")
        else:
            y = F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
    else:
        y = F.interpolate(y, size=(height, width), mode=mode)
    return y.to(x.dtype)


def apply_fit(x: torch.Tensor, fit: FitRecord, mode: str = "image", pad_value: float = 0.0) -> torch.Tensor:
    """Bring ``[B, C, H, W]`` from native size to the model grid of ``fit``.

    Args:
        x: the native-size tensor (values in [0, 1] for images and soft masks).
        fit: the plan from :func:`plan_fit`.
        mode: "image" (area/bilinear), or a ``torch.nn.functional.interpolate`` mode for masks.
        pad_value: value of the added border (0 = black for a radiograph, 0 = outside for a mask).
    """
    if x.shape[-2:] != (fit.native_height, fit.native_width):
        raise CXRInputError(
            f"size {tuple(x.shape[-2:])} does not match the fit's native size "
            f"{(fit.native_height, fit.native_width)}.",
            fix="Use the geometry from the same radiograph.",
        )
    y = _resize(x, fit.resized_height, fit.resized_width, mode)
    return F.pad(y, (fit.pad_left, fit.pad_right, fit.pad_top, fit.pad_bottom), value=pad_value)


def undo_fit(y: torch.Tensor, fit: FitRecord, mode: str = "image") -> torch.Tensor:
    """Crop the padding of ``[B, C, h, w]`` and scale it back to native size (inverse of :func:`apply_fit`)."""
    if y.shape[-2:] != (fit.height, fit.width):
        raise CXRInputError(
            f"size {tuple(y.shape[-2:])} is not the fitted size {(fit.height, fit.width)}.",
            fix="Restore the image the fit produced (or one of the same size, e.g. the decoded edit).",
        )
    crop = y[..., fit.pad_top : fit.pad_top + fit.resized_height, fit.pad_left : fit.pad_left + fit.resized_width]
    return _resize(crop, fit.native_height, fit.native_width, mode)


def native_region(region: torch.Tensor, fit: FitRecord) -> torch.Tensor:
    """``[B, h, w]`` edit weights on the fitted grid (or already at native size) → ``[B, H, W]`` in [0, 1] at native
    size. A pixel with a weight above 0 is edited: the composite blends the edit in there, and the export's DICOM
    Segmentation marks it so.

    Raises:
        CXRInputError: the region is on neither grid of this fit.
    """
    x = region.float()[:, None]
    if tuple(x.shape[-2:]) != (fit.height, fit.width) and tuple(x.shape[-2:]) == (fit.native_height, fit.native_width):
        return x[:, 0].clamp(0, 1)
    return undo_fit(x, fit).clamp(0, 1)[:, 0]


def composite_native(source: torch.Tensor, edited: torch.Tensor, edit_region: torch.Tensor,
                     fit: FitRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend the decoded edit into the native radiograph inside the (feathered) edit region only.

    The VAE round trip changes every pixel a little (and a random-weight test VAE changes them completely),
    and the model works on a downscaled grid: outside the edit region the result is the source's own native
    pixels, bit for bit; inside, the edit (scaled back with :func:`undo_fit`) is blended by the region's
    weight, so the feather stays seamless.

    Args:
        source: ``[B, H, W, C]`` the radiograph at native size (``fit``'s native size).
        edited: ``[B, h, w, C]`` the decoded edit on the fitted grid.
        edit_region: ``[B, h, w]`` or ``[h, w]`` weights in [0, 1] on the fitted grid.
        fit: the plan the edit was made with.

    Returns:
        ``(image [B, H, W, C], region [B, H, W])`` at native size; a grey source (equal channels) gets the
        edit's channel mean, so the result stays grey.
    """
    if source.shape[1:3] != (fit.native_height, fit.native_width):
        raise CXRInputError(
            f"the source is {source.shape[2]}×{source.shape[1]} px, not the radiograph the fit was made for "
            f"({fit.native_width}×{fit.native_height}).", input_name="source",
            fix="Connect the radiograph at native size (Load Chest X-ray (DICOM) or Load Image), the same one "
            "that went into Fit Radiograph to Model.")
    with_region = edit_region.reshape(-1, 1, *edit_region.shape[-2:]).float()
    if not bool(torch.isfinite(with_region).all()):
        raise CXRInputError("the edit region contains NaN or infinite values.", input_name="edit_region",
                            fix="Connect Edit / Keep Regions' edit_region (values 0 to 1).")
    sizes = {"source": source.shape[0], "edited": edited.shape[0], "edit_region": with_region.shape[0]}
    b = max(sizes.values())
    odd = next((name for name, n in sizes.items() if n not in (1, b)), None)
    if odd is not None:
        raise CXRInputError(f"batch sizes {', '.join(f'{k} {v}' for k, v in sizes.items())} do not pair up.",
                            input_name=odd, fix="Use batch 1 or the same batch size on every input.")
    region = native_region(with_region[:, 0].to(edited.device), fit)
    native = rearrange(undo_fit(rearrange(edited.float(), "b h w c -> b c h w"), fit), "b c h w -> b h w c")
    src = source.float().to(native.device)
    if src.shape[-1] == native.shape[-1] and bool((src == src[..., :1]).all()):
        native = native.mean(-1, keepdim=True).expand_as(native)
    src, native, region = (t.expand(b, *t.shape[1:]) for t in (src, native, region))
    weight = region[..., None]
    out = torch.where(weight > 0, torch.lerp(src, native, weight), src)
    return out.clamp(0, 1), region

"""Organ masks: the patient's anatomy as one typed graph value (``ORGAN_MASKS``).

An :class:`OrganMasks` bundle holds named soft masks (values in ``[0, 1]``) on one grid ``H×W``. Names
are the patient's sides (``right_lung`` is on the image's left in a PA view); at least ``right_lung``,
``left_lung`` and ``heart`` are known, any other lower-case name is allowed.

Everything here is pure torch (plus kornia for morphology and feathering) and returns new bundles:
a bundle is never changed in place, so a mask a user made upstream in a graph is never altered.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F

from ..errors import CXRInputError

KNOWN_ORGANS = ("right_lung", "left_lung", "heart")
# Two grids describe the same field of view when their aspect ratios agree within this (relative)
# tolerance: a 1-pixel rounding of a downscaled mask must pass, a crop or a rotated image must not.
ASPECT_TOLERANCE = 0.02
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def normalise_name(name: str) -> str:
    """``"Left Lung"`` → ``"left_lung"``; raises for names that cannot be organ keys."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if not _NAME.match(key):
        raise CXRInputError(
            f"'{name}' is not a valid organ name.",
            fix="Use letters, digits and underscores, starting with a letter (e.g. left_lung).",
        )
    return key


def parse_names(text: str | Iterable[str]) -> list[str]:
    """A comma- or space-separated list of organ names (``"left_lung, heart"``), normalised, de-duplicated."""
    items = re.split(r"[,;\n]+", text) if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        if item.strip():
            key = normalise_name(item)
            if key not in names:
                names.append(key)
    if not names:
        raise CXRInputError("no organ name was given.", fix="Name at least one organ, e.g. left_lung.")
    return names


def aspect_matches(h1: int, w1: int, h2: int, w2: int, tolerance: float = ASPECT_TOLERANCE) -> bool:
    """True when ``h1×w1`` and ``h2×w2`` have the same aspect ratio within ``tolerance`` (relative)."""
    a, b = h1 / w1, h2 / w2
    return abs(a - b) <= tolerance * b


def require_latent_aspect(masks: OrganMasks, latent: tuple[int, int]) -> None:
    """Organ masks must cover the latent's field of view (its aspect ratio), whatever token grid they go to.

    Raises:
        CXRInputError: the masks' aspect ratio is not the latent's.
    """
    lh, lw = latent
    if not aspect_matches(masks.height, masks.width, lh, lw):
        raise CXRInputError(
            f"the organ masks are {masks.height}×{masks.width} (H×W) but the latent is {lh}×{lw}: their aspect "
            "ratios differ, so the masks do not cover the image's field of view.",
            fix="Use the organ masks output of 'Fit Radiograph to Model' for the same image.",
        )


def disk_kernel(radius: int) -> torch.Tensor:
    """A ``(2r+1)×(2r+1)`` disk structuring element: isotropic dilation, unlike a square."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + 1e-6).float()


@dataclass(frozen=True, eq=False)
class OrganMasks:
    """Named organ masks on one grid.

    Attributes:
        names: organ names, in order.
        data: ``[N, H, W]`` float32 on the CPU, values in ``[0, 1]`` (1 = inside the organ).
    """

    names: tuple[str, ...]
    data: torch.Tensor

    def __post_init__(self) -> None:
        if self.data.dtype != torch.float32:
            # Masks are resampled, dilated and compared in float32 whatever the model computes in: a half-precision
            # mask would resample differently (and older torch has no Half kernels for area/bilinear resizing on
            # the CPU); stages cast the biases they derive to the attention's dtype at the end.
            object.__setattr__(self, "data", self.data.float())
        if self.data.ndim != 3 or self.data.shape[0] != len(self.names):
            raise ValueError(
                f"OrganMasks needs [N, H, W] data for {len(self.names)} names, got {tuple(self.data.shape)}"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate organ names in {self.names}")

    # ----------------------------------------------------------------------------------------------
    # construction and access
    @classmethod
    def from_dict(cls, masks: dict[str, torch.Tensor], *, allow_empty: bool = False) -> OrganMasks:
        """Build from ``{name: [H, W] mask}``; every mask on the same grid, values clamped to [0, 1].

        Raises:
            CXRInputError: no masks, grids differ, a mask has NaN, or (unless ``allow_empty``) a mask is
                all zero, which would silently switch a stage off.
        """
        if not masks:
            raise CXRInputError("no organ mask was given.", fix="Connect or load at least one organ mask.")
        names = [normalise_name(n) for n in masks]
        tensors = [torch.as_tensor(m).detach().float().cpu().squeeze() for m in masks.values()]
        shapes = {tuple(t.shape) for t in tensors}
        if any(t.ndim != 2 for t in tensors) or len(shapes) != 1:
            sizes = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in zip(names, tensors, strict=True))
            raise CXRInputError(
                f"organ masks must be single 2-D masks on one grid; got {sizes}.",
                fix="Load every organ's mask at the radiograph's size (one mask per organ, batch 1).",
            )
        for name, t in zip(names, tensors, strict=True):
            if not torch.isfinite(t).all():
                raise CXRInputError(
                    f"the mask of '{name}' contains NaN or infinite values.",
                    fix="Re-export the mask file, or fix the node that made the MASK (values must be 0 to 1).",
                )
            if not allow_empty and float(t.max()) <= 0:
                raise CXRInputError(
                    f"the mask of '{name}' is empty (all zero).",
                    fix="Check that the file is the right organ's mask and that inside is white (255).",
                )
        return cls(tuple(names), torch.stack(tensors).clamp(0, 1).contiguous())

    @property
    def height(self) -> int:
        return int(self.data.shape[1])

    @property
    def width(self) -> int:
        return int(self.data.shape[2])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:  # shown in ComfyUI logs: keep it short
        return f"OrganMasks({', '.join(self.names)}; {self.height}x{self.width})"

    def get(self, name: str) -> torch.Tensor:
        """The ``[H, W]`` mask of one organ; an error lists the organs present."""
        key = normalise_name(name)
        if key not in self.names:
            raise CXRInputError(
                f"organ '{key}' is not in the organ masks (present: {', '.join(self.names)}).",
                fix="Load a mask for it, or pick one of the organs present.",
            )
        return self.data[self.names.index(key)]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: self.data[i] for i, n in enumerate(self.names)}

    def area_fraction(self, name: str) -> float:
        return float(self.get(name).mean())

    # ----------------------------------------------------------------------------------------------
    # combination
    def select(self, names: str | Iterable[str]) -> OrganMasks:
        """Only the named organs, in the given order."""
        keys = parse_names(names)
        return OrganMasks(tuple(keys), torch.stack([self.get(k) for k in keys]))

    def with_mask(self, name: str, mask: torch.Tensor) -> OrganMasks:
        """Add (or replace) one organ; the mask must be on this bundle's grid."""
        key = normalise_name(name)
        m = torch.as_tensor(mask).float().cpu().squeeze()
        if tuple(m.shape) != (self.height, self.width):
            raise CXRInputError(
                f"the mask for '{key}' is {tuple(m.shape)}, the organ masks are {(self.height, self.width)}.",
                fix="Resample it to the organ masks' grid first.",
            )
        d = self.as_dict()
        d[key] = m.clamp(0, 1)
        return OrganMasks(tuple(d), torch.stack(list(d.values())))

    def merged(self, other: OrganMasks) -> OrganMasks:
        """This bundle plus ``other``'s organs (``other`` wins on a name clash); same grid required."""
        out = self
        for name, mask in other.as_dict().items():
            out = out.with_mask(name, mask)
        return out

    def union(self, names: str | Iterable[str]) -> torch.Tensor:
        """Pixel-wise maximum of the named organs: a soft union."""
        return torch.stack([self.get(n) for n in parse_names(names)]).amax(dim=0)

    def subtract(self, names: str | Iterable[str], minus: str | Iterable[str]) -> torch.Tensor:
        """Union of ``names`` with the union of ``minus`` taken out (``a · (1 - b)``)."""
        return self.union(names) * (1 - self.union(minus))

    # ----------------------------------------------------------------------------------------------
    # resampling
    def resampled(self, height: int, width: int, *, mode: str = "area") -> OrganMasks:
        """The bundle on an exact ``height×width`` grid (odd and non-square grids included).

        ``area`` gives each target cell the covered fraction (soft, for attention grids); ``nearest``
        keeps hard labels. The grid must show the same field of view: a different aspect ratio is an
        error (a mask cropped or rotated relative to the image would put organs in the wrong place).
        """
        if height < 1 or width < 1:
            raise CXRInputError(f"cannot resample masks to {height}×{width}.", fix="Use a positive size.")
        if not aspect_matches(self.height, self.width, height, width):
            raise CXRInputError(
                f"the organ masks are {self.height}×{self.width} (H×W) but the target is {height}×{width}: "
                "their aspect ratios differ, so the masks do not cover the same field of view.",
                fix="Use masks made for this radiograph (same crop and orientation), or resize both together.",
            )
        if (height, width) == (self.height, self.width):
            return self
        x = self.data[None]
        if mode == "area" and (height > self.height or width > self.width):
            mode = "bilinear"  # area is only an average when shrinking
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        y = F.interpolate(x, size=(height, width), mode=mode, **kwargs)[0].clamp(0, 1)
        return OrganMasks(self.names, y.contiguous())

    def to_grid(self, height: int, width: int, names: Sequence[str] | None = None) -> torch.Tensor:
        """``[N, height, width]`` coverage fractions of the (named) organs on a token grid."""
        masks = self if names is None else self.select(names)
        return masks.resampled(height, width, mode="area").data

    # ----------------------------------------------------------------------------------------------
    # morphology (binary: a mask is inside where it is ≥ 0.5)
    def dilated(self, radius_px: int, names: Iterable[str] | None = None) -> OrganMasks:
        """Grow the named organs (all when None) by a disk of ``radius_px`` pixels of this grid."""
        return self._morph(radius_px, names, grow=True)

    def eroded(self, radius_px: int, names: Iterable[str] | None = None) -> OrganMasks:
        """Shrink the named organs (all when None) by a disk of ``radius_px`` pixels of this grid."""
        return self._morph(radius_px, names, grow=False)

    def feathered(self, sigma_px: float, names: Iterable[str] | None = None) -> OrganMasks:
        """Soften the borders with a Gaussian of ``sigma_px`` pixels (kornia), so blends show no seam."""
        if sigma_px < 0:
            raise CXRInputError(f"feather sigma {sigma_px} is negative.", fix="Use 0 (off) or more.")
        if sigma_px == 0:
            return self
        idx = self._indices(names)
        k = 2 * int(3 * sigma_px + 0.5) + 1
        blurred = kornia.filters.gaussian_blur2d(
            self.data[idx][None], (k, k), (sigma_px, sigma_px), border_type="replicate"
        )[0]
        data = self.data.clone()
        data[idx] = blurred.clamp(0, 1)
        return OrganMasks(self.names, data)

    def _indices(self, names: Iterable[str] | None) -> list[int]:
        if names is None:
            return list(range(len(self.names)))
        keys = parse_names(names)
        for k in keys:
            self.get(k)  # raises with the list of organs present
        return [self.names.index(k) for k in keys]

    def _morph(self, radius_px: int, names: Iterable[str] | None, *, grow: bool) -> OrganMasks:
        if radius_px < 0:
            raise CXRInputError(f"radius {radius_px} px is negative.", fix="Use 0 (off) or more.")
        if radius_px == 0:
            return self
        idx = self._indices(names)
        binary = (self.data[idx] >= 0.5).float()
        # Erosion is the complement of the dilated complement; pixels beyond the border count as outside,
        # so erosion also shrinks from the image edge.
        out = dilate_binary(binary, radius_px) if grow else 1 - dilate_binary(1 - binary, radius_px, outside=1.0)
        data = self.data.clone()
        data[idx] = out
        return OrganMasks(self.names, data)


def dilate_binary(masks: torch.Tensor, radius: int, outside: float = 0.0) -> torch.Tensor:
    """Exact binary dilation of ``[N, H, W]`` {0, 1} masks by a disk of ``radius`` pixels.

    Computed as an FFT convolution with the disk (a pixel is inside when any disk neighbour is), so the
    cost is O(HW log HW) whatever the radius; a max-filter costs O(HW r²) and stalls at large margins.
    ``outside`` is the value assumed beyond the image border.
    """
    n, h, w = masks.shape
    r = int(radius)
    if r * r >= (h - 1) ** 2 + (w - 1) ** 2:
        # The disk reaches every pixel from anywhere (outside counts too): all or nothing.
        anywhere = (masks.reshape(n, -1).amax(dim=1) > 0.5) | (outside > 0.5)
        return anywhere.float()[:, None, None].expand(n, h, w).clone()
    padded = F.pad(masks[None].double(), (r, r, r, r), value=outside)[0]
    kernel = disk_kernel(r).double()
    size = (padded.shape[-2] + 2 * r, padded.shape[-1] + 2 * r)
    conv = torch.fft.irfft2(torch.fft.rfft2(padded, s=size) * torch.fft.rfft2(kernel, s=size), s=size)
    # Full convolution shifts by r; the padded border adds another r.
    hits = conv[:, 2 * r : 2 * r + h, 2 * r : 2 * r + w]
    return (hits > 0.5).float()


def label_map_to_masks(labels: torch.Tensor, mapping: dict[str, int]) -> OrganMasks:
    """Split an ``[H, W]`` integer label map into organs, e.g. ``{"right_lung": 1, "left_lung": 2}``."""
    masks = {name: (labels == value).float() for name, value in mapping.items()}
    missing = [n for n, m in masks.items() if float(m.max()) == 0]
    if missing:
        present = sorted(int(v) for v in torch.unique(labels).tolist())[:16]
        raise CXRInputError(
            f"label value(s) for {', '.join(missing)} do not occur in the label map (values present: {present}).",
            fix="Map each organ to a value that the label map contains.",
        )
    return OrganMasks.from_dict(masks)


def edit_and_keep(
    masks: OrganMasks,
    edit_organs: Sequence[str],
    *,
    margin_px: int = 0,
    feather_px: float = 0.0,
    protect: Sequence[str] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit region and its complement, the keep region, both ``[H, W]`` in ``[0, 1]``.

    edit = feather(dilate(∪ edit_organs, margin) · (1 − ∪ protect)); keep = 1 − edit. The margin lets
    a lesion reach the organ's border (an effusion blunts the costophrenic angle); ``protect`` keeps
    organs such as the heart out of the edit however far the margin reaches.

    Raises:
        CXRInputError: the edit region is empty, or it covers the whole image (nothing would be kept).
    """
    names = parse_names(edit_organs)
    grown = masks.select(names).dilated(margin_px)
    edit = grown.union(names)
    if protect:
        edit = edit * (1 - masks.union(protect))
    if float(edit.max()) < 0.5:
        raise CXRInputError(
            f"the edit region ({', '.join(names)}) is empty.",
            input_name="edit_organs",
            fix="Pick organs present in the masks, or remove them from 'protect'.",
        )
    if float(edit.min()) >= 0.5:
        raise CXRInputError(
            "the edit region covers the whole image, so nothing of the patient would be kept.",
            input_name="margin_px",
            fix="Use a smaller margin or fewer organs.",
        )
    if feather_px > 0:
        edit = OrganMasks(("edit",), edit[None]).feathered(feather_px).data[0]
    return edit, 1 - edit

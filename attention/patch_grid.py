"""A diffusion transformer's image token grid: the patchified latent, padded as the host pads it.

A DiT cuts the latent into ``p×p`` patches (SD3/SD3.5's MMDiT and Flux: ``p = 2``), one token each, row-major.
A side ``n`` that ``p`` does not divide is first padded **at its end** (bottom/right) by ``(p - n % p) % p``
cells, **circularly** (ComfyUI 0.3.64: ``comfy/ldm/common_dit.py`` ``pad_to_patch_size``, called by MMDiT's
``PatchEmbed`` and Flux's ``process_img``): the pad repeats the latent's first rows/columns. So token ``(i, j)``
reads exactly the cells ``[p·i, p·(i+1)) × [p·j, p·(j+1))`` of the padded latent: no half-cell shift as in a
UNet's stride-2 convolutions (:func:`.regions.token_offset` does not apply), and on an odd side the last tokens
also read the wrapped top/left cells. The masks are padded the same way, so a token's region describes what the
token actually reads.
"""

from __future__ import annotations

import torch.nn.functional as F

from .organs import OrganMasks, require_latent_aspect
from .regions import Fit

Grid = tuple[int, int]


def patch_grid(latent: Grid, patch: int) -> Grid:
    """The token grid ``(ceil(H/p), ceil(W/p))`` of a ``latent`` ``(H, W)`` cut into ``patch×patch`` patches."""
    if patch < 1:
        raise ValueError(f"patch size must be positive, got {patch}")
    lh, lw = latent
    return -(-lh // patch), -(-lw // patch)


def patch_padding(latent: Grid, patch: int) -> Grid:
    """Cells the host pads at the bottom and at the right: ``(p - n % p) % p`` per side."""
    h, w = patch_grid(latent, patch)
    return h * patch - latent[0], w * patch - latent[1]


def fit_to_patches(masks: OrganMasks, latent: Grid, patch: int) -> OrganMasks:
    """The masks over exactly the padded latent a DiT patchifies (see the module docstring).

    Masks must have the latent's aspect ratio (the same field of view); they are resampled to a whole number of
    pixels per latent cell and padded circularly at the bottom/right by the host's padding, so a resampling to
    the patch grid gives each token the coverage of exactly the cells it reads.

    Raises:
        CXRInputError: the masks' aspect ratio is not the latent's.
    """
    lh, lw = latent
    require_latent_aspect(masks, latent)
    pad_h, pad_w = patch_padding(latent, patch)
    if pad_h == 0 and pad_w == 0:
        return masks  # the grid has the latent's aspect ratio: resampling to it is exact
    scale = max(1, -(-masks.height // lh), -(-masks.width // lw))
    exact = masks.resampled(lh * scale, lw * scale)
    data = F.pad(exact.data[None], (0, pad_w * scale, 0, pad_h * scale), mode="circular")[0]
    return OrganMasks(masks.names, data.contiguous())


def patch_fit(latent: Grid, patch: int) -> Fit:
    """The ``fit`` for :func:`.regions.partition` / :func:`.regions.coverage` at a DiT's patch grid.

    Raises (when called):
        ValueError: the grid asked for is not this latent's patch grid.
    """
    grid = patch_grid(latent, patch)

    def fit(masks: OrganMasks, height: int, width: int) -> OrganMasks:
        if (height, width) != grid:
            raise ValueError(f"a {latent[0]}×{latent[1]} latent in {patch}×{patch} patches has a "
                             f"{grid[0]}×{grid[1]} token grid, not {height}×{width}")
        return fit_to_patches(masks, latent, patch)

    return fit

"""Pure core tests of a DiT's patch token grid: sizes, the host's circular end padding, regions at the grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cxr_counterfactual.attention.joint import JointGate, JointLayout, joint_attention, joint_attention_dense
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.patch_grid import fit_to_patches, patch_fit, patch_grid, patch_padding
from cxr_counterfactual.attention.regions import coverage, partition
from cxr_counterfactual.errors import CXRInputError


def pad_like_comfy(x: torch.Tensor, patch: int) -> torch.Tensor:
    """ComfyUI 0.3.64's ``comfy/ldm/common_dit.py`` ``pad_to_patch_size`` (circular, at each side's end)."""
    pad: tuple[int, ...] = ()
    for i in range(x.ndim - 2):
        pad = (0, (patch - x.shape[i + 2] % patch) % patch) + pad
    return F.pad(x, pad, mode="circular")


@pytest.mark.parametrize(("latent", "patch", "grid"), [((128, 128), 2, (64, 64)), ((5, 7), 2, (3, 4)),
                                                       ((9, 9), 3, (3, 3)), ((1, 3), 2, (1, 2))])
def test_patch_grid_matches_the_hosts_padded_patchify(latent, patch, grid):
    assert patch_grid(latent, patch) == grid
    x = torch.zeros(1, 1, *latent)
    padded = pad_like_comfy(x, patch)
    assert tuple(padded.shape[2:]) == (grid[0] * patch, grid[1] * patch)
    assert patch_padding(latent, patch) == (padded.shape[2] - latent[0], padded.shape[3] - latent[1])
    if patch == 2:  # MMDiT's unpatchify and Flux's h_len agree with it for their patch size
        assert ((latent[0] + 1) // 2, (latent[1] + 1) // 2) == grid


@pytest.mark.parametrize(("latent", "patch"), [((6, 8), 2), ((5, 7), 2), ((7, 5), 2), ((9, 11), 3)])
def test_token_coverage_is_what_the_token_reads(latent, patch):
    # An organ drawn on the latent's own cells: a token's coverage must be the mean of exactly the cells it reads
    # from the padded latent (wrapped cells included), as the host's patch embedding reads them.
    g = torch.Generator().manual_seed(1)
    cells = (torch.rand(*latent, generator=g) > 0.5).float()
    masks = OrganMasks.from_dict({"left_lung": cells})
    want = F.avg_pool2d(pad_like_comfy(cells[None, None], patch), patch)[0, 0]
    h, w = patch_grid(latent, patch)
    got = fit_to_patches(masks, latent, patch).to_grid(h, w)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the same at 8 px per cell (masks of Fit Radiograph to Model)
    big = OrganMasks.from_dict({"left_lung": cells.repeat_interleave(8, 0).repeat_interleave(8, 1)})
    torch.testing.assert_close(fit_to_patches(big, latent, patch).to_grid(h, w)[0], want, atol=1e-6, rtol=0)
    cover = coverage(big, ("left_lung",), h, w, fit=patch_fit(latent, patch))
    assert torch.equal(cover, (want >= 0.5).reshape(-1))


def test_odd_side_wraps_the_top_rows_into_the_last_tokens():
    # 5 latent rows in 2×2 patches: the last token row reads latent row 4 and (wrapped) row 0.
    top = torch.zeros(5, 4)
    top[0] = 1  # an organ on the first latent row only
    masks = OrganMasks.from_dict({"heart": top})
    cover = fit_to_patches(masks, (5, 4), 2).to_grid(3, 2)[0]
    assert cover[0].tolist() == [0.5, 0.5] and cover[1].tolist() == [0.0, 0.0] and cover[2].tolist() == [0.5, 0.5]


def test_partition_at_the_patch_grid_drives_joint_attention():
    latent, patch = (13, 9), 2
    h, w = patch_grid(latent, patch)
    rl, ll = torch.zeros(104, 72), torch.zeros(104, 72)
    rl[20:80, 8:34] = 1
    ll[20:80, 38:64] = 1
    masks = OrganMasks.from_dict({"right_lung": rl, "left_lung": ll})
    part = partition(masks, ("right_lung", "left_lung"), h, w, fit=patch_fit(latent, patch))
    assert part.labels.numel() == h * w and part.counts[1] > 0 and part.counts[2] > 0
    layout = JointLayout(6, h * w)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.total, 8, generator=g) for _ in range(3))
    gate = JointGate(part, 0.1)
    torch.testing.assert_close(joint_attention(q, k, v, layout, gate), joint_attention_dense(q, k, v, layout, gate),
                               atol=1e-5, rtol=1e-5)


def test_masks_off_the_latents_aspect_ratio_are_refused():
    masks = OrganMasks.from_dict({"heart": torch.ones(64, 64)})
    with pytest.raises(CXRInputError, match="aspect"):
        fit_to_patches(masks, (13, 9), 2)
    with pytest.raises(ValueError, match="token grid"):
        partition(masks, ("heart",), 4, 4, fit=patch_fit((16, 16), 2))
    with pytest.raises(ValueError, match="patch size"):
        patch_grid((8, 8), 0)

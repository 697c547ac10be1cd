"""The refinement on a batch of radiographs: each image's energy against its own target, each image stopping at
its own threshold, so an image in a batch is refined as it would be alone (core, tiny tensors; the end-to-end
batch test through ComfyUI is tests/test_batch_equals_alone.py)."""

from __future__ import annotations

import pytest
import torch

from cxr_counterfactual.attention.mask_batch import OrganMaskBatch
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.refinement import (
    RefineConfig,
    Refinement,
    concentration_energy,
    refine_step,
)
from cxr_counterfactual.errors import CXRInputError

# float32 sums over at most a few hundred cells: a batch and a single map may reduce in another order, a few ulps
# of values ≤ 1 (ε = 1.2e-7) apart.
F32_SUM = 1e-6


def _target(rows: slice, cols: slice, h: int = 6, w: int = 5) -> torch.Tensor:
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[rows, cols] = True
    return inside


def test_each_map_is_scored_against_its_own_target():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 6, 5, generator=g) ** 2
    targets = torch.stack([_target(slice(0, 3), slice(0, 5)), _target(slice(3, 6), slice(0, 5)),
                           _target(slice(1, 5), slice(1, 4))])
    for lam in (0.0, 0.7):
        batch = concentration_energy(maps, targets, extent_weight=lam)
        alone = torch.cat([concentration_energy(maps[i:i + 1], targets[i], extent_weight=lam) for i in range(3)])
        torch.testing.assert_close(batch, alone, rtol=0, atol=F32_SUM)
    # the targets differ, so the energies of one map under them differ: the per-map target is really used
    shared = concentration_energy(maps, targets[0])
    assert float((shared - concentration_energy(maps, targets)).abs().max()) > 0.05


def _masks(inside: torch.Tensor) -> OrganMasks:
    return OrganMasks(("left_lung",), inside.float()[None])


def test_refinement_cells_are_per_image_and_a_wrong_count_is_refused():
    a, b = _target(slice(0, 8), slice(0, 16), 16, 16), _target(slice(8, 16), slice(0, 8), 16, 16)
    ref = Refinement(RefineConfig(), OrganMaskBatch((_masks(a), _masks(b))), {"effusion": (3,)})
    cells = ref.cells((4, 4), (16, 16))
    assert cells.shape == (2, 16)
    single = [Refinement(RefineConfig(), _masks(t), {"effusion": (3,)}).cells((4, 4), (16, 16)) for t in (a, b)]
    assert torch.equal(cells, torch.cat(single))  # the same coverage rule per set
    ref.check_batch(2)
    with pytest.raises(CXRInputError, match="2 mask sets but the batch has 3 images"):
        ref.check_batch(3, "CXR Refinement Sampler")
    empty = Refinement(RefineConfig(), OrganMaskBatch((_masks(a), _masks(torch.zeros(16, 16, dtype=torch.bool)))),
                       {"effusion": (3,)})
    with pytest.raises(CXRInputError, match="image 2 of the batch"):
        empty.cells((4, 4), (16, 16))


def test_each_image_stops_at_its_own_threshold_and_then_stays_put():
    """Energy per image: distance of its latent's mean from 1 (squashed into [0, 1)). Image 0 starts below the
    stop energy, image 1 above: image 0 must come back bit for bit, image 1 must move exactly as it does alone."""
    def energy(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh((x.mean(dim=(1, 2, 3)) - 1.0).abs())

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 5, generator=g) * 0.1
    x[0] += 1.0  # energy ≈ 0: already stopped
    config = RefineConfig(iterations=4, step_size=0.3)
    stop = 0.5
    assert float(energy(x[:1])) < stop < float(energy(x[1:]))
    out, rec = refine_step(energy, x, 1.0, config, step=0, stop=stop)
    assert torch.equal(out[0], x[0])
    alone, _ = refine_step(energy, x[1:], 1.0, config, step=0, stop=stop)
    torch.testing.assert_close(out[1:], alone, rtol=0, atol=F32_SUM)
    assert not torch.equal(alone, x[1:]) and rec.iterations >= 1

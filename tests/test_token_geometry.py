"""Where an attention layer's tokens sit on the latent, measured, and the mask resampling held to it.

The measurement: the UNets of the SD1.5, SD2 and SDXL-family test models (the recipes of ``demo/tiny_checkpoint.py``
and ``testing/tiny_models.py``, drawn from seed 0 exactly as the test checkpoints draw them, without their text
encoders), loaded by ComfyUI's own loader, run once on a random latent and once per latent cell of one line with
that single cell perturbed. An ``attn1`` patch records every attention layer's input tokens (input, middle and
output blocks); a token's response to a cell is the norm of the change of its features. A token's centre is the
response-weighted mean cell position within a window symmetric about that centre (found by iterating from the
aligned cell's centre, the old assumption): besides the convolutions' local response, GroupNorm statistics and the
self-attention of earlier layers make every token respond a little to every cell (1-6 % of the peak, but over
every cell), which would pull a plain mean toward the latent's middle by up to 6 cells; a symmetric window cancels
a flat floor. Its radius, ``2^L + 1`` cells (a token pitch and a cell: the stride-2 chain's own reach, ``2^L - 1``,
plus two), holds the token's cells and reaches into both neighbours', wide enough for the decoder's broader
response (a radius of ``2^L`` makes level-1 decoder centres jump by up to half a cell between neighbouring
tokens) and small enough to fit the latent; only tokens whose windows (at the start and at the centre) lie inside
the latent count (a border cuts the response off).

Lines: the middle row of an 8×32 latent (centres along x) for every model, and the middle column of a 32×8 latent
(along y) for SD1.5; the kernels, strides and padding are the same on both axes. CPU time ≈ 50 s on one core.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import pytest
import torch

from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.regions import fit_to_layer, partition, token_offset

logger = logging.getLogger(__name__)

TOLERANCE = 0.25  # cells: the bound for "the offset the resampling uses equals the measured one"
PREFIX = "model.diffusion_model."
# (model, latent H×W, axis the line runs along, the line's fixed row/column)
LINES = {"sd15": [((8, 32), "x", 4), ((32, 8), "y", 4)], "sd2": [((8, 32), "x", 4)], "sdxl": [((8, 32), "x", 4)]}
DETECTED = {"sd15": "SD15", "sd2": "SD20", "sdxl": "Segmind_Vega"}


def test_unet(comfy, name: str):
    """The test model's UNet (its recipe's seed-0 weights), as ComfyUI's loader detects and loads it."""
    import comfy.sd

    from cxr_counterfactual.demo import tiny_checkpoint
    from cxr_counterfactual.testing import tiny_models

    gen = torch.Generator().manual_seed(0)  # every recipe draws its UNet first from the seed-0 generator
    if name == "sd15":
        state = tiny_checkpoint._unet_state(gen)
    elif name == "sd2":
        state = tiny_models._unet_state(tiny_models.SD2_UNET_CONFIG, gen, marker=tiny_models.V_MARKER_KEY)
    else:
        state = tiny_models._unet_state(tiny_models.SDXL_UNET_CONFIG, gen)
    model = comfy.sd.load_diffusion_model_state_dict({k.removeprefix(PREFIX): v for k, v in state.items()})
    assert type(model.model.model_config).__name__ == DETECTED[name]
    return model


test_unet.__test__ = False  # a helper, not a test


def responses(model, latent: tuple[int, int], axis: str, line: int) -> dict[tuple, torch.Tensor]:
    """``{(part, block, index): [cells, h, w]}``: every attention layer's per-token response to each single cell of
    the line perturbed (the norm of the change of the layer's input features)."""
    h, w = latent
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 4, h, w, generator=gen)
    direction = torch.randn(4, generator=gen)
    direction = direction / direction.norm()  # one cell moved by the latent's own scale (unit variance)
    batch = [base]
    for j in range(w if axis == "x" else h):
        x = base.clone()
        row, col = (line, j) if axis == "x" else (j, line)
        x[0, :, row, col] += direction
        batch.append(x)
    x = torch.cat(batch)
    n = x.shape[0]
    config = model.model.model_config.unet_config
    sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.5))
    context = torch.randn(1, 77, config["context_dim"], generator=gen).expand(n, -1, -1)
    extra = {"y": torch.zeros(n, config["adm_in_channels"])} if config.get("adm_in_channels") else {}
    seen: dict[tuple, torch.Tensor] = {}

    def record(q, k, v, options):
        seen[(options["block"][0], options["block"][1], options["block_index"])] = q.detach().float()
        return q, k, v

    m = model.clone()
    m.set_model_attn1_patch(record)
    with torch.inference_mode():
        m.model.apply_model(x * math.sqrt(sigma**2 + 1), torch.full((n,), sigma), c_crossattn=context,
                            transformer_options=m.model_options["transformer_options"], **extra)
    out = {}
    for key, q in seen.items():
        level = next(lv for lv in range(6) if (-(-h // 2**lv)) * (-(-w // 2**lv)) == q.shape[1])
        f = 2**level
        out[key] = (q[1:] - q[:1]).norm(dim=-1).reshape(n - 1, -(-h // f), -(-w // f))
    return out


def centre(profile: torch.Tensor, start: float, radius: float) -> float:
    """The response-weighted mean position (cell ``j`` spans ``[j, j+1)``) within ``radius`` of itself: the fixed
    point reached from ``start`` (cells cut by the window count by the part inside)."""
    cells = torch.arange(profile.numel(), dtype=torch.float64) + 0.5
    profile = profile.double()
    c = start
    for _ in range(200):
        inside = (torch.clamp(cells + 0.5, max=c + radius) - torch.clamp(cells - 0.5, min=c - radius)).clamp(0, 1)
        new = float((cells * profile * inside).sum() / (profile * inside).sum())
        if abs(new - c) < 1e-7:
            break
        c = new
    return c


def measured_offsets(model, latent, axis, line) -> dict[tuple[str, int], list[float]]:
    """``{(part, level): [offset of each interior token of each layer]}``, in latent cells, from the aligned cell's
    centre ``2^L·i + 2^L/2`` (what the masks assumed before)."""
    size = latent[1] if axis == "x" else latent[0]
    found = defaultdict(list)
    for (part, _, _), r in responses(model, latent, axis, line).items():
        level = next(lv for lv in range(6) if -(-size // 2**lv) == r.shape[2 if axis == "x" else 1])
        f = 2**level
        radius = f + 1
        for i in range(r.shape[2 if axis == "x" else 1]):
            profile = r[:, line // f, i] if axis == "x" else r[:, i, line // f]
            aligned = f * i + f / 2
            c = centre(profile, aligned, radius)
            if min(aligned, c) - radius >= 0 and max(aligned, c) + radius <= size:  # both windows inside
                found[(part, level)].append(c - aligned)
    return found


def resampling_offset(cells: int) -> float:
    """The offset ``fit_to_layer`` applies at a grid of ``cells`` latent cells per token, read off its output: an
    all-ones mask's first token row covers ``cells + offset`` of its ``cells`` rows inside the image."""
    latent = (4 * cells, 4 * cells)
    ones = OrganMasks(("m",), torch.ones(1, 8 * latent[0], 8 * latent[1]))
    covered = fit_to_layer(ones, 4, 4, latent).to_grid(4, 4)[0]
    return float(covered[0, 1]) * cells - cells


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LINES))
def test_the_masks_are_placed_where_each_level_centres_its_tokens(comfy, name) -> None:
    model = test_unet(comfy, name)
    for latent, axis, line in LINES[name]:
        found = measured_offsets(model, latent, axis, line)
        assert {level for _, level in found} >= ({1, 2} if name == "sdxl" else {0, 1, 2, 3})
        assert {part for part, _ in found} >= {"input", "output"}
        for (part, level), offsets in sorted(found.items()):
            used = resampling_offset(2**level)
            assert used == token_offset(2**level)  # the resampling reads the one rule
            mean = sum(offsets) / len(offsets)
            logger.info("%s %s %s level %d: measured %+.2f cells (%d tokens, %+.2f … %+.2f), resampling %+.2f",
                        name, axis, part, level, mean, len(offsets), min(offsets), max(offsets), used)
            assert abs(mean - used) <= TOLERANCE, (name, axis, part, level, mean, used)


@pytest.mark.parametrize("latent", [(16, 16), (7, 9), (12, 5)])
@pytest.mark.parametrize("px_per_cell", [8, 3])
def test_the_partition_at_each_level_is_the_shifted_cell_partition(latent, px_per_cell) -> None:
    """An organ on whole latent cells, at 8 and at 3 mask pixels per cell: token ``i`` of level ``L`` belongs to it
    exactly when its cell ``[2^L·i + o, 2^L·(i+1) + o)`` (``o = token_offset(2^L)``, half a token up-left less half a
    cell) is at least half covered, counted independently here per axis (cells past the image are outside)."""
    lh, lw = latent
    box = ((1, lh - 2), (2, lw - 1))  # rows, columns of the organ in latent cells: [start, end)
    cells = torch.zeros(lh, lw)
    cells[box[0][0]:box[0][1], box[1][0]:box[1][1]] = 1
    masks = OrganMasks(("organ",), cells.repeat_interleave(px_per_cell, 0).repeat_interleave(px_per_cell, 1)[None])
    for level in range(4):
        f = 2**level
        grid = (-(-lh // f), -(-lw // f))
        o = token_offset(f)
        axes = []
        for (start, end), g in zip(box, grid, strict=True):
            first = torch.arange(g, dtype=torch.float64) * f + o
            axes.append((torch.minimum(first + f, torch.tensor(float(end))) - torch.clamp(first, min=start))
                        .clamp(min=0) / f)
        fraction = (axes[0][:, None] * axes[1][None, :]).reshape(-1)
        labels = partition(masks, ["organ"], *grid, latent=latent).labels
        clear = (fraction - 0.5).abs() > 1e-4  # an exact tie is a float32 rounding question, not geometry
        assert clear.sum() >= clear.numel() // 2
        assert torch.equal((labels == 1)[clear], (fraction >= 0.5)[clear]), (latent, px_per_cell, level)
    # The shift is the point: at level 2 the old aligned cells label other tokens for the 16×16 organ.
    if latent == (16, 16):
        aligned = masks.to_grid(4, 4)[0].reshape(-1) >= 0.5
        assert not torch.equal(partition(masks, ["organ"], 4, 4, latent=latent).labels == 1, aligned)

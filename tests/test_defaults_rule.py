"""The mechanism behind the gate's ``apply_to_uncond`` default (README, "Defaults for the negative prompt's pass").

One Euler step from the top of the schedule returns the guided denoised latent itself, ComfyUI's
``uncond + cfg·(cond − uncond)``. Against the stock run with the same seed and cfg, the gate's change is then

- ``apply_to_uncond`` off: ``cfg·(cond_gated − cond_stock)``: proportional to cfg (the negative pass is stock);
- on: ``(uncond_gated − uncond_stock) + cfg·(Δcond − Δuncond)``: the two passes' changes cancel in the guided part.

At cfg 1 ComfyUI skips the negative pass, so both settings are the same run.
"""

from __future__ import annotations

import torch
from cxr_helpers import gate, sample

CFGS = (4.0, 7.0)


def _changes(comfy, tiny_model, chest, apply_to_uncond: bool) -> dict[float, torch.Tensor]:
    gated = gate(comfy, tiny_model.model, chest, apply_to_uncond=apply_to_uncond)
    stock = tiny_model.model
    return {cfg: sample(comfy, gated, chest, steps=1, cfg=cfg) - sample(comfy, stock, chest, steps=1, cfg=cfg)
            for cfg in (1.0, *CFGS)}


def _outside(chest, delta: torch.Tensor) -> float:
    """Mean |Δ| of the latent outside the left lung (the boost's default target: the edit region)."""
    h, w = delta.shape[-2:]
    outside = chest.masks.resampled(h, w).get("left_lung") < 0.5
    return float(delta.abs().mean(1)[0][outside].mean())


def test_cfg_scales_the_gate_change_only_when_the_negative_pass_is_stock(comfy, tiny_model, chest):
    off = _changes(comfy, tiny_model, chest, apply_to_uncond=False)
    on = _changes(comfy, tiny_model, chest, apply_to_uncond=True)
    # cfg 1: no negative pass, so apply_to_uncond cannot matter (same code path: exact)
    assert torch.equal(off[1.0], on[1.0])
    # off: the change is cfg × one fixed latent change. float32 sums of terms ~cfg·|x| round at ~eps·cfg·|x| each;
    # 64 ulps of the largest term covers the few roundings of the guidance sum and the Euler step.
    lo, hi = CFGS
    scale = 64 * torch.finfo(torch.float32).eps * hi * float(off[hi].abs().max() / hi + 1.0)
    torch.testing.assert_close(off[hi] / hi, off[lo] / lo, rtol=0, atol=scale)
    # on: the change outside the edit region grows less from cfg 4 to 7 than with the stock negative pass
    growth_off = _outside(chest, off[hi]) - _outside(chest, off[lo])
    growth_on = _outside(chest, on[hi]) - _outside(chest, on[lo])
    assert growth_off > 0
    assert growth_on < growth_off, (growth_on, growth_off)

"""The refinement energy measured independently of the refinement loop, in either host: the core's CaptureStage on
the encoder layers of the energy grid records the pathology word's map during one ordinary (no-gradient) model
call, and the core's energy formula is applied to that capture. The refinement tests compare it with the energies
the loop recorded.
"""

from __future__ import annotations

import torch

from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.refinement import concentration_energy
from cxr_counterfactual.attention.regions import coverage
from cxr_counterfactual.attention.run_record import RunRecord
from cxr_counterfactual.attention.stages import CaptureStage
from cxr_counterfactual.attention.tokens import TokenMap

LABEL, WORD = "probe", "effusion"


def probe_stage(tokens: TokenMap, target: OrganMasks, grid_factor: int) -> CaptureStage:
    """A capture of ``WORD`` on the encoder layers at ``latent / grid_factor``, always active."""
    return CaptureStage(LABEL, 1e9, 0.0, frozenset({"input"}), label=LABEL, positions={WORD: tokens.indices(WORD)},
                        pathology=(WORD,), grid_factor=grid_factor, target=target, cond_len=tokens.cond_len)


def captured_energy(record: RunRecord, target: OrganMasks, latent: tuple[int, int], smoothing: float) -> float:
    """The energy of the probe's one captured step: ``WORD``'s map averaged over the captured layers."""
    cap = record.capture[LABEL]
    (step,) = cap.steps.values()
    h, w = cap.grid
    maps = (step.maps[WORD] / step.layers)[None]
    return float(concentration_energy(maps, coverage(target, target.names, h, w, latent=latent), smoothing=smoothing))


def comfy_energy(comfy, model, c, x: torch.Tensor, sigma: float, *, grid_factor: int, smoothing: float) -> float:
    """The energy at the latent ``x`` (model space) through ComfyUI's ordinary forward: the probe on ``model``
    during a 1-step SamplerCustom at ``sigma`` without noise, cfg 1 (cond only), target the left lung of the
    chest fixture ``c``."""
    from cxr_counterfactual.hosts.comfy.patch import install_stage, run_state

    target = OrganMasks(("target",), c.masks.union(["left_lung"])[None])
    m = install_stage(model, probe_stage(c.tokens, target, grid_factor), ["attn2"])
    euler = comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    scale = model.model.latent_format.scale_factor
    with torch.inference_mode():  # add_noise off: the seed is unused
        comfy.node("SamplerCustom")().sample(m, False, 0, 1.0, c.positive, c.negative, euler,
                                             torch.tensor([sigma, 0.0]), {"samples": x / scale})
    latent = (int(x.shape[-2]), int(x.shape[-1]))
    return captured_energy(run_state(m).store.latest(), target, latent, smoothing)

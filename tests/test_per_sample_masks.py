"""Per-sample masks: a batch of radiographs, each with its own organ masks, through gate, boost and capture in one
sampler call gives every image the result it gets alone.

Four real radiographs fitted to 64 px (latent 8×7), one ``OrganMaskBatch``: the CheXmask example with its human
masks, its mirror image and a vertically shifted copy (masks moved the same way), and another patient, the NIH
radiograph (cropped to the example's aspect ratio) with the atlas's masks. "Alone" is a batch of one with the same
noise: ComfyUI's ``batch_index`` in the latent makes ``prepare_noise`` give image ``i`` the noise it has in the
batch (the batch run carries ``batch_index`` too, so both draw noise the same way). Real ComfyUI in-process, the tiny
SD1.5 checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from cxr_helpers import chexmask_radiograph, gate
from node_run import run

from cxr_counterfactual.attention.mask_batch import OrganMaskBatch
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.regions import partition
from cxr_counterfactual.errors import CXRInputError

ORGANS = ("right_lung", "left_lung", "heart")
STEPS = 2
# Batch and single runs differ only in float32 rounding: the same rows go through convolutions and attention whose
# kernels block and order their sums by batch size. One float32 op rounds to 2^-24 relative; the tiny UNet's
# reductions run over ≤ 1152 terms (3×3×128 convolution inputs), so one layer's worst case is ≈ 1152 · 2^-24 ≈ 7e-5
# relative, and errors of ~20 layers and 2 steps add to a bound near 3e-3 of the latent's scale.
TOL = 3e-3


@pytest.fixture(scope="module")
def trio(comfy, tiny_model, chexmask_example, data_dir, chest):
    import numpy as np
    from PIL import Image

    image, masks = chexmask_radiograph(chexmask_example)
    nih = Image.open(data_dir / "cxr" / "nih" / "00000001_000.png").convert("RGB")
    nih = torch.from_numpy(np.asarray(nih, dtype=np.float32) / 255.0)[None, :, 32:480]  # 512×448: the example's aspect
    with torch.inference_mode():
        nih_masks = run(comfy.node("CXRAtlasOrgans"), image=nih)[0]
    variants = [
        (image, masks),
        (image.flip(2), OrganMasks(masks.names, masks.data.flip(-1))),
        (image.roll(90, dims=1), OrganMasks(masks.names, masks.data.roll(90, dims=-2))),
        (nih, nih_masks),
    ]
    sets, latents = [], []
    with torch.inference_mode():
        for img, m in variants:
            fitted, fitted_masks, _ = run(comfy.node("CXRFitToModel"), image=img, max_side=64, organ_masks=m)
            latents.append(comfy.node("VAEEncode")().encode(tiny_model.vae, fitted)[0]["samples"])
            sets.append(fitted_masks)
    latent = torch.cat(latents)
    assert latent.shape[-2:] == (8, 7)
    assert all(not torch.equal(sets[0].data, other.data) for other in sets[1:])
    return sets, latent


def regulated(comfy, model, chest, masks):
    """Gate, boost (left lung target) and capture (same target), all from ``masks``."""
    m = gate(comfy, model, chest, organ_masks=masks)
    m = run(comfy.node("CXRPathologyBoost"), model=m, tokens=chest.tokens, organ_masks=masks,
            target_organs="left_lung", factor=4.0)[0]
    return run(comfy.node("CXRCaptureAttention"), model=m, tokens=chest.tokens, organ_masks=masks,
               target_organs="left_lung", grid_factor="1")[0]


def sample(comfy, model, chest, samples, index, seed=5):
    latent = {"samples": samples, "batch_index": list(index)}
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, seed, STEPS, 5.0, "euler", "normal", chest.positive,
                                              chest.negative, latent, denoise=1.0)[0]
    return out["samples"].clone()


def shares(model) -> list[float]:
    from cxr_counterfactual.hosts.comfy.patch import run_state

    capture = run_state(model).store.latest().capture["run"]
    return [s.share_sum / s.share_layers for _, s in sorted(capture.steps.items(), reverse=True)]


def test_each_image_gets_its_own_masks_and_the_result_it_gets_alone(comfy, tiny_model, chest, trio, monkeypatch):
    from cxr_counterfactual.hosts.comfy.patch import CXRReplace

    sets, latent = trio
    seen = []
    original = CXRReplace._gate

    def gated(self, stage, q, k, v, extra, state, field):
        h, w = (int(n) for n in extra["activations_shape"][-2:])
        seen.append((field.sample, (h, w), stage.partition(h, w, field, q.device).labels.cpu().clone()))
        return original(self, stage, q, k, v, extra, state, field)

    monkeypatch.setattr(CXRReplace, "_gate", gated)
    model = regulated(comfy, tiny_model.model, chest, OrganMaskBatch(tuple(sets)))
    batch = sample(comfy, model, chest, latent, range(4))
    batch_shares = shares(model)
    # the gate's labels for image i's rows are image i's masks on each grid
    assert {s for s, _, _ in seen} == {0, 1, 2, 3}
    for s, grid, labels in seen:
        assert torch.equal(labels, partition(sets[s], ORGANS, *grid, latent=(8, 7)).labels), (s, grid)
    monkeypatch.undo()
    alone_shares = []
    for i in range(4):
        single = regulated(comfy, tiny_model.model, chest, sets[i])
        alone = sample(comfy, single, chest, latent[i:i + 1], [i])
        alone_shares.append(shares(single))
        scale = alone.abs().max()
        assert (batch[i] - alone[0]).abs().max() <= TOL * scale, i
    # the images' results differ (their own masks and latents), so equality above is per image
    assert not torch.allclose(batch[0], batch[1], atol=TOL * batch.abs().max())
    # capture: the batch records the mean over images of each image's share in its own target
    expected = [sum(a[j] for a in alone_shares) / 4 for j in range(STEPS)]
    assert batch_shares == pytest.approx(expected, abs=1e-4)  # a share is a ratio of float32 sums (≤ 1e-5 apart)


def test_mask_count_differing_from_the_image_count_is_refused_before_sampling(comfy, tiny_model, chest, trio):
    sets, latent = trio
    two = OrganMaskBatch(tuple(sets[:2]))
    model = gate(comfy, tiny_model.model, chest, organ_masks=two)
    with pytest.raises(CXRInputError, match=r"\[CXR Anatomy Attention Gate\] input 'organ_masks'.*2 mask sets.*"
                                            r"4 images"):
        sample(comfy, model, chest, latent, range(4))
    targets = torch.stack([s.union(["left_lung"]) for s in sets[:2]])
    boost = run(comfy.node("CXRPathologyBoost"), model=tiny_model.model, tokens=chest.tokens, target_mask=targets,
                factor=4.0)[0]
    with pytest.raises(CXRInputError, match=r"\[CXR Pathology Boost\] input 'organ_masks / target_mask'"):
        sample(comfy, boost, chest, latent, range(4))


def test_target_region_builds_one_target_per_image(trio):
    from cxr_counterfactual.attention.stage_builders import target_region

    sets, _ = trio
    per_image = target_region(OrganMaskBatch(tuple(sets)), "left_lung")
    assert isinstance(per_image, OrganMaskBatch) and per_image.count == len(sets)
    for s, t in zip(sets, per_image.samples, strict=True):
        assert torch.equal(t.data[0], s.union(["left_lung"]))
    masks = torch.stack([s.union(["heart"]) for s in sets])
    from_mask = target_region(None, "", masks)
    assert [torch.equal(t.data[0], m) for t, m in zip(from_mask.samples, masks, strict=True)] == [True] * len(sets)
    single = target_region(sets[0], "left_lung")  # one set: one shared target, as before
    assert isinstance(single, OrganMasks) and torch.equal(single.data[0], sets[0].union(["left_lung"]))
    empty = masks.clone()
    empty[1] = 0
    with pytest.raises(CXRInputError, match="target mask 2 of 4 is empty"):
        target_region(None, "", empty)


def test_the_diffusers_host_refuses_a_batch_of_mask_sets(trio):
    """The diffusers host applies one mask set per call: a stage holding one per image is refused when installed."""
    from cxr_counterfactual.attention.stage_builders import gate_stage
    from cxr_counterfactual.hosts.diffusers.processors import install_regulation

    sets, _ = trio
    stage = gate_stage(OrganMaskBatch(tuple(sets)), lambda p: 1.0 - p, title="gate")
    with pytest.raises(CXRInputError, match=r"\[gate\] input 'organ_masks'.*4 mask sets"):
        install_regulation(object(), [stage])
    assert stage.mask_count == len(sets)


def refine(comfy, model, chest, masks, samples, index, sigmas):
    """The CXR Refinement Sampler (target: each image's left lung, energy grid latent ÷ 2, early stop at energy
    0.8, which the shifted image reaches after one iteration of the first step and the others do not) through
    SamplerCustom; the latent and the run's record."""
    sampler = run(comfy.node("CXRRefinementSampler"), tokens=chest.tokens, organ_masks=masks, iterations=3,
                  step_size=0.5, end_percent=1.0, grid_factor="2", smoothing=0.0, thresholds="0:0.8")[0]
    latent = {"samples": samples, "batch_index": list(index)}
    with torch.inference_mode():
        out = comfy.node("SamplerCustom")().sample(model, True, 5, 5.0, chest.positive, chest.negative, sampler,
                                                   sigmas, latent)[0]
    return out["samples"].clone(), sampler.sampler_function.store.for_latent(out["samples"])


def test_refinement_on_a_batch_gives_each_image_the_result_it_gets_alone(comfy, tiny_model, chest, trio):
    """Each image's energy against its own left lung, each stopping at its own threshold: the batch's latents equal
    the images' runs alone (TOL above), and so do the refined latents of the first refined step."""
    sets, latent = trio
    sigmas = comfy.node("BasicScheduler")().get_sigmas(tiny_model.model, "normal", STEPS, 1.0)[0]
    batch, record = refine(comfy, tiny_model.model, chest, OrganMaskBatch(tuple(sets)), latent, range(4), sigmas)
    assert record.refine and record.refine[0].iterations >= 1
    first = record.refine[0]
    alone_iterations = []
    for i in range(4):
        alone, rec = refine(comfy, tiny_model.model, chest, sets[i], latent[i:i + 1], [i], sigmas)
        alone_iterations.append(rec.refine[0].iterations)
        scale = alone.abs().max()
        assert (batch[i] - alone[0]).abs().max() <= TOL * scale, i
        mine = rec.refine[0]
        moved = (first.latent_after[i] - first.latent_before[i]).abs().max()
        assert (first.latent_after[i] - mine.latent_after[0]).abs().max() <= TOL * max(float(moved), float(scale)), i
    # the stop was per image: one image stopped early alone (and so in the batch, as compared above), the batch went on
    assert min(alone_iterations) < first.iterations == max(alone_iterations)
    # another image's target changes the result (the mirror image's left lung lies on the other side): the per-image
    # targets were used
    shared, _ = refine(comfy, tiny_model.model, chest, sets[0], latent, range(4), sigmas)
    assert (shared[1] - batch[1]).abs().max() > TOL * batch.abs().max()

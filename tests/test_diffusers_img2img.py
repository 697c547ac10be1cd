"""The diffusers img2img loop: keep region and latent refinement, on the real radiograph (CheXmask example fitted
to 128 px: latent 16×14) encoded by a tiny random-weight pipeline, with its real organ masks and a real prompt.

- keep region: at every model call the UNet sees the source noised to the current sigma outside the edit
  region, the carried latent there is the source noised to the current sigma, and the result is the source bit
  for bit where the mask keeps cells in full;
- refinement lowers the attention-concentration energy at every refined step, measured again by an independent
  pass (the core's CaptureStage on the same encoder layers); 0 iterations is plain Euler, bit for bit;
- the example script edits the radiograph end to end from a saved pipeline folder.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers_helpers import PROMPT, fitted_masks, require_diffusers, tiny_pipeline
from energy_probe import captured_energy, probe_stage

from cxr_counterfactual.attention.organs import edit_and_keep
from cxr_counterfactual.attention.refinement import RefineConfig, Refinement
from cxr_counterfactual.attention.schedule import DiscreteSchedule
from cxr_counterfactual.attention.stage_builders import target_region
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.hosts.diffusers.pipeline import energy_layers, img2img, latent_mask
from cxr_counterfactual.hosts.diffusers.processors import install_regulation
from cxr_counterfactual.hosts.diffusers.stages import boost_stage, gate_stage, token_map

STEPS, GUIDANCE, GRID = 6, 5.0, 2


@pytest.fixture(scope="module")
def edit(comfyui_path, chexmask_example):
    require_diffusers()
    pipe = tiny_pipeline(comfyui_path)
    image, masks = fitted_masks(chexmask_example, 128)  # [1, 3, 128, 112]
    with torch.no_grad():
        source = pipe.vae.encode(image * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
    assert source.shape[-2:] == (16, 14)
    tokens = token_map(pipe.tokenizer, PROMPT, anatomy="left lung, heart", pathology="effusion")
    region, _ = edit_and_keep(masks, ["left_lung"], margin_px=4, feather_px=2.0, protect=["heart"])
    schedule = DiscreteSchedule.from_scheduler(pipe.scheduler)
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(5))
    return SimpleNamespace(pipe=pipe, masks=masks, source=source, cond=cond, uncond=uncond, tokens=tokens,
                           region=region, schedule=schedule, noise=noise, target=target_region(masks, "left_lung"))


def _run(e, stages, sigmas, **kwargs):
    with torch.no_grad(), install_regulation(e.pipe, stages) as reg:
        return img2img(reg, e.source, e.cond, sigmas, e.noise, uncond=e.uncond, guidance_scale=GUIDANCE, **kwargs)


def test_keep_region_feeds_the_noised_source_and_ends_exactly_at_the_source(edit):
    e = edit
    sigmas = e.schedule.normal_sigmas(STEPS, denoise=0.7)
    stages = [gate_stage(e.masks, e.schedule, tokens=e.tokens), boost_stage(e.tokens, e.target, e.schedule)]
    inputs, carried = [], []

    def see_input(module, args, kwargs):
        inputs.append(args[0].detach().clone())

    hook = e.pipe.unet.register_forward_pre_hook(see_input, with_kwargs=True)
    try:
        out = _run(e, stages, sigmas, edit_mask=e.region, callback=lambda i, s, x: carried.append((s, x.clone())))
    finally:
        hook.remove()
    mask = latent_mask(e.region, e.source)
    kept, edited = mask == 0, mask > 0.9
    assert kept.float().mean() > 0.5 and edited.any()
    assert torch.equal(out.latent[kept], e.source[kept])
    assert (out.latent[edited] - e.source[edited]).abs().mean() > 0.05
    assert len(inputs) == len(carried) == STEPS
    for (sigma, x), seen in zip(carried, inputs, strict=True):
        noised = e.source + e.noise * sigma
        scale = float(noised.abs().max())
        assert torch.allclose(x[kept], noised[kept], atol=1e-5 * scale)  # the carried latent
        x_in = seen[1:] * (sigma**2 + 1) ** 0.5  # the positive half of the CFG batch, c_in undone
        assert torch.allclose(x_in[kept], noised[kept], atol=1e-5 * scale)  # what the UNet sees
    # without a keep region every cell may change
    free = _run(e, stages, sigmas)
    assert (free.latent[kept] - e.source[kept]).abs().mean() > 0.05


def _refiner(e, iterations: int) -> Refinement:
    config = RefineConfig(iterations=iterations, step_size=0.5, end_percent=0.5, smoothing=0.0)
    return Refinement(config, e.target, {"effusion": e.tokens.indices("effusion")}, e.tokens.cond_len, GRID)


def _independent_energy(e, x: torch.Tensor, sigma: float) -> float:
    """The core's CaptureStage on the encoder layers of the energy grid, one UNet call at ``x``'s model input."""
    mask = latent_mask(e.region, e.source)
    x_in = x * mask + (e.source + e.noise * sigma) * (1 - mask)
    t = torch.tensor([float(e.schedule.timestep(sigma))])
    with torch.no_grad(), install_regulation(e.pipe.unet, [probe_stage(e.tokens, e.target, GRID)]) as reg, \
            reg.step((16, 14), sigma):
        e.pipe.unet(x_in / (sigma**2 + 1) ** 0.5, t, encoder_hidden_states=e.cond)
        return captured_energy(reg.record, e.target, (16, 14), smoothing=0)


def test_refinement_lowers_the_independently_measured_energy(edit):
    e = edit
    sigmas = e.schedule.normal_sigmas(STEPS)
    assert energy_layers(e.pipe.unet, (16, 14), GRID) == (("down_blocks.1.attentions.0.transformer_blocks.0.attn2",),
                                                          (8, 7))
    refined = _run(e, [], sigmas, edit_mask=e.region, refine=_refiner(e, 5))
    plain = _run(e, [], sigmas, edit_mask=e.region, refine=_refiner(e, 0))
    assert torch.equal(plain.latent, _run(e, [], sigmas, edit_mask=e.region).latent)  # 0 iterations = Euler
    assert len(refined.refine) == len(plain.refine) >= 2
    for st in refined.refine:
        assert st.iterations == 5
        before = _independent_energy(e, st.latent_before, st.sigma)
        after = _independent_energy(e, st.latent_after, st.sigma)
        assert before == pytest.approx(st.before, abs=1e-4) and after == pytest.approx(st.after, abs=1e-4)
        assert after < before, (st.step, before, after)
        mask = latent_mask(e.region, e.source)
        assert torch.equal(st.latent_after[mask == 0], st.latent_before[mask == 0])  # only the edit moves
    assert refined.refine[-1].after < plain.refine[-1].before
    assert not torch.equal(refined.latent, plain.latent)
    with pytest.raises(CXRInputError, match="grid_factor"):
        _run(e, [], sigmas, refine=Refinement(RefineConfig(), e.target, {"effusion": (12,)}, 77, grid_factor=8))


def test_example_script_edits_the_radiograph(edit, chexmask_example, tmp_path):
    """scripts/diffusers_edit.py on a saved pipeline folder, the real radiograph and its mask files."""
    import importlib.util

    import numpy as np
    from PIL import Image

    from cxr_counterfactual.runner.comfyui_path import PACK_ROOT

    folder = tmp_path / "pipeline"
    edit.pipe.save_pretrained(folder, safe_serialization=True)
    script = PACK_ROOT / "scripts" / "diffusers_edit.py"
    spec = importlib.util.spec_from_file_location("diffusers_edit_example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    src = chexmask_example / "utils_example1.jpg"
    masks = ",".join(f"{o}={chexmask_example / f'{k}_mask.png'}" for o, k in
                     (("right_lung", "RL"), ("left_lung", "LL"), ("heart", "H")))
    out = tmp_path / "edited.png"
    assert example.main(["--pipeline", str(folder), "--image", str(src), "--masks", masks, "--prompt", PROMPT,
                         "--anatomy", "left lung, heart", "--pathology", "effusion", "--size", "128", "--steps", "3",
                         "--refine-iterations", "1", "--device", "cpu", "--out", str(out)]) == 0
    before = np.asarray(Image.open(src).convert("L"))
    after = np.asarray(Image.open(out))
    assert after.shape == before.shape == (899, 786)
    left_lung = torch.from_numpy(np.asarray(Image.open(chexmask_example / "LL_mask.png").convert("L")) > 127)
    # the edit region is the left lung grown by 8 px of the 128 px grid (56 native px) and feathered (σ 4 px):
    # farther than 160 native px from the lung every pixel is the source's own
    pool = torch.nn.functional.max_pool2d  # a square max filter, separably
    near = pool(pool(left_lung.float()[None, None], (321, 1), 1, (160, 0)), (1, 321), 1, (0, 160))[0, 0] > 0
    far = (~near).numpy()
    assert far.mean() > 0.3 and (after[far] == before[far]).all()
    inside = left_lung.numpy()
    assert (after[inside] != before[inside]).mean() > 0.5

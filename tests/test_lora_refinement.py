"""LoRA-patched models and the refinement sampler: a kohya-format LoRA for the tiny SD1.5 UNet, loaded by ComfyUI's
``LoraLoader`` / ``LoraLoaderModelOnly``, must be the model the gradient pass differentiates.

ComfyUI merges LoRA patches into the UNet's weights when it loads the model for sampling (as inference tensors);
the refinement's gradient pass substitutes clones of those weights, so it has to see the merged values. Checked
on the real radiograph at 128 px (latent 16×14; energy grid 8×7 at grid factor 2), with the anatomy gate on.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cxr_helpers import fitted_chest, gate
from energy_probe import comfy_energy
from node_run import run

from cxr_counterfactual.attention.run_record import RefineStep
from cxr_counterfactual.demo.tiny_checkpoint import UNET_CONFIG
from cxr_counterfactual.testing.tiny_lora import build_tiny_lora, tiny_sd15_lora_targets

STEPS, CFG, SEED = 6, 5.0, 3
REFINE = dict(iterations=3, step_size=0.5, grid_factor="2", smoothing=0.0)  # the rest at the node's defaults


@pytest.fixture(scope="module")
def c128(comfy, tiny_model, chexmask_example) -> SimpleNamespace:
    """The radiograph fitted to 128 px (latent 16×14), its masks, conditioning, tokens and schedule."""
    return fitted_chest(comfy, tiny_model, chexmask_example, max_side=128, steps=STEPS)


def with_lora(comfy, model, lora_name: str, strength: float):
    with torch.inference_mode():
        return comfy.node("LoraLoaderModelOnly")().load_lora_model_only(model, lora_name, strength)[0]


def refiner(comfy, c, **overrides):
    return run(comfy.node("CXRRefinementSampler"), tokens=c.tokens, organ_masks=c.masks, **{**REFINE, **overrides})[0]


def sample(comfy, model, c, sampler, sigmas=None, latent=None, cfg=CFG, add_noise=True) -> torch.Tensor:
    with torch.inference_mode():
        return comfy.node("SamplerCustom")().sample(model, add_noise, SEED, cfg, c.positive, c.negative, sampler,
                                                   c.sigmas if sigmas is None else sigmas, latent or c.latent)[0][
            "samples"]


def refined_run(comfy, model, c, **overrides) -> tuple[torch.Tensor, list[RefineStep]]:
    """Latent and refinement record of one refined run of ``model`` (gated, as users run it)."""
    sampler = refiner(comfy, c, **overrides)
    out = sample(comfy, gate(comfy, model, c), c, sampler)
    return out, sampler.sampler_function.store.for_latent(out).refine


def forward_energy(comfy, model, c, x: torch.Tensor, sigma: float) -> float:
    """The energy at ``x`` through ComfyUI's ordinary forward (no gradient pass): CXR's capture stage on the 8×7
    encoder layers during a 1-step SamplerCustom at ``sigma``, cond only, with the same gate as the refined run."""
    return comfy_energy(comfy, gate(comfy, model, c), c, x, sigma, grid_factor=2, smoothing=0.0)


def test_comfyui_maps_every_lora_key_onto_the_intended_weight(comfy, tiny_model, lora_name):
    """Kohya's diffusers-path names land on the tiny UNet's own layers (one res block per level: the level-L
    transformer is input_blocks.(1 + 2L).1), and LoraLoaderModelOnly patches exactly those weights."""
    import comfy.lora as comfy_lora  # aliased: the fixture is called comfy

    key_map = comfy_lora.model_lora_keys_unet(tiny_model.model.model, {})
    per_level = UNET_CONFIG["num_res_blocks"][0] + 1  # type: ignore[index]
    expected = {
        f"lora_unet_down_blocks_{level}_attentions_0_transformer_blocks_0_{attn}_{proj}":
            f"diffusion_model.input_blocks.{1 + per_level * level}.1.transformer_blocks.0.{attn}.{proj}.weight"
        for level, attn in ((0, "attn1"), (0, "attn2"), (1, "attn2")) for proj in ("to_q", "to_k")
    }
    assert set(tiny_sd15_lora_targets()) == set(expected)
    assert {name: key_map.get(name) for name in expected} == expected
    patched = with_lora(comfy, tiny_model.model, lora_name, 1.0)
    assert set(patched.patches) == set(expected.values())
    assert set(tiny_model.model.patches) == set()  # the loader patched a clone


@pytest.mark.slow
def test_refinement_runs_on_a_lora_model_and_lowers_its_energy(comfy, tiny_model, c128, lora_name):
    lora = with_lora(comfy, tiny_model.model, lora_name, 1.0)
    out, record = refined_run(comfy, lora, c128)
    assert torch.isfinite(out).all()
    assert len(record) >= 2
    for st in record:
        assert st.iterations == REFINE["iterations"] and st.after < st.before, st.step
    plain, _ = refined_run(comfy, tiny_model.model, c128)
    assert float((out - plain).abs().mean()) > 1e-3, "the LoRA must change the refined result"
    # LoraLoader (model and CLIP) gives the same model patches: the same refined latent.
    with torch.inference_mode():
        both = comfy.node("LoraLoader")().load_lora(tiny_model.model, tiny_model.clip, lora_name, 1.0, 1.0)[0]
    assert torch.equal(refined_run(comfy, both, c128)[0], out)


@pytest.mark.slow
def test_the_gradient_pass_differentiates_the_lora_weights(comfy, tiny_model, c128, lora_name):
    """At the first refined step every run starts from the same noisy latent: the energy the gradient pass measured
    there follows the LoRA strength and equals ComfyUI's ordinary forward of that model, so the pass used the
    merged weights (not the base weights, not a stale copy)."""
    runs = {s: refined_run(comfy, with_lora(comfy, tiny_model.model, lora_name, s) if s else tiny_model.model, c128)
            for s in (0.0, 0.5, 1.0)}
    first = {s: record[0] for s, (_, record) in runs.items()}
    assert all(torch.equal(first[s].latent_before, first[0.0].latent_before) for s in first)
    befores = sorted(st.before for st in first.values())
    assert min(b - a for a, b in zip(befores, befores[1:], strict=False)) > 1e-3, befores
    assert not torch.equal(first[1.0].latent_after, first[0.0].latent_after)  # another gradient
    assert not torch.equal(runs[1.0][0], runs[0.5][0])
    for s, st in first.items():
        model = with_lora(comfy, tiny_model.model, lora_name, s) if s else tiny_model.model
        # Agreement measured at 6e-8; the strengths' energies differ by 2.6e-3 and more.
        energy = forward_energy(comfy, model, c128, st.latent_before, st.sigma)
        assert energy == pytest.approx(st.before, abs=1e-5), s


def test_lora_and_gate_commute(comfy, tiny_model, c128, lora_name):
    """LoRA then gate, or gate then LoRA: weight patches and attention patches are independent."""
    sampler = refiner(comfy, c128)
    a = sample(comfy, gate(comfy, with_lora(comfy, tiny_model.model, lora_name, 1.0), c128), c128, sampler)
    b = sample(comfy, with_lora(comfy, gate(comfy, tiny_model.model, c128), lora_name, 1.0), c128, sampler)
    assert torch.equal(a, b)


def test_lora_file_is_seeded(tmp_path: Path):
    from safetensors.torch import load_file

    first, again, other = (load_file(build_tiny_lora(tmp_path / f"{n}.safetensors", seed=s))
                           for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert first.keys() == again.keys() == other.keys() and len(first) == 3 * len(tiny_sd15_lora_targets())
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[k := next(k for k in first if k.endswith("lora_up.weight"))], other[k])

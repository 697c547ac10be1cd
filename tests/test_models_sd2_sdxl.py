"""SD2.x (v-prediction) and SDXL-family checkpoints: ComfyUI's own loader detects them, and the whole regulation
(text encode with token map, gate, boost, capture, refinement sampler, keep region) runs on them as on SD1.5.

The checkpoints are the tiny random-weight ones of ``testing/tiny_models.py`` (full-size text encoders), loaded
by ``CheckpointLoaderSimple``; one family is loaded at a time (module-scoped, parametrised fixture). The real
CheXmask radiograph is fitted to 128 px: latent 16×14, so SD2's attention runs at 16×14, 8×7 and 4×4 and
Segmind Vega's (none at level 0) at 8×7 and 4×4. Tests that need the checkpoints are marked slow: building them
takes ≈ 8 s + 13 s on one core (0.6 + 1.0 GB, deleted when the session ends).
"""

from __future__ import annotations

import gc
import math
from types import SimpleNamespace

import pytest
import torch
from cxr_helpers import PROMPT, fitted_chest, gate
from host_fixtures import load_checkpoint
from node_run import run

SIZE = 128
STEPS, CFG, SEED = 4, 5.0, 11
# The stages at their schema defaults but for these.
BOOST = dict(end_percent=0.5)
CAPTURE = dict(label="chain")
REFINE = dict(iterations=2, step_size=0.5, grid_factor="2", smoothing=0.0)
REGIONS = dict(edit_organs="left_lung", margin_px=4, feather_px=3.0, protect="heart")  # on the 128 px mask grid
ROUNDING = 1e-5  # ComfyUI's keep path ends at the source up to float rounding (see test_keep_inversion.py)

# What ComfyUI must detect, per family, and the text-encoder facts the token locator relies on.
FAMILIES = {
    "sd2": SimpleNamespace(config="SD20", model_type="V_PREDICTION", base="BaseModel", context=1024, pooled=None,
                           encoders={"h": ("clip_h", 24, 0)}, adm=None,
                           file_keys=("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight",
                                      "cond_stage_model.model.text_projection",
                                      "cond_stage_model.model.token_embedding.weight")),
    "sdxl": SimpleNamespace(config="Segmind_Vega", model_type="EPS", base="SDXL", context=2048, pooled=1280,
                            encoders={"g": ("clip_g", 32, 0), "l": ("clip_l", 12, 49407)}, adm=2816,
                            file_keys=("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                                       "conditioner.embedders.1.model.text_projection",
                                       "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1"
                                       ".weight")),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, comfy, chexmask_example):
    """One family's MODEL/CLIP/VAE (CheckpointLoaderSimple), the radiograph at 128 px, conditioning and tokens."""
    from cxr_counterfactual.testing import tiny_models

    name = request.param
    path = request.getfixturevalue(f"tiny_{name}_checkpoint")
    loaded = load_checkpoint(comfy, path)
    chest = fitted_chest(comfy, loaded, chexmask_example, max_side=SIZE, steps=STEPS)
    assert chest.latent["samples"].shape[-2:] == (16, 14)
    config = tiny_models.SD2_UNET_CONFIG if name == "sd2" else tiny_models.SDXL_UNET_CONFIG
    yield SimpleNamespace(name=name, spec=FAMILIES[name], path=path, unet_config=config, model=loaded.model,
                          clip=loaded.clip, vae=loaded.vae, **vars(chest))
    del loaded
    gc.collect()  # one family in memory at a time (SDXL's text encoders are 1.5 GB in float16)


def euler(comfy):
    return comfy.node("KSamplerSelect")().get_sampler("euler")[0]


def sample(comfy, model, f, sampler=None, latent=None) -> dict:
    """SamplerCustom (cfg 5: cond and uncond passes) over the family's 4-step schedule."""
    with torch.inference_mode():
        return comfy.node("SamplerCustom")().sample(model, True, SEED, CFG, f.positive, f.negative,
                                                   sampler or euler(comfy), f.sigmas, latent or f.latent)[0]


def refiner(comfy, f, **overrides):
    return run(comfy.node("CXRRefinementSampler"), tokens=f.tokens, organ_masks=f.masks, **{**REFINE, **overrides})[0]


def boost(comfy, model, f):
    return run(comfy.node("CXRPathologyBoost"), model=model, tokens=f.tokens, organ_masks=f.masks, **BOOST)[0]


def capture(comfy, model, f, label="chain"):
    return run(comfy.node("CXRCaptureAttention"), model=model, tokens=f.tokens, organ_masks=f.masks,
               **{**CAPTURE, "label": label})[0]


# ---------------------------------------------------------------------------------------------------------------
# the checkpoints
@pytest.mark.slow
def test_file_layout(family) -> None:
    """Text encoders in the key layout of real checkpoints (OpenCLIP names where ComfyUI converts them), float8;
    UNet float16; TAESD; the recipe's one metadata entry."""
    from safetensors import safe_open

    from cxr_counterfactual.demo import tiny_checkpoint
    from cxr_counterfactual.testing import tiny_models

    with safe_open(str(family.path), framework="pt") as fh:
        keys = set(fh.keys())
        dtypes = {k: fh.get_slice(k).get_dtype() for k in keys}
        assert fh.metadata() == {tiny_checkpoint.METADATA_KEY: f"tiny-{family.name} v{tiny_models.RECIPE_VERSION} "
                                 "seed 0"}
    for key in family.spec.file_keys:
        assert key in keys, key
    text = [k for k in keys if k.startswith(("cond_stage_model.", "conditioner."))]
    assert {dtypes[k] for k in text if not k.endswith("position_ids")} == {"F8_E4M3"}
    assert {dtypes[k] for k in keys if k.startswith("model.diffusion_model.")} == {"F16"}
    assert "first_stage_model.taesd_decoder.1.weight" in keys
    assert not any(".resblocks.32." in k or ".layers.12." in k for k in text), "text encoders are exactly full size"
    assert not any(k.startswith(("cond_stage_model.", "conditioner.")) and ".q_proj." in k and "embedders.0" not in k
                   for k in keys), "OpenCLIP encoders are stored with fused in_proj, as real checkpoints"


@pytest.mark.slow
def test_detected_by_comfyuis_loader(family) -> None:
    import comfy.model_base

    from cxr_counterfactual.testing.tiny_models import V_MARKER_KEY

    base = family.model.model
    config = base.model_config
    assert type(config).__name__ == family.spec.config
    assert base.model_type == comfy.model_base.ModelType[family.spec.model_type]
    assert type(base).__name__ == family.spec.base
    for key in ("context_dim", "transformer_depth", "transformer_depth_output", "channel_mult", "num_res_blocks",
                "adm_in_channels", "use_linear_in_transformer"):
        assert config.unet_config[key] == family.unet_config[key], key
    unet_params = sum(p.numel() for p in base.diffusion_model.parameters())
    assert 100e6 < unet_params < 125e6, unet_params  # tiny, but real widths (320 channels, 64-channel heads)
    # Every text encoder is full size and its deepest layer came from the file (std 0.02 init, not garbage).
    for attr, layers, _ in family.spec.encoders.values():
        encoder = getattr(family.clip.cond_stage_model, attr)
        assert encoder.num_layers == layers
        deepest = encoder.transformer.text_model.encoder.layers[layers - 1].mlp.fc1.weight.float()
        assert torch.isfinite(deepest).all() and 0.015 < float(deepest.std()) < 0.025, attr
    # The v-prediction marker is what makes SD20 v-prediction: the same config reads a zero bias as eps.
    prefix = "model.diffusion_model."
    zero = {prefix + V_MARKER_KEY: torch.zeros(320)}
    assert config.model_type(zero, prefix) == comfy.model_base.ModelType.EPS
    if family.name == "sd2":
        marker = base.diffusion_model.get_parameter(V_MARKER_KEY).detach()
        assert float(marker.std(unbiased=False)) > 0.09
        assert config.model_type({prefix + V_MARKER_KEY: marker}, prefix) == comfy.model_base.ModelType.V_PREDICTION


def test_streamed_init_draws_exactly_what_the_in_memory_init_draws(comfy) -> None:
    """The layer-by-layer build on a meta skeleton gives the same tensors as initialising the whole module and
    casting it (the SD1.5 recipe's way), so streaming only saves memory. A narrow CLIP keeps this quick."""
    import comfy.clip_model as clip_model  # aliases: the fixture is called comfy
    import comfy.ops as ops

    from cxr_counterfactual.demo.tiny_checkpoint import _init_module_, _prefixed
    from cxr_counterfactual.testing.tiny_models import _streamed_state

    config = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 3,
              "vocab_size": 1000, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "eos_token_id": 999}
    whole = clip_model.CLIPTextModel(config, torch.float32, "cpu", ops.disable_weight_init)
    _init_module_(whole, torch.Generator().manual_seed(5))
    expected = _prefixed(whole.state_dict(), "x.", torch.float8_e4m3fn)
    skeleton = clip_model.CLIPTextModel(config, torch.float32, "meta", ops.disable_weight_init)
    streamed = _streamed_state(skeleton, torch.Generator().manual_seed(5), torch.float8_e4m3fn, "x.")
    assert list(streamed) == list(expected)
    assert all(torch.equal(streamed[k].view(torch.uint8), expected[k].view(torch.uint8)) for k in expected)
    assert all(p.is_meta for p in skeleton.parameters()), "every layer's float32 copy was released"


def test_recipe_names() -> None:
    from cxr_counterfactual.testing import tiny_models

    assert tiny_models.checkpoint_name("sdxl") == f"tiny-sdxl-v{tiny_models.RECIPE_VERSION}.safetensors"
    with pytest.raises(ValueError, match="unknown tiny-model recipe 'sd3'"):
        tiny_models.checkpoint_name("sd3")


# ---------------------------------------------------------------------------------------------------------------
# text encoding: the token map on 'h' (SD2) and 'g' + 'l' (SDXL)
@pytest.mark.slow
def test_text_encode_token_map_matches_every_tokenizer(comfy, family) -> None:
    clip, enc = family.clip, comfy.node("CXRTextEncode")
    tokens = clip.tokenize(PROMPT)
    assert set(tokens) == set(family.spec.encoders)
    for key, (attr, _, pad) in family.spec.encoders.items():
        ids = [t[0] for t in tokens[key][0]]
        word = getattr(clip.tokenizer, attr).tokenizer("effusion")["input_ids"][1:-1]
        assert [ids[p] for p in family.tokens.positions["effusion"]] == word, key
        assert ids[-1] == pad, f"'{key}' pads with {pad}"  # SD2's h and SDXL's g pad with 0, not the end token
    with torch.inference_mode():
        stock = comfy.node("CLIPTextEncode")().encode(clip, PROMPT)[0]
    cond, extra = family.positive[0]
    assert cond.shape == (1, 77, family.spec.context) and torch.isfinite(cond).all()
    assert torch.equal(cond, stock[0][0]), "CXR Text Encode encodes exactly as CLIP Text Encode"
    pooled = extra.get("pooled_output")
    if family.spec.pooled is not None:
        assert pooled.shape == (1, family.spec.pooled) and torch.equal(pooled, stock[0][1]["pooled_output"])
    long_text = "chest x-ray " + "normal study " * 40 + "left pleural effusion"
    long_cond, long_map = run(enc, clip=clip, text=long_text, anatomy="", pathology="effusion")
    assert long_map.cond_len == 154 and min(long_map.positions["effusion"]) > 77
    assert long_cond[0][0].shape == (1, 154, family.spec.context)
    with pytest.raises(ValueError, match=r"\[CXR Text Encode.*'pneumothorax' is not in the prompt"):
        run(enc, clip=clip, text=PROMPT, anatomy="", pathology="pneumothorax")


@pytest.mark.slow
def test_adm_input_carries_the_pooled_text(comfy, family) -> None:
    """SDXL's UNet gets ``y`` = [pooled CLIP-G (1280) | size embedding] from CLIPTextEncode's pooled_output and
    ComfyUI's default sizes; SD2 has no adm input."""
    from comfy.patcher_extension import WrappersMP

    seen: list = []

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen.append((kwargs.get("y"), transformer_options["cond_or_uncond"]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    (m := gate(comfy, family.model, family)).add_wrapper_with_key(WrappersMP.APPLY_MODEL, "cxr_test_adm", wrapper)
    with torch.inference_mode():  # KSampler this time: no size inputs, ComfyUI's defaults fill the size embedding
        out = comfy.node("KSampler")().sample(m, SEED, STEPS, CFG, "euler", "normal", family.positive,
                                              family.negative, family.latent)[0]["samples"]
    assert torch.isfinite(out).all() and len(seen) == STEPS
    for y, cond_or_uncond in seen:
        if family.spec.adm is None:
            assert y is None
            continue
        assert y.shape == (len(cond_or_uncond), family.spec.adm) and torch.isfinite(y).all()
        row = cond_or_uncond.index(0)  # 0 = the positive prompt
        torch.testing.assert_close(y[row, :1280], family.positive[0][1]["pooled_output"][0].to(y.dtype))


# ---------------------------------------------------------------------------------------------------------------
# the regulation
@pytest.mark.slow
def test_probe_every_transformer_block_regulated_at_every_step(comfy, family) -> None:
    from cxr_counterfactual.hosts.comfy.patch import run_state
    from cxr_counterfactual.hosts.comfy.unet_layout import transformer_keys

    keys = transformer_keys(family.model)
    cfg = family.unet_config
    assert len(keys) == sum(cfg["transformer_depth"]) + sum(cfg["transformer_depth_output"]) + max(
        cfg["transformer_depth_middle"], 0)
    patched = gate(comfy, family.model, family)
    state = run_state(patched)
    state.trace_enabled = True
    out = sample(comfy, patched, family)["samples"]
    assert torch.isfinite(out).all()
    trace = state.store.latest().trace
    sigmas = {s for _, _, s, _ in trace}
    assert len(sigmas) == STEPS
    for kind in ("attn1", "attn2"):
        for sigma in sigmas:
            calls = {key: gated for k, key, s, gated in trace if k == kind and s == sigma}
            assert set(calls) == set(keys) and set(calls.values()) == {True}, (kind, sigma)


@pytest.mark.slow
def test_hard_gate_confines_self_attention_to_regions_in_every_layer(comfy, family) -> None:
    """Another pack's attn1 replace under the gate becomes its kernel: with hard gating and confined background,
    each layer calls it once per region with that region's tokens only (sizes summing to N) for the positive
    rows, then once with every token for the negative rows, which stay the other pack's own call (it may read
    their whole attention, as SAG does). (At 2×2, SD2's middle block, the partition has one region.)"""
    import comfy.ldm.modules.attention as comfy_attention

    from cxr_counterfactual.attention.regions import partition
    from cxr_counterfactual.hosts.comfy.unet_layout import transformer_keys

    calls: list[tuple] = []

    def foreign(q, k, v, extra):
        h, w = (int(n) for n in extra["activations_shape"][-2:])
        calls.append(((extra["block"][0], extra["block"][1], extra["block_index"]), h, w, q.shape[1],
                      k.shape[1]))
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"], transformer_options=extra)

    keys = transformer_keys(family.model)
    m = family.model.clone()
    for block, number, index in keys:
        m.set_model_attn1_replace(foreign, block, number, index)
    organs = "right_lung, left_lung, heart"
    gated = gate(comfy, m, family, organs=organs, background="confined", apply_to_uncond=False, token_strength=0.0)
    out = sample(comfy, gated, family)["samples"]
    assert torch.isfinite(out).all()
    assert {c[0] for c in calls} == set(keys)
    latent = tuple(family.latent["samples"].shape[-2:])
    i = 0
    while i < len(calls):  # one layer call = consecutive kernel calls covering its N tokens
        key, h, w = calls[i][:3]
        counts = [n for n in partition(family.masks, tuple(o.strip() for o in organs.split(",")), h, w,
                                       latent=latent).counts if n]
        group = calls[i:i + len(counts)]
        assert [c[3] for c in group] == counts, (key, h, w)  # one kernel call per region, its tokens only
        assert all(c[0] == key and c[3] == c[4] for c in group), key  # keys from the same region
        assert len(counts) >= 2 or h * w <= 4, (key, h, w)  # split wherever the grid can hold two regions
        assert calls[i + len(counts)][:5] == (key, h, w, h * w, h * w)  # the negative rows: one whole call
        i += len(counts) + 1


@pytest.mark.slow
def test_strength_zero_is_stock_and_regulation_changes_the_output(comfy, family) -> None:
    off = gate(comfy, family.model, family, strength=0.0, token_strength=0.0)
    assert off is family.model
    assert run(comfy.node("CXRPathologyBoost"), model=family.model, tokens=family.tokens, organ_masks=family.masks,
               **{**BOOST, "factor": 1.0})[0] is family.model
    stock = sample(comfy, family.model, family)["samples"]
    assert torch.equal(sample(comfy, family.model, family, refiner(comfy, family, iterations=0))["samples"], stock)
    assert torch.equal(sample(comfy, capture(comfy, family.model, family), family)["samples"], stock)
    for patched in (gate(comfy, family.model, family), boost(comfy, family.model, family)):
        out = sample(comfy, patched, family)["samples"]
        assert torch.isfinite(out).all() and float((out - stock).abs().mean()) > 1e-4


@pytest.mark.slow
def test_boost_raises_the_captured_in_target_share(comfy, family) -> None:
    from cxr_counterfactual.hosts.comfy.patch import run_state

    sigma_end = float(family.model.get_model_object("model_sampling").percent_to_sigma(BOOST["end_percent"]))
    shares = {}
    for label, model in (("stock", family.model), ("boosted", boost(comfy, family.model, family))):
        m = capture(comfy, model, family, label=label)
        sample(comfy, m, family)
        steps = run_state(m).store.latest().capture[label].steps
        shares[label] = {s: st.share_sum / st.share_layers for s, st in steps.items() if s >= sigma_end}
    assert len(shares["stock"]) >= 2
    for s, stock_share in shares["stock"].items():
        assert shares["boosted"][s] > stock_share + 0.01, (s, stock_share, shares["boosted"][s])


@pytest.mark.slow
def test_full_chain_with_refinement_and_keep_region(comfy, family) -> None:
    """Gate → boost → capture → refinement sampler on the keep latent → exact paste, against the stock chain."""
    from cxr_counterfactual.hosts.comfy.patch import run_state
    from cxr_counterfactual.nodes.keep import latent_keep_mask

    edit, _, _ = run(comfy.node("CXREditKeepRegions"), organ_masks=family.masks, **REGIONS)
    keep_latent, _ = run(comfy.node("CXRApplyKeepRegion"), latent=family.latent, edit_region=edit)
    kept = latent_keep_mask(keep_latent["noise_mask"], keep_latent["samples"])
    assert 0 < int(kept[0, 0].sum()) < kept[0, 0].numel()
    model = capture(comfy, boost(comfy, gate(comfy, family.model, family), family), family)
    sampler = refiner(comfy, family)
    out = sample(comfy, model, family, sampler, latent=keep_latent)
    stock = sample(comfy, family.model, family, latent=keep_latent)["samples"]
    samples = out["samples"]
    assert torch.isfinite(samples).all()
    source = family.latent["samples"]
    scale = float(source.abs().max())
    assert float((samples - source).abs()[kept].max()) <= ROUNDING * scale  # the keep path held
    assert float((samples - stock).abs()[~kept].mean()) > 1e-3  # regulated inside the edit region
    pasted = run(comfy.node("CXRPasteKeepRegion"), samples=out, source=keep_latent)[0]["samples"]
    assert torch.equal(pasted[kept], source[kept]) and torch.equal(pasted[~kept], samples[~kept])
    refined = sampler.sampler_function.store.for_latent(samples).refine
    assert len(refined) >= 2 and all(st.iterations == REFINE["iterations"] for st in refined)
    for st in refined:
        assert math.isfinite(st.before) and st.after < st.before, (st.step, st.before, st.after)
    record = run_state(model).store.latest()
    assert record.refine is refined and record.capture["chain"].steps
    with torch.inference_mode():
        image = comfy.node("VAEDecode")().decode(family.vae, {"samples": pasted})[0]
    assert image.shape == (1, SIZE, 112, 3) and torch.isfinite(image).all()

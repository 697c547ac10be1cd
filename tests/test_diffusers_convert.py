"""``python -m cxr_counterfactual convert-diffusers``: a diffusers SD1.x pipeline folder (RoentGen's layout) into one
checkpoint that ComfyUI's own CheckpointLoaderSimple loads as SD1.5, with the folder's text encoder.

The folder is a FULL-size SD1.5 pipeline with random weights, built here from diffusers' and transformers' own
classes (UNet 860 M parameters, CLIP text model 12 layers × 768, AutoencoderKL with SD's config, CLIP's tokenizer
from the files ComfyUI ships, a PNDM scheduler with SD's betas), stored as float16 safetensors by
``save_pretrained`` and built once per session (~30 s on 2 cores, 2.1 GB).
"""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch
from diffusers_helpers import PROMPT, SD_BETAS, clip_tokenizer, require_diffusers

from cxr_counterfactual.errors import CXRInputError


@pytest.fixture
def comfy_host(comfy):
    """The in-process ComfyUI (named apart from the ``comfy`` package this test imports)."""
    return comfy


@pytest.fixture(scope="session")
def sd15_folder(comfyui_path, tmp_path_factory):
    """A full-size random-weight SD1.5 pipeline folder in diffusers' layout (float16 safetensors)."""
    require_diffusers()
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("sd15-diffusers") / "cxr-sd15"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).half()
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, projection_dim=768)).half()
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512).half()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(comfyui_path), unet=unet,
                                   scheduler=PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1),
                                   safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    assert sum(p.numel() for p in unet.parameters()) > 850e6
    del pipe, unet, text, vae
    gc.collect()
    return folder


@pytest.mark.slow
def test_converted_folder_loads_in_comfyui_as_sd15_with_its_own_text_encoder(comfy_host, comfyui_path, sd15_folder,
                                                                             tmp_path):
    import comfy.model_management
    import folder_paths
    from comfy.model_detection import unet_config_from_diffusers_unet
    from comfy.utils import unet_to_diffusers
    from safetensors.torch import load_file

    from cxr_counterfactual.__main__ import main
    from cxr_counterfactual.hosts.comfy.convert_diffusers import text_encoder_state

    out = tmp_path / "cxr-sd15.safetensors"
    assert main(["convert-diffusers", str(sd15_folder), str(out)]) == 0
    assert main(["convert-diffusers", str(sd15_folder), str(out)]) == 2  # never overwritten silently
    folder_paths.add_model_folder_path("checkpoints", str(tmp_path))
    with torch.inference_mode():
        model, clip, vae = comfy_host.node("CheckpointLoaderSimple")().load_checkpoint(out.name)[:3]
    assert type(model.model.model_config).__name__ == "SD15"

    # every UNet tensor arrived under ComfyUI's name, exactly (float16 in the folder and in the file)
    unet = load_file(str(sd15_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    key_map = unet_to_diffusers(unet_config_from_diffusers_unet(unet))
    loaded = model.model.diffusion_model.state_dict()
    assert len(unet) == len(loaded) == 686
    assert all(torch.equal(loaded[key_map[k]].to(v.dtype), v) for k, v in unet.items())
    del unet, loaded

    # the text encoder is the folder's: its weights, and its output for a real prompt
    text = text_encoder_state(load_file(str(sd15_folder / "text_encoder" / "model.safetensors")))
    ours = clip.cond_stage_model.clip_l.transformer.state_dict()
    assert len(text) == 196 and all(torch.equal(ours[k].to(v.dtype), v) for k, v in text.items())
    with torch.inference_mode():
        comfy_cond = clip.encode_from_tokens(clip.tokenize(PROMPT))
    from transformers import CLIPTextModel

    reference = CLIPTextModel.from_pretrained(sd15_folder / "text_encoder", torch_dtype=torch.float32)
    ids = clip_tokenizer(comfyui_path)(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
    rel = float((comfy_cond.float() - expected).abs().max() / expected.abs().max())
    assert rel < 1e-4, rel  # the same float16 weights computed in float32 by both (measured 6e-7)

    # the VAE: SD names, attention projections reshaped to 1×1 convolutions
    vae_sd = vae.first_stage_model.state_dict()
    folder_vae = load_file(str(sd15_folder / "vae" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(vae_sd["encoder.conv_in.weight"].to(torch.float16), folder_vae["encoder.conv_in.weight"])
    assert torch.equal(vae_sd["decoder.mid.attn_1.q.weight"].to(torch.float16)[..., 0, 0],
                       folder_vae["decoder.mid_block.attentions.0.to_q.weight"])

    # one UNet forward: ComfyUI's UNet from the file vs diffusers' from the folder
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        theirs = model.model.diffusion_model(x, t, context=ctx).float()
    del model, clip, vae, vae_sd, ours, reference
    comfy.model_management.unload_all_models()  # ComfyUI's model list holds the loaded CLIP
    gc.collect()
    from diffusers import UNet2DConditionModel

    with torch.no_grad():
        reference_unet = UNet2DConditionModel.from_pretrained(sd15_folder / "unet", torch_dtype=torch.float32)
        expected_eps = reference_unet(x, t, encoder_hidden_states=ctx).sample
    del reference_unet
    # float32 on both sides, other kernels and op order (measured 1.4e-6 of the output's largest magnitude)
    assert float((theirs - expected_eps).abs().max() / expected_eps.abs().max()) < 1e-4


def test_folder_errors_name_the_fix(comfy, comfyui_path, tmp_path):
    """Refusals before any weight is read: no model_index, pickle-only weights, a changed tokenizer."""
    from cxr_counterfactual.hosts.comfy.convert_diffusers import convert

    folder = tmp_path / "pipe"
    with pytest.raises(CXRInputError, match="model_index.json"):
        convert(folder, tmp_path / "a.safetensors")
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CXRInputError, match="lacks tokenizer"):
        convert(folder, tmp_path / "a.safetensors")
    shutil.copytree(comfyui_path / "comfy" / "sd1_tokenizer", folder / "tokenizer")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CXRInputError, match=r"pickle.*safe_serialization=True"):
        convert(folder, tmp_path / "a.safetensors")
    (folder / "tokenizer" / "added_tokens.json").write_text(json.dumps({"<effusion>": 49408}))
    with pytest.raises(CXRInputError, match="tokenizer is not CLIP's"):
        convert(folder, tmp_path / "a.safetensors")
    with pytest.raises(CXRInputError, match=r"\.safetensors"):
        convert(folder, tmp_path / "a.ckpt")
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModel"]}
    (sdxl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CXRInputError, match="SD1.x"):
        convert(sdxl, tmp_path / "b.safetensors")

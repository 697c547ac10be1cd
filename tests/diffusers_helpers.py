"""Helpers of the diffusers tests: a tiny random-weight diffusers UNet and its ComfyUI twin, the SD1 tokenizer
ComfyUI ships, and the real radiograph's masks fitted to a latent.

The tiny UNet has SD1.5's layout in miniature: three levels (32, 64, 64 channels), cross-attention on the first
two and none on the last (as SD1.5's fourth level), one res block per level, 8 heads (head dims 4 and 8),
768-wide context. Its ComfyUI twin is built from a hand-written ``unet_config`` (ComfyUI's automatic diffusers
detection only knows full-size models) with the weights mapped by ``comfy.utils.unet_to_diffusers``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from conftest import need

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' UNet2DConditionModel reads this as the number of heads (SD1.x: 8)
}

#: The same network in ComfyUI's terms (SD15's unet_extra_config adds num_heads 8, num_head_channels -1).
TINY_COMFY_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2], "transformer_depth": [1, 1, 0], "transformer_depth_output": [1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": torch.float32,
}

PROMPT = "chest x-ray, left lung with large pleural effusion, normal heart"

#: Float32 agreement between two different kernels, batch splits or op orders over a UNet's ~20 layers, as a
#: fraction of the output's largest magnitude: float32's epsilon (1.2e-7) times ~170, i.e. a few ulps per layer.
#: Measured 5e-7 … 1e-6 on two CPUs; exact equality would depend on the CPU (it did: 1e-6 on another one).
FLOAT32_KERNEL_TOL = 2e-5


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference as a fraction of ``b``'s largest magnitude."""
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def require_diffusers() -> None:
    need(importlib.util.find_spec("diffusers") is not None, "diffusers is not installed (pip install '.[diffusers]')")


def tiny_unet(seed: int = 0):
    """The tiny diffusers UNet with diffusers' own (seeded) initialisation, float32, eval mode."""
    require_diffusers()
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
    return unet.eval().requires_grad_(False)


def comfy_twin(unet):
    """A ComfyUI ModelPatcher (SD15 model config, EPS) holding exactly ``unet``'s weights."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    key_map = comfy.utils.unet_to_diffusers(TINY_COMFY_UNET)  # diffusers key -> ComfyUI key
    state = unet.state_dict()
    # every diffusers tensor has a ComfyUI name (the map also names layers this layout lacks, e.g. a last-level
    # downsampler); the strict load below checks that every ComfyUI weight is filled
    assert set(state) <= set(key_map), "the hand-written unet_config does not match the diffusers config"
    base = comfy.supported_models.SD15(TINY_COMFY_UNET).get_model({})
    base.diffusion_model.load_state_dict({key_map[k]: v for k, v in state.items()}, strict=True)
    return comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))


def clip_tokenizer(comfyui_path: Path):
    """transformers' CLIPTokenizer from the SD1 vocabulary ComfyUI ships (no download), 77 tokens as SD1.5's."""
    from transformers import CLIPTokenizer

    folder = comfyui_path / "comfy" / "sd1_tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def fitted_masks(chexmask_example: Path, max_side: int):
    """The CheXmask example's human organ masks fitted (as Fit Radiograph to Model) to ``max_side`` pixels."""
    from cxr_helpers import chexmask_radiograph

    from cxr_counterfactual.attention.organs import OrganMasks
    from cxr_counterfactual.imaging.geometry import apply_fit, plan_fit

    image, masks = chexmask_radiograph(chexmask_example)
    fit = plan_fit(masks.height, masks.width, max_side)
    fitted_image = apply_fit(image.movedim(-1, 1), fit)  # [1, 3, H, W]
    return fitted_image, OrganMasks(masks.names, apply_fit(masks.data[None], fit)[0].contiguous())


#: SD1.5's scaled-linear betas, and its DDIM scheduler settings.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD_SCHEDULER = {**SD_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def tiny_pipeline(comfyui_path: Path, seed: int = 0):
    """A StableDiffusionPipeline of tiny random-weight parts: the tiny UNet, a 2-layer 768-wide CLIP text model,
    a 4-level AutoencoderKL (latent factor 8, as SD's), CLIP's tokenizer and a DDIM scheduler with SD's betas."""
    require_diffusers()
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=77))
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                            latent_channels=4, sample_size=64)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(comfyui_path),
                                   unet=tiny_unet(seed), scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)

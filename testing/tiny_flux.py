"""A tiny random-weight Flux model built the way ComfyUI builds one, without a checkpoint, and Flux conditioning
made by hand at the length T5's real tokenizer gives a prompt.

Why no checkpoint: ComfyUI's detection fixes a Flux file's width (hidden 3072, 24 heads, ``context_in_dim`` 4096)
and its text encoder is the full T5-XXL (about 4.8 GB in fp8), too big for a test fixture. So the model comes from
``comfy.supported_models.Flux`` with a small ``unet_config`` (its ``get_model`` → ``comfy.model_base.Flux`` around
ComfyUI's own ``comfy.ldm.flux.model.Flux``: the real double/single blocks, RoPE, patchify and flow sampling),
seeded random weights, wrapped in ComfyUI's ``ModelPatcher``, so ``nodes.common_ksampler`` samples it. What is
real Flux: the block code, the head size (128), the RoPE axes (16, 56, 56), the 4096-wide context and 768-wide
pooled inputs, 16 latent channels, patch 2, guidance embedding, the latent format and the sigma schedule. What is
not: the width (256 instead of 3072, so 2 heads instead of 24), the depth (``depth`` double and ``singles`` single
blocks instead of 19 and 38) and every weight. Measured on a busy 2-core CPU, cfg 2 (cond and uncond in one batch),
an 8×7 latent and 256 text tokens: ``heads=2`` 5.1 M parameters, built in 0.5 s, ≈ 1 s a step, 1 GB peak memory;
``heads=24`` (Flux.1's width 3072) 546 M parameters, built in 7 s, ≈ 4 s a step, 3.4 GB peak memory.

The prompt's word positions come from ComfyUI's ``FluxTokenizer`` through the pack's own locating path
(``nodes/text.py`` ``locate_words``) on a Flux text encoder built on the ``meta`` device (real classes, no weights:
only tokenising runs); the context values are seeded noise of that length, since T5 itself is not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Flux.1's per-head layout: head size 128 split into RoPE axes (index, row, column) of 16, 56, 56.
HEAD_DIM, AXES_DIM = 128, (16, 56, 56)
#: T5-XXL's width (the context) and CLIP-L's pooled width (the ``y`` vector), as Flux reads them.
CONTEXT_DIM, POOLED_DIM = 4096, 768


def flux_unet_config(heads: int = 2, depth: int = 1, singles: int = 1, guidance_embed: bool = True) -> dict:
    """The ``unet_config`` of a small Flux: Flux.1's head size and inputs, ``heads × 128`` wide."""
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED_DIM,
            "context_in_dim": CONTEXT_DIM, "hidden_size": heads * HEAD_DIM, "mlp_ratio": 4.0, "num_heads": heads,
            "depth": depth, "depth_single_blocks": singles, "axes_dim": list(AXES_DIM), "theta": 10000,
            "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance_embed}


def _init(module: torch.nn.Module, generator: torch.Generator) -> None:
    """ComfyUI's ops skip weight init (``torch.empty``). Linear weights ~ N(0, 1/fan_in) keep activations at unit
    scale through the blocks, biases zero, the RMS norms' scales one (as a trained Flux's are, roughly): q·k then
    spreads attention over the tokens instead of making it uniform, so a text bias or a gate visibly changes it."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".scale"):  # RMSNorm (q/k norms); Flux's LayerNorms have no affine weights
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            else:
                p.zero_()


def tiny_flux(seed: int = 0, heads: int = 2, depth: int = 1, singles: int = 1, guidance_embed: bool = True,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """A ComfyUI ``ModelPatcher`` around ``comfy.model_base.Flux`` (``comfy.supported_models.Flux`` with
    :func:`flux_unet_config`), seeded random weights. ComfyUI must be importable (``prepare_comfy_import``)."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(flux_unet_config(heads, depth, singles, guidance_embed))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    _init(model.diffusion_model, torch.Generator().manual_seed(seed))
    model = model.to(device).eval()
    device = torch.device(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


@dataclass(frozen=True)
class FluxPrompt:
    """A prompt as Flux conditioning: ``tokens`` (``clip.tokenize``'s output: 't5xxl' and 'l'), ``token_map`` (the
    pack's ``TokenMap``, layout "flux"), ``cond`` (ComfyUI CONDITIONING: ``[[context, {pooled_output, guidance}]]``,
    ``context`` ``[1, T, 4096]`` with T = T5's token count, at least 256)."""

    tokens: dict
    token_map: object
    cond: list


def flux_text_encoder():
    """A real ``comfy.sd.CLIP`` for Flux (``FluxTokenizer``, ``FluxClipModel``) whose encoders are built on the meta
    device: it tokenises like a loaded Flux text encoder and holds no weights (it cannot encode)."""
    import comfy.sd
    import comfy.supported_models_base as smb
    from comfy.text_encoders import flux

    cpu = torch.device("cpu")
    return comfy.sd.CLIP(smb.ClipTarget(flux.FluxTokenizer, flux.flux_clip()),
                         model_options={"initial_device": torch.device("meta"), "load_device": cpu,
                                        "offload_device": cpu})


def flux_prompt(clip, text: str, anatomy: str = "", pathology: str = "", seed: int = 0,
                guidance: float | None = 3.5) -> FluxPrompt:
    """``text`` tokenised and its words located by the pack's CXR Text Encode path on ``clip``
    (:func:`flux_text_encoder`), with seeded context and pooled vectors in place of T5's and CLIP-L's outputs."""
    from ..nodes.text import locate_words

    tokens, token_map = locate_words(clip, text, anatomy, pathology)
    length = sum(len(chunk) for chunk in tokens["t5xxl"])
    g = torch.Generator().manual_seed(seed)
    extra: dict = {"pooled_output": torch.randn(1, POOLED_DIM, generator=g)}
    if guidance is not None:
        extra["guidance"] = guidance
    return FluxPrompt(tokens, token_map, [[torch.randn(1, length, CONTEXT_DIM, generator=g), extra]])

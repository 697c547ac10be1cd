"""Helpers shared by the gating tests: run a node as ComfyUI does, patch with the gate, sample."""

from __future__ import annotations

import torch
from node_run import run

PROMPT = "chest x-ray, left lung with large pleural effusion, normal heart"


def gate(comfy, model, chest, **overrides):
    """The gate at its schema defaults (full strength, all organs, whole window) unless ``overrides``."""
    inputs = dict(model=model, organ_masks=chest.masks, tokens=chest.tokens)
    return run(comfy.node("CXRAnatomyAttentionGate"), **{**inputs, **overrides})[0]


def sample(comfy, model, chest, seed=1, steps=4, cfg=7.0, denoise=1.0, latent=None):
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, seed, steps, cfg, "euler", "normal", chest.positive,
                                              chest.negative, latent or chest.latent, denoise=denoise)[0]
    return out["samples"].clone()


def chexmask_radiograph(folder):
    """The CheXmask example radiograph as a ComfyUI IMAGE ``[1, H, W, 3]`` and its human organ masks."""
    import numpy as np
    from PIL import Image

    from cxr_counterfactual.attention.organs import OrganMasks
    from cxr_counterfactual.imaging.mask_files import read_mask_image

    img = Image.open(folder / "utils_example1.jpg").convert("RGB")
    image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    masks = OrganMasks.from_dict({name: read_mask_image(folder / f"{key}_mask.png")
                                  for name, key in (("right_lung", "RL"), ("left_lung", "LL"), ("heart", "H"))})
    return image, masks


def fitted_chest(comfy, loaded, folder, max_side: int, steps: int | None = None):
    """The CheXmask example radiograph fitted to ``max_side`` for ``loaded`` (MODEL/CLIP/VAE): its masks, latent,
    positive prompt with token map, empty negative, and (``steps``) the normal schedule."""
    from types import SimpleNamespace

    image, masks = chexmask_radiograph(folder)
    with torch.inference_mode():
        fitted, fitted_masks, _ = run(comfy.node("CXRFitToModel"), image=image, max_side=max_side, organ_masks=masks)
        latent = comfy.node("VAEEncode")().encode(loaded.vae, fitted)[0]
        positive, tokens = run(comfy.node("CXRTextEncode"), clip=loaded.clip, text=PROMPT,
                               anatomy="left lung, heart", pathology="effusion")
        negative = comfy.node("CLIPTextEncode")().encode(loaded.clip, "")[0]
        sigmas = None
        if steps is not None:
            sigmas = comfy.node("BasicScheduler")().get_sigmas(loaded.model, "normal", steps, 1.0)[0]
    return SimpleNamespace(masks=fitted_masks, latent=latent, positive=positive, negative=negative, tokens=tokens,
                           sigmas=sigmas)

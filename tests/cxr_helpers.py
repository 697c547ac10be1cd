"""Helpers shared by the gating tests: run a node as ComfyUI does, patch with the gate, sample."""

from __future__ import annotations

import torch

PROMPT = "chest x-ray, left lung with large pleural effusion, normal heart"


def run(cls, **inputs):
    return cls.PREPARE_CLASS_CLONE({}).execute(**inputs).result


def gate(comfy, model, chest, **overrides):
    inputs = dict(model=model, organ_masks=chest.masks, tokens=chest.tokens, strength=1.0, token_strength=1.0,
                  organs="right_lung, left_lung, heart", background="free", margin_px=0, blocks="all",
                  start_percent=0.0, end_percent=1.0, apply_to_uncond=False)
    inputs.update(overrides)
    return run(comfy.node("CXRAnatomyAttentionGate"), **inputs)[0]


def sample(comfy, model, chest, seed=1, steps=4, cfg=7.0, denoise=1.0, latent=None):
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, seed, steps, cfg, "euler", "normal", chest.positive,
                                              chest.negative, latent or chest.latent, denoise=denoise)[0]
    return out["samples"].clone()

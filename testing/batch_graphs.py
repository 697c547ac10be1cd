"""Graphs and inputs for runner batches (tests and benchmarks): an img2img graph whose nodes all take batches,
real radiographs of one size, and the shipped CheXmask workflow's overrides for a small, fast run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data import test_data_dir


def img2img_graph(checkpoint: str, px: int, steps: int, cfg: float = 7.0, denoise: float = 0.8,
                  seed: int = 5) -> dict[str, dict[str, Any]]:
    """Load Image → scale to ``px`` → VAE Encode → KSampler → VAE Decode → Save Image, and CXR Evaluate Edit (over
    the whole image) for per-image metrics: every node takes a batch on ComfyUI 0.3.64 and this pack's main."""
    return {
        "1": {"class_type": "LoadImage", "_meta": {"title": "Radiograph"}, "inputs": {"image": "x.png"}},
        "2": {"class_type": "ImageScale", "_meta": {"title": "Scale"}, "inputs": {
            "image": ["1", 0], "upscale_method": "bilinear", "width": px, "height": px, "crop": "disabled"}},
        "3": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Checkpoint"},
              "inputs": {"ckpt_name": checkpoint}},
        "4": {"class_type": "CLIPTextEncode", "_meta": {"title": "Prompt"},
              "inputs": {"clip": ["3", 1], "text": "chest x-ray, left pleural effusion"}},
        "5": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative"}, "inputs": {"clip": ["3", 1], "text": ""}},
        "6": {"class_type": "VAEEncode", "_meta": {"title": "Encode"}, "inputs": {"pixels": ["2", 0], "vae": ["3", 2]}},
        "7": {"class_type": "KSampler", "_meta": {"title": "Sampler"}, "inputs": {
            "model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": denoise}},
        "8": {"class_type": "VAEDecode", "_meta": {"title": "Decode"},
              "inputs": {"samples": ["7", 0], "vae": ["3", 2]}},
        "9": {"class_type": "SaveImage", "_meta": {"title": "Save: edit"},
              "inputs": {"images": ["8", 0], "filename_prefix": "batches/edit"}},
        "10": {"class_type": "SolidMask", "_meta": {"title": "Whole image"},
               "inputs": {"value": 1.0, "width": px, "height": px}},
        "11": {"class_type": "CXREvaluateEdit", "_meta": {"title": "Metrics"}, "inputs": {
            "source": ["2", 0], "edited": ["8", 0], "edit_region": ["10", 0], "attention_threshold": 0.5,
            "heat_scale": 0.0}},
    }


def same_size_radiographs(folder: Path) -> list[Path]:
    """Four real radiographs of one size (512×512): the NIH image, mirrored, upside down and inverted."""
    nih = np.asarray(Image.open(test_data_dir() / "cxr" / "nih" / "00000001_000.png").convert("L"))
    paths = []
    for name, pixels in (("nih", nih), ("mirrored", nih[:, ::-1]), ("flipped", nih[::-1]), ("inverted", 255 - nih)):
        paths.append(folder / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(pixels)).save(paths[-1])
    return paths


def small_chexmask_overrides(checkpoint: str, px: int, steps: int) -> list[str]:
    """``--set`` values that run the shipped cxr_chexmask_edit small: ``px`` side, ``steps`` steps, thin margins."""
    return [f"Checkpoint (SD1.5 CXR model).ckpt_name={checkpoint}", f"Fit radiograph to the model.max_side={px}",
            f"Sampler (img2img in the edit region).steps={steps}",
            "Edit region (left lung + margin, heart kept).margin_px=2",  # at 64 px the default margin covers all
            "Edit region (left lung + margin, heart kept).feather_px=1"]

"""The tiny random-weight checkpoint loads through ComfyUI's own nodes as a working SD1.5 model.

In-process on the CPU (the ``comfy`` fixture); every call goes through the node classes that ComfyUI
registered, as a graph would run them, under ``torch.inference_mode()`` as ComfyUI's executor does.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cxr_counterfactual.demo import tiny_checkpoint as tc
from cxr_counterfactual.runner.comfyui_path import PACK_ROOT

PROMPT = "chest x-ray, small left pleural effusion"


@pytest.fixture(scope="module")
def loaded(tiny_model) -> SimpleNamespace:
    """MODEL, CLIP and VAE of the tiny checkpoint, loaded by ``CheckpointLoaderSimple`` by name."""
    return tiny_model


def _encode(comfy, clip, text: str):
    with torch.inference_mode():
        return comfy.node("CLIPTextEncode")().encode(clip, text)[0]


@pytest.fixture(scope="module")
def conds(comfy, loaded: SimpleNamespace) -> tuple[list, list]:
    """Positive and (empty) negative conditioning, encoded once for the sampling tests."""
    return _encode(comfy, loaded.clip, PROMPT), _encode(comfy, loaded.clip, "")


def _sample(comfy, loaded: SimpleNamespace, conds: tuple[list, list], seed: int, size: int = 64) -> torch.Tensor:
    """Latent of a 4-step Euler txt2img run (cfg 7: both the cond and the uncond pass run)."""
    positive, negative = conds
    with torch.inference_mode():
        latent = comfy.node("EmptyLatentImage")().generate(size, size, 1)[0]
        out = comfy.node("KSampler")().sample(
            loaded.model, seed, 4, 7.0, "euler", "normal", positive, negative, latent
        )[0]
    return out["samples"]


def test_checkpoint_file_layout(tiny_checkpoint: Path) -> None:
    """Keys under the SD1.5 prefixes, CLIP stored as float8, UNet as float16, and nothing else."""
    from safetensors import safe_open

    prefixes = ("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model.")
    dtypes: dict[str, set[torch.dtype]] = {p: set() for p in prefixes}
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            assert prefix is not None, f"unexpected key {key}"
            dtypes[prefix].add(f.get_slice(key).get_dtype())
        assert f.metadata() == {tc.METADATA_KEY: f"tiny-sd15 v{tc.RECIPE_VERSION} seed 0"}
    assert dtypes["cond_stage_model.transformer.text_model."] == {"F8_E4M3"}
    assert dtypes["model.diffusion_model."] == {"F16"}
    assert "first_stage_model.taesd_decoder.1.weight" in keys  # the key that selects TAESD as VAE
    assert sum(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.11.") for k in keys) > 0
    assert sum(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.12.") for k in keys) == 0


def test_ensure_reuses_existing_file(tiny_checkpoint: Path) -> None:
    """A second ensure_tiny_checkpoint in the same folder returns the same file without rebuilding it."""
    before = tiny_checkpoint.stat().st_mtime_ns
    assert tc.ensure_tiny_checkpoint(tiny_checkpoint.parent) == tiny_checkpoint
    assert tiny_checkpoint.stat().st_mtime_ns == before


def test_detected_as_sd15_eps_with_taesd(loaded: SimpleNamespace) -> None:
    import comfy.model_base
    import comfy.taesd.taesd

    base_model = loaded.model.model
    assert type(base_model.model_config).__name__ == "SD15"
    assert base_model.model_type == comfy.model_base.ModelType.EPS
    unet_config = base_model.model_config.unet_config
    assert unet_config["model_channels"] == 320
    assert unet_config["context_dim"] == 768
    assert unet_config["channel_mult"] == tc.UNET_CONFIG["channel_mult"]
    assert isinstance(loaded.vae.first_stage_model, comfy.taesd.taesd.TAESD)
    assert loaded.clip.cond_stage_model.clip_l.num_layers == 12


def test_unet_weights_loaded_not_empty(loaded: SimpleNamespace) -> None:
    """Every UNet weight came from the file: finite and not left at torch.empty garbage or zeros."""
    for name, param in loaded.model.model.diffusion_model.named_parameters():
        value = param.detach()  # ComfyUI leaves requires_grad on for the UNet's parameters
        assert torch.isfinite(value).all(), name
        if name.endswith("weight") and value.ndim > 1:
            assert 0.001 < value.float().std().item() < 0.2, name


def test_clip_text_encode_gives_finite_conditioning(comfy, loaded: SimpleNamespace) -> None:
    cond = _encode(comfy, loaded.clip, PROMPT)
    other = _encode(comfy, loaded.clip, "normal chest radiograph")
    tensor = cond[0][0]
    assert tensor.shape == (1, 77, 768)
    assert torch.isfinite(tensor).all()
    assert not torch.equal(tensor, other[0][0]), "different prompts must give different conditioning"


def test_ksampler_is_finite_seeded_and_reproducible(comfy, loaded: SimpleNamespace, conds) -> None:
    first = _sample(comfy, loaded, conds, seed=0)
    again = _sample(comfy, loaded, conds, seed=0)
    other = _sample(comfy, loaded, conds, seed=1)
    assert first.shape == (1, 4, 8, 8)
    assert torch.isfinite(first).all() and torch.isfinite(other).all()
    assert torch.equal(first, again), "same seed must give the same latent"
    assert not torch.allclose(first, other), "a different seed must give a different latent"


def test_vae_decode_gives_image_in_unit_range(comfy, loaded: SimpleNamespace, conds) -> None:
    samples = _sample(comfy, loaded, conds, seed=3)
    with torch.inference_mode():
        image = comfy.node("VAEDecode")().decode(loaded.vae, {"samples": samples})[0]
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.01, "the decoded image should not be flat"


def test_weights_follow_the_seed(comfy) -> None:
    """Same seed, same weights; another seed, other weights (checked on the small TAESD part)."""
    draw = tc._vae_state  # the full build draws the UNet and CLIP from the same generator the same way
    first = draw(torch.Generator().manual_seed(0))
    again = draw(torch.Generator().manual_seed(0))
    other = draw(torch.Generator().manual_seed(1))
    key = "first_stage_model.taesd_decoder.1.weight"
    assert torch.equal(first[key], again[key])
    assert not torch.equal(first[key], other[key])


@pytest.mark.slow
def test_cli_rebuilds_a_byte_identical_file(comfyui_path: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``python -m cxr_counterfactual.demo.tiny_checkpoint OUT --seed 0`` in a fresh interpreter
    writes exactly the file the in-process fixture built: the recipe is deterministic."""
    out = tmp_path / "again.safetensors"
    # The CLI runs as a module of the package, so the subprocess needs a folder holding the package.
    package_parent = tmp_path / "pkg"
    package_parent.mkdir()
    (package_parent / "cxr_counterfactual").symlink_to(PACK_ROOT, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(package_parent), "COMFYUI_PATH": str(comfyui_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_counterfactual.demo.tiny_checkpoint", str(out), "--seed", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(out)
        assert _sha256(out) == _sha256(tiny_checkpoint)
    finally:
        out.unlink(missing_ok=True)  # 350 MB; pytest keeps the last runs' tmp folders


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

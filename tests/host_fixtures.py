"""Fixtures that need the ComfyUI host: the tiny checkpoint and a headless server.

- ``tiny_checkpoint``: the random-weight SD1.5-shaped checkpoint (``demo/tiny_checkpoint.py``), built
  once per test run, in this process (the weights are drawn with ComfyUI's own modules, so ComfyUI is
  imported on the CPU, exactly as the ``comfy`` fixture does).
- ``tiny_sd2_checkpoint`` / ``tiny_sdxl_checkpoint``: the SD2.x v-prediction and SDXL-family (Segmind Vega)
  checkpoints of ``testing/tiny_models.py``, built once per test run on first use (≈ 8 s / 13 s, 0.6 / 1.0 GB);
  :func:`load_checkpoint` loads one through ``CheckpointLoaderSimple``. ``tiny_sd35_checkpoint``: its SD3.5-family
  (MMDiT-X) one, built the same way (≈ 15-30 s on a busy 2-core machine, 0.83 GB).
- ``tiny_controlnet``: a random-weight ControlNet for the tiny checkpoint (``testing/tiny_controlnet.py``), built
  once per run beside it in a folder registered as ComfyUI's ``controlnet``; the fixture is its file name.
- ``lora_name``: a random LoRA for the tiny checkpoint's UNet (``testing/tiny_lora.py``) in a folder registered as
  ComfyUI's ``loras``; the fixture is its file name.
- ``comfy_server``: one real headless ComfyUI for the whole session, with this pack and the tiny
  checkpoint linked into its private base directory; stopped at the end of the session.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pydicom.data
import pytest

from conftest import need
from cxr_counterfactual.demo.tiny_checkpoint import ensure_tiny_checkpoint
from cxr_counterfactual.hosts.comfy.standalone import prepare_comfy_import
from cxr_counterfactual.testing.tiny_controlnet import ensure_tiny_controlnet
from cxr_counterfactual.testing.tiny_models import ensure_tiny_model_checkpoint

if TYPE_CHECKING:
    from cxr_counterfactual.runner.server import ComfyServer


@pytest.fixture(scope="session")
def tiny_checkpoint(comfyui_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny SD1.5-shaped checkpoint (``tiny-sd15-v*.safetensors``), built once per run.

    Built in-process rather than through the CLI: the test process imports torch and ComfyUI anyway,
    so this saves a second interpreter start and torch import (several seconds on 2 cores).
    """
    need(importlib.util.find_spec("safetensors") is not None, "safetensors is not installed")
    prepare_comfy_import(comfyui_path)
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_controlnet(comfy, tiny_checkpoint: Path) -> str:
    """File name of the tiny ControlNet (``tiny-sd15-controlnet-v*.safetensors``, built once per run), in a folder
    registered as ComfyUI's 'controlnet' (as extra_model_paths.yaml would): what ``ControlNetLoader`` takes."""
    import folder_paths

    path = ensure_tiny_controlnet(tiny_checkpoint.parent)
    folder_paths.add_model_folder_path("controlnet", str(path.parent))
    return path.name


@pytest.fixture(scope="session")
def lora_name(comfy, tmp_path_factory: pytest.TempPathFactory) -> str:
    """File name of the tiny LoRA (``testing/tiny_lora.py``, seed 0), in a folder registered as ComfyUI's 'loras'
    (as extra_model_paths.yaml would): what ``LoraLoader`` / ``LoraLoaderModelOnly`` take."""
    import folder_paths

    from cxr_counterfactual.testing.tiny_lora import build_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    build_tiny_lora(folder / "tiny-sd15-lora.safetensors")
    folder_paths.add_model_folder_path("loras", str(folder))
    return "tiny-sd15-lora.safetensors"


@pytest.fixture(scope="session")
def tiny_models_dir(comfyui_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder the SD2, SDXL and SD3.5 tiny checkpoints are built into (once per run, each on first use); their
    2.5 GB are deleted when the session ends (pytest keeps the last runs' temporary folders)."""
    need(importlib.util.find_spec("safetensors") is not None, "safetensors is not installed")
    prepare_comfy_import(comfyui_path)
    folder = tmp_path_factory.mktemp("tiny-models")
    yield folder
    for built in folder.glob("*.safetensors"):
        built.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tiny_models_dir: Path) -> Path:
    """Path of the tiny SD2.x v-prediction checkpoint (``tiny-sd2-v*.safetensors``), built once per run."""
    return ensure_tiny_model_checkpoint("sd2", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tiny_models_dir: Path) -> Path:
    """Path of the tiny SDXL-family (Segmind Vega) checkpoint (``tiny-sdxl-v*.safetensors``), built once per run."""
    return ensure_tiny_model_checkpoint("sdxl", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_sd35_checkpoint(tiny_models_dir: Path) -> Path:
    """Path of the tiny SD3.5-family (MMDiT-X) checkpoint (``tiny-sd35-v*.safetensors``), built once per run."""
    return ensure_tiny_model_checkpoint("sd35", tiny_models_dir)


@pytest.fixture(scope="session")
def sd35_loaded(comfy, tiny_sd35_checkpoint: Path) -> SimpleNamespace:
    """MODEL, CLIP and VAE of the tiny SD3.5-family checkpoint, loaded once per session (the DiT test files share
    it: loading and the full-size CLIP-G cost more than any of their tests)."""
    return load_checkpoint(comfy, tiny_sd35_checkpoint)


def load_checkpoint(comfy, path: Path) -> SimpleNamespace:
    """MODEL, CLIP and VAE of the checkpoint at ``path``, loaded by ComfyUI's ``CheckpointLoaderSimple`` by name."""
    import folder_paths
    import torch

    # Registering the folder is how a user's extra_model_paths.yaml makes a checkpoint visible.
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    with torch.inference_mode():
        model, clip, vae = comfy.node("CheckpointLoaderSimple")().load_checkpoint(path.name)[:3]
    return SimpleNamespace(model=model, clip=clip, vae=vae)


@pytest.fixture(scope="session")
def comfy_server(
    comfyui_path: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComfyServer]:
    """A running headless ComfyUI (CPU, 127.0.0.1) with the pack and the tiny checkpoint, per session."""
    # Imported here: a missing websocket-client must skip server tests, not break every test module.
    need(importlib.util.find_spec("websocket") is not None, "websocket-client is not installed")
    from cxr_counterfactual.runner.server import ComfyServer

    base = tmp_path_factory.mktemp("comfy-server")
    server = ComfyServer(comfyui_path, checkpoints=[tiny_checkpoint], base_dir=base)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def upload_shipped_inputs(server: ComfyServer, data_dir: Path, chexmask_example: Path) -> None:
    """Put every input file the shipped workflows name into the server's input folder (a test that runs a
    shipped graph must not rely on another test having uploaded them first)."""
    dicom = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(dicom is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    server.upload_input(Path(dicom))
    server.upload_input(chexmask_example / "utils_example1.jpg", "chest_pa.png")
    server.upload_input(data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv")
    server.upload_input(data_dir / "cxr" / "nih" / "00000001_000.png")


@pytest.fixture(scope="session")
def tiny_model(comfy, tiny_checkpoint: Path):
    """MODEL, CLIP and VAE of the tiny checkpoint, loaded once per session by ``CheckpointLoaderSimple``."""
    return load_checkpoint(comfy, tiny_checkpoint)


@pytest.fixture(scope="session")
def chest(comfy, tiny_model, chexmask_example) -> SimpleNamespace:
    """The real radiograph fitted to 64 px (latent 8×7: an odd side), its masks, and conditioning."""
    from cxr_helpers import fitted_chest

    chest = fitted_chest(comfy, tiny_model, chexmask_example, max_side=64)
    assert chest.latent["samples"].shape[-2:] == (8, 7)
    return chest


@pytest.fixture(scope="session")
def chest128(comfy, tiny_model, chexmask_example) -> SimpleNamespace:
    """The real radiograph fitted to 128 px (latent 16×14): SD1.5's middle block (latent ÷ 8) then has 2×2 tokens.
    Core SAG and PAG act on the middle block's self-attention, which at 64 px is one token: PAG's identity
    attention then equals attention and SAG cannot factor its map (a ComfyUI limit)."""
    from cxr_helpers import fitted_chest

    chest = fitted_chest(comfy, tiny_model, chexmask_example, max_side=128)
    assert chest.latent["samples"].shape[-2:] == (16, 14)
    return chest

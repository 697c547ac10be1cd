"""Fixtures that need the ComfyUI host: the tiny checkpoint and a headless server.

- ``tiny_checkpoint``: the random-weight SD1.5-shaped checkpoint (``testing/tiny_checkpoint.py``), built
  once per test run, in this process (the weights are drawn with ComfyUI's own modules, so ComfyUI is
  imported on the CPU, exactly as the ``comfy`` fixture does).
- ``comfy_server``: one real headless ComfyUI for the whole session, with this pack and the tiny
  checkpoint linked into its private base directory; stopped at the end of the session.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import need
from cxr_counterfactual.testing.tiny_checkpoint import ensure_tiny_checkpoint, prepare_comfy_import

if TYPE_CHECKING:
    from cxr_counterfactual.testing.server import ComfyServer


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
def comfy_server(
    comfyui_path: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComfyServer]:
    """A running headless ComfyUI (CPU, 127.0.0.1) with the pack and the tiny checkpoint, per session."""
    # Imported here: a missing websocket-client must skip server tests, not break every test module.
    need(importlib.util.find_spec("websocket") is not None, "websocket-client is not installed")
    from cxr_counterfactual.testing.server import ComfyServer

    base = tmp_path_factory.mktemp("comfy-server")
    server = ComfyServer(comfyui_path, checkpoints=[tiny_checkpoint], base_dir=base)
    server.start()
    try:
        yield server
    finally:
        server.stop()

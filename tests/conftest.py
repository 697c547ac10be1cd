"""Shared test set-up.

- The repo root is the package ``cxr_counterfactual``: a session folder holds a link of that name to the
  root and goes first on ``sys.path``, so tests import ``cxr_counterfactual...`` without installing it.
- The ``comfy`` fixture imports the real ComfyUI (CPU) and loads the pack through ComfyUI's own loader
  under the same module name, so the pack's classes exist once per process.
- Real data: the repo's ``tests/data`` (``CXR_TEST_DATA`` overrides it; see tests/data/README.md).
- Missing ComfyUI or data: skip with a reason, except under ``CI=true``, where the test fails.
- Devices: pure core tests take ``device`` from :data:`DEVICES` (``@pytest.mark.parametrize("device", DEVICES)``;
  the ids ``cpu`` / ``cuda`` select them, ``-k cuda``): the CPU always, CUDA where torch sees one
  (``benchmarks/gpu.py`` runs them there). ComfyUI tests stay on the CPU (the ``comfy`` fixture).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_LINK_PARENT = Path(tempfile.mkdtemp(prefix="cxr-pack-"))
(_LINK_PARENT / "cxr_counterfactual").symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_LINK_PARENT))

from cxr_counterfactual.runner.comfyui_path import COMFYUI_HINT, find_comfyui  # noqa: E402
from cxr_counterfactual.testing.data import test_data_dir  # noqa: E402

pytest_plugins = ["host_fixtures", "classifier_fixtures", "report_fixtures"]

IN_CI = os.environ.get("CI", "").lower() == "true"

#: Devices the pure core tests run on (parametrised by name, so test ids say which one ran).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def need(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing; under CI=true, fail instead (nothing may be skipped there)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pack_import_path() -> Path:
    """A folder that makes ``import cxr_counterfactual`` work (for subprocesses: add it to PYTHONPATH)."""
    return _LINK_PARENT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = test_data_dir()
    need(
        (path / "cxr").is_dir(),
        f"real CXR test data not found at {path}: unset CXR_TEST_DATA to use the repo's tests/data, or point "
        "it at a folder with the same cxr/ layout",
    )
    return path


@pytest.fixture(scope="session")
def chexmask_example(data_dir: Path) -> Path:
    return data_dir / "cxr" / "chexmask-example"


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path = find_comfyui()
    need(path is not None, f"ComfyUI not found. {COMFYUI_HINT}")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def comfy(comfyui_path: Path):
    """The real ComfyUI, imported in-process on the CPU, with its built-in nodes and this pack loaded.

    Returns a namespace: ``nodes`` (ComfyUI's module), ``node(name)`` (a node class by id), ``pack``
    (the pack module as ComfyUI loaded it).
    """
    if str(comfyui_path) not in sys.path:
        sys.path.insert(0, str(comfyui_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
    import folder_paths
    import nodes

    base = Path(tempfile.mkdtemp(prefix="cxr-comfy-base-"))
    for sub in ("input", "output", "temp"):
        (base / sub).mkdir()
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        # Load through ComfyUI's loader with the relative path "cxr_counterfactual", so the module it
        # registers is named "cxr_counterfactual": the same modules the pure tests import.
        cwd = os.getcwd()
        os.chdir(_LINK_PARENT)
        try:
            ok = loop.run_until_complete(nodes.load_custom_node("cxr_counterfactual"))
        finally:
            os.chdir(cwd)
    finally:
        loop.close()
    assert ok, "ComfyUI's loader failed to load the pack (see the log above)"

    def node(name: str):
        assert name in nodes.NODE_CLASS_MAPPINGS, f"{name} is not registered with ComfyUI"
        return nodes.NODE_CLASS_MAPPINGS[name]

    return SimpleNamespace(nodes=nodes, node=node, pack=sys.modules["cxr_counterfactual"], base=base)

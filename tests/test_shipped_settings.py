"""Every shipped workflow at its shipped settings, through the runner, on the tiny checkpoint.

The other end-to-end tests run the graphs at 64 px with grid factors changed to fit; here each graph of
``workflows/api/`` runs once as shipped: its ``max_side``, grid factors, windows, cfg, refinement and inversion
settings, on a real radiograph. Only the number of sampling and inversion steps drops (to :data:`STEPS`), to keep
CI time in bounds; nothing else changes. The tiny checkpoint has SD1.5's level structure, so a setting that
needs a grid a real SD1.5 has works here as it would there.

The radiograph each workflow gets is :data:`RADIOGRAPHS` (one line per workflow).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image
from test_runner import chexmask_id
from test_runner_graph import write_manifest

from conftest import need
from cxr_counterfactual.imaging.geometry import plan_fit

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows" / "api"
STEPS = 4  # sampling and inversion steps; the only setting lowered
STEP_NODES = ("KSampler", "BasicScheduler", "CXRInvertLatent")


def _dicom(data_dir: Path) -> dict[str, str]:
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(path is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    return {"radiograph": str(path)}


def _png(data_dir: Path) -> dict[str, str]:
    return {"radiograph": str(data_dir / "cxr" / "nih" / "00000001_000.png")}


def _png_chexmask(data_dir: Path) -> dict[str, str]:
    # The NIH radiograph stands in for a CheXmask row on the same 1024 px grid (as in test_runner).
    return {**_png(data_dir), "chexmask_csv": str(data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"),
            "chexmask_id": chexmask_id(data_dir)}


#: Workflow → the manifest row it runs on (radiograph, and any other role it needs).
RADIOGRAPHS = {
    "cxr_counterfactual_edit": _dicom,
    "cxr_dicom_masked_edit": _dicom,
    "cxr_ablation": _png,
    "cxr_chexmask_edit": _png_chexmask,
}


def test_every_shipped_workflow_is_in_the_table():
    assert set(RADIOGRAPHS) == {p.stem for p in WORKFLOWS.glob("*.json")}


def _overrides(graph: dict, checkpoint: str) -> list[str]:
    """``--set`` arguments: the test checkpoint, and STEPS steps; every other input stays as shipped."""
    out = []
    for node in graph.values():
        title, inputs = node["_meta"]["title"], node["inputs"]
        if "ckpt_name" in inputs:
            out += ["--set", f"{title}.ckpt_name={checkpoint}"]
        if node["class_type"] in STEP_NODES:
            out += ["--set", f"{title}.steps={STEPS}"]
    return out


def _cpu_seconds(server) -> float:
    """User + system CPU seconds the server process has used so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, AttributeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _native_size(row: dict[str, str]) -> tuple[int, int]:
    path = row["radiograph"]
    if path.endswith(".dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    with Image.open(path) as im:
        return im.size


def _fitted_size(native: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) of CXR Fit Radiograph to Model's grid: longer side ``max_side``, padded to multiples of 8."""
    fit = plan_fit(native[1], native[0], max_side)
    return (fit.resized_width + fit.pad_left + fit.pad_right, fit.resized_height + fit.pad_top + fit.pad_bottom)


@pytest.mark.parametrize("workflow", sorted(RADIOGRAPHS))
def test_shipped_workflow_runs_at_its_shipped_settings(workflow, comfy_server, tiny_checkpoint, pack_import_path,
                                                       data_dir, tmp_path):
    graph = json.loads((WORKFLOWS / f"{workflow}.json").read_text(encoding="utf-8"))
    row = {"id": workflow, **RADIOGRAPHS[workflow](data_dir)}
    manifest = write_manifest(tmp_path / "rows.csv", [row])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(pack_import_path)}
    cpu_before = _cpu_seconds(comfy_server)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_counterfactual", "run", workflow, "--manifest", str(manifest), "--server",
         comfy_server.url, "--out", str(out), "--no-progress", "--retries", "0", "--timeout", "1500",
         *_overrides(graph, tiny_checkpoint.name)],
        capture_output=True, text=True, timeout=1800, env=env)
    elapsed = time.monotonic() - started
    # CI time, in the log: wall time, and the server's CPU time (which other load on the machine does not inflate)
    logger.warning("%s at its shipped settings (%d steps): %.0f s wall, %.0f s server CPU", workflow, STEPS, elapsed,
                   _cpu_seconds(comfy_server) - cpu_before)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    with (out / "results.csv").open(newline="") as f:
        (result,) = list(csv.DictReader(f))
    assert result["status"] == "done", result
    metrics = {k: v for k, v in result.items() if k.startswith("metric_") and v != ""}
    for key, value in metrics.items():
        assert math.isfinite(float(value)), (key, value)
    folder = out / result["output_dir"]
    files = json.loads((folder / "row.json").read_text())["files"]
    assert files, "the run saved nothing"

    native = _native_size(row)
    (max_side,) = {n["inputs"]["max_side"] for n in graph.values() if n["class_type"] == "CXRFitToModel"}
    fitted = _fitted_size(native, max_side)
    sizes = {}
    for name in files:
        path = folder / name
        assert path.stat().st_size > 0, name
        if path.suffix == ".png":
            with Image.open(path) as im:
                sizes[name] = im.size
                pixels = torch.from_numpy(np.asarray(im, dtype=np.float32))
            assert torch.isfinite(pixels).all() and float(pixels.std()) > 0, f"{name} is flat"
        elif path.suffix == ".latent":
            from safetensors.torch import load_file

            latent = load_file(path)["latent_tensor"]
            assert torch.isfinite(latent).all(), name
            assert tuple(latent.shape[-2:]) == (fitted[1] // 8, fitted[0] // 8), (name, latent.shape)
        elif path.suffix == ".json":
            json.loads(path.read_text())  # metrics files parse (NaN would be written as bare NaN)
            assert "NaN" not in path.read_text(), name

    restores_native = any(n["class_type"] in ("CXRRestoreNativeSize", "CXRCompositeNative", "CXRExportCounterfactual")
                          for n in graph.values())
    if restores_native:
        assert native in sizes.values(), (native, sizes)
    else:  # the ablation's side-by-side: four fitted images with 8 px between them
        assert (4 * fitted[0] + 3 * 8, fitted[1]) in sizes.values(), (fitted, sizes)

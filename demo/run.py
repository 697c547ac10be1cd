"""The README's first command: one masked counterfactual edit of a real radiograph, run headless.

Runs the shipped API workflow ``workflows/api/cxr_dicom_masked_edit.json`` in a private headless ComfyUI
(started here, stopped at the end) on pydicom-data's real PA chest radiograph ``RG1_UNCR.dcm``, with organ
masks from the weight-free atlas (the default) or, with ``--masks outlines``, the outlines we drew for that
image (``assets/rg1_uncr_organs.json``). With ``--checkpoint`` it uses your SD1.5
CXR checkpoint; otherwise it builds the tiny random-weight test checkpoint and says so: that one shows the
mechanics (masks, regions, keep region, native size), not realistic anatomy.

This module talks to ComfyUI over HTTP only; it never imports ``comfy`` (the checkpoint builder runs in a
subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..runner.comfyui_path import PACK_ROOT, find_comfyui

logger = logging.getLogger("cxr_counterfactual.demo.run")

WORKFLOW = PACK_ROOT / "workflows" / "api" / "cxr_dicom_masked_edit.json"
OUTLINES = PACK_ROOT / "assets" / "rg1_uncr_organs.json"
SAMPLE_DICOM = "RG1_UNCR.dcm"
TINY_NOTE = (
    "No checkpoint named: using the tiny random-weight test checkpoint. It shows the mechanics (masks, edit "
    "and keep regions, native size), NOT realistic anatomy. Pass --checkpoint with an SD1.5 CXR model (e.g. "
    "RoentGen converted to one .safetensors) for a real counterfactual."
)


def sample_dicom() -> Path:
    """pydicom-data's real PA chest radiograph (found offline in the installed package)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError as err:  # pragma: no cover - the demo extra installs pydicom
        raise SystemExit("pydicom is not installed: pip install '.[demo]'") from err
    path = get_testdata_file(SAMPLE_DICOM)
    if not path:
        raise SystemExit(f"{SAMPLE_DICOM} not found: install the sample data with pip install pydicom-data")
    return Path(path)


def write_mask_files(folder: Path) -> dict[str, str]:
    """Rasterise our RG1_UNCR organ outlines to one PNG per organ in ``folder``; returns organ → file name."""
    import numpy as np
    from PIL import Image

    from ..imaging.mask_files import read_polygon_json

    masks = read_polygon_json(OUTLINES)
    names = {}
    for organ, mask in masks.as_dict().items():
        name = f"RG1_UNCR_{organ}.png"
        Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(folder / name)
        names[organ] = name
    return names


def tiny_checkpoint(cache: Path, comfyui: Path) -> Path:
    """Build (once) the tiny test checkpoint in a subprocess that imports ComfyUI."""
    from .tiny_checkpoint import CHECKPOINT_NAME

    path = cache / CHECKPOINT_NAME
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        logger.info("building the tiny test checkpoint (about a minute, once) ...")
        env = {**os.environ, "COMFYUI_PATH": str(comfyui)}
        subprocess.run(
            [sys.executable, "-m", "cxr_counterfactual.demo.tiny_checkpoint", str(path)],
            # its stdout (the checkpoint's path) is dropped: the demo's stdout is the run folder, nothing else
            check=True, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL,
        )
    return path


def build_prompt(checkpoint: str, masks: dict[str, str] | None, *, tiny: bool, seed: int, prompt: str) -> dict:
    """The shipped workflow with this run's inputs; ``masks`` (organ → file) replaces the atlas."""
    graph = json.loads(WORKFLOW.read_text())
    graph["1"]["inputs"]["dicom_file"] = SAMPLE_DICOM
    if masks is not None:
        graph["2"] = {"class_type": "CXRLoadOrganMasks", "_meta": {"title": "Organ masks (our outlines)"},
                      "inputs": {**masks, "threshold": 0.5}}
    graph["6"]["inputs"]["ckpt_name"] = checkpoint
    graph["7"]["inputs"]["text"] = prompt
    graph["11"]["inputs"]["seed"] = seed
    if tiny:  # a quick CPU run: the tiny model shows mechanics, more steps or pixels add nothing
        graph["4"]["inputs"]["max_side"] = 256
        graph["11"]["inputs"]["steps"] = 8
    return graph


# What each saved file is, by the SaveImage/SaveLatent node of the workflow that wrote it (the file names
# carry the node's filename_prefix). The composite is the main result: the raw decode passes every pixel,
# the patient's included, through the VAE (with the tiny checkpoint: noise over the whole radiograph).
OUTPUTS = (
    ("22", "images", "counterfactual: the edit composited onto the patient's own radiograph at native size "
                     "(the source's pixels, bit for bit, outside the edit region)"),
    ("14", "images", "raw decode: the whole decoded latent at native size (every pixel through the VAE, not the "
                     "patient's pixels)"),
    ("16", "images", "source: the decoded DICOM"),
    ("15", "images", "organs: the organ masks over the source"),
    ("20", "images", "edit region: where the counterfactual may differ from the source (white)"),
    ("17", "latents", "source latent"),
    ("18", "latents", "edited latent"),
)


def unique_dir(parent: Path) -> Path:
    """A new run folder under ``parent``: earlier results are never overwritten."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = parent / (f"run-{stamp}" + (f"-{i}" if i else ""))
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a new run folder in {parent}")


def run_demo(out: Path, checkpoint: Path | None, comfyui: Path | None, seed: int, prompt: str,
             mask_source: str = "atlas") -> Path:
    from ..runner.protocol import ComfyServerError
    from ..runner.server import ComfyServer

    comfy_path = comfyui or find_comfyui()
    if comfy_path is None:
        raise SystemExit(
            "ComfyUI not found. Install it the usual way (comfy-cli puts it in ~/comfy/ComfyUI) or pass "
            "--comfyui / set COMFYUI_PATH."
        )
    tiny = checkpoint is None
    if tiny:
        logger.warning(TINY_NOTE)
        cache = Path(os.environ.get("CXR_DEMO_CACHE", Path.home() / ".cache" / "cxr-counterfactual"))
        ckpt = tiny_checkpoint(cache, comfy_path)
    else:
        ckpt = Path(checkpoint).expanduser().resolve()
        if not ckpt.is_file():
            raise SystemExit(f"--checkpoint {ckpt} does not exist")
        logger.info("using your checkpoint %s", ckpt.name)

    base = Path(tempfile.mkdtemp(prefix="cxr-demo-"))
    try:
        try:
            with ComfyServer(comfy_path, checkpoints=[ckpt], base_dir=base) as server:
                server.upload_input(sample_dicom(), SAMPLE_DICOM)
                masks = write_mask_files(server.folders["input"]) if mask_source == "outlines" else None
                graph = build_prompt(ckpt.name, masks, tiny=tiny, seed=seed, prompt=prompt)
                result = server.run(graph, on_progress=_log_progress)
        except ComfyServerError as err:
            raise SystemExit(_server_failure(err)) from err
        # The run folder is made only now, when there are results to put in it: a failed start or run leaves
        # nothing behind, and an existing folder is never reused (unique_dir makes a new one).
        saved = [(f, text) for node_id, key, text in OUTPUTS for f in result.files(node_id, key)]
        run_dir = _write_run(out, saved, _notes(ckpt, tiny, mask_source, prompt, seed))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    logger.info("done: %d files in %s", len(saved), run_dir)
    for f, text in saved:
        logger.info("  %s: %s", f.name, text)
    if tiny:
        logger.warning("Reminder: these images come from random weights (mechanics only).")
    return run_dir


def _notes(ckpt: Path, tiny: bool, mask_source: str, prompt: str, seed: int) -> str:
    return (
        f"checkpoint: {'tiny random-weight test checkpoint (mechanics only, not anatomy)' if tiny else ckpt.name}\n"
        f"radiograph: pydicom-data {SAMPLE_DICOM}; masks: "
        f"{'our outlines (assets/rg1_uncr_organs.json)' if mask_source == 'outlines' else 'weight-free atlas'}\n"
        f"prompt: {prompt}\nseed: {seed}\n"
    )


def _write_run(out: Path, saved: list[tuple[Path, str]], notes: str) -> Path:
    """Copy the results into a new run folder; if that fails, remove what this call created, nothing else."""
    made_out = not out.exists()
    run_dir = unique_dir(out)
    try:
        for f, _ in saved:
            shutil.copy2(f, run_dir / f.name)
        files = "".join(f"  {f.name}: {text}\n" for f, text in saved)
        (run_dir / "README.txt").write_text(f"{notes}files:\n{files}")
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        if made_out:
            with contextlib.suppress(OSError):  # only if still empty: never anything of the user's
                out.rmdir()
        raise
    return run_dir


def _server_failure(err: Exception) -> str:
    """The demo's message for a ComfyUI that did not start or failed the run, with the fix when one is known."""
    missing = re.search(r"No module named '([\w.]+)'", str(err))
    hint = ""
    if missing:
        module = missing.group(1).split(".")[0]
        hint = (f"\nComfyUI's Python environment lacks the module '{module}'. Install it there (pip install "
                f"{module}); ComfyUI 0.3.64 imports 'requests' without listing it in its requirements.txt, and "
                f"pip install '.[demo]' brings it.")
    return f"the demo's ComfyUI failed; no output folder was written.\n{err}{hint}"


def _log_progress(event) -> None:
    if event.max and (event.value == event.max or event.value % 4 == 0):
        logger.info("sampling %d/%d", event.value, event.max)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_counterfactual demo", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="your SD1.5 CXR checkpoint (.safetensors); default: tiny")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI folder (default: COMFYUI_PATH, ~/comfy/ComfyUI)")
    parser.add_argument(
        "--out", type=Path, default=Path("cxr-demo-output"), help="results go to a new run-* folder here"
    )
    parser.add_argument("--masks", choices=("atlas", "outlines"), default="atlas",
                        help="organ masks: the weight-free atlas (default) or the outlines we drew for RG1_UNCR")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--prompt", default="chest x-ray, large left pleural effusion")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_dir = run_demo(args.out, args.checkpoint, args.comfyui, args.seed, args.prompt, args.masks)
    sys.stdout.write(f"{run_dir}\n")
    return 0

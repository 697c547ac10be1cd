"""The headless runner end to end: ``python -m cxr_counterfactual run`` against real headless ComfyUIs with
the tiny checkpoint and real radiographs (single runs, batches killed and resumed, retries, two servers)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from test_runner_graph import write_manifest as write_rows

from conftest import need

pytestmark = pytest.mark.slow

CHEXMASK = "cxr_chexmask_edit"
# Test size: a 64 px fitted image, 3 steps, a thin edit margin.
SMALL = ["Fit radiograph to the model.max_side=64", "Sampler (img2img in the edit region).steps=3",
         "Edit region (left lung + margin, heart kept).margin_px=2",
         "Edit region (left lung + margin, heart kept).feather_px=1"]


def cli(pack_import_path: Path, *args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pack_import_path)}
    return subprocess.run([sys.executable, "-m", "cxr_counterfactual", "run", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **popen)


def small(checkpoint: Path, title: str = "Checkpoint (SD1.5 CXR model)") -> list[str]:
    return [arg for item in [*SMALL, f"{title}.ckpt_name={checkpoint.name}"] for arg in ("--set", item)]


def chexmask_id(data_dir: Path) -> str:
    """A CheXmask row on the 1024 px grid with good quality (its own image is not in the test data: the NIH
    radiograph stands in for it, as in test_workflows)."""
    with (data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv").open(newline="") as f:
        return next(r["Image Index"] for r in csv.DictReader(f) if float(r["Dice RCA (Mean)"]) >= 0.7
                    and float(r["Height"] or 1024) == float(r["Width"] or 1024))


def write_manifest(path: Path, data_dir: Path, example: Path, seeds: list[int], extra: list[dict] = ()) -> Path:
    """Rows alternating a CheXmask row source and mask files, one seed each (radiograph paths relative)."""
    rows = []
    for i, seed in enumerate(seeds):
        if i % 2 == 0:
            rows.append({"id": f"nih-{seed}", "radiograph": str(data_dir / "cxr" / "nih" / "00000001_000.png"),
                         "chexmask_csv": str(data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"),
                         "chexmask_id": chexmask_id(data_dir), "seed": str(seed)})
        else:
            rows.append({"id": f"example-{seed}", "radiograph": str(example / "utils_example1.jpg"),
                         "mask_right_lung": str(example / "RL_mask.png"),
                         "mask_left_lung": str(example / "LL_mask.png"),
                         "mask_heart": str(example / "H_mask.png"), "seed": str(seed),
                         "prompt": "chest x-ray, large left pleural effusion, left lung, normal heart"})
    rows += list(extra)
    return write_rows(path, rows)


def results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_single_run_saves_every_output_in_a_new_folder(comfy_server, tiny_checkpoint, pack_import_path, tmp_path):
    dicom = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(dicom is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    args = ["cxr_dicom_masked_edit", "--server", comfy_server.url, "--input", dicom, "--out", str(tmp_path),
            "--set", "Fit to model.max_side=64", "--set", "Sampler.steps=3", "--set",
            f"CXR checkpoint.ckpt_name={tiny_checkpoint.name}", "--set", "Pathology prompt.text=chest x-ray, effusion"]
    first = cli(pack_import_path, *args)
    assert first.returncode == 0, first.stderr
    second = cli(pack_import_path, *args)
    assert second.returncode == 0, second.stderr
    folders = [Path(first.stdout.split()[0]), Path(second.stdout.split()[0])]
    assert folders[0] != folders[1] and all(f.parent == tmp_path for f in folders)  # never overwritten
    record = json.loads((folders[0] / "row.json").read_text())
    assert record["server"] == comfy_server.url
    assert record["graph"]["7"]["inputs"]["text"] == "chest x-ray, effusion"
    assert {"save-counterfactual.png", "save-source.png", "save-edited-latent.latent"} <= set(record["files"])
    assert all((folders[0] / name).stat().st_size > 0 for name in record["files"])
    from PIL import Image

    with Image.open(folders[0] / "save-counterfactual.png") as im:
        assert im.size == (1841, 1955)  # back at the DICOM's native size


def test_usage_errors_are_clear(comfy_server, tiny_checkpoint, pack_import_path, tmp_path):
    base = [CHEXMASK, "--server", comfy_server.url, "--out", str(tmp_path / "out")]
    typo = cli(pack_import_path, *base, "--set", "Samplr.steps=3")
    assert typo.returncode == 2 and "no node titled 'Samplr'" in typo.stderr
    assert "'Edit prompt + token map' (CXRTextEncode)" in typo.stderr  # the titles are listed
    unknown = cli(pack_import_path, *base, "--set", "Sampler (img2img in the edit region).stepz=3")
    assert unknown.returncode == 2 and "has no input 'stepz'" in unknown.stderr and "steps" in unknown.stderr
    rejected = cli(pack_import_path, *base, "--set", "Checkpoint (SD1.5 CXR model).ckpt_name=missing.safetensors")
    assert rejected.returncode == 1 and "prompt rejected" in rejected.stderr and "ckpt_name" in rejected.stderr
    no_file = cli(pack_import_path, *base, "--input", str(tmp_path / "nothing.png"))
    assert no_file.returncode == 2 and "nothing.png does not exist" in no_file.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_batch_killed_mid_way_resumes_without_losing_or_overwriting(
        comfy_server, tiny_checkpoint, pack_import_path, data_dir, chexmask_example, tmp_path):
    manifest = write_manifest(tmp_path / "rows.csv", data_dir, chexmask_example, seeds=list(range(1, 9)))
    out = tmp_path / "out"
    args = [CHEXMASK, "--manifest", str(manifest), "--server", comfy_server.url, "--out", str(out),
            "--no-progress", *small(tiny_checkpoint)]
    env = {**os.environ, "PYTHONPATH": str(pack_import_path)}
    proc = subprocess.Popen([sys.executable, "-m", "cxr_counterfactual", "run", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((out / "rows").glob("*/row.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "rows").glob("*/row.json")}
    assert 1 <= len(before) < 8, "the batch was not killed mid-way"

    again = cli(pack_import_path, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"finished before: {len(before)}" in again.stdout
    rows = results(out)
    assert [r["status"] for r in rows] == ["done"] * 8 and len({r["output_dir"] for r in rows}) == 8
    for key, stamp in before.items():  # the rows finished before the kill are the very same files
        record = out / "rows" / key / "row.json"
        assert (record.stat().st_ino, record.stat().st_mtime_ns) == stamp
    assert not (out / ".partial").exists() or not list((out / ".partial").iterdir())
    # Every row holds its counterfactual and metrics; the example rows used the manifest's mask files.
    for row in rows:
        folder = out / row["output_dir"]
        assert (folder / "save-counterfactual.png").is_file() and float(row["metric_keep_ssim"]) > 0.5
        graph = json.loads((folder / "row.json").read_text())["graph"]
        kind = "CXRLoadCheXmask" if row["id"].startswith("nih") else "CXRLoadOrganMasks"
        assert graph["2"]["class_type"] == kind and graph["13"]["inputs"]["seed"] == int(row["seed"])
    third = cli(pack_import_path, *args)
    assert third.returncode == 0 and "finished now: 0; finished before: 8" in third.stdout


def test_failed_rows_are_retried_a_bounded_number_of_times_and_kept_apart(
        comfy_server, tiny_checkpoint, pack_import_path, data_dir, chexmask_example, tmp_path):
    bad_value = {"id": "bad-gate", "radiograph": str(chexmask_example / "utils_example1.jpg"),
                 "mask_right_lung": str(chexmask_example / "RL_mask.png"),
                 "mask_left_lung": str(chexmask_example / "LL_mask.png"),
                 "mask_heart": str(chexmask_example / "H_mask.png"), "Stage 2: anatomy gate.background": "nowhere"}
    missing = {"id": "missing", "radiograph": "no/such/radiograph.png"}
    manifest = write_manifest(tmp_path / "rows.csv", data_dir, chexmask_example, [3], [bad_value, missing])
    out = tmp_path / "out"
    args = [CHEXMASK, "--manifest", str(manifest), "--server", comfy_server.url, "--out", str(out),
            "--retries", "1", "--no-progress", *small(tiny_checkpoint)]
    run = cli(pack_import_path, *args)
    assert run.returncode == 1, run.stdout + run.stderr
    by_id = {r["id"]: r for r in results(out)}
    assert by_id["nih-3"]["status"] == "done"
    assert by_id["bad-gate"]["status"] == "failed" and by_id["bad-gate"]["attempts"] == "2"
    assert "background" in by_id["bad-gate"]["error"]
    assert by_id["missing"]["status"] == "failed" and "radiograph.png does not exist" in by_id["missing"]["error"]
    assert "FAILED missing" in run.stdout and "run the same command again" in run.stdout
    assert sorted(p.name.split("-")[0] for p in (out / "rows").iterdir()) == ["nih"]  # only good rows get folders
    again = cli(pack_import_path, *args)
    assert again.returncode == 1 and "finished before: 1" in again.stdout


def test_rows_are_spread_over_two_servers(comfy_server, comfyui_path, tiny_checkpoint, pack_import_path, data_dir,
                                          chexmask_example, tmp_path):
    from cxr_counterfactual.runner.server import ComfyServer

    manifest = write_manifest(tmp_path / "rows.csv", data_dir, chexmask_example, seeds=[11, 12, 13, 14])
    with ComfyServer(comfyui_path, checkpoints=[tiny_checkpoint], base_dir=tmp_path / "second") as second:
        run = cli(pack_import_path, CHEXMASK, "--manifest", str(manifest), "--server", comfy_server.url,
                  "--server", second.url, "--out", str(tmp_path / "out"), "--no-progress", *small(tiny_checkpoint))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = results(tmp_path / "out")
    assert [r["status"] for r in rows] == ["done"] * 4
    assert {r["server"] for r in rows} == {comfy_server.url, second.url}


def test_a_server_that_goes_down_mid_batch_leaves_its_rows_to_the_other(
        comfy_server, comfyui_path, tiny_checkpoint, pack_import_path, data_dir, chexmask_example, tmp_path):
    from cxr_counterfactual.runner.server import ComfyServer

    manifest = write_manifest(tmp_path / "rows.csv", data_dir, chexmask_example, seeds=list(range(30, 42)))
    out = tmp_path / "out"
    second = ComfyServer(comfyui_path, checkpoints=[tiny_checkpoint], base_dir=tmp_path / "second").start()
    try:
        env = {**os.environ, "PYTHONPATH": str(pack_import_path)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxr_counterfactual", "run", CHEXMASK, "--manifest", str(manifest), "--server",
             comfy_server.url, "--server", second.url, "--out", str(out), "--no-progress", *small(tiny_checkpoint)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while not list((out / "rows").glob("*/row.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        second.stop()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        second.stop()
    assert proc.returncode == 0, stdout + stderr
    assert f"server {second.url} is down" in stderr
    rows = results(out)
    assert [r["status"] for r in rows] == ["done"] * 12
    assert {r["server"] for r in rows} >= {comfy_server.url}


def test_without_a_server_it_starts_its_own(comfyui_path, tiny_checkpoint, pack_import_path, tmp_path):
    """The embedded default: a private headless ComfyUI with the pack, the one --checkpoint selected, and the
    radiograph, prompt and seed given as options."""
    dicom = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(dicom is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    run = cli(pack_import_path, "cxr_dicom_masked_edit", "--comfyui", str(comfyui_path), "--checkpoint",
              str(tiny_checkpoint), "--radiograph", dicom, "--seed", "4", "--prompt", "chest x-ray, effusion",
              "--set", "Fit to model.max_side=64", "--set", "Sampler.steps=2", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((Path(run.stdout.split()[0]) / "row.json").read_text())
    graph = record["graph"]
    assert graph["6"]["inputs"]["ckpt_name"] == tiny_checkpoint.name and graph["11"]["inputs"]["seed"] == 4
    assert graph["7"]["inputs"]["text"] == "chest x-ray, effusion"
    assert graph["1"]["inputs"]["dicom_file"] == "RG1_UNCR.dcm"  # a single run's files keep their names
    assert "save-counterfactual.png" in record["files"]


def test_a_shipped_workflow_runs_on_a_png_and_a_jpeg(comfy_server, tiny_checkpoint, pack_import_path, data_dir,
                                                      chexmask_example, tmp_path):
    """cxr_chexmask_edit through the runner on a 16-bit PNG (the NIH radiograph, made at test time) and on the
    CheXmask example JPEG: the shipped radiograph loader reads both, and each edit comes back at native size."""
    from PIL import Image
    from radiograph_files import png_bytes, quantise

    nih = np.asarray(Image.open(data_dir / "cxr" / "nih" / "00000001_000.png").convert("L"), dtype=np.float64)
    png16 = tmp_path / "nih16.png"
    png16.write_bytes(png_bytes(quantise(nih / 255, 16), 16))
    rows = [{"id": "png16", "radiograph": str(png16),
             "chexmask_csv": str(data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"),
             "chexmask_id": chexmask_id(data_dir)},
            {"id": "jpeg", "radiograph": str(chexmask_example / "utils_example1.jpg"),
             "mask_right_lung": str(chexmask_example / "RL_mask.png"),
             "mask_left_lung": str(chexmask_example / "LL_mask.png"),
             "mask_heart": str(chexmask_example / "H_mask.png")}]
    out = tmp_path / "out"
    run = cli(pack_import_path, CHEXMASK, "--manifest", str(write_rows(tmp_path / "rows.csv", rows)), "--server",
              comfy_server.url, "--out", str(out), "--no-progress", *small(tiny_checkpoint))
    assert run.returncode == 0, run.stdout + run.stderr
    by_id = {r["id"]: r for r in results(out)}
    assert [by_id[i]["status"] for i in ("png16", "jpeg")] == ["done", "done"]
    for row_id, size in (("png16", (512, 512)), ("jpeg", (786, 899))):
        folder = out / by_id[row_id]["output_dir"]
        loader = json.loads((folder / "row.json").read_text())["graph"]["1"]
        assert loader["class_type"] == "CXRLoadDICOM" and loader["inputs"]["dicom_file"].endswith(
            Path(rows[0 if row_id == "png16" else 1]["radiograph"]).name)
        with Image.open(folder / "save-counterfactual.png") as im:
            assert im.size == size
        assert float(by_id[row_id]["metric_keep_ssim"]) > 0.5

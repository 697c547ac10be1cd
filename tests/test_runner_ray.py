"""The batch on Ray: a local instance on loopback (no dashboard, usage stats off) with two CPU actors, each
owning a headless ComfyUI; same manifest, results and resume semantics as the thread backend."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile

import pytest
from test_runner import CHEXMASK, cli, results, small, write_manifest

from conftest import need

pytestmark = pytest.mark.slow


def test_batch_on_a_local_ray_instance_with_two_cpu_actors(
        comfyui_path, tiny_checkpoint, pack_import_path, data_dir, chexmask_example, tmp_path, monkeypatch,
        request):
    need(importlib.util.find_spec("ray") is not None, "ray is not installed: pip install 'ray>=2.9' (the [ray] extra)")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's session files in a folder of this test, short enough for its socket paths (107 bytes at most).
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    manifest = write_manifest(tmp_path / "rows.csv", data_dir, chexmask_example, seeds=[21, 22, 23])
    out = tmp_path / "out"
    args = [CHEXMASK, "--manifest", str(manifest), "--out", str(out), "--ray", "local", "--ray-actors", "2",
            "--comfyui", str(comfyui_path), "--checkpoint", str(tiny_checkpoint), "--no-progress",
            *small(tiny_checkpoint)]
    run = cli(pack_import_path, *args, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert "local Ray instance on 127.0.0.1:" in run.stderr  # loopback, not the machine's outward address
    rows = results(out)
    assert [r["status"] for r in rows] == ["done"] * 3
    assert all(r["server"].split()[-1].startswith("http://127.0.0.1:") for r in rows)
    assert len({r["server"] for r in rows}) == 2  # both actors, each with its own ComfyUI, took rows
    assert all((out / r["output_dir"] / "save-counterfactual.png").is_file() for r in rows)
    again = cli(pack_import_path, *args, timeout=900)
    assert again.returncode == 0 and "finished now: 0; finished before: 3" in again.stdout, again.stdout

"""End to end through a real headless ComfyUI: the harness in ``runner/server.py`` and the tiny checkpoint.

One server per session (``comfy_server``); the start/stop tests start their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cxr_counterfactual.runner.comfyui_path import PACK_ROOT
from cxr_counterfactual.runner.protocol import (
    ComfyServerError,
    ExecutionFailed,
    ExecutionInterrupted,
    ProgressEvent,
    PromptRejected,
)
from cxr_counterfactual.runner.server import ComfyServer

pytestmark = pytest.mark.slow

SAMPLER = "5"
SAVE = "9"


def txt2img(ckpt_name: str, seed: int = 0, steps: int = 4, size: int = 64, prefix: str = "harness") -> dict:
    """API graph: CheckpointLoaderSimple → CLIPTextEncode ×2 → EmptyLatentImage → KSampler → VAEDecode
    → SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "chest x-ray", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        SAMPLER: {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": ["1", 2]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def _combo_options(spec: list[Any]) -> list[str]:
    """Options of a COMBO input in /object_info: ``[[...], {...}]`` or ``["COMBO", {"options": [...]}]``."""
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1]["options"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_object_info_lists_core_nodes_and_checkpoint(comfy_server: ComfyServer, tiny_checkpoint: Path) -> None:
    info = comfy_server.object_info()
    for node in ("KSampler", "CheckpointLoaderSimple", "CLIPTextEncode", "VAEDecode", "SaveImage"):
        assert node in info, f"{node} missing from /object_info"
    ckpt_spec = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    assert tiny_checkpoint.name in _combo_options(ckpt_spec)


def test_txt2img_runs_end_to_end(comfy_server: ComfyServer, tiny_checkpoint: Path) -> None:
    seen: list[ProgressEvent] = []
    result = comfy_server.run(txt2img(tiny_checkpoint.name, seed=1), timeout=300, on_progress=seen.append)

    assert seen == result.progress
    sampler_steps = [event for event in result.progress if event.node == SAMPLER]
    assert sampler_steps, f"no progress from the KSampler; got {result.progress}"
    assert sampler_steps[-1].value == sampler_steps[-1].max == 4
    assert set(result.executed) | set(result.cached) >= {"1", "2", "3", "4", SAMPLER, "8", SAVE}

    files = result.files(SAVE)
    assert len(files) == 1
    png = files[0]
    assert png.is_file() and png.is_relative_to(comfy_server.folders["output"])
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (64, 64)


def test_invalid_widget_value_is_rejected_and_server_stays_usable(
    comfy_server: ComfyServer, tiny_checkpoint: Path
) -> None:
    with pytest.raises(PromptRejected) as caught:
        comfy_server.run(txt2img("no-such-model.safetensors"))
    rejected = caught.value
    assert set(rejected.node_errors) == {"1"}
    assert rejected.node_errors["1"]["class_type"] == "CheckpointLoaderSimple"
    assert "ckpt_name" in str(rejected) and "no-such-model.safetensors" in str(rejected)

    # Still usable: two valid runs with other seeds give two different images.
    first = comfy_server.run(txt2img(tiny_checkpoint.name, seed=11, prefix="after-reject"), timeout=300)
    second = comfy_server.run(txt2img(tiny_checkpoint.name, seed=12, prefix="after-reject"), timeout=300)
    assert "1" in second.cached, "the unchanged checkpoint loader should come from the server's cache"
    a, b = _pixels(first.files(SAVE)[0]), _pixels(second.files(SAVE)[0])
    assert a.shape == b.shape == (64, 64, 3)
    assert not np.array_equal(a, b), "different seeds must give different images"


def test_node_exception_raises_execution_failed(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """A graph that validates but whose node raises: LoadImage on a file that is not an image."""
    fake = tmp_path / "not-an-image.png"
    fake.write_text("plain text, not a PNG")
    name = comfy_server.upload_input(fake)
    assert (comfy_server.folders["input"] / name).is_file()
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(ExecutionFailed) as caught:
        comfy_server.run(graph, timeout=120)
    assert caught.value.node_id == "1"
    assert caught.value.node_type == "LoadImage"
    assert caught.value.exception_message


def test_interrupt_stops_a_run(comfy_server: ComfyServer, tiny_checkpoint: Path) -> None:
    """interrupt() from the progress callback ends a long run early with ExecutionInterrupted."""
    events: list[ProgressEvent] = []

    def interrupt_once(event: ProgressEvent) -> None:
        events.append(event)
        if len(events) == 1:
            comfy_server.interrupt()

    graph = txt2img(tiny_checkpoint.name, seed=21, steps=200)
    with pytest.raises(ExecutionInterrupted):
        comfy_server.run(graph, timeout=300, on_progress=interrupt_once)
    assert events and events[-1].value < 200


def test_stop_ends_the_process(comfyui_path: Path, tmp_path: Path) -> None:
    """A server of its own: it starts without checkpoints, stop() reaps it, a second stop() is harmless."""
    with ComfyServer(comfyui_path, base_dir=tmp_path / "base") as server:
        pid = server.pid
        assert pid is not None and server.is_running()
        assert "KSampler" in server.object_info()
        assert (tmp_path / "base" / "custom_nodes" / "cxr_counterfactual").is_symlink()
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()
    assert "To see the GUI go to" in server.log_text()  # the log file caught the server's output


def test_start_failure_reports_the_log(comfyui_path: Path, tmp_path: Path) -> None:
    """A server that exits during start-up raises with the end of its log, and leaves nothing running."""
    server = ComfyServer(comfyui_path, base_dir=tmp_path / "base", extra_args=["--no-such-flag"])
    with pytest.raises(ComfyServerError, match="no-such-flag"):
        server.start()
    assert not server.is_running()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


_PARENT_SCRIPT = """
import sys, time
from pathlib import Path
from cxr_counterfactual.runner.server import ComfyServer
server = ComfyServer(Path(sys.argv[1]), base_dir=Path(sys.argv[2])).start()
sys.stdout.write(f"{server.pid}\\n")
sys.stdout.flush()
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_server_dies_with_a_killed_parent(comfyui_path: Path, tmp_path: Path) -> None:
    """SIGKILL the process that started a server (atexit cannot run): the server still goes away."""
    package_parent = tmp_path / "pkg"
    package_parent.mkdir()
    (package_parent / "cxr_counterfactual").symlink_to(PACK_ROOT, target_is_directory=True)
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT_SCRIPT, str(comfyui_path), str(tmp_path / "base")],
        env={**os.environ, "PYTHONPATH": str(package_parent)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert _alive(server_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    survived = _alive(server_pid)
    if survived:
        os.kill(server_pid, signal.SIGKILL)  # do not leak it into the rest of the run
    assert not survived, f"server {server_pid} outlived its killed parent"

"""End to end through a real headless ComfyUI: real radiographs and organ masks, the mask nodes, a
KSampler on the tiny checkpoint, and the saved outputs (compared as float latents, not PNG bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from cxr_counterfactual.runner.comfyui_path import PACK_ROOT

WORKFLOW = PACK_ROOT / "workflows" / "api" / "cxr_dicom_masked_edit.json"
pytestmark = pytest.mark.slow


def load_latent(path: Path) -> torch.Tensor:
    return load_file(str(path))["latent_tensor"].float()


def kept_latent_cells(edit_mask: np.ndarray, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Latent cells whose noise mask is exactly 0 after ComfyUI's bilinear resize: far from any edit pixel."""
    m = torch.from_numpy(edit_mask.astype(np.float32))[None, None]
    # Each cell plus two neighbours each way: the feather tails below one grey level (invisible in the 8-bit
    # PNG) and the resize round trip reach about a cell beyond the visible region.
    reach = F.max_pool2d(m, kernel_size=40, stride=8, padding=16)
    reach = F.interpolate(reach, size=latent_hw, mode="nearest")[0, 0]
    return reach == 0


def png_to_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


def test_masked_edit_of_the_chexmask_radiograph(comfy_server, chexmask_example, tiny_checkpoint):
    server = comfy_server
    for name in ("utils_example1.jpg", "RL_mask.png", "LL_mask.png", "H_mask.png"):
        server.upload_input(chexmask_example / name)
    graph = json.loads(WORKFLOW.read_text())
    # A user's graph may load the radiograph with ComfyUI's own LoadImage instead of the pack's loader.
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": "utils_example1.jpg"}}
    del graph["4"]["inputs"]["geometry"]
    graph["2"] = {"class_type": "CXRLoadOrganMasks", "inputs": {"right_lung": "RL_mask.png", "left_lung": "LL_mask.png",
                                                                 "heart": "H_mask.png", "threshold": 0.5}}
    graph["4"]["inputs"]["max_side"] = 256
    graph["6"]["inputs"]["ckpt_name"] = tiny_checkpoint.name
    graph["11"]["inputs"].update(steps=6, seed=3)

    result = server.run(graph)

    assert any(e.value == e.max for e in result.progress), "the sampler reported no finished progress"
    (edit_png,) = result.files("14")
    (overlay_png,) = result.files("15")
    (region_png,) = result.files("20")
    for png in (edit_png, overlay_png, region_png):
        assert Image.open(png).size == (786, 899), png.name  # back at native size
    # The overlay tints the patient's right lung (image left) red and the heart blue.
    overlay = np.asarray(Image.open(overlay_png).convert("RGB"), dtype=np.float32)
    source = np.asarray(Image.open(chexmask_example / "utils_example1.jpg").convert("RGB"), dtype=np.float32)
    rl = np.asarray(Image.open(chexmask_example / "RL_mask.png").convert("L")) > 127
    heart = np.asarray(Image.open(chexmask_example / "H_mask.png").convert("L")) > 127
    d = overlay - source
    assert d[rl].mean(0)[0] > d[rl].mean(0)[2] + 10
    assert d[heart & ~rl].mean(0)[2] > d[heart & ~rl].mean(0)[0] + 10

    # The edit region at native size covers the left lung, not the heart (protected).
    region = png_to_array(region_png)
    ll = np.asarray(Image.open(chexmask_example / "LL_mask.png").convert("L")) > 127
    assert region[ll].mean() > 0.9 and region[heart & ~ll].mean() < 0.1

    # Latents: outside the edit region the sampler ends at the source latent (noise-mask path);
    # inside it the model changed it.
    (src_file,) = result.files("17", "latents")
    (out_file,) = result.files("18", "latents")
    src, out = load_latent(src_file), load_latent(out_file)
    assert src.shape == out.shape and src.shape[-2:] == (32, 28)
    fitted_region = region_for_latent(region, src.shape[-2:])
    keep = kept_latent_cells(fitted_region, tuple(src.shape[-2:]))
    inside = torch.from_numpy(fitted_region > 0.5)
    inside = F.interpolate(inside[None, None].float(), size=tuple(src.shape[-2:]), mode="area")[0, 0] == 1
    assert keep.sum() > 100 and inside.sum() > 20
    # Equal up to float rounding: the sampler works on latent × 0.18215 and its last Euler step computes
    # x − (x − x0), neither of which is bit-exact in fp32.
    kept_diff = float((out[..., keep] - src[..., keep]).abs().max())
    assert kept_diff <= 1e-5 * float(src.abs().max()), kept_diff
    assert float((out[..., inside] - src[..., inside]).abs().mean()) > 0.05


def region_for_latent(native_region: np.ndarray, latent_hw) -> np.ndarray:
    """The native-size edit region brought back onto the fitted grid (same rule as the fit node)."""
    from cxr_counterfactual.imaging.geometry import apply_fit, plan_fit

    fit = plan_fit(*native_region.shape, 256)
    assert (fit.height // 8, fit.width // 8) == tuple(latent_hw)
    t = torch.from_numpy(native_region)[None, None]
    return apply_fit(t, fit)[0, 0].numpy()


def demo_env(pack_import_path: Path, comfyui_path: Path, cache: Path, pythonpath: str = "") -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(pack_import_path), os.environ.get("PYTHONPATH", ""))
                                      if p),
        "COMFYUI_PATH": str(comfyui_path),
        "CXR_DEMO_CACHE": str(cache),
    }


def test_readme_demo_runs_on_the_real_dicom(tmp_path, tiny_checkpoint, comfyui_path, pack_import_path):
    """The README's first command, as a user runs it (tiny checkpoint, real DICOM from pydicom-data)."""
    import pydicom.data

    from cxr_counterfactual.demo.run import build_prompt
    from cxr_counterfactual.imaging.dicom import read_dicom
    from cxr_counterfactual.imaging.geometry import plan_fit

    proc = subprocess.run(
        [sys.executable, "-m", "cxr_counterfactual", "demo", "--out", str(tmp_path)],
        env=demo_env(pack_import_path, comfyui_path, tiny_checkpoint.parent),
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny random-weight test checkpoint" in proc.stderr and "NOT realistic anatomy" in proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    files = sorted(p.name for p in run_dir.iterdir())
    assert any(f.startswith("organs") for f in files)
    (edit,) = [run_dir / f for f in files if f.startswith("counterfactual")]
    (raw,) = [run_dir / f for f in files if f.startswith("raw_decode")]
    (region_png,) = [run_dir / f for f in files if f.startswith("edit_region")]
    (source,) = [run_dir / f for f in files if f.startswith("source_0")]
    for png in (edit, raw, region_png, source):
        assert Image.open(png).size == (1841, 1955), png.name  # RG1_UNCR's native size
    # The DICOM is MONOCHROME1: after inversion the lungs are darker than the mediastinum.
    s = png_to_array(source)
    assert s[500:1100, 300:700].mean() + 0.1 < s[400:1000, 850:1000].mean()
    notes = (run_dir / "README.txt").read_text()
    assert notes.startswith("checkpoint: tiny random-weight") and "masks: weight-free atlas" in notes
    # The notes and the log say which file is the composite and which the raw decode.
    for text in (notes, proc.stderr):
        assert f"{edit.name}: counterfactual: the edit composited onto the patient's own radiograph" in text
        assert f"{raw.name}: raw decode: the whole decoded latent" in text

    # The main image is the composite: outside the edit region, the patient's own pixels bit for bit. Expected
    # pixels: the source DICOM decoded by the pack's reader (what CXRLoadDICOM outputs), written the way
    # SaveImage writes them (float32 × 255, clipped, truncated to uint8; grey, so R = G = B).
    pixels = read_dicom(pydicom.data.get_testdata_file("RG1_UNCR.dcm")).pixels.numpy()
    expected = np.clip(np.float32(255.0) * pixels, 0, 255).astype(np.uint8)
    composite = np.asarray(Image.open(edit).convert("RGB"))
    # "Outside" = away from every pixel the 8-bit region PNG shows, by the feather's reach: the Gaussian
    # feather (kernel half-width int(3σ + 0.5) fitted px, one more for the bilinear scale-back) leaves weights
    # in (0, 1/255) that the PNG rounds to 0 but that may move a composite pixel by one grey level.
    graph = build_prompt("tiny.safetensors", None, tiny=True, seed=7, prompt="p")
    fit = plan_fit(1955, 1841, graph["4"]["inputs"]["max_side"])
    reach_fitted = int(3 * graph["5"]["inputs"]["feather_px"] + 0.5) + 1
    reach = int(np.ceil(reach_fitted * max(1955 / fit.resized_height, 1841 / fit.resized_width)))
    visible = torch.from_numpy(png_to_array(region_png) > 0).float()[None, None]
    near = F.max_pool2d(visible, kernel_size=2 * reach + 1, stride=1, padding=reach)[0, 0].numpy() > 0
    outside = ~near
    assert outside.mean() > 0.3, outside.mean()  # most of the radiograph is checked
    assert np.array_equal(composite[outside], np.repeat(expected[outside][:, None], 3, axis=1))
    # ... and the edit is there: inside the region the composite is the decoded edit, not the source.
    inside = png_to_array(region_png) > 0.5
    assert (composite[inside][:, 0] != expected[inside]).mean() > 0.5
    # The raw decode is not the patient outside the edit (the tiny VAE's noise): the check above can fail.
    raw_pixels = np.asarray(Image.open(raw).convert("RGB"))[..., 0]
    assert (raw_pixels[outside] != expected[outside]).mean() > 0.5


def test_demo_that_cannot_start_comfyui_leaves_no_folder(tmp_path, tiny_checkpoint, comfyui_path, pack_import_path):
    """ComfyUI 0.3.64 without `requests` (its requirements.txt omits it) exits before it answers: the demo says
    which module is missing and leaves no output folder; a folder the user already had stays as it was."""
    blocker = tmp_path / "no_requests"
    (blocker / "requests").mkdir(parents=True)
    (blocker / "requests" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'requests'\", name='requests')\n")
    env = demo_env(pack_import_path, comfyui_path, tiny_checkpoint.parent, pythonpath=str(blocker))
    new_out = tmp_path / "new-output"
    mine = tmp_path / "mine"
    (mine / "run-earlier").mkdir(parents=True)
    (mine / "run-earlier" / "counterfactual_00001_.png").write_bytes(b"the user's earlier result")
    before = {p.relative_to(mine): p.read_bytes() if p.is_file() else None for p in mine.rglob("*")}
    for out in (new_out, mine):
        proc = subprocess.run([sys.executable, "-m", "cxr_counterfactual", "demo", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode != 0 and "No module named 'requests'" in proc.stderr, proc.stderr[-3000:]
        assert "pip install requests" in proc.stderr and "no output folder was written" in proc.stderr
    assert not new_out.exists()
    assert {p.relative_to(mine): p.read_bytes() if p.is_file() else None for p in mine.rglob("*")} == before


def test_demo_run_folders_never_overwrite(tmp_path):
    from cxr_counterfactual.demo.run import unique_dir

    first, second = unique_dir(tmp_path), unique_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()

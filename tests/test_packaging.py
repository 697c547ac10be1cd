"""The pack installs as one package, ``cxr_counterfactual``, in the Comfy Registry's form."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from cxr_counterfactual.runner.comfyui_path import PACK_ROOT

PYPROJECT = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())


def requirement_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_dependencies_match_requirements_and_leave_torch_to_comfyui():
    deps = PYPROJECT["project"]["dependencies"]
    assert deps == requirement_lines(PACK_ROOT / "requirements.txt")
    assert not any(re.match(r"(torch|torchvision|torchaudio)\b", d) for d in deps)


def test_test_extra_matches_requirements_test_and_diffusers_stays_optional():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["test"] == requirement_lines(PACK_ROOT / "requirements-test.txt")
    assert "diffusers>=0.30" in extras["diffusers"] and "diffusers>=0.30" in extras["test"]
    assert not any(d.startswith("diffusers") for d in PYPROJECT["project"]["dependencies"])


def test_extras_that_start_comfyui_bring_requests():
    # ComfyUI 0.3.64's server.py imports app/frontend_management.py, which imports requests, and ComfyUI's own
    # requirements.txt does not list it: every extra that starts a server (demo, runner, Ray, the suite) must.
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in ("demo", "run", "ray", "test"):
        assert any(re.match(r"requests\b", d) for d in extras[name]), name


def test_registry_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert project["name"] == "cxr-counterfactual"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"}
    assert "GNU GENERAL PUBLIC LICENSE" in (PACK_ROOT / "LICENSE").read_text()
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy) and comfy["requires-comfyui"] == ">=0.3.64"
    assert project["urls"]


def test_core_is_host_agnostic():
    importers = [
        p.name for p in (PACK_ROOT / "attention").rglob("*.py")
        if re.search(r"^\s*(import comfy|from comfy)", p.read_text(), re.M)
    ]
    assert importers == []  # the ComfyUI adapter lives in hosts/comfy/
    # the diffusers adapter works on the objects it is given: no shipped module imports diffusers (the example
    # script and the tests do)
    shipped = [p for p in PACK_ROOT.rglob("*.py") if (rel := p.relative_to(PACK_ROOT).parts)[0] not in
               ("tests", "scripts") and not any(part.startswith(".") for part in rel)]
    assert len(shipped) > 30
    assert not [p.name for p in shipped if re.search(r"^\s*(import diffusers|from diffusers)", p.read_text(), re.M)]
    for p in (PACK_ROOT / "imaging").rglob("*.py"):
        assert not re.search(r"^\s*(import comfy|from comfy|import folder_paths)", p.read_text(), re.M), p.name


def test_importing_the_package_does_not_import_comfy(pack_import_path):
    code = (
        "import sys, cxr_counterfactual, cxr_counterfactual.hosts.diffusers.processors; "
        "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'diffusers') for m in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(pack_import_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_wheel_holds_only_the_cxr_counterfactual_package(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    shutil.copytree(PACK_ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", ".*_cache", ".hypothesis"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(src)],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"cxr_counterfactual"}
    for needed in ("nodes/__init__.py", "attention/organs.py", "assets/rg1_uncr_organs.json",
                   "workflows/api/cxr_dicom_masked_edit.json", "__main__.py"):
        assert f"cxr_counterfactual/{needed}" in names
    assert not any("/tests/" in n for n in names)

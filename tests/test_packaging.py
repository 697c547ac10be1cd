"""The pack installs as one package, ``cxr_counterfactual``, in the Comfy Registry's form."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from conftest import need
from cxr_counterfactual.runner.comfyui_path import COMFYUI_HINT, PACK_ROOT, find_comfyui

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


# ---- Layering: what may import what (docs/development.md mirrors this table) ------------------------------------

# ComfyUI's own top-level modules (an absolute ``nodes`` is ComfyUI's; the pack's is ``cxr_counterfactual.nodes``).
COMFY = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "nodes", "server", "execution",
         "latent_preview", "node_helpers", "comfyui_version")
DIFFUSERS = ("diffusers", "transformers")
NOT_SHIPPED = ("tests", "testing", "tools", "benchmarks", "scripts")


def _ours(*names: str) -> tuple[str, ...]:
    return tuple(f"cxr_counterfactual.{n}" for n in names)


# Each shipped package (its path under the pack) → the modules it must not import, at module level or inside a
# function alike. A name forbids itself and everything below it.
LAYERS: dict[str, tuple[str, ...]] = {
    # The method's core: pure torch, no host, nothing above it.
    "attention": COMFY + DIFFUSERS + _ours("hosts", "nodes", "runner", "demo", "imaging"),
    # Image I/O, geometry, metrics, previews: pure, may use the core.
    "imaging": COMFY + DIFFUSERS + _ours("hosts", "nodes", "runner", "demo"),
    # Host glue: binds the core to one host, never to the nodes.
    "hosts/comfy": DIFFUSERS + _ours("nodes", "demo", "hosts.diffusers"),
    "hosts/diffusers": COMFY + DIFFUSERS + _ours("nodes", "demo", "runner", "hosts.comfy"),
    # Thin V3 nodes: schemas and input checks, then the core, imaging and the ComfyUI host.
    "nodes": _ours("runner", "demo", "hosts.diffusers"),
    # The headless runner talks HTTP to a ComfyUI: no core, no host, no nodes, no imaging.
    "runner": COMFY + _ours("attention", "imaging", "hosts", "nodes", "demo"),
    # The demo drives a server through the runner and builds its checkpoint through the ComfyUI host.
    "demo": _ours("nodes"),
    # The batch report reads an output folder (its on-disk layout is the contract, not the runner's code, so it
    # needs none of the runner's network packages) with imaging's reader and metrics: no ComfyUI, host or node.
    "report": COMFY + DIFFUSERS + _ours("attention", "hosts", "nodes", "runner", "demo"),
}
# Every shipped module (all but NOT_SHIPPED): no test fixture, no dev-only code, no diffusers (the diffusers
# host works on the objects it is given).
EVERY_SHIPPED_MODULE = DIFFUSERS + _ours(*NOT_SHIPPED)


def module_name(path: Path, root: Path = PACK_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["cxr_counterfactual", *parts])


def imported_modules(path: Path, root: Path = PACK_ROOT) -> set[str]:
    """Every module ``path`` imports anywhere in its code, relative imports resolved to absolute names (``from
    ..attention import gating`` gives ``cxr_counterfactual.attention`` and ``cxr_counterfactual.attention.gating``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                assert node.level <= len(parts), f"{path}: import beyond the package"
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def shipped_files(root: Path = PACK_ROOT) -> list[Path]:
    return [p for p in sorted(root.rglob("*.py")) if (rel := p.relative_to(root).parts)[0] not in NOT_SHIPPED
            and rel[0] != "build" and not any(part.startswith(".") for part in rel)]


def layering_violations(root: Path = PACK_ROOT) -> list[str]:
    """``file imports module (rule)`` for every import the layer table forbids."""
    def hits(imported: str, forbidden: tuple[str, ...]) -> str | None:
        return next((f for f in forbidden if imported == f or imported.startswith(f + ".")), None)

    out: dict[tuple[str, str, str], str] = {}
    for path in shipped_files(root):
        rel = path.relative_to(root).as_posix()
        rules = [(layer, banned) for layer, banned in LAYERS.items() if rel.startswith(layer + "/")]
        rules.append(("every shipped module", EVERY_SHIPPED_MODULE))
        for imported in sorted(imported_modules(path, root), key=len):  # one line per rule: the shortest name
            for layer, banned in rules:
                if (rule := hits(imported, banned)) is not None:
                    out.setdefault((rel, layer, rule), imported)
    return [f"{rel} imports {imported} ({layer} must not import {rule})"
            for (rel, layer, rule), imported in sorted(out.items())]


def test_the_layers_import_only_what_the_module_map_allows():
    assert len(shipped_files()) > 30
    for layer in LAYERS:  # every package under a rule exists, so a move cannot leave a rule checking nothing
        assert list((PACK_ROOT / layer).glob("*.py")), layer
    assert layering_violations() == []


def test_the_layer_check_catches_a_violation_of_each_rule(tmp_path):
    # The same check on a copy of the tree with forbidden imports planted (module level, inside a function,
    # relative, absolute): it must name each of them, and nothing else.
    src = tmp_path / "pack"
    shutil.copytree(PACK_ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", ".*_cache", "tests", "build",
                                                                 "data", "*.json", "*.png", "*.jpg"))
    planted = {
        "attention/planted.py": "import comfy.model_management\n",
        "imaging/planted.py": "def f():\n    from ..hosts.comfy import patch\n",
        "hosts/comfy/planted.py": "from ... import nodes\n",
        "hosts/diffusers/planted.py": "from ...nodes import common\n",
        "runner/planted.py": "from ..attention import gating\n",
        "demo/planted.py": "from cxr_counterfactual.testing import data\n",
        "nodes/planted.py": "from ..tools import workflow_format\n",
        "report/planted.py": "def f():\n    from ..runner import results\n",
        "planted.py": "import diffusers\n",
    }
    for rel, code in planted.items():
        (src / rel).write_text(code)
    found = layering_violations(src)
    for rel in planted:
        assert any(line.startswith(rel + " imports ") for line in found), (rel, found)
    assert {line.split(" imports ")[0] for line in found} == set(planted), found


def test_the_package_lists_every_shipped_sub_package():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == {module_name(p) for p in shipped_files() if p.name == "__init__.py"}
    assert "cxr_counterfactual.testing" not in listed  # test fixtures stay out of the wheel


# Third-party modules shipped code may import without declaring them: ComfyUI's environment, which the pack runs
# in, provides them (the runner's progress bar falls back to log lines without tqdm).
HOST_PROVIDED = set(COMFY) | {"torch", "torchvision", "safetensors", "tqdm"}
# Attention kernels ComfyUI itself imports when the user installed them (comfy/ldm/modules/attention.py). The pack
# may use them too, but only behind `importlib.util.find_spec(name)`, so a missing one is never an ImportError.
HOST_OPTIONAL_KERNELS = {"xformers", "flash_attn", "sageattention"}
DISTRIBUTION_OF = {"PIL": "pillow", "websocket": "websocket-client", "pydicom_data": "pydicom-data"}


def test_every_third_party_import_of_shipped_code_is_declared():
    def dist(requirement: str) -> str:
        return re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower()

    declared = {dist(d) for d in PYPROJECT["project"]["dependencies"]}
    extras = {dist(d) for group in PYPROJECT["project"]["optional-dependencies"].values() for d in group}
    assert "einops" in declared  # imaging/ uses it (ComfyUI requires it too, but the pack says what it uses)
    undeclared = set()
    for path in shipped_files():
        for imported in imported_modules(path):
            top = imported.split(".")[0]
            if top in sys.stdlib_module_names or top == "cxr_counterfactual" or top in HOST_PROVIDED:
                continue
            if top in HOST_OPTIONAL_KERNELS and f'find_spec("{top}")' in path.read_text():
                continue
            if DISTRIBUTION_OF.get(top, top).lower() not in declared | extras:
                undeclared.add(f"{path.relative_to(PACK_ROOT)}: {top}")
    assert not undeclared, sorted(undeclared)


def test_importing_the_package_does_not_import_comfy(pack_import_path):
    code = (
        "import sys, cxr_counterfactual, cxr_counterfactual.hosts.diffusers.processors; "
        "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'diffusers') for m in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(pack_import_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# Imports the modules named in argv[3] (JSON) from the unpacked wheel in argv[1]; given ComfyUI's folder (argv[2]),
# it first makes ComfyUI importable on the CPU. Without it, prints (as JSON) the modules that need ComfyUI.
_IMPORT_ALL = """
import importlib, json, sys
from pathlib import Path
root, comfyui, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, root)
import cxr_counterfactual
assert Path(cxr_counterfactual.__file__).resolve().is_relative_to(Path(root).resolve()), cxr_counterfactual.__file__
if comfyui:
    from cxr_counterfactual.hosts.comfy.standalone import prepare_comfy_import
    prepare_comfy_import(Path(comfyui))
needs_comfy = []
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if comfyui or (err.name or "").split(".")[0] not in COMFY:
            raise
        needs_comfy.append(name)
if not comfyui:
    assert not [m for m in sys.modules if m.split(".")[0] in COMFY], "a module imported ComfyUI"
print(json.dumps(needs_comfy))
""".replace("COMFY", repr(set(COMFY)))


def test_wheel_holds_only_the_shipped_package_and_every_module_imports(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    shutil.copytree(PACK_ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", ".*_cache", ".hypothesis",
                                                                 "build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(src)],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"cxr_counterfactual"}
    for needed in ("nodes/__init__.py", "attention/organs.py", "hosts/comfy/patch.py", "hosts/diffusers/stages.py",
                   "demo/tiny_checkpoint.py", "runner/server.py", "assets/rg1_uncr_organs.json",
                   "workflows/api/cxr_dicom_masked_edit.json", "__main__.py"):
        assert f"cxr_counterfactual/{needed}" in names
    for dev_only in NOT_SHIPPED:
        assert not any(n.startswith(f"cxr_counterfactual/{dev_only}/") for n in names), dev_only
    modules = sorted(n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in names
                     if n.endswith(".py"))
    assert modules == sorted(module_name(p) for p in shipped_files())  # every shipped module, nothing else

    # Import every module of the unpacked wheel (a pure wheel unpacks to its installed layout) in a fresh process
    # without ComfyUI, where only nodes/ and hosts/comfy/ may need it; then those with ComfyUI.
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def import_all(comfyui: str, which: list[str]) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, str(unpacked), comfyui, json.dumps(which)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    needs_comfy = import_all("", modules)
    assert needs_comfy and all(m.startswith(("cxr_counterfactual.nodes", "cxr_counterfactual.hosts.comfy"))
                               for m in needs_comfy), needs_comfy
    comfyui_path = find_comfyui()  # checked only here: the wheel's contents and the rest need no ComfyUI
    need(comfyui_path is not None, f"ComfyUI not found. {COMFYUI_HINT}")
    assert import_all(str(comfyui_path), needs_comfy) == []

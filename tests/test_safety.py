"""Safety of the pack's own code: no code execution from data, and file inputs confined to their folders.

1. Every ``.py`` file the pack ships (all but ``tests/`` and hidden folders such as ``.git`` or a local venv)
   is parsed with ``ast`` and must not call ``eval``/``exec``, unpickle (``pickle.load(s)``, ``np.load``
   with ``allow_pickle=True``), ``torch.load`` without ``weights_only=True``, ``yaml.load`` without a safe
   loader, ``os.system``/``os.popen`` or anything with ``shell=True``. The checker is tested on bad
   snippets too, so a broken checker cannot pass silently.
2. Every node that takes a file name rejects ``../x``, absolute paths and (for input-folder files) a
   symlink inside the input folder pointing outside it, with a message naming node, input and fix.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cxr_counterfactual.runner.comfyui_path import PACK_ROOT

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's target (``torch.load``, ``eval``); '' for anything fancier."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(value: ast.expr | None) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def problems(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe call or import in ``source``, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            found.append(f"{where}: imports from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        root, _, attr = name.rpartition(".")
        if name in ("eval", "exec", "builtins.eval", "builtins.exec", "__import__"):
            found.append(f"{where}: {name}()")
        elif root.split(".")[0] in UNPICKLERS and attr in ("load", "loads", "Unpickler", "open"):
            found.append(f"{where}: {name}() unpickles")
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{where}: torch.load() without weights_only=True")
        elif root in ("np", "numpy") and attr == "load" and not _is_false_or_absent(_keyword(node, "allow_pickle")):
            found.append(f"{where}: {name}(allow_pickle=...)")
        elif root == "yaml" and attr in ("load", "load_all") and not _safe_loader(_keyword(node, "Loader")):
            found.append(f"{where}: {name}() without a SafeLoader")
        elif root == "yaml" and attr in ("unsafe_load", "full_load", "unsafe_load_all", "full_load_all"):
            found.append(f"{where}: {name}()")
        elif name in ("os.system", "os.popen", "os.execl", "os.execv", "os.spawnl", "commands.getoutput"):
            found.append(f"{where}: {name}()")
        shell = _keyword(node, "shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append(f"{where}: {name or 'a call'}(shell=...)")
    return found


def _is_false_or_absent(value: ast.expr | None) -> bool:
    return value is None or (isinstance(value, ast.Constant) and value.value is False)


def _safe_loader(value: ast.expr | None) -> bool:
    return value is not None and _name(value).rpartition(".")[2] in ("SafeLoader", "CSafeLoader")


def shipped_python() -> list[Path]:
    files = []
    for path in sorted(PACK_ROOT.rglob("*.py")):
        parts = path.relative_to(PACK_ROOT).parts
        # tests are not shipped code; hidden folders are tool state (.git, a local venv, caches)
        if parts[0] == "tests" or any(p.startswith(".") for p in parts):
            continue
        files.append(path)
    return files


def test_the_checker_finds_every_unsafe_pattern():
    bad = {
        "eval('1')": "eval()", "exec(code)": "exec()", "import pickle\npickle.loads(b)": "unpickles",
        "pickle.load(f)": "unpickles", "from pickle import loads": "imports from pickle",
        "torch.load(p)": "weights_only", "torch.load(p, weights_only=False)": "weights_only",
        "np.load(p, allow_pickle=True)": "allow_pickle", "yaml.load(s)": "SafeLoader",
        "yaml.load(s, Loader=yaml.Loader)": "SafeLoader", "yaml.unsafe_load(s)": "unsafe_load",
        "subprocess.run(cmd, shell=True)": "shell=", "subprocess.Popen(cmd, shell=flag)": "shell=",
        "os.system('ls')": "os.system", "os.popen('ls')": "os.popen",
    }
    for snippet, words in bad.items():
        found = problems(snippet)
        assert len(found) == 1 and words in found[0], (snippet, found)
    good = ("torch.load(p, weights_only=True)", "yaml.load(s, Loader=yaml.SafeLoader)", "yaml.safe_load(s)",
            "np.load(p)", "model.eval()", "subprocess.run(['ls'], shell=False)", "json.loads(s)",
            "safetensors.torch.load_file(p)")
    assert [p for s in good for p in problems(s)] == []


def test_shipped_code_runs_no_code_from_data():
    files = shipped_python()
    assert len(files) > 30 and PACK_ROOT / "nodes" / "dicom.py" in files
    found = [p for path in files
             for p in problems(path.read_text(encoding="utf-8"), str(path.relative_to(PACK_ROOT)))]
    assert not found, "unsafe calls in the pack:\n" + "\n".join(found)


# file inputs ----------------------------------------------------------------------------------------------------------
# node id -> (file input, other inputs of validate_inputs, suffix of a real file of that kind)
FILE_NODES = {
    "CXRLoadDICOM": ("dicom_file", {"window": "auto"}, ".dcm"),
    "CXRLoadOrganMasks": ("right_lung", {"left_lung": "(none)", "heart": "(none)"}, ".png"),
    "CXRLoadOrganLabelMap": ("label_map", {}, ".png"),
    "CXRLoadCheXmask": ("csv_file", {"image_id": "x", "id_column": "auto", "border_crop": "auto"}, ".csv"),
}


@pytest.fixture
def outside_file(comfy, tmp_path):
    """A real file next to (not inside) ComfyUI's input folder, and a cleanup of links made to it."""
    import folder_paths

    made: list[Path] = []
    input_dir = Path(folder_paths.get_input_directory())
    secret = input_dir.parent / "outside-secret.txt"
    secret.write_text("not for nodes")

    def make(suffix: str, link: bool = False) -> tuple[Path, Path]:
        target = secret.with_suffix(suffix)
        target.write_bytes(secret.read_bytes())
        made.append(target)
        if link:
            made.append(input_dir / f"escape{suffix}")
            made[-1].unlink(missing_ok=True)
            made[-1].symlink_to(target)
        return target, input_dir

    yield make
    for path in [*made, secret]:
        path.unlink(missing_ok=True)


def assert_rejected(message: object, title: str, input_name: str) -> None:
    assert isinstance(message, str), f"accepted: {message!r}"
    assert f"[{title}] input '{input_name}':" in message and "Fix:" in message, message


@pytest.mark.parametrize("node_id", sorted(FILE_NODES))
def test_file_inputs_stay_in_the_input_folder(comfy, outside_file, node_id):
    from cxr_counterfactual.errors import CXRInputError
    from cxr_counterfactual.nodes.common import resolve_input_file

    cls = comfy.node(node_id)
    input_name, others, suffix = FILE_NODES[node_id]
    target, input_dir = outside_file(suffix, link=True)
    for name in (f"../{target.name}", str(target), f"escape{suffix}", f"sub/../../{target.name}"):
        message = cls.validate_inputs(**{input_name: name}, **others)
        assert_rejected(message, cls.TITLE, input_name)
        assert "outside ComfyUI's input folder" in message, message
        with pytest.raises(CXRInputError, match="outside ComfyUI's input folder"):
            resolve_input_file(name)
    # A symlink that stays inside the folder is fine (users organise inputs with links).
    inside = input_dir / f"inside{suffix}"
    inside.write_bytes(b"")
    (input_dir / f"alias{suffix}").symlink_to(inside)
    try:
        assert resolve_input_file(f"alias{suffix}") == inside.resolve()
    finally:
        (input_dir / f"alias{suffix}").unlink()
        inside.unlink()


def test_segmentation_weights_stay_in_the_model_folders(comfy, tmp_path):
    """ComfyUI's ``get_full_path`` makes the name relative before joining it to each model folder, so
    ``../x`` and absolute names land inside the folders (and are then missing). A symlink a user puts *in*
    a model folder is followed on purpose: that is how ComfyUI users share model files."""
    cls = comfy.node("CXRSegmentOrgans")
    weights = tmp_path / "real.safetensors"
    weights.write_bytes(b"not weights")
    for name in (str(weights), f"../../../../../../../../{weights.relative_to('/')}", "../real.safetensors"):
        assert_rejected(cls.validate_inputs(weights=name), cls.TITLE, "weights")

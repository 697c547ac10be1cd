"""Network weights from a file the user placed, read without running code; the optional torchxrayvision.

The segmentation (:mod:`.segmentation`) and the classifier (:mod:`.classifier`) both build a torchxrayvision
network and fill it from a local file; nothing here downloads anything. A ``.safetensors`` file is plain
tensors. A ``.pt``/``.pth`` file is a pickle: it is read with ``torch.load(weights_only=True)``, whose
unpickler builds only tensors, containers and the classes a caller allows (:func:`read_tensors`'s
``allowed``); anything else in the pickle is refused with a one-line command that converts the file to
safetensors, for the user to run where they trust the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import CXRInputError

INSTALL_HINT = 'pip install "cxr-counterfactual[seg]" (or pip install torchxrayvision) and restart ComfyUI'
STATE_WRAPPERS = ("model_state", "state_dict")  # ChestX-Det's and common training scripts' checkpoint dicts

# File hashes by (path, size, modification time), newest last; the export's audit trail hashes every row's input
# radiograph too, so a server running a long batch keeps only the last few thousand.
_SHA256: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_SHA256_KEEP = 4096


def torchxrayvision_available() -> bool:
    """Whether torchxrayvision can be imported (checked without importing it: that takes seconds)."""
    return importlib.util.find_spec("torchxrayvision") is not None


def require_torchxrayvision(what: str) -> None:
    """Raises:
    CXRInputError: torchxrayvision is not installed (the message names ``what`` needs it and how to install it).
    """
    if not torchxrayvision_available():
        raise CXRInputError(f"{what} needs the optional package torchxrayvision.", fix=INSTALL_HINT)


def conversion_command(path: Path) -> str:
    """One line that turns a pickled model or checkpoint into plain tensors (safetensors), for the user to run in
    an environment where they trust the file: unpickling it there may run code, which this pack never does."""
    src, dst = path.name, f"{path.stem}.safetensors"
    return (
        'python -c "import torch; from safetensors.torch import save_file; '
        f"m = torch.load('{src}', map_location='cpu', weights_only=False); "
        f"save_file({{k: v.contiguous() for k, v in (m.state_dict() if hasattr(m, 'state_dict') else m).items()}}, "
        f"'{dst}')\""
    )


def _module_tensors(module: object, prefix: str, seen: set[int]) -> dict[str, torch.Tensor]:
    """The persistent parameters and buffers of an unpickled ``torch.nn.Module``, read from its ``__dict__``.

    No method of the unpickled object runs (``state_dict()`` would call hooks the pickle may have set); a
    pickle may also be cyclic, hence ``seen``.
    """
    if id(module) in seen:
        return {}
    seen.add(id(module))
    fields = vars(module)
    skip = fields.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (fields.get(group) or {}).items():
            if isinstance(value, torch.Tensor) and name not in skip:
                out[prefix + name] = value.detach()
    for name, child in (fields.get("_modules") or {}).items():
        if isinstance(child, torch.nn.Module):
            out.update(_module_tensors(child, f"{prefix}{name}.", seen))
    return out


def read_tensors(path: Path, *, fix: str, allowed: Sequence[type] = ()) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` pickle read with ``weights_only=True``.

    A pickle may hold a state dict (also inside ``{"model_state": ...}`` or ``{"state_dict": ...}``) or a whole
    module whose classes are all in ``allowed``; DataParallel's ``module.`` prefixes are dropped.

    Args:
        path: the file.
        fix: what to do when the file holds no usable weights (names the file the caller expects).
        allowed: the classes the pickle may hold besides tensors and containers (a whole pickled model).

    Raises:
        CXRInputError: unreadable, not tensors, or a pickle with any other global (with the conversion command).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals(list(allowed)):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(err))
            raise CXRInputError(f"'{path.name}' is not a readable weight file (the unpickler stopped: "
                                f"{detail.group(1) if detail else str(err).splitlines()[0]}).", fix=fix) from None
        raise CXRInputError(
            f"'{path.name}' holds {found.group(1)}, which is not plain weights: it was not loaded, since "
            "unpickling it could run code.",
            fix=f"Convert it where you trust it, with: {conversion_command(path)} - then use the .safetensors file.",
        ) from None
    except Exception as err:  # any other reader failure is the same user problem
        raise CXRInputError(f"'{path.name}' is not a readable weight file ({type(err).__name__}: {err}).",
                            fix=fix) from None
    if isinstance(state, torch.nn.Module):
        state = _module_tensors(state, "", set())
    for wrapper in STATE_WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CXRInputError(f"'{path.name}' holds no state dict of tensors.", fix=fix)
    return OrderedDict((str(k).removeprefix("module."), v) for k, v in state.items())


def load_matching(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, expected: str,
                  fix: str) -> torch.nn.Module:
    """``model`` with ``state`` loaded, in eval mode; every key and shape must match.

    Raises:
        CXRInputError: names the file, what it expected, and the first missing, unexpected or mis-shaped keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:2])})"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", shapes)) if keys]
    if problems:
        raise CXRInputError(f"'{path.name}' is not {expected}: {'; '.join(problems)}.", fix=fix)
    model.load_state_dict(state)
    return model.eval()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per path, size and modification time (a weight file is read once)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
        while len(_SHA256) > _SHA256_KEEP:
            _SHA256.popitem(last=False)
    _SHA256.move_to_end(key)
    return _SHA256[key]

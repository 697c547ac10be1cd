"""Where ComfyUI is: the runner, the demo and the commands start it from here."""

from __future__ import annotations

import os
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
_PACK_DIR_UNRESOLVED = Path(os.path.abspath(__file__)).parent.parent


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def find_comfyui() -> Path | None:
    """ComfyUI's folder: ``COMFYUI_PATH``, else the ComfyUI whose ``custom_nodes/`` holds this pack,
    else comfy-cli's default workspace ``~/comfy/ComfyUI``. None when none of them is a ComfyUI."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser()
        return path if _is_comfyui(path) else None
    for pack_dir in (_PACK_DIR_UNRESOLVED, PACK_ROOT):
        if pack_dir.parent.name == "custom_nodes" and _is_comfyui(pack_dir.parent.parent):
            return pack_dir.parent.parent
    default = Path.home() / "comfy" / "ComfyUI"
    return default if _is_comfyui(default) else None


COMFYUI_HINT = (
    "Install ComfyUI the usual way (comfy-cli puts it in ~/comfy/ComfyUI) or set COMFYUI_PATH to its folder."
)


def require_comfyui() -> Path:
    path = find_comfyui()
    if path is None:
        where = os.environ.get("COMFYUI_PATH") or "~/comfy/ComfyUI"
        raise FileNotFoundError(f"ComfyUI not found at {where}. {COMFYUI_HINT}")
    return path

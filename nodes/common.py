"""Conventions every node of the pack shares: category root, link types, error helpers."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..errors import CXRInputError

CATEGORY_ROOT = "CXR Counterfactual"
CATEGORY_INPUT = f"{CATEGORY_ROOT}/input"
CATEGORY_MASKS = f"{CATEGORY_ROOT}/masks"
CATEGORY_GEOMETRY = f"{CATEGORY_ROOT}/geometry"
CATEGORY_ATTENTION = f"{CATEGORY_ROOT}/attention"

# Link types of the pack. A custom type is a plain type string in ComfyUI.
OrganMasksType = io.Custom("ORGAN_MASKS")
GeometryType = io.Custom("CXR_GEOMETRY")
TokensType = io.Custom("CXR_TOKENS")


@contextmanager
def user_errors(node: str, input_name: str = "", fix: str = "") -> Iterator[None]:
    """Attach the node (and input/fix) to a CXRInputError raised by the core inside the block."""
    try:
        yield
    except CXRInputError as err:
        raise err.located(node, input_name, fix) from None


NONE_CHOICE = "(none)"


def input_image_files() -> list[str]:
    """Image files in ComfyUI's input folder (what LoadImage lists), sorted."""
    root = folder_paths.get_input_directory()
    files = [f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f))]
    return sorted(folder_paths.filter_files_content_types(files, ["image"]))


def resolve_input_file(name: str, fix: str = "Upload it or copy it into ComfyUI/input, then pick it.") -> Path:
    """The on-disk path of ``name`` chosen from ComfyUI's input folder, which it must not leave.

    ComfyUI 0.3.64 checks no V3 combo value against its options (and skips any check for inputs a node
    validates itself), so a name posted through the API could point anywhere (``../../``).

    Raises:
        CXRInputError: no name, a path outside the folder, or no such file.
    """
    if not name:
        raise CXRInputError("no file chosen.", fix=fix)
    bare, base = folder_paths.annotated_filepath(name)
    base_dir = os.path.realpath(base or folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(base_dir, bare))
    if os.path.commonpath((base_dir, path)) != base_dir:
        raise CXRInputError(f"'{name}' points outside ComfyUI's input folder.", fix="Pick a file from the list.")
    if not os.path.isfile(path):
        raise CXRInputError(f"file '{name}' is not in ComfyUI's input folder.", fix=fix)
    return Path(path)


def input_file_problem(node: str, input_name: str, name: str, *, optional: bool = False) -> str | None:
    """Why ``name`` cannot be read from ComfyUI's input folder, as a message for validate_inputs."""
    if optional and name in ("", NONE_CHOICE):
        return None
    try:
        resolve_input_file(name)
    except CXRInputError as err:
        return str(err.located(node, input_name))
    return None


def require_choice(node: str, input_name: str, value: str, options: list[str] | tuple[str, ...]) -> None:
    """ComfyUI 0.3.64 does not check V3 combo values against their options: check one here."""
    if value not in options:
        raise CXRInputError(
            f"'{value}' is not one of {', '.join(options)}.", node=node, input_name=input_name,
            fix="Pick a value from the list (an API prompt may hold any string).",
        )


def check_numbers(cls: type[io.ComfyNode], **values: float | None) -> None:
    """Refuse NaN (and any number outside the input's declared min/max) for the named FLOAT inputs of ``cls``.

    ComfyUI checks a number against its input's min/max before the graph runs, but every comparison with NaN
    is false: a NaN posted in an API prompt (JSON ``NaN``) passes and would spread through masks and the
    sampler, or end in an index error deep inside ComfyUI. Unconnected optional inputs (None) are skipped.

    Raises:
        CXRInputError: naming the node, the input and its range.
    """
    schema = cls.define_schema()
    limits = {i.id: (i.min, i.max) for i in schema.inputs if isinstance(i, io.Float.Input)}
    for name, value in values.items():
        if value is None:
            continue
        lo, hi = limits[name]
        if math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi):
            continue
        span = f"between {lo:g} and {hi:g}" if lo is not None and hi is not None else "that is finite"
        raise CXRInputError(f"{value} is not a number {span}.", node=schema.display_name or "", input_name=name,
                            fix=f"Use a number {span}.")


def file_fingerprint(*names: str) -> str:
    """Modification time and size of the chosen input files: re-run the node when one changes."""
    parts = []
    for name in names:
        if name and name != NONE_CHOICE:
            try:
                st = os.stat(resolve_input_file(name))
                parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}")
            except OSError:
                parts.append(f"{name}:missing")
    return "|".join(parts)

"""Helpers every node of the pack shares: error location, ComfyUI's input and output folders, the input check.

The names the schemas share (categories, link types, choices, tooltips) are in :mod:`.schema`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..attention.stage_builders import check_choice, check_number
from ..errors import CXRInputError
from .schema import NONE_CHOICE


@contextmanager
def user_errors(node: str, input_name: str = "", fix: str = "") -> Iterator[None]:
    """Attach the node (and input/fix) to a CXRInputError raised by the core inside the block."""
    try:
        yield
    except CXRInputError as err:
        raise err.located(node, input_name, fix) from None


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


@dataclass(frozen=True)
class _Declared:
    """What a node's schema declares about one input: a number's range, or a combo's choices."""

    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None

    def check(self, name: str, value: float | str) -> None:
        """The core's checks (one text for every node and both hosts)."""
        if self.choices is not None:
            check_choice(name, str(value), self.choices)
        else:
            check_number(name, float(value), self.low, self.high)


@functools.cache
def _declared(cls: type[io.ComfyNode]) -> tuple[str, dict[str, _Declared]]:
    """The node's display name and its inputs' ranges and choices, read from its schema once per class: a
    schema is rebuilt by every ``define_schema`` call, and some of those list ComfyUI's input folder."""
    schema = cls.define_schema()
    declared = {}
    for i in schema.inputs:
        if isinstance(i, (io.Float.Input, io.Int.Input)):
            declared[i.id] = _Declared(low=i.min, high=i.max)
        elif isinstance(i, io.Combo.Input):
            declared[i.id] = _Declared(choices=tuple(i.options))
    return schema.display_name or "", declared


def check_inputs(cls: type[io.ComfyNode], **values: float | str | None) -> None:
    """Check the named number and choice inputs of ``cls`` against its schema: the one input check of the pack.

    ComfyUI checks a number against its input's min/max before the graph runs, but every comparison with NaN
    is false: a NaN posted in an API prompt (JSON ``NaN``) passes and would spread through masks and the
    sampler, or end in an index error deep inside ComfyUI. And ComfyUI 0.3.64 checks no V3 combo value against
    its options. So a node names its numbers and choices here: NaN, infinity, a number outside the declared
    min/max and a value that is not one of the options are refused, in the order named. Unconnected optional
    inputs (None) are skipped. A combo that lists files is checked where the file is opened
    (:func:`resolve_input_file`): the choices here are read once, the folder changes while ComfyUI runs.

    Raises:
        CXRInputError: naming the node, the input and what it accepts.
    """
    node, declared = _declared(cls)
    for name, value in values.items():
        if value is None:
            continue
        try:
            declared[name].check(name, value)
        except CXRInputError as err:
            raise err.located(node, name) from None


def validation_of(cls: type[io.ComfyNode], **values: float | str | None) -> bool | str:
    """:func:`check_inputs` for ``validate_inputs``, which answers True or the message."""
    try:
        check_inputs(cls, **values)
    except CXRInputError as err:
        return str(err)
    return True


def output_location(title: str, prefix: str, width: int, height: int) -> tuple[str, str, int, str]:
    """ComfyUI's SaveImage placement: (folder, file stem, first free counter, subfolder) in the output folder."""
    try:
        folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, folder_paths.get_output_directory(), width, height)
    except Exception:  # noqa: BLE001 - ComfyUI raises a bare Exception for a prefix leaving the folder
        raise CXRInputError(f"'{prefix}' leads outside ComfyUI's output folder.", node=title,
                            input_name="filename_prefix", fix="Use a relative prefix such as 'cxr/edit'.") from None
    return folder, stem, counter, subfolder


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

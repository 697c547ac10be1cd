"""Weight files of the optional torchxrayvision networks in a ComfyUI models folder (segmentation, classifier).

Each network has its own folder under ``models/`` (extra paths from ``extra_model_paths.yaml`` under the same
name are kept). The pack never creates the folder nor downloads a file: the missing-file message names the file
expected, where to get it, and the folder to put it in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import folder_paths
from comfy_api.latest import io

from ..errors import CXRInputError
from ..imaging import weight_files

WEIGHT_EXTENSIONS = {".pth", ".pt", ".safetensors"}
XRV_CACHE = "~/.torchxrayvision/models_data/"  # where torchxrayvision keeps the files it downloaded


@dataclass(frozen=True)
class ModelFolder:
    """One models folder and the file it should hold.

    Attributes:
        name: the folder's name under ``models/`` (and in ``extra_model_paths.yaml``).
        expected: the published weight file's name.
        url: where that file is published.
    """

    name: str
    expected: str
    url: str

    def register(self) -> ModelFolder:
        """Add ``models/<name>`` to ComfyUI's model folders, listing weight files only; returns itself."""
        folder_paths.add_model_folder_path(self.name, os.path.join(folder_paths.models_dir, self.name),
                                           is_default=True)
        # add_model_folder_path creates a new entry with no extensions (= every file): list weights only.
        folder_paths.folder_names_and_paths[self.name][1].update(WEIGHT_EXTENSIONS)
        return self

    def files(self) -> list[str]:
        return folder_paths.get_filename_list(self.name)

    def default(self, files: list[str]) -> str | None:
        """The published file when present, else the first one (None for an empty folder)."""
        return self.expected if self.expected in files else (files[0] if files else None)

    def missing_message(self, name: str) -> str:
        folders = " or ".join(folder_paths.get_folder_paths(self.name))
        what = f"weight file '{name}' is not" if name else "no weight file is"
        return (
            f"{what} in {folders}. Fix: download torchxrayvision's {self.expected} ({self.url}; torchxrayvision "
            f"keeps a copy in {XRV_CACHE} once it has downloaded it) into {folders}, then refresh ComfyUI. This "
            "pack downloads nothing."
        )

    def problem(self, title: str, name: str) -> bool | str:
        """``validate_inputs``: True, or the message for a missing torchxrayvision or file."""
        if not weight_files.torchxrayvision_available():
            return f"[{title}] the optional package torchxrayvision is not installed. Fix: {weight_files.INSTALL_HINT}."
        if not name or folder_paths.get_full_path(self.name, name) is None:
            return f"[{title}] input 'weights': {self.missing_message(name)}"
        return True

    def fingerprint(self, name: str) -> str:
        """Re-run the node when the chosen file changes (same name, new weights)."""
        path = folder_paths.get_full_path(self.name, name) if name else None
        if path is None:
            return f"{name}:missing"
        st = os.stat(path)
        return f"{name}:{st.st_mtime_ns}:{st.st_size}"

    def path(self, name: str) -> Path:
        """The chosen file's path.

        Raises:
            CXRInputError: no such file in the folder (the message says which file goes where).
        """
        path = folder_paths.get_full_path(self.name, name) if name else None
        if path is None:
            raise CXRInputError(self.missing_message(name))
        return Path(path)


class WeightFileNode(io.ComfyNode):
    """A node with a ``weights`` combo of :attr:`FOLDER`'s files: checked before the graph runs (torchxrayvision
    installed, the file present), and run again when the chosen file changes."""

    TITLE: ClassVar[str]
    FOLDER: ClassVar[ModelFolder]

    @classmethod
    def validate_inputs(cls, weights: str) -> bool | str:
        return cls.FOLDER.problem(cls.TITLE, weights)

    @classmethod
    def fingerprint_inputs(cls, weights: str, **_: object) -> str:
        return cls.FOLDER.fingerprint(weights)

"""A manifest CSV (one edit per row) to jobs: the graph for that row and the files it needs uploaded.

Columns (all optional except ``radiograph``; paths are relative to the manifest's folder):

- ``id``: the row's name in the output folder (default ``row<N>``, N = its 1-based data line: give ids
  when rows may be inserted or removed later, so finished rows keep their names).
- ``radiograph``: PNG/JPEG or DICOM file, given to the workflow's radiograph loader.
- ``mask_right_lung``, ``mask_left_lung``, ``mask_heart``: organ mask images (replace the workflow's mask source).
- ``chexmask_csv`` + ``chexmask_id``: organ masks from a CheXmask CSV row (replace the mask source).
- ``prompt``: the edit prompt; ``pathology``: its pathology words (CXR Text Encode); ``seed``: every seed.
- ``<node title>.<input>``: any other widget value, exactly like ``--set``.

Other columns are carried into the results unchanged (with a warning, in case one is a typo).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import graph as g

logger = logging.getLogger(__name__)

ROLE_COLUMNS = ("id", "radiograph", "mask_right_lung", "mask_left_lung", "mask_heart", "chexmask_csv",
                "chexmask_id", "prompt", "pathology", "seed")
DICOM_SUFFIXES = (".dcm", ".dicom")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Upload:
    """A local file a server needs in its input folder, under a name derived from its content."""

    name: str
    path: Path


@dataclass
class RowJob:
    """One row, ready to run.

    Attributes:
        key: The row's folder name: its id and a fingerprint of everything that decides its result, so an
            edited row (or workflow) gets a new folder instead of mixing with the old result.
        index: 1-based data line in the manifest.
        row: The manifest's values, as read.
        graph: The API graph with the row's values.
        uploads: Files to put in the server's input folder first.
    """

    key: str
    index: int
    row: dict[str, str]
    graph: g.Graph
    uploads: list[Upload] = field(default_factory=list)


class ManifestError(ValueError):
    """A row cannot become a job (missing file, bad value); the message names the row and column."""


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The manifest's rows; checks the ids are unique."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "radiograph" not in reader.fieldnames:
            raise ManifestError(f"{path}: the manifest needs a 'radiograph' column (has {reader.fieldnames})")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    extra = [c for c in rows[0] if c not in ROLE_COLUMNS and "." not in c] if rows else []
    if extra:
        logger.warning("manifest columns %s are not inputs; they are carried into the results as they are "
                       "(inputs: %s, or 'Node title.input')", extra, ", ".join(ROLE_COLUMNS))
    ids = [r["id"] for r in rows if r.get("id")]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ManifestError(f"{path}: ids {dupes} appear more than once; each row needs its own id")
    return rows


class UploadNamer:
    """Content-derived upload names, hashed once per file per run (a CheXmask CSV can be gigabytes)."""

    def __init__(self) -> None:
        self._names: dict[tuple[Path, int, int], str] = {}

    def __call__(self, path: Path) -> Upload:
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._names:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            # Same bytes → same name: re-uploads are harmless and servers never mix two files of one name.
            self._names[key] = f"cxr-{digest.hexdigest()[:12]}-{_SAFE.sub('_', path.name)}"
        return Upload(self._names[key], path)


def _file(root: Path, row: Mapping[str, str], column: str, index: int) -> Path:
    path = (root / row[column]).expanduser()
    if not path.is_file():
        raise ManifestError(f"row {index} ({row.get('id') or 'no id'}): {column} file {path} does not exist")
    return path


def build_job(base: g.Graph, row: dict[str, str], index: int, root: Path, namer: Callable[[Path], Upload],
              object_info: Mapping[str, Any] | None = None) -> RowJob:
    """The job of one manifest row on top of ``base`` (the workflow with the global overrides)."""
    graph: g.Graph = json.loads(json.dumps(base))
    uploads: list[Upload] = []
    where = f"row {index} ({row.get('id') or 'no id'})"
    try:
        if row.get("radiograph"):
            radiograph = namer(_file(root, row, "radiograph", index))
            uploads.append(radiograph)
            g.set_radiograph(graph, radiograph.name, radiograph.path.suffix.lower() in DICOM_SUFFIXES)
        elif "radiograph" in row:
            raise ManifestError(f"{where}: the radiograph column is empty")
        masks = {organ: namer(_file(root, row, f"mask_{organ}", index))
                 for organ in g.MASK_FILE_INPUTS if row.get(f"mask_{organ}")}
        if masks and row.get("chexmask_csv"):
            raise ManifestError(f"{where}: give mask files or a CheXmask row, not both")
        if masks:
            uploads.extend(masks.values())
            g.set_mask_files(graph, {organ: up.name for organ, up in masks.items()})
        elif row.get("chexmask_csv"):
            if not row.get("chexmask_id"):
                raise ManifestError(f"{where}: chexmask_csv needs a chexmask_id (the radiograph's id in it)")
            csv_upload = namer(_file(root, row, "chexmask_csv", index))
            uploads.append(csv_upload)
            g.set_chexmask(graph, csv_upload.name, row["chexmask_id"])
        if row.get("prompt"):
            g.set_input(graph, g.prompt_node(graph), "text", row["prompt"], object_info)
        if row.get("pathology"):
            g.set_input(graph, g._one(graph, ["CXRTextEncode"], "pathology"), "pathology", row["pathology"])
        if row.get("seed"):
            g.set_seed(graph, int(row["seed"]))
        for column, value in row.items():
            if "." in column and column not in ROLE_COLUMNS and value != "":
                node_title, name = column.rsplit(".", 1)
                g.set_input(graph, g.find_node(graph, node_title), name, value, object_info)
    except (g.GraphError, ValueError) as err:
        if isinstance(err, ManifestError):
            raise
        raise ManifestError(f"{where}: {err}") from err
    return RowJob(key=row_key(row, index, base), index=index, row=row, graph=graph, uploads=uploads)


def row_key(row: Mapping[str, str], index: int, base: g.Graph) -> str:
    """``<id>-<fingerprint>``: the fingerprint covers the row's inputs and the workflow with its overrides.

    Cheap on purpose (paths, not file contents): a restart of a large batch must not re-read every finished
    row's files. Columns that are not inputs (labels carried into the results) do not count.
    """
    name = _SAFE.sub("_", row.get("id") or f"row{index:05d}")[:80]
    inputs = sorted((k, v) for k, v in row.items() if k != "id" and (k in ROLE_COLUMNS or "." in k) and v)
    blob = json.dumps([inputs, base], sort_keys=True).encode("utf-8")
    return f"{name}-{hashlib.sha256(blob).hexdigest()[:10]}"


def prepare(base: g.Graph, rows: Sequence[dict[str, str]], root: Path,
            object_info: Mapping[str, Any] | None = None,
            skip: Callable[[str], bool] = lambda key: False) -> tuple[list[RowJob], dict[int, str]]:
    """Jobs for every row that can run, and ``{index: reason}`` for rows that cannot (missing file...).

    Rows whose key ``skip`` accepts (finished before) are left out before their files are read.
    """
    namer = UploadNamer()
    jobs, problems = [], {}
    for index, row in enumerate(rows, start=1):
        if skip(row_key(row, index, base)):
            continue
        try:
            jobs.append(build_job(base, row, index, root, namer, object_info))
        except ManifestError as err:
            problems[index] = str(err)
    return jobs, problems

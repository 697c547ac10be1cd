"""Streaming index of a CheXmask CSV: id → byte offset, built once, then one seek per lookup.

The published CSVs are gigabytes. The file is read once, in binary, a line at a time, tracking open quotes
(numpy-style landmark prints span several lines inside one quoted field); a lookup seeks to the offset and
parses that single record with the ``csv`` module. Indexes are cached in memory by (path, mtime, size,
id column); nothing is written to disk.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import CXRInputError
from .chexmask import (
    _DATASET_OF,
    DICE_MAX,
    DICE_MEAN,
    ID_COLUMNS,
    INDEX_CACHE_SIZE,
    MAX_RECORD_BYTES,
    ORGAN_COLUMNS,
    CheXmaskRow,
)

log = logging.getLogger(__name__)


def _records(handle: BinaryIO, offset: int) -> Iterator[tuple[int, list[bytes]]]:
    """``(byte offset, lines)`` of each record from ``offset`` on; a quoted field may hold line breaks.

    A doubled quote inside a quoted field keeps the count even, so the parity of ``"`` per line tells
    whether a record goes on.
    """
    parts: list[bytes] = []
    start, open_quote = offset, False
    while line := handle.readline(MAX_RECORD_BYTES):
        start = offset if not parts else start
        offset += len(line)
        parts.append(line)
        if offset - start >= MAX_RECORD_BYTES:
            raise CXRInputError(
                f"the record at byte {start} of the CSV is over {MAX_RECORD_BYTES >> 20} MB (an unclosed quote, "
                "or not a text CSV).", input_name="csv_file", fix="Use an unmodified CheXmask CSV.",
            )
        if line.count(b'"') % 2:
            open_quote = not open_quote
        if not open_quote:
            yield start, parts
            parts = []
    if parts:
        yield start, parts


def _parse(raw: bytes) -> list[str]:
    text = raw.decode("utf-8", errors="replace")
    # csv's field limit (128 KiB by default) is process-wide: raise it for this record only.
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, len(text) + 1))
    try:
        return next(csv.reader(io.StringIO(text, newline="")), [])
    finally:
        csv.field_size_limit(old)


def _record_id(parts: list[bytes], column: int) -> str:
    first = parts[0]
    if column == 0 and not first.startswith(b'"'):
        # Fast path for the usual layout (id first, unquoted): no CSV parse of a 20 KB record.
        end = first.find(b",")
        return (first if end < 0 else first[:end]).decode("utf-8", errors="replace").strip()
    fields = _parse(b"".join(parts))
    return fields[column].strip() if column < len(fields) else ""


class CheXmaskIndex:
    """Byte offsets of a CheXmask CSV's records by image id, built in one streaming pass.

    Memory is one record at a time plus the id → offset table (~150 bytes an id: 36 MiB for MIMIC).
    """

    offsets: dict[str, int]

    def __init__(self, path: Path, id_column: str = "auto"):
        """Stream ``path`` and index it by ``id_column`` (``auto``: the first known id column present).

        Raises:
            CXRInputError: no header, no id column, neither masks nor landmarks, or an endless record.
        """
        self.path, self.offsets, self.duplicates = Path(path), {}, 0
        with open(self.path, "rb", buffering=1 << 20) as handle:
            records = _records(handle, 0)
            first = next(records, None)
            self.header = _parse(b"".join(first[1]).removeprefix(b"\xef\xbb\xbf")) if first else []
            self.id_column = _id_column(self.header, id_column, self.path.name)
            column = self.header.index(self.id_column)
            for offset, parts in records:
                key = _record_id(parts, column)
                if not key and not b"".join(parts).strip():
                    continue  # blank line
                if key in self.offsets:
                    self.duplicates += 1
                else:
                    self.offsets[key] = offset
        if self.duplicates:
            log.warning("%s: %d duplicate ids; the first row of each is used", self.path.name, self.duplicates)

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def dataset(self) -> str:
        """The source dataset, guessed from the id column (PadChest's file lists Dice Max before Mean)."""
        if self.id_column == "ImageID":
            order = [c for c in self.header if c in (DICE_MEAN, DICE_MAX)]
            return "PadChest" if order == [DICE_MAX, DICE_MEAN] else "CANDID-PTX"
        return _DATASET_OF.get(self.id_column, "unknown dataset")

    def row(self, image_id: str) -> CheXmaskRow:
        """The row of ``image_id`` (surrounding spaces ignored), read by seeking to its offset.

        Raises:
            CXRInputError: the id is not in the CSV, or its record does not have the header's columns.
        """
        key = image_id.strip()
        offset = self.offsets.get(key)
        if offset is None:
            example = next(iter(self.offsets), "none: the CSV has no rows")
            raise CXRInputError(
                f"image id '{key}' is not in column '{self.id_column}' of '{self.path.name}' "
                f"({len(self)} rows; an id there looks like '{example}').",
                input_name="image_id",
                fix="Copy the id exactly as the CSV writes it (same dataset's CSV, same folder prefix and "
                "extension), or pick the id column that holds it.",
            )
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            _, parts = next(_records(handle, offset))
        values = _parse(b"".join(parts))
        if len(values) != len(self.header):
            raise CXRInputError(
                f"the row of '{key}' has {len(values)} fields but the header has {len(self.header)}.",
                input_name="csv_file", fix="The CSV is damaged or cut short: download it again.",
            )
        return CheXmaskRow(key, self.id_column, dict(zip(self.header, values, strict=True)))


def _shown_columns(header: list[str]) -> str:
    """The header's first columns for a message: short, and never the raw bytes of a binary file."""
    if not all(ch.isprintable() for ch in "".join(header)):
        return "not readable text (a binary or damaged file?)"
    return ", ".join(f"'{c[:40]}…'" if len(c) > 40 else f"'{c}'" for c in header[:12]) or "none"


def _id_column(header: list[str], wanted: str, name: str) -> str:
    columns = _shown_columns(header)
    found = next((c for c in ID_COLUMNS if c in header), None) if wanted == "auto" else wanted
    if found not in header:
        which = f"column '{wanted}'" if wanted != "auto" else "image id column (" + ", ".join(ID_COLUMNS) + ")"
        raise CXRInputError(
            f"'{name}' has no {which}; its columns are {columns}.",
            input_name="csv_file" if wanted == "auto" else "id_column",
            fix="Pick a CheXmask CSV (one per dataset), or the id column it really has.",
        )
    for organ, mask_column in ORGAN_COLUMNS.items():
        if mask_column not in header and "Landmarks" not in header:
            raise CXRInputError(
                f"'{name}' has neither a '{mask_column}' column nor 'Landmarks', so the {organ} cannot be read; "
                f"its columns are {columns}.",
                input_name="csv_file", fix="Use an unmodified CheXmask CSV.",
            )
    return str(found)


_CACHE: OrderedDict[tuple[str, int, int, str], CheXmaskIndex] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def open_index(path: Path, id_column: str = "auto") -> CheXmaskIndex:
    """The index of ``path``, built once per (file, mtime, size, id column) and kept in memory (LRU of 4)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, id_column)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = CheXmaskIndex(Path(path), id_column)
            log.info("indexed %s: %d rows by '%s'", Path(path).name, len(_CACHE[key]), _CACHE[key].id_column)
            while len(_CACHE) > INDEX_CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return _CACHE[key]

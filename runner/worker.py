"""Run one job on one server and bring back what its output nodes wrote (shared by every backend).

The outcome holds the files' bytes, not paths: the server may be on another machine (``--server``) or in
another process (a Ray actor), and only the driver writes into the output folder, so resume semantics
are the same everywhere.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import graph as g
from .batching import BatchJob, sampler_seeds
from .client import ComfyClient
from .manifest import RowJob, Upload
from .protocol import ProgressEvent

logger = logging.getLogger(__name__)

# A line of a node's UI text that names a file it wrote (CXR Save Metrics, CXR Export list theirs so).
_FILE_LINE = re.compile(r"^[\w.\-/]+\.(json|csv|dcm|png|jpe?g|tiff?|npz|latent|txt)$", re.I)
_SLUG = re.compile(r"[^a-z0-9]+")
# ComfyUI's numbered names (``edit_00001_seg.dcm``): what follows the counter tells files of one export apart.
_NUMBERED = re.compile(r"_\d{5,}_([\w\-]*)(\.[\w]+)$")
EXPORT_NODE = "CXRExportCounterfactual"  # its sidecar JSON holds the row's provenance hash


@dataclass
class RowOutcome:
    """What a finished row produced.

    Attributes:
        files: ``{name in the row folder: bytes}``, named after the output node's title.
        outputs: The run's UI outputs (``GET /history``), with ``saved_as`` added to each file item.
        metrics: The first image pair's metrics when the workflow evaluates the edit ({} otherwise).
        server: The server that ran it.
        prompt_id: The id it ran under there.
        elapsed_s: Wall time of the run, uploads and downloads included.
        batch: How the row ran: ``size`` rows in one graph, this row image (and noise index) ``index`` of it,
            the samplers' ``seeds``, and the batch graph; size 1, index 0 for a row run alone.
        provenance: The ``provenance_sha256`` of each provenance sidecar the row's export nodes wrote (in order).
    """

    files: dict[str, bytes]
    outputs: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    server: str = ""
    prompt_id: str = ""
    elapsed_s: float = 0.0
    batch: dict[str, Any] = field(default_factory=dict)
    provenance: list[str] = field(default_factory=list)


def slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-") or "output"


class Worker:
    """One server, and the inputs already uploaded to it (each file goes over once per server)."""

    def __init__(self, client: ComfyClient, read: Callable[[Upload], bytes] | None = None):
        self.client = client
        self.read = read or (lambda upload: upload.path.read_bytes())
        self._uploaded: set[str] = set()

    def run(self, job: RowJob, timeout: float = 3600.0,
            on_progress: Callable[[ProgressEvent], None] | None = None) -> RowOutcome:
        """Upload the job's inputs, run its graph, and collect its output files.

        Raises:
            ComfyServerError (and subclasses): see :meth:`ComfyClient.run`.
        """
        started = time.monotonic()
        self._upload(job.uploads)
        result = self.client.run(job.graph, timeout=timeout, on_progress=on_progress)
        files, outputs, metrics, trail = collect(self.client, job.graph, result.outputs)
        return RowOutcome(files=files, outputs=outputs, metrics=metrics, server=self.client.url,
                          prompt_id=result.prompt_id, elapsed_s=time.monotonic() - started,
                          batch={"size": 1, "index": 0, "seeds": sampler_seeds(job.graph)}, provenance=trail)

    def run_batch(self, batch: BatchJob, timeout: float = 3600.0) -> list[RowOutcome]:
        """Run a batch graph and give every row the outputs of its own output nodes (batch order).

        Raises:
            ComfyServerError (and subclasses): see :meth:`ComfyClient.run`; the batch then failed as a whole.
        """
        started = time.monotonic()
        self._upload(batch.uploads)
        result = self.client.run(batch.graph, timeout=timeout * len(batch.rows))
        elapsed = time.monotonic() - started
        outcomes = []
        for index, (job, nodes) in enumerate(zip(batch.rows, batch.row_nodes, strict=True)):
            # The row's own output nodes, under their ids in the row's graph: files are named as in a run alone.
            own = {nodes[node_id]: ui for node_id, ui in result.outputs.items() if node_id in nodes}
            files, outputs, metrics, trail = collect(self.client, job.graph, own)
            info = {"size": len(batch.rows), "index": index, "seeds": sampler_seeds(batch.graph),
                    "rows": [r.key for r in batch.rows], "graph": batch.graph}
            outcomes.append(RowOutcome(files=files, outputs=outputs, metrics=metrics, server=self.client.url,
                                       prompt_id=result.prompt_id, elapsed_s=elapsed / len(batch.rows),
                                       batch=info, provenance=trail))
        return outcomes

    def _upload(self, uploads: list[Upload]) -> None:
        for upload in uploads:
            if upload.name not in self._uploaded:
                self.client.upload_bytes(upload.name, self.read(upload))
                self._uploaded.add(upload.name)


def _free_name(files: Mapping[str, bytes], stem: str, suffix: str) -> str:
    name, i = f"{stem}{suffix}", 1
    while name in files:
        name, i = f"{stem}_{i}{suffix}", i + 1
    return name


def suffix_of(name: str) -> str:
    """What a fetched file keeps of its server name: the extension, and what follows ComfyUI's counter
    (``edit_00001_seg.dcm`` → ``-seg.dcm``), so an export's image and its Segmentation stay told apart."""
    numbered = _NUMBERED.search(name)
    if numbered is None:
        return Path(name).suffix
    return (f"-{numbered.group(1)}" if numbered.group(1) else "") + numbered.group(2)


def collect(client: ComfyClient, graph: Mapping[str, Any],
            outputs: Mapping[str, Any]) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any], list[str]]:
    """Fetch every file the output nodes list (images, latents, previews, files named in their text); the
    provenance hashes of the export nodes' sidecars.

    Files are renamed after their node's title (``save-counterfactual.png``): a dataset's rows then hold the
    same names, while the server's own names carry per-server counters.
    """
    files: dict[str, bytes] = {}
    metrics: dict[str, Any] = {}
    trail: list[str] = []
    annotated: dict[str, Any] = json.loads(json.dumps(outputs))  # the caller's copy stays as the server sent it
    for node_id, ui in annotated.items():
        stem = slug(g.title(graph, node_id)) if node_id in graph else f"node-{node_id}"
        for items in ui.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    data = client.fetch(item["filename"], item.get("subfolder", ""), item.get("type", "output"))
                    item["saved_as"] = _free_name(files, stem, Path(item["filename"]).suffix)
                    files[item["saved_as"]] = data
                elif isinstance(item, str):
                    for line in (ln.strip() for ln in item.splitlines()):
                        if not _FILE_LINE.match(line):
                            continue
                        folder, _, name = line.rpartition("/")
                        try:
                            data = client.fetch(name, folder, "output")
                        except urllib.error.HTTPError:
                            continue  # text that only looks like a file name
                        saved = _free_name(files, stem, suffix_of(name))
                        files[saved] = data
                        kind = graph.get(node_id, {}).get("class_type")
                        if saved.endswith(".json") and kind == "CXRSaveMetrics":
                            metrics = _first_metrics(data)
                        elif saved.endswith(".json") and kind == EXPORT_NODE and (digest := _provenance(data)):
                            trail.append(digest)
    return files, annotated, metrics, trail


def _provenance(data: bytes) -> str | None:
    """The ``provenance_sha256`` of an export's sidecar JSON (None for anything else)."""
    try:
        digest = json.loads(data).get("provenance_sha256")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None
    return digest if isinstance(digest, str) else None


def _first_metrics(data: bytes) -> dict[str, Any]:
    """The first image pair's metrics from a CXR Save Metrics JSON (one pair per row in a batch)."""
    try:
        rows = json.loads(data).get("images") or []
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {k: v for k, v in rows[0].items() if isinstance(v, (int, float, str))} if rows else {}

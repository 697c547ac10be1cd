"""``--batch-size``: manifest rows that differ only in their per-row inputs run N at a time in one graph.

A row's graph differs from its neighbours' in its *per-row nodes* only: the radiograph loader and the organ
mask source the manifest fills (radiograph, mask files, CheXmask row). Rows whose graphs are equal apart from
those nodes (same workflow, prompt, seed, settings) and whose radiographs have the same pixel size form a
group; a group is cut into batches of at most N rows. A batch's graph is the row graph rewritten:

- every per-row node is repeated once per row (copy ``i`` reads row ``i``'s files; a per-row node that reads
  another, e.g. CheXmask reading the radiograph, reads the same row's copy);
- where the rest of the graph reads a per-row output, a *join* node stacks the copies in row order (IMAGE:
  ComfyUI's Batch Images; ORGAN_MASKS: the pack's batch node, see :data:`JOINS`), so the model-side nodes run
  once on the whole batch;
- every output node is repeated once per row and reads image ``i`` of each batch it is given through a
  *split* node (ComfyUI's Image/Latent From Batch), or row ``i``'s own per-row node directly; so each row's
  files, metrics and previews come from its own output nodes, named as in the row's own graph.

Image ``i`` of the batch gets noise index ``i`` of the batch's seed (ComfyUI draws a batch's noise from one
seed): see docs/runner.md, "Batches", for how one row is reproduced alone.

A graph that cannot be rewritten so (a per-row output of a type no join handles, an output node feeding the
model side, a node known to take one image on the model side, a join node the server lacks) raises
:class:`CannotBatch` naming the node; the caller then runs that group's rows one at a time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import graph as g
from .manifest import DICOM_SUFFIXES, RowJob, Upload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Join:
    """A node type that stacks two per-row outputs of one type into a batch (its two inputs ``inputs``); a chain of
    N−1 such nodes joins N rows, whatever N (each node appends to the batch the previous one made)."""

    class_type: str
    inputs: tuple[str, str]


# The joins by ComfyUI type. ORGAN_MASKS: the pack's 'CXR Batch Organ Masks' (nodes/masks.py), which appends the sets
# of its second input (a set or a batch) to its first's.
JOINS: dict[str, Join] = {
    "IMAGE": Join("ImageBatch", ("image1", "image2")),
    "LATENT": Join("LatentBatch", ("samples1", "samples2")),
    "ORGAN_MASKS": Join("CXRBatchOrganMasks", ("organ_masks_1", "organ_masks_2")),
}

# Splits by ComfyUI type: a chain of (class_type, input the previous link goes to, other inputs), the first node
# reading the batch; ``{i}`` in a value is the row's index. MASK has no core split: it goes through an image
# (MaskToImage copies the mask into every channel, ImageToMask reads one back: exact).
SPLITS: dict[str, tuple[tuple[str, str, dict[str, Any]], ...]] = {
    "IMAGE": (("ImageFromBatch", "image", {"batch_index": "{i}", "length": 1}),),
    "LATENT": (("LatentFromBatch", "samples", {"batch_index": "{i}", "length": 1}),),
    "MASK": (("MaskToImage", "mask", {}), ("ImageFromBatch", "image", {"batch_index": "{i}", "length": 1}),
             ("ImageToMask", "image", {"channel": "red"})),
}

# Node types that read one image only (they refuse a batch, or use its first image): on the model side of a
# batch graph they would be wrong, so such a graph runs one row at a time. Today these are the mask sources that
# are not the manifest's own (the manifest's one is repeated per row, so it never sees a batch).
SINGLE_IMAGE_NODES = g.MASK_SOURCES


class CannotBatch(ValueError):
    """The graph cannot run several rows as one batch; the message names the node and why."""


@dataclass
class BatchJob:
    """Several rows run as one graph.

    Attributes:
        rows: The rows, in batch order (row ``i`` is image ``i`` of every batch, noise index ``i``).
        graph: The batch graph.
        row_nodes: For each row, ``{node id in graph: node id in the row's own graph}`` of its output nodes.
    """

    rows: list[RowJob]
    graph: g.Graph
    row_nodes: list[dict[str, str]] = field(default_factory=list)

    @property
    def uploads(self) -> list[Upload]:
        seen: dict[str, Upload] = {}
        for job in self.rows:
            for up in job.uploads:
                seen.setdefault(up.name, up)
        return list(seen.values())

    @property
    def key(self) -> str:
        return "+".join(job.key for job in self.rows)


def per_row_nodes(graph: Mapping[str, Any]) -> list[str]:
    """The nodes the manifest fills per row: the radiograph loader and, when there is one, the mask source."""
    found = g.nodes_of(graph, g.RADIOGRAPH_LOADERS)
    if len(found) != 1:
        raise CannotBatch(f"the workflow has {len(found)} radiograph loaders "
                          f"({' or '.join(g.RADIOGRAPH_LOADERS)}); batches need exactly one")
    sources = g.nodes_of(graph, g.MASK_SOURCES)
    return found + (sources if len(sources) == 1 else [])


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of a radiograph from its header, None when it cannot be read here.

    Batch Images scales a second image of another size to the first one's: rows are only batched with rows of
    the same pixel size, so nothing is ever rescaled.
    """
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width
    except Exception as err:  # noqa: BLE001 - any unreadable header means "run this row alone"
        logger.debug("size of %s unknown (%s): it runs alone", path, err)
        return None


def group_key(job: RowJob, size: tuple[int, int] | None) -> str | None:
    """Rows with equal keys may share a batch: the graph without its per-row nodes, and the radiograph size."""
    if size is None:
        return None
    try:
        own = set(per_row_nodes(job.graph))
    except CannotBatch:
        return None
    rest = {n: v for n, v in job.graph.items() if n not in own}
    return json.dumps([sorted(own), rest, size], sort_keys=True)


def _radiograph(job: RowJob) -> Path | None:
    loader = job.graph[per_row_nodes(job.graph)[0]]
    name = loader["inputs"].get(g.RADIOGRAPH_LOADERS[loader["class_type"]])
    return next((up.path for up in job.uploads if up.name == name), None)


def plan(jobs: Sequence[RowJob], size: int, object_info: Mapping[str, Any],
         size_of: Callable[[Path], tuple[int, int] | None] = image_size) -> list[RowJob | BatchJob]:
    """The run units: batches of up to ``size`` rows that may share a graph, and rows that run alone.

    Rows keep their manifest order within a batch; a group whose graph cannot batch runs its rows alone, with
    one log line saying which node stops it.
    """
    if size <= 1:
        return list(jobs)
    groups: dict[str | None, list[RowJob]] = {}
    units: list[RowJob | BatchJob] = []
    for job in jobs:
        try:
            path = _radiograph(job)
        except CannotBatch:
            path = None
        key = group_key(job, size_of(path) if path is not None else None)
        if key is None:
            units.append(job)
        else:
            groups.setdefault(key, []).append(job)
    told: set[str] = set()
    for members in groups.values():
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            if len(chunk) == 1:
                units.append(chunk[0])
                continue
            try:
                units.append(batch_graph(chunk, object_info))
            except CannotBatch as err:
                if str(err) not in told:
                    told.add(str(err))
                    logger.warning("batch size 1 for these rows: %s", err)
                units.extend(chunk)
    return units


def _output_type(object_info: Mapping[str, Any], class_type: str, index: int) -> str:
    outputs = object_info.get(class_type, {}).get("output") or []
    return str(outputs[index]) if index < len(outputs) else "?"


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _downstream(graph: Mapping[str, Any], sources: set[str]) -> set[str]:
    """Every node that reads (directly or not) an output of ``sources``, ``sources`` excluded."""
    reached = set(sources)
    changed = True
    while changed:
        changed = False
        for node_id, node in graph.items():
            if node_id not in reached and any(_is_link(v) and v[0] in reached for v in node["inputs"].values()):
                reached.add(node_id)
                changed = True
    return reached - sources


def batch_graph(rows: Sequence[RowJob], object_info: Mapping[str, Any]) -> BatchJob:
    """One graph running ``rows`` as a batch (see the module docstring).

    Raises:
        CannotBatch: the graph has a node the rewrite cannot handle; the message names it.
    """
    base = rows[0].graph
    n = len(rows)
    own = per_row_nodes(base)
    batch_side = _downstream(base, set(own))
    outputs = {nid for nid, node in base.items() if nid not in own
               and object_info.get(node["class_type"], {}).get("output_node")}
    out: g.Graph = {}

    def name(node_id: str) -> str:
        return f"{g.title(base, node_id)!r} ({base[node_id]['class_type']})"

    joined: dict[tuple[str, int], list[Any]] = {}

    def join(src: str, index: int, reader: str) -> list[Any]:
        if (src, index) in joined:
            return joined[(src, index)]
        kind = _output_type(object_info, base[src]["class_type"], index)
        spec = JOINS.get(kind)
        if spec is None:
            raise CannotBatch(f"{name(reader)} reads output {index} ({kind}) of the per-row node {name(src)}, and "
                              f"the runner joins only {', '.join(JOINS)} over rows")
        if spec.class_type not in object_info:
            raise CannotBatch(f"{name(reader)} reads {kind} from {name(src)}; joining {kind} over rows needs the "
                              f"node {spec.class_type}, which the server does not have")
        parts = [[f"{src}_row{i}", index] for i in range(n)]
        link = parts[0]
        for i in range(1, n):
            node_id = f"join_{src}_{index}_{i}"
            out[node_id] = {"class_type": spec.class_type, "_meta": {"title": f"runner: join {kind}"},
                            "inputs": {spec.inputs[0]: link, spec.inputs[1]: parts[i]}}
            link = [node_id, 0]
        joined[(src, index)] = link
        return link

    def split(src: str, index: int, row: int, reader: str) -> list[Any]:
        kind = _output_type(object_info, base[src]["class_type"], index)
        chain = SPLITS.get(kind)
        if chain is None:
            raise CannotBatch(f"the output node {name(reader)} reads {kind} from {name(src)}, which holds the "
                              f"whole batch; the runner splits only {', '.join(SPLITS)} back into rows")
        link: list[Any] = [src, index]
        for step, (class_type, input_name, extra) in enumerate(chain):
            node_id = f"split_{src}_{index}_{row}_{step}"
            if node_id not in out:
                values = {k: (row if v == "{i}" else v) for k, v in extra.items()}
                out[node_id] = {"class_type": class_type, "_meta": {"title": f"runner: row {row} of {kind}"},
                                "inputs": {input_name: link, **values}}
            link = [node_id, 0]
        return link

    for node_id, node in base.items():  # the model side: runs once, on the batch
        if node_id in own or node_id in outputs:
            continue
        if node_id in batch_side and node["class_type"] in SINGLE_IMAGE_NODES:
            raise CannotBatch(f"{name(node_id)} reads one radiograph only and would get the whole batch")
        inputs = {}
        for key, value in node["inputs"].items():
            if _is_link(value) and value[0] in own:
                value = join(value[0], value[1], node_id)
            elif _is_link(value) and value[0] in outputs:
                raise CannotBatch(f"{name(node_id)} reads the output node {name(value[0])}, which runs per row")
            inputs[key] = value
        out[node_id] = {**node, "inputs": inputs}

    row_nodes: list[dict[str, str]] = []
    for i, job in enumerate(rows):
        mine: dict[str, str] = {}
        for node_id in [*own, *sorted(outputs, key=lambda x: list(base).index(x))]:
            node = job.graph[node_id]
            inputs = {}
            for key, value in node["inputs"].items():
                if _is_link(value):
                    src = value[0]
                    if src in own or src in outputs:
                        value = [f"{src}_row{i}", value[1]]
                    elif src in batch_side:
                        if node_id in own:
                            raise CannotBatch(f"the per-row node {name(node_id)} reads {name(src)}, which "
                                              "runs on the whole batch")
                        value = split(src, value[1], i, node_id)
                inputs[key] = value
            out[f"{node_id}_row{i}"] = {**node, "inputs": inputs}
            if node_id in outputs:
                mine[f"{node_id}_row{i}"] = node_id
        row_nodes.append(mine)
    return BatchJob(rows=list(rows), graph=out, row_nodes=row_nodes)


def sampler_seeds(graph: Mapping[str, Any]) -> list[int]:
    """The seeds of the graph's samplers (``seed``, ``noise_seed`` widget values), in node order."""
    return [int(node["inputs"][name]) for node in graph.values() for name in g.SEED_INPUTS
            if name in node.get("inputs", {}) and not _is_link(node["inputs"][name])]

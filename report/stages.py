"""A row's stage configuration, its edit-mask source and its saved edit / source images, read from its API graph.

**The configuration rule** (the one place it is written): a stage counts as ON for a row when its node lies
upstream of the image the row's metrics evaluate (the ``edited`` input of the CXR Evaluate Edit node whose
metrics the row saved) and its inputs do not make it neutral. Neutral values are the nodes' own rule
(``attention/stages.py`` ``neutral``, ``attention/stage_builders.py``, ``attention/refinement.py``):

- gate (CXRAnatomyAttentionGate): ``strength`` 0 and ``token_strength`` 0 (self-leak and token-leak 1);
- boost (CXRPathologyBoost): ``outside_damping`` 1 and every word's factor 1 (``words`` ``word=factor`` entries;
  a bare word or empty ``words`` takes ``factor``);
- refinement (CXRRefinementSampler): ``iterations`` 0 (no gradient step: the plain sampler).

A row with no stage on is "stock". A stage input given by a link (not a literal) counts as on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

Graph = Mapping[str, Any]

STAGES = ("gate", "boost", "refinement")
STAGE_NODES = {"CXRAnatomyAttentionGate": "gate", "CXRPathologyBoost": "boost", "CXRRefinementSampler": "refinement"}
EVALUATE = "CXREvaluateEdit"
SAVE_METRICS = "CXRSaveMetrics"
# Edit-mask sources: what produced the masks Dice compares against the source's masks.
MASK_SOURCES = {
    "CXRSegmentOrgans": "segmentation node (TorchXRayVision PSPNet run on the image's pixels)",
    "CXRAtlasOrgans": "weight-free atlas (a CheXmask shape model registered to the image)",
    "CXRLoadCheXmask": "CheXmask annotation (the source radiograph's row)",
    "CXRLoadOrganMasks": "mask files",
}


def _is_link(value: Any) -> TypeGuard[list]:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _float(value: Any) -> float | None:
    if _is_link(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _boost_factors(words: str, factor: float) -> list[float]:
    factors = []
    for part in re.split(r"[,;\n]+", words or ""):
        if part.strip():
            _, _, value = part.partition("=")
            factors.append(_float(value) if value.strip() else factor)
    return [f if f is not None else float("nan") for f in factors] or [factor]


def is_neutral(node: Mapping[str, Any]) -> bool:
    """True when the stage node's literal inputs switch it off (the rule in the module doc)."""
    kind = STAGE_NODES.get(node.get("class_type", ""))
    inputs = node.get("inputs") or {}
    if kind == "gate":
        return _float(inputs.get("strength", 1.0)) == 0.0 and _float(inputs.get("token_strength", 1.0)) == 0.0
    if kind == "boost":
        factor = _float(inputs.get("factor", 3.0))
        if factor is None or _float(inputs.get("outside_damping", 1.0)) != 1.0 or _is_link(inputs.get("words")):
            return False
        return all(f == 1.0 for f in _boost_factors(str(inputs.get("words") or ""), factor))
    if kind == "refinement":
        return _float(inputs.get("iterations", 1)) == 0.0
    return False


def upstream(graph: Graph, start: Iterable[str]) -> set[str]:
    """Node ids that ``start`` depends on, ``start`` included."""
    seen: set[str] = set()
    todo = [s for s in start if s in graph]
    while todo:
        node_id = todo.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        for value in (graph[node_id].get("inputs") or {}).values():
            if _is_link(value) and value[0] in graph:
                todo.append(value[0])
    return seen


def evaluate_node(graph: Graph) -> str | None:
    """The CXR Evaluate Edit node whose metrics the row saved (the one CXR Save Metrics reads), else the first."""
    for node in graph.values():
        if node.get("class_type") == SAVE_METRICS:
            link = (node.get("inputs") or {}).get("metrics")
            if _is_link(link) and graph.get(link[0], {}).get("class_type") == EVALUATE:
                return link[0]
    return next((i for i, n in graph.items() if n.get("class_type") == EVALUATE), None)


def stages_on(graph: Graph) -> tuple[str, ...]:
    """The row's stages that are on, in :data:`STAGES` order (see the module doc)."""
    evaluated = evaluate_node(graph)
    edited = (graph.get(evaluated, {}).get("inputs") or {}).get("edited") if evaluated else None
    ids = upstream(graph, [edited[0]]) if _is_link(edited) else set(graph)
    on = {STAGE_NODES[graph[i]["class_type"]] for i in ids
          if graph[i].get("class_type") in STAGE_NODES and not is_neutral(graph[i])}
    return tuple(s for s in STAGES if s in on)


def configuration(graph: Graph) -> str:
    on = stages_on(graph)
    return " + ".join(on) if on else "stock"


def mask_source(graph: Graph, role: str = "edit_organ_masks") -> str:
    """What produced the organ masks CXR Evaluate Edit takes as ``role`` (``organ_masks``: the source's,
    ``edit_organ_masks``: the edit's, for Dice): the mask node nearest upstream of that input."""
    evaluated = evaluate_node(graph)
    if evaluated is None:
        return "no CXR Evaluate Edit in the graph"
    link = (graph[evaluated].get("inputs") or {}).get(role)
    if not _is_link(link):
        return f"none ({role} not connected: no organ Dice)"
    for node_id in sorted(upstream(graph, [link[0]]), key=lambda i: i != link[0]):
        kind = graph[node_id].get("class_type", "")
        if kind in MASK_SOURCES:
            return MASK_SOURCES[kind]
    return f"{graph[link[0]].get('class_type', '?')} (not a mask source the report knows)"


def edit_mask_source(graph: Graph) -> str:
    """What produced the edit's organ masks for Dice (the evaluation's ``edit_organ_masks`` input)."""
    return mask_source(graph, "edit_organ_masks")


def saved_image(record: Mapping[str, Any], role: str) -> str | None:
    """The row file saved from the evaluated ``role`` image ("edited" or "source"): an output node whose image input
    is the same link as the evaluation's ``role`` input, as the runner named it (``saved_as`` in row.json's outputs)."""
    graph = record.get("graph") or {}
    evaluated = evaluate_node(graph)
    if evaluated is None:
        return None
    link = (graph[evaluated].get("inputs") or {}).get(role)
    if not _is_link(link):
        return None
    outputs = record.get("outputs") or {}
    for node_id, node in graph.items():
        if node_id == evaluated or (node.get("inputs") or {}).get("images") != link:
            continue
        for item in (outputs.get(node_id) or {}).get("images") or []:
            if isinstance(item, dict) and item.get("saved_as"):
                return str(item["saved_as"])
    return None

"""API workflows: load them, override inputs by node title, and fill the manifest's roles.

A user names a node by the title the workflow shows (``_meta.title``, e.g. ``Edit prompt + token map``),
never by its id, which nobody sees in the UI. Every override is checked: a title that matches no node or
several nodes, an input the node does not have, or a linked input is an :class:`GraphError` that lists
what exists, before anything is sent to a server.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .comfyui_path import PACK_ROOT

Graph = dict[str, dict[str, Any]]
SHIPPED = PACK_ROOT / "workflows" / "api"

# The manifest's roles, bound to node types rather than ids, so one manifest drives any shipped workflow. The
# pack's loader reads DICOM, PNG and JPEG (every shipped workflow uses it); LoadImage is for users' own graphs.
RADIOGRAPH_LOADERS = {"CXRLoadDICOM": "dicom_file", "LoadImage": "image"}
MASK_SOURCES = frozenset({"CXRAtlasOrgans", "CXRLoadOrganMasks", "CXRLoadCheXmask", "CXRLoadOrganLabelMap",
                          "CXRSegmentOrgans", "CXROrganMasksFromMask"})
SEED_INPUTS = ("seed", "noise_seed")
MASK_FILE_INPUTS = ("right_lung", "left_lung", "heart")


class GraphError(ValueError):
    """A workflow, an override or a manifest value does not fit the graph; the message says what does."""


def load_workflow(name_or_path: str | Path) -> Graph:
    """An API workflow from a file, or a shipped one by name (``cxr_dicom_masked_edit``)."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = SHIPPED / f"{Path(str(name_or_path)).stem}.json"
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.json")))
            raise GraphError(f"workflow {name_or_path} not found (a file, or a shipped one: {names})")
        path = shipped
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise GraphError(f"{path} is not JSON: {err}") from err
    if not isinstance(graph, dict) or "nodes" in graph or not all(
            isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise GraphError(f"{path} is not an API-format workflow (export it with 'Export (API)' in ComfyUI)")
    return graph


def title(graph: Mapping[str, Any], node_id: str) -> str:
    """A node's title; its class type when the workflow gave it none."""
    node = graph[node_id]
    return str(node.get("_meta", {}).get("title") or node["class_type"])


def titles(graph: Mapping[str, Any]) -> list[str]:
    return [title(graph, node_id) for node_id in graph]


def find_node(graph: Mapping[str, Any], wanted: str) -> str:
    """The id of the one node titled ``wanted`` (a node id is accepted too, for titleless graphs)."""
    matches = [node_id for node_id in graph if title(graph, node_id) == wanted]
    if len(matches) == 1:
        return matches[0]
    if not matches and wanted in graph:
        return wanted
    listing = "\n  ".join(f"{title(graph, n)!r} ({graph[n]['class_type']})" for n in graph)
    what = "no node" if not matches else f"{len(matches)} nodes (ids {', '.join(matches)})"
    raise GraphError(f"{what} titled {wanted!r}; the workflow's titles are:\n  {listing}")


def parse_assignment(text: str) -> tuple[str, str, str]:
    """``"Title.input=value"`` → (title, input, value). Titles may hold dots; input names never do."""
    target, sep, value = text.partition("=")
    node, dot, name = target.rpartition(".")
    if not sep or not dot or not node or not name:
        raise GraphError(f"--set {text!r}: expected 'Node title.input=value', e.g. 'Sampler.steps=8'")
    return node.strip(), name.strip(), value


def _typed(value: Any, current: Any, spec: list[Any] | None, where: str) -> Any:
    """A text value converted to the input's type: the type of the value it replaces, else the server's."""
    if not isinstance(value, str):
        return value
    kind = spec[0] if spec else None
    try:
        if isinstance(current, bool) or kind == "BOOLEAN":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(current, int) or kind == "INT":
            return int(value)
        if isinstance(current, float) or kind == "FLOAT":
            return float(value)
    except ValueError:
        raise GraphError(f"{where}: {value!r} is not a {kind or type(current).__name__}") from None
    return value


def _input_spec(object_info: Mapping[str, Any] | None, class_type: str, name: str) -> list[Any] | None:
    spec = (object_info or {}).get(class_type, {}).get("input", {})
    return spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)


def set_input(graph: Graph, node_id: str, name: str, value: Any,
              object_info: Mapping[str, Any] | None = None) -> None:
    """Set one widget input of a node, type-converted and checked (see the module docstring)."""
    node = graph[node_id]
    where = f"{title(graph, node_id)!r}.{name}"
    inputs = node.setdefault("inputs", {})
    spec = _input_spec(object_info, node["class_type"], name)
    if name not in inputs and spec is None:
        known = sorted(inputs) if object_info is None else sorted(
            {**object_info.get(node["class_type"], {}).get("input", {}).get("required", {}),
             **object_info.get(node["class_type"], {}).get("input", {}).get("optional", {})})
        raise GraphError(f"{where}: node {node['class_type']} has no input {name!r}; it has {', '.join(known)}")
    current = inputs.get(name)
    if isinstance(current, list):
        raise GraphError(f"{where} is linked from node {current[0]}: only widget values can be set")
    inputs[name] = _typed(value, current, spec, where)


def check_allowed(graph: Mapping[str, Any], node_id: str, name: str, object_info: Mapping[str, Any]) -> None:
    """The value set on ``node_id.name`` is one the server accepts: within the input's min/max, one of its
    combo options. ``--set`` leaves this to the server (its files may be uploaded after the check); a sweep checks
    every value before the first of its rows runs."""
    node = graph[node_id]
    spec = _input_spec(object_info, node["class_type"], name)
    if not spec:
        return
    value, kind = node["inputs"].get(name), spec[0]
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    where = f"{title(graph, node_id)!r}.{name}"
    options = kind if isinstance(kind, list) else extra.get("options") if kind == "COMBO" else None
    if options is not None and value not in options:
        shown = ", ".join(map(str, options[:20])) + (", ..." if len(options) > 20 else "")
        raise GraphError(f"{where}: {value!r} is not one of its options ({shown})")
    if kind in ("INT", "FLOAT") and isinstance(value, (int, float)):
        low, high = extra.get("min"), extra.get("max")
        if (low is not None and value < low) or (high is not None and value > high) or value != value:
            raise GraphError(f"{where}: {value!r} is out of its range {low}..{high}")


def apply_overrides(graph: Graph, assignments: Iterable[str | tuple[str, str, Any]],
                    object_info: Mapping[str, Any] | None = None) -> Graph:
    """A copy of ``graph`` with every ``"Title.input=value"`` (or (title, input, value)) applied."""
    out = copy.deepcopy(graph)
    for item in assignments:
        node_title, name, value = parse_assignment(item) if isinstance(item, str) else item
        set_input(out, find_node(out, node_title), name, value, object_info)
    return out


def nodes_of(graph: Mapping[str, Any], class_types: Iterable[str]) -> list[str]:
    wanted = set(class_types)
    return [node_id for node_id, node in graph.items() if node["class_type"] in wanted]


def _one(graph: Mapping[str, Any], class_types: Iterable[str], role: str) -> str:
    found = nodes_of(graph, class_types)
    if len(found) != 1:
        have = ", ".join(f"{title(graph, n)!r}" for n in found) or "none"
        raise GraphError(f"the manifest's {role} needs exactly one node of type {' or '.join(class_types)} in "
                         f"the workflow; it has {have}. Use 'Title.input' columns instead.")
    return found[0]


def set_radiograph(graph: Graph, upload_name: str, is_dicom: bool) -> None:
    """Point the workflow's radiograph loader at an uploaded file.

    The pack's loader (``CXRLoadDICOM``) reads DICOM, PNG and JPEG alike; ComfyUI's LoadImage, which users'
    own graphs may hold, reads no DICOM.
    """
    node_id = _one(graph, RADIOGRAPH_LOADERS, "radiograph")
    class_type = graph[node_id]["class_type"]
    if class_type == "LoadImage" and is_dicom:
        raise GraphError(f"the workflow's radiograph loader {title(graph, node_id)!r} is ComfyUI's Load Image, "
                         f"which reads no DICOM; {upload_name} is one. Replace it with the pack's Load Chest "
                         "X-ray (DICOM/PNG/JPEG) (CXRLoadDICOM), which reads DICOM, PNG and JPEG.")
    graph[node_id]["inputs"][RADIOGRAPH_LOADERS[class_type]] = upload_name


def _replace_mask_source(graph: Graph, class_type: str, new_title: str, inputs: dict[str, Any]) -> None:
    """Swap the workflow's organ mask source for another kind (same id, so every link still holds)."""
    node_id = _one(graph, MASK_SOURCES, "mask source")
    for other in graph.values():  # only output 0 (ORGAN_MASKS) is common to every mask source
        for value in other.get("inputs", {}).values():
            if isinstance(value, list) and value[0] == node_id and value[1] != 0 and class_type != \
                    graph[node_id]["class_type"]:
                raise GraphError(f"the workflow uses output {value[1]} of {title(graph, node_id)!r}: its mask "
                                 f"source cannot be replaced by {class_type}")
    if graph[node_id]["class_type"] == class_type:
        graph[node_id]["inputs"].update(inputs)
        return
    graph[node_id] = {"class_type": class_type, "_meta": {"title": new_title}, "inputs": inputs}


def set_mask_files(graph: Graph, files: Mapping[str, str]) -> None:
    """Organ masks from uploaded mask images (organ → name), replacing the workflow's own source."""
    inputs: dict[str, Any] = {organ: files.get(organ, "(none)") for organ in MASK_FILE_INPUTS}
    inputs["threshold"] = 0.5
    _replace_mask_source(graph, "CXRLoadOrganMasks", "Organ masks (manifest files)", inputs)


def set_chexmask(graph: Graph, csv_name: str, image_id: str) -> None:
    """Organ masks from a CheXmask CSV row, mapped onto the radiograph the loader reads."""
    loader = _one(graph, RADIOGRAPH_LOADERS, "radiograph")
    inputs: dict[str, Any] = {"csv_file": csv_name, "image_id": image_id, "id_column": "auto",
                              "min_dice": 0.7, "border_crop": "auto", "image": [loader, 0]}
    existing = nodes_of(graph, ["CXRLoadCheXmask"])
    if existing:  # keep the workflow's own quality threshold and crop mode
        inputs = {**graph[existing[0]]["inputs"], "csv_file": csv_name, "image_id": image_id}
    _replace_mask_source(graph, "CXRLoadCheXmask", "Organ masks (manifest CheXmask row)", inputs)


def prompt_node(graph: Mapping[str, Any]) -> str:
    """The positive prompt's encoder: the CXR Text Encode node, else the CLIPTextEncode fed to ``positive``."""
    ours = nodes_of(graph, ["CXRTextEncode"])
    if ours:
        return _one(graph, ["CXRTextEncode"], "prompt")
    positive = {v["inputs"]["positive"][0] for v in graph.values()
                if isinstance(v.get("inputs", {}).get("positive"), list)}
    found = [n for n in nodes_of(graph, ["CLIPTextEncode"]) if n in positive]
    if len(found) != 1:
        raise GraphError("the manifest's prompt needs one text encoder feeding the sampler's 'positive'; "
                         f"found {len(found)}. Use a 'Title.text' column instead.")
    return found[0]


def set_seed(graph: Graph, seed: int) -> int:
    """Set every sampler seed (``seed``, ``noise_seed``); returns how many were set."""
    count = 0
    for node in graph.values():
        for name in SEED_INPUTS:
            if name in node.get("inputs", {}) and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = seed
                count += 1
    if not count:
        raise GraphError("the manifest sets a seed but the workflow has no seed or noise_seed input")
    return count


def add_metrics_saver(graph: Graph, prefix: str = "cxr_runner/metrics") -> str | None:
    """Save CXR Evaluate Edit's metrics as JSON when the workflow shows them but does not save them.

    The metrics table is a UI text only; a saved JSON is what the runner can read back into its results.
    Returns the id of the CXRSaveMetrics node that saves them, or None without an evaluation node.
    """
    evaluators = nodes_of(graph, ["CXREvaluateEdit"])
    if not evaluators:
        return None
    for node_id in nodes_of(graph, ["CXRSaveMetrics"]):
        if graph[node_id]["inputs"].get("metrics", [None])[0] in evaluators:
            return node_id
    node_id = str(max((int(k) for k in graph if k.isdigit()), default=0) + 1)
    graph[node_id] = {"class_type": "CXRSaveMetrics", "_meta": {"title": "Save metrics (runner)"},
                      "inputs": {"metrics": [evaluators[0], 1], "filename_prefix": prefix}}
    return node_id


def combo_options(object_info: Mapping[str, Any] | None, class_type: str, name: str) -> list[Any] | None:
    """The choices a server offers for a combo input (``[options, {...}]`` or V3's ``["COMBO", {"options": ...}]``);
    None when the server does not describe it."""
    spec = _input_spec(object_info, class_type, name)
    if not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    options = spec[1].get("options") if len(spec) > 1 and isinstance(spec[1], Mapping) else None
    return list(options) if isinstance(options, list) else None


def add_classifier(graph: Graph, weights: str, target: str | None, workflow: str | Path,
                   object_info: Mapping[str, Any] | None = None) -> str:
    """Score the edit with a classifier: a CXR Load Classifier node on ``weights`` linked into every CXR Evaluate
    Edit's ``classifier`` input, with ``target`` as its ``target_pathology``.

    Without ``target`` the evaluator takes the pathology words of the tokens linked to it; one without a tokens link
    gets the workflow's one CXR Text Encode's (so each row's ``pathology`` is its target). Returns the new node's id.

    Raises:
        GraphError: no CXR Evaluate Edit, a weight file the server does not offer, or no way to know the target.
    """
    evaluators = nodes_of(graph, ["CXREvaluateEdit"])
    if not evaluators:
        raise GraphError(f"--classifier scores what CXR Evaluate Edit (CXREvaluateEdit) compares, and the workflow "
                         f"{workflow} has none: add one (source, edited, edit_region) or use a workflow with one "
                         "(cxr_chexmask_edit, cxr_counterfactual_edit, cxr_ablation)")
    offered = combo_options(object_info, "CXRLoadClassifier", "weights")
    if offered is not None and weights not in offered:
        raise GraphError(f"--classifier {weights}: the server offers {', '.join(map(str, offered)) or 'no file'} in "
                         "its models/cxr_classifiers folder; put the file there (and refresh), or pick one of those")
    encoders = nodes_of(graph, ["CXRTextEncode"])
    node_id = str(max((int(k) for k in graph if k.isdigit()), default=0) + 1)
    graph[node_id] = {"class_type": "CXRLoadClassifier", "_meta": {"title": "Classifier (runner)"},
                      "inputs": {"weights": weights}}
    for evaluator in evaluators:
        inputs = graph[evaluator]["inputs"]
        inputs["classifier"] = [node_id, 0]
        if target:
            inputs["target_pathology"] = target
        elif not isinstance(inputs.get("tokens"), list):
            if len(encoders) != 1:
                raise GraphError(f"{title(graph, evaluator)!r} has no tokens to take the target pathology from and "
                                 f"the workflow has {len(encoders)} CXR Text Encode nodes: pass --target-pathology")
            inputs["tokens"] = [encoders[0], 1]  # CXR Text Encode's outputs: conditioning, tokens
    return node_id


ATLAS = "atlas"


def add_organ_dice(graph: Graph, method: str, workflow: str | Path,
                   object_info: Mapping[str, Any] | None = None) -> list[str]:
    """Per-organ Dice of source vs edit: organ masks of every CXR Evaluate Edit's ``edited`` image, linked into its
    ``edit_organ_masks``, from the weight-free atlas (``method`` = ``atlas``) or from CXR Segment Organs on the
    PSPNet weight file named ``method``. Returns the new nodes' ids.

    The atlas node accepts any fit quality (``min_quality`` 0): an edit that moved the anatomy must give a low Dice,
    not stop the row; the fit report is in the node's output.

    Raises:
        GraphError: no CXR Evaluate Edit, one without the source's ``organ_masks`` or already given edit masks, or a
            weight file the server does not offer.
    """
    evaluators = nodes_of(graph, ["CXREvaluateEdit"])
    if not evaluators:
        raise GraphError(f"--organ-dice compares the organ masks CXR Evaluate Edit (CXREvaluateEdit) is given, and the "
                         f"workflow {workflow} has none: use a workflow with one (cxr_chexmask_edit, "
                         "cxr_counterfactual_edit, cxr_ablation)")
    if method != ATLAS:
        offered = combo_options(object_info, "CXRSegmentOrgans", "weights")
        if offered is not None and method not in offered:
            raise GraphError(f"--organ-dice {method}: the server offers {', '.join(map(str, offered)) or 'no file'} "
                             "in its models/cxr_segmentation folder; put the file there (and refresh), or pick one")
    added = []
    for evaluator in evaluators:
        inputs = graph[evaluator]["inputs"]
        name = title(graph, evaluator)
        if not isinstance(inputs.get("organ_masks"), list):
            raise GraphError(f"--organ-dice: {name!r} has no organ_masks input linked (the source's masks, the other "
                             "side of the Dice): link them in the workflow")
        if isinstance(inputs.get("edit_organ_masks"), list):
            raise GraphError(f"--organ-dice: {name!r} already takes the edit's organ masks from the workflow: "
                             "drop --organ-dice")
        node_id = str(max((int(k) for k in graph if k.isdigit()), default=0) + 1)
        if method == ATLAS:
            graph[node_id] = {"class_type": "CXRAtlasOrgans", "_meta": {"title": "Organs of the edit (runner, atlas)"},
                              "inputs": {"image": list(inputs["edited"]), "min_quality": 0.0}}
        else:
            graph[node_id] = {"class_type": "CXRSegmentOrgans",
                              "_meta": {"title": "Organs of the edit (runner, segmentation)"},
                              "inputs": {"image": list(inputs["edited"]), "weights": method, "threshold": 0.5}}
        inputs["edit_organ_masks"] = [node_id, 0]
        added.append(node_id)
    return added


def check_types(graph: Mapping[str, Any], object_info: Mapping[str, Any], where: str) -> None:
    """Every node type must be registered on the server (is the pack installed there?)."""
    missing = sorted({n["class_type"] for n in graph.values()} - set(object_info))
    if missing:
        raise GraphError(f"{where} does not know the node types {', '.join(missing)}: install the "
                         "cxr_counterfactual pack (and any other pack the workflow uses) there")

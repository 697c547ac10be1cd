"""ComfyUI's two workflow formats, converted with the server's own node definitions (``GET /object_info``).

- **API format** (``{"id": {"class_type", "inputs", "_meta": {"title"}}}``): what ``POST /prompt`` takes and
  what headless runs use.
- **UI format** (``{"nodes": [...], "links": [...], "version": 0.4}``): what the frontend saves and loads by
  drag-and-drop, with positions, and widget values as one ordered list per node.

The frontend itself converts UI to API (``graphToPrompt``): a node's ``widgets_values`` follow the order of
its widget inputs (``input_order``: required, then optional), where an INT with ``control_after_generate``
(a seed) is followed by that control's value ("fixed", "randomize", ...) and an image-upload combo by the
upload button's value ("image"). Slot inputs (MODEL, IMAGE, ...) are links. :func:`ui_to_api` follows the
same rules, so a test can keep a shipped UI workflow and its API twin in step; :func:`api_to_ui` lays an
API graph out as a UI graph (columns by depth) with each node's title.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Frontend-only nodes: never sent to the server.
VIRTUAL_NODES = frozenset({"MarkdownNote", "Note", "Reroute", "PrimitiveNode"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload")
COLUMN_WIDTH, NODE_WIDTH, ROW_HEIGHT, GAP = 400, 340, 26, 40


def _spec(object_info: Mapping[str, Any], class_type: str) -> Mapping[str, Any]:
    spec = object_info.get(class_type)
    if spec is None:
        raise KeyError(f"node type {class_type!r} is not registered in this ComfyUI (is its pack installed?)")
    return spec


def ordered_inputs(spec: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """``(name, [type, options])`` of every visible input, in the node's declared order."""
    order = spec.get("input_order") or {g: list(spec["input"].get(g, {})) for g in ("required", "optional")}
    return [(name, spec["input"][group][name]) for group in ("required", "optional")
            for name in order.get(group, [])]


def is_widget(definition: list[Any]) -> bool:
    """A widget input (a value typed in the node) rather than a slot (a link from another node)."""
    kind = definition[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _options(definition: list[Any]) -> Mapping[str, Any]:
    return definition[1] if len(definition) > 1 and isinstance(definition[1], Mapping) else {}


def widget_values(spec: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[Any]:
    """A node's ``widgets_values`` for the given API inputs (controls and upload buttons included)."""
    values: list[Any] = []
    for name, definition in ordered_inputs(spec):
        if not is_widget(definition):
            continue
        options = _options(definition)
        value = inputs.get(name, options.get("default"))
        if isinstance(value, list):
            raise ValueError(f"widget {name!r} is linked; shipped workflows give widgets constants")
        values.append(value)
        if options.get("control_after_generate"):
            values.append("fixed")  # a shared workflow reproduces its seed
        if any(options.get(flag) for flag in UPLOAD_FLAGS):
            values.append("image")
    return values


def ui_to_api(ui: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The API prompt the frontend would submit for a UI workflow (muted and bypassed nodes left out)."""
    links = {link[0]: link for link in ui.get("links", [])}
    prompt: dict[str, dict[str, Any]] = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        spec = _spec(object_info, node["type"])
        slots = {slot["name"]: slot.get("link") for slot in node.get("inputs", [])}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name, definition in ordered_inputs(spec):
            if is_widget(definition):
                options = _options(definition)
                if not values and options.get("default") is not None:
                    # saved before this input was appended: the frontend gives the new widget its default
                    inputs[name] = options["default"]
                    continue
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
                inputs[name] = values.pop(0)
                if options.get("control_after_generate") and values:
                    values.pop(0)
                if any(options.get(flag) for flag in UPLOAD_FLAGS) and values:
                    values.pop(0)
            link_id = slots.get(name)
            if link_id is not None:  # a slot, or a widget converted to an input and linked
                _, origin, slot, *_ = links[link_id]
                inputs[name] = [str(origin), slot]
        entry: dict[str, Any] = {"inputs": inputs, "class_type": node["type"]}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def _depths(api: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str, trail: tuple[str, ...] = ()) -> int:
        if node_id in trail:
            raise ValueError(f"the graph has a cycle through node {node_id}")
        if node_id not in depth:
            parents = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(p, (*trail, node_id)) for p in parents), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api: Mapping[str, Mapping[str, Any]], object_info: Mapping[str, Any],
              notes: Mapping[int, str] | None = None) -> dict[str, Any]:
    """A UI workflow for an API graph: same node ids and titles, columns by depth, fixed seeds.

    Args:
        api: the API prompt (node ids must be integers as strings, as ComfyUI writes them).
        object_info: ``GET /object_info`` of a server with every node type of the graph.
        notes: Markdown notes to show above given columns (``{column: text}``).
    """
    depth = _depths(api)
    nodes: list[dict[str, Any]] = []
    links: list[list[Any]] = []
    outputs: dict[tuple[str, int], list[int]] = {}
    column_y: dict[int, int] = {}
    for order, node_id in enumerate(sorted(api, key=lambda i: (depth[i], int(i)))):
        entry, spec = api[node_id], _spec(object_info, api[node_id]["class_type"])
        slots: list[dict[str, Any]] = []
        for name, definition in ordered_inputs(spec):
            if is_widget(definition):
                continue
            slot = {"name": name, "type": definition[0], "link": None}
            source = entry["inputs"].get(name)
            if isinstance(source, list):
                link_id = len(links) + 1
                kind = _spec(object_info, api[source[0]]["class_type"])["output"][source[1]]
                links.append([link_id, int(source[0]), source[1], int(node_id), len(slots), kind])
                outputs.setdefault((source[0], source[1]), []).append(link_id)
                slot["link"] = link_id
            slots.append(slot)
        values = widget_values(spec, entry["inputs"])
        height = 30 + ROW_HEIGHT * (max(len(slots), len(spec["output"])) + len(values))
        if spec.get("output_node"):
            height += 240  # room for the preview
        col = depth[node_id]
        y = column_y.get(col, 0)
        column_y[col] = y + height + GAP
        nodes.append({
            "id": int(node_id), "type": entry["class_type"], "pos": [col * COLUMN_WIDTH, y],
            "size": [NODE_WIDTH, height], "flags": {}, "order": order, "mode": 0, "inputs": slots, "outputs": [],
            "title": entry.get("_meta", {}).get("title", spec.get("display_name", entry["class_type"])),
            "properties": {"Node name for S&R": entry["class_type"]}, "widgets_values": values,
        })
    for node in nodes:
        spec = _spec(object_info, node["type"])
        node["outputs"] = [{"name": name, "type": kind, "slot_index": i,
                            "links": outputs.get((str(node["id"]), i)) or None}
                           for i, (name, kind) in enumerate(zip(spec["output_name"], spec["output"], strict=True))]
    next_id = max((n["id"] for n in nodes), default=0) + 1
    for col, text in (notes or {}).items():
        nodes.append({"id": next_id, "type": "MarkdownNote", "pos": [col * COLUMN_WIDTH, -260], "size": [NODE_WIDTH,
                      220], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "title": "Note",
                      "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        next_id += 1
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, repr(sorted(api)) + repr(len(links)))), "revision": 0,
            "last_node_id": max((n["id"] for n in nodes), default=0), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [40, 320]}},
            "version": 0.4}


def check_values(api: Mapping[str, Mapping[str, Any]], object_info: Mapping[str, Any],
                 file_inputs: frozenset[str] = frozenset()) -> list[str]:
    """Problems with an API graph's node types and widget values against the server's definitions.

    ``file_inputs`` names combo inputs whose options are files of the user's folders (a shipped workflow's
    checkpoint or image is not in a fresh install); their values are checked only for type.
    """
    problems = []
    for node_id, entry in api.items():
        spec = object_info.get(entry["class_type"])
        if spec is None:
            problems.append(f"node {node_id}: unknown type {entry['class_type']}")
            continue
        declared = dict(ordered_inputs(spec))
        required = spec["input"].get("required", {})
        for name in required:
            if name not in entry["inputs"]:
                problems.append(f"node {node_id} ({entry['class_type']}): missing required input {name!r}")
        for name, value in entry["inputs"].items():
            definition = declared.get(name)
            where = f"node {node_id} ({entry['class_type']}) input {name!r}"
            if definition is None:
                problems.append(f"{where}: not an input of this node")
            elif isinstance(value, list):
                if is_widget(definition) or value[0] not in api:
                    problems.append(f"{where}: a link where a value is expected, or to a missing node")
            elif not is_widget(definition):
                problems.append(f"{where}: a value where a link is expected")
            else:
                problems.extend(f"{where}: {p}" for p in _value_problems(definition, value, name in file_inputs))
    return problems


def _value_problems(definition: list[Any], value: Any, is_file: bool) -> list[str]:
    kind, options = definition[0], _options(definition)
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if is_file:
            return [] if isinstance(value, str) and value else [f"{value!r} is not a file name"]
        return [] if value in choices else [f"{value!r} is not one of {choices}"]
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and
                                                                                not isinstance(value, int)):
            return [f"{value!r} is not an {kind}"]
        low, high = options.get("min"), options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            return [f"{value} is outside [{low}, {high}]"]
        return []
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{value!r} is not a string"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{value!r} is not a boolean"]
    return []

"""The audit trail of an export: what made it, read from the graph that ran and what its nodes measured.

Pure (no ComfyUI import): the caller hands in the API prompt (ComfyUI's hidden ``PROMPT``), a function that hashes
a file a widget names, the versions and the measurements; :mod:`..nodes.audit` is the ComfyUI glue.

The document (``schema`` :data:`SCHEMA`, documented in docs/audit.md):

- ``recipe``: how the export was made, per node upstream of the export node: its class and settings (widget
  values), model files by SHA-256, links as ``[node, slot]``; ``seeds``, ``sampling`` and ``models`` are views
  of it. ``provenance_sha256`` hashes the recipe *by structure*: every node's hash covers its class, settings and
  the hashes of the nodes feeding it (node ids play no part), the patient's files count as "an input" and the
  output file names not at all. Two exports made the same way, of any radiograph, share it.
- ``inputs``: the patient's files (radiograph, mask files, CheXmask CSV) by SHA-256; their names, and a CheXmask
  row id, only when patient data is kept (else the row id's SHA-256: it may be a hospital's own identifier).
- ``mask_source``: where the organ masks came from (files, CheXmask row, atlas fit and its quality, segmentation
  weights), ``measurements``: what nodes measured while the graph ran (atlas fit quality, CheXmask Dice, the
  inversion's reconstruction residuals, the refinement's energy per step).

A node's measurements are noted under (prompt id, node id) in a :class:`Journal`; a node ComfyUI took from its
cache did not run in this prompt, so its notes are found in an earlier prompt whose node had the same structural
hash (same class, settings and inputs: the same output).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CXRInputError

SCHEMA = "cxr_counterfactual/provenance/1"
EXPORT_NODE = "CXRExportCounterfactual"
PATIENT_INPUT = "<patient input>"  # what a patient's file counts as in the structural hash

# Widgets naming a model file, for any node class: widget name → ComfyUI folder kind.
MODEL_WIDGETS: dict[str, str] = {
    "ckpt_name": "checkpoints", "lora_name": "loras", "vae_name": "vae", "control_net_name": "controlnet",
    "unet_name": "diffusion_models", "clip_name": "text_encoders", "clip_name1": "text_encoders",
    "clip_name2": "text_encoders", "style_model_name": "style_models", "model_name": "upscale_models",
}
# The pack's own weight files (the widget is called ``weights``): class → ComfyUI folder kind.
PACK_WEIGHTS: dict[str, str] = {"CXRSegmentOrgans": "cxr_segmentation", "CXRLoadClassifier": "cxr_classifiers"}
# Widgets naming a file of the patient's in ComfyUI's input folder: (class, widget).
PATIENT_FILES: frozenset[tuple[str, str]] = frozenset({
    ("CXRLoadDICOM", "dicom_file"), ("LoadImage", "image"), ("LoadImageMask", "image"),
    ("CXRLoadOrganMasks", "right_lung"), ("CXRLoadOrganMasks", "left_lung"), ("CXRLoadOrganMasks", "heart"),
    ("CXRLoadOrganLabelMap", "label_map"), ("CXRLoadCheXmask", "csv_file"),
})
# Widgets holding a patient's identifier as text: (class, widget).
PATIENT_TEXT: frozenset[tuple[str, str]] = frozenset({("CXRLoadCheXmask", "image_id")})
# Where the output goes, not how it was made: left out of the recipe.
OUTPUT_WIDGETS = frozenset({"filename_prefix"})
SEED_WIDGETS = frozenset({"seed", "noise_seed"})
SAMPLING_WIDGETS = ("sampler_name", "scheduler", "steps", "cfg", "denoise", "start_percent", "end_percent",
                    "add_noise", "start_at_step", "end_at_step")
# Nodes that make ORGAN_MASKS, and how the trail names their kind.
MASK_SOURCES: dict[str, str] = {
    "CXRLoadOrganMasks": "mask files", "CXRLoadOrganLabelMap": "label map file", "CXRLoadCheXmask": "CheXmask row",
    "CXRAtlasOrgans": "atlas fit", "CXRSegmentOrgans": "segmentation network", "CXROrganMasksFromMask": "drawn masks",
}
NONE_CHOICES = frozenset({"", "(none)", "none"})

HashFile = Callable[[str, str, str, str], str]
"""``hash_file(folder_kind, name, node_id, widget)`` → SHA-256; raises :class:`CXRInputError` if it is gone."""


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, plain ASCII: the one text a value hashes as."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str,
                      allow_nan=False)


def sha256_of(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def is_link(value: Any) -> bool:
    """An API prompt's link: ``[source node id, output slot]``."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _order(node_ids: Iterable[str]) -> list[str]:
    return sorted(node_ids, key=lambda n: (len(n), n))


def upstream(prompt: Mapping[str, Any], node_id: str) -> list[str]:
    """``node_id`` and every node it depends on, in id order."""
    seen: set[str] = set()
    todo = [node_id]
    while todo:
        current = todo.pop()
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        todo += [v[0] for v in (prompt[current].get("inputs") or {}).values() if is_link(v)]
    return _order(seen)


@dataclass(frozen=True)
class _Widget:
    """How one widget value enters the trail."""

    recipe: Any  # its value in the recipe (and the structural hash)
    file: dict[str, Any] | None = None  # a file: {"sha256", "name"?}
    patient: bool = False  # the patient's (goes to ``inputs``)


class _Reader:
    """Reads one prompt: widget values classified, files hashed once, structural hashes memoised."""

    def __init__(self, prompt: Mapping[str, Any], hash_file: HashFile, keep_patient_data: bool):
        self.prompt, self.hash_file, self.keep = prompt, hash_file, keep_patient_data
        self._hashes: dict[str, str] = {}

    def widget(self, node_id: str, class_type: str, name: str, value: Any) -> _Widget | None:
        if name in OUTPUT_WIDGETS:
            return None
        folder = MODEL_WIDGETS.get(name) or (PACK_WEIGHTS.get(class_type) if name == "weights" else None)
        if folder and isinstance(value, str) and value not in NONE_CHOICES:
            digest = self.hash_file(folder, value, node_id, name)
            return _Widget({"sha256": digest}, {"name": value, "sha256": digest, "folder": folder})
        if (class_type, name) in PATIENT_FILES and isinstance(value, str) and value not in NONE_CHOICES:
            digest = self.hash_file("input", value, node_id, name)
            return _Widget(PATIENT_INPUT, {"sha256": digest, **({"name": value} if self.keep else {})}, patient=True)
        if (class_type, name) in PATIENT_TEXT and isinstance(value, str):
            shown = {"value": value} if self.keep else {"sha256": hashlib.sha256(value.encode()).hexdigest()}
            return _Widget(PATIENT_INPUT, shown, patient=True)
        return _Widget(value)

    def node_hash(self, node_id: str) -> str:
        """The structural hash: class, recipe values and the hashes of the linked nodes (never node ids)."""
        if node_id not in self._hashes:
            node = self.prompt[node_id]
            parts: dict[str, Any] = {}
            for name, value in sorted((node.get("inputs") or {}).items()):
                if is_link(value):
                    parts[name] = ["link", self.node_hash(value[0]) if value[0] in self.prompt else None, value[1]]
                elif (w := self.widget(node_id, node["class_type"], name, value)) is not None:
                    parts[name] = w.recipe
            self._hashes[node_id] = sha256_of({"class_type": node["class_type"], "inputs": parts})
        return self._hashes[node_id]


def node_signature(prompt: Mapping[str, Any], node_id: str) -> str:
    """A node's structural hash with its files counted by name (no file is read): equal signatures in two prompts
    mean ComfyUI computes the same output, which it then takes from its cache."""
    return _Reader(prompt, lambda folder, name, *_: f"{folder}/{name}", True).node_hash(node_id)


def collect(prompt: Mapping[str, Any] | None, export_id: str | None, *, hash_file: HashFile,
            keep_patient_data: bool, versions: Mapping[str, str | None],
            measurements: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The provenance document of the export node ``export_id`` in ``prompt`` (see the module doc).

    A prompt without that node (the node was run outside ComfyUI's executor, or by a client that sent another
    graph) gives a document with ``graph.complete`` false and the reason: the export is still made, its settings
    and versions recorded, and the reader can see what is missing.

    Raises:
        CXRInputError: a model or input file the graph names cannot be hashed (it is gone).
    """
    doc: dict[str, Any] = {"schema": SCHEMA, "patient_data": "kept" if keep_patient_data else "removed"}
    if not prompt or export_id is None or export_id not in prompt:
        if not prompt:
            reason = "no graph was given to the export node (it did not run inside ComfyUI's executor)"
        elif export_id is None:
            reason = "the export node was not told its id in the graph: its settings could not be found"
        else:
            reason = f"the graph that ran has no node {export_id!r}: it holds no {EXPORT_NODE} to start from"
        doc.update(graph={"complete": False, "problem": reason}, recipe={"versions": dict(versions)},
                   inputs={}, mask_source=[], measurements={})
        doc["provenance_sha256"] = sha256_of({"versions": dict(versions), "graph": None})
        return doc
    reader = _Reader(prompt, hash_file, keep_patient_data)
    nodes: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    models: list[dict[str, Any]] = []
    seeds: dict[str, Any] = {}
    sampling: list[dict[str, Any]] = []
    for node_id in upstream(prompt, export_id):
        node = prompt[node_id]
        class_type = node["class_type"]
        settings: dict[str, Any] = {}
        links: dict[str, Any] = {}
        for name, value in sorted((node.get("inputs") or {}).items()):
            if is_link(value):
                links[name] = value
                continue
            w = reader.widget(node_id, class_type, name, value)
            if w is None:
                continue
            if w.patient:
                inputs.setdefault(node_id, {"class_type": class_type})[name] = w.file
            elif w.file is not None:
                settings[name] = w.file
                models.append({"node": node_id, "class_type": class_type, "widget": name, **w.file})
            else:
                settings[name] = value
            if name in SEED_WIDGETS:
                seeds.setdefault(node_id, {})[name] = value
        if any(name in settings for name in SAMPLING_WIDGETS):
            sampling.append({"node": node_id, "class_type": class_type,
                             **{k: settings[k] for k in SAMPLING_WIDGETS if k in settings}})
        nodes[node_id] = {"class_type": class_type, "settings": settings, "links": links}
    found = {n: dict(m) for n, m in (measurements or {}).items() if n in nodes}
    recipe = {"versions": dict(versions), "nodes": nodes, "models": models, "seeds": seeds, "sampling": sampling}
    doc.update(graph={"complete": True, "export_node": export_id}, recipe=recipe, inputs=inputs,
               mask_source=_mask_sources(nodes, inputs, found), measurements=found)
    doc["provenance_sha256"] = sha256_of({"versions": dict(versions), "graph": reader.node_hash(export_id)})
    return doc


def _mask_sources(nodes: Mapping[str, Any], inputs: Mapping[str, Any],
                  measured: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per node upstream that made organ masks: its kind, files (hashes), weights and measures."""
    out = []
    for node_id, node in nodes.items():
        kind = MASK_SOURCES.get(node["class_type"])
        if kind is None:
            continue
        entry: dict[str, Any] = {"node": node_id, "class_type": node["class_type"], "kind": kind}
        own = {k: v for k, v in (inputs.get(node_id) or {}).items() if k != "class_type"}
        if "image_id" in own:
            entry["row_id"] = own.pop("image_id")
        if own:
            entry["files"] = own
        if isinstance(node["settings"].get("weights"), Mapping):
            entry["weights"] = node["settings"]["weights"]
        if node_id in measured:
            entry["measured"] = dict(measured[node_id])
        out.append(entry)
    return out


def summary_text(doc: Mapping[str, Any]) -> str:
    """The document as one line of canonical JSON (PNG text chunk, DICOM private element)."""
    return canonical_json(doc)


class Journal:
    """What nodes measured while a prompt ran, by (prompt id, node id). Thread-safe; keeps the last prompts only.

    Args:
        keep: how many prompts' notes (and graphs) to keep.
    """

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self._notes: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()
        self._prompts: dict[str, Mapping[str, Any]] = {}
        self._lock = threading.Lock()

    def note(self, prompt_id: str, node_id: str, key: str, value: Any) -> None:
        with self._lock:
            self._touch(prompt_id)
            self._notes[prompt_id].setdefault(node_id, {})[key] = value

    def remember(self, prompt_id: str, prompt: Mapping[str, Any]) -> None:
        """The graph of ``prompt_id``: lets a later prompt recognise this one's nodes when it reuses their output."""
        with self._lock:
            self._touch(prompt_id)
            self._prompts[prompt_id] = prompt

    def _touch(self, prompt_id: str) -> None:
        """Make ``prompt_id`` the newest prompt; forget the notes and graph of any beyond the last ``keep`` (a server
        running a long batch holds a bounded journal)."""
        self._notes.setdefault(prompt_id, {})
        self._notes.move_to_end(prompt_id)
        while len(self._notes) > self.keep:
            old, _ = self._notes.popitem(last=False)
            self._prompts.pop(old, None)

    def measurements(self, prompt_id: str, prompt: Mapping[str, Any],
                     node_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each node's notes from this prompt, else from the newest earlier prompt whose node had the same
        signature (ComfyUI reused that node's output); a node found in neither has none."""
        with self._lock:
            notes = {p: {n: dict(v) for n, v in by_node.items()} for p, by_node in self._notes.items()}
            prompts = dict(self._prompts)
        out: dict[str, dict[str, Any]] = {}
        for node_id in node_ids:
            if node_id in notes.get(prompt_id, {}):
                out[node_id] = notes[prompt_id][node_id]
                continue
            signature = node_signature(prompt, node_id)
            for earlier in reversed(list(notes)):
                graph = prompts.get(earlier)
                if earlier == prompt_id or graph is None:
                    continue
                match = next((n for n, v in notes[earlier].items() if n in graph
                              and graph[n].get("class_type") == prompt[node_id].get("class_type")
                              and node_signature(graph, n) == signature), None)
                if match is not None:
                    out[node_id] = {**notes[earlier][match], "from_cache_of_prompt": earlier}
                    break
        return out


def gone(kind: str, name: str, node_id: str, widget: str) -> CXRInputError:
    """The error for a file the graph names that cannot be read for its hash (a patient's file is not named: its
    name may name the patient)."""
    named = f"the {kind} file" if kind == "input" else f"the {kind} file '{name}'"
    return CXRInputError(
        f"{named} (node {node_id}, input '{widget}') is gone or unreadable: it cannot be hashed for the audit trail, "
        "so nothing was written.",
        fix="Put the file back where the graph loaded it from (or pick the file now there) and queue again.")

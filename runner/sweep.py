"""``--sweep "TITLE.INPUT=v1,v2,..."``: dose–response sweeps as ordinary manifest rows.

Every radiograph row is expanded into one row per combination of the swept values (the cartesian product of
every ``--sweep``), the values written as ``TITLE.INPUT`` columns, so :func:`~.manifest.build_job` applies
them like any manifest column and :func:`~.manifest.row_key` fingerprints them: a rerun skips finished
combinations and a value added to a list runs only its new rows. An expanded row keeps the original row's
columns and gets ``id = <original id or row<N>>~<k>`` and ``source_row = <original id or row<N>>``; ``k`` is
the index of each setting's value in its list (``~2`` for one setting, ``~2.0`` for two, settings in the order
of their column names), so appending a value to a list keeps every existing row's id and its finished result.

Values: commas separate them and spaces around a value are dropped; a value holding a comma goes in double
quotes (``"chest x-ray, effusion"``), and a double quote inside quotes is written twice (the CSV rules).
Every value is checked before anything runs (:func:`validate`), with the same rule as ``--set`` plus the
input's range and options.
"""

from __future__ import annotations

import copy
import csv
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import graph as g

SEPARATOR = "~"


class SweepError(g.GraphError):
    """A sweep that cannot run; the message names the sweep, the node title and input, and the fix."""


@dataclass(frozen=True)
class Setting:
    """One ``--sweep``: the manifest column it fills (``Title.input``) and its values as written."""

    text: str
    title: str
    name: str
    values: tuple[str, ...]

    @property
    def column(self) -> str:
        return f"{self.title}.{self.name}"


def parse(text: str) -> Setting:
    """``"Title.input=v1,v2"`` → a :class:`Setting` (titles may hold dots, input names never do)."""
    target, sep, listing = text.partition("=")
    node, dot, name = target.rpartition(".")
    if not sep or not dot or not node.strip() or not name.strip():
        raise SweepError(f"--sweep {text!r}: expected 'Node title.input=value1,value2,...', "
                         "e.g. 'Stage 3: pathology boost.factor=1,2,3'")
    try:
        values = [v.strip() for v in next(csv.reader([listing], skipinitialspace=True, strict=True), [])]
    except csv.Error as err:
        raise SweepError(f"--sweep {text!r}: {err}; quote a value holding a comma as \"a, b\"") from None
    if not values or any(v == "" for v in values):
        raise SweepError(f"--sweep {text!r}: empty value in the list for {node.strip()!r}.{name.strip()}; "
                         "give one or more values separated by commas, e.g. '...factor=1,3'")
    return Setting(text, node.strip(), name.strip(), tuple(values))


def parse_all(texts: Sequence[str]) -> list[Setting]:
    """Every ``--sweep``, in the order of their column names (so ids do not depend on the order of flags)."""
    return sorted((parse(t) for t in texts), key=lambda s: s.column)


def spec(settings: Sequence[Setting]) -> dict[str, list[str]]:
    """``{"Title.input": [values]}``, as the run's provenance records it."""
    return {s.column: list(s.values) for s in settings}


def _targets(graph: g.Graph, column: str) -> set[tuple[str, str]]:
    """The (node id, input) pairs a manifest column or ``--set`` writes (roles included; unknown → none)."""
    try:
        if column == "prompt":
            return {(g.prompt_node(graph), "text")}
        if column == "pathology":
            return {(n, "pathology") for n in g.nodes_of(graph, ["CXRTextEncode"])}
        if column == "seed":
            return {(n, k) for n, node in graph.items() for k in g.SEED_INPUTS
                    if k in node.get("inputs", {}) and not isinstance(node["inputs"][k], list)}
        if "." in column:
            node_title, name = column.rsplit(".", 1)
            return {(g.find_node(graph, node_title.strip()), name.strip())}
    except g.GraphError:
        pass  # the manifest or --set reports its own bad column
    return set()


def validate(settings: Sequence[Setting], graph: g.Graph, object_info: Mapping[str, Any] | None,
             manifest_columns: Sequence[str] = (), overrides: Sequence[str] = ()) -> None:
    """Refuse a sweep that cannot run, before anything runs.

    Checked: the title names one node, the node has the input and it is a widget, every value converts to the
    input's type and lies within its range / options (with ``object_info``), no value twice, no setting swept
    twice, and no sweep over a setting the manifest (a column, a role such as ``seed``) or ``--set`` also sets.
    """
    seen: dict[tuple[str, str], Setting] = {}
    for setting in settings:
        where = f"--sweep {setting.text!r}"
        trial = copy.deepcopy(graph)
        try:
            node_id = g.find_node(trial, setting.title)
            typed = []
            for value in setting.values:
                g.set_input(trial, node_id, setting.name, value, object_info)
                if object_info is not None:
                    g.check_allowed(trial, node_id, setting.name, object_info)
                typed.append(trial[node_id]["inputs"][setting.name])
        except g.GraphError as err:
            raise SweepError(f"{where}: {err}") from None
        twice = sorted({str(v) for v in typed if typed.count(v) > 1})
        if twice:
            raise SweepError(f"{where}: {setting.column} lists {', '.join(twice)} more than once; list each "
                             "value once")
        target = (node_id, setting.name)
        if target in seen:
            raise SweepError(f"{where}: {setting.column} is already swept by --sweep {seen[target].text!r}; "
                             "put all its values in one --sweep")
        seen[target] = setting
        for column in manifest_columns:
            if target in _targets(graph, column):
                raise SweepError(f"{where}: the manifest's column {column!r} also sets {setting.column}; drop "
                                 "that column or the sweep")
        for item in overrides:
            node_title, name, _ = g.parse_assignment(item)
            if target in _targets(graph, f"{node_title}.{name}"):
                raise SweepError(f"{where}: --set {item!r} also sets {setting.column}; drop the --set or the "
                                 "sweep")


def expand(rows: Sequence[Mapping[str, str]], settings: Sequence[Setting]) -> list[dict[str, str]]:
    """One row per radiograph row and combination of values (see the module docstring for ids)."""
    combos = list(itertools.product(*(range(len(s.values)) for s in settings)))
    out = []
    for number, row in enumerate(rows, start=1):
        source = row.get("id") or f"row{number:05d}"
        rest = {k: v for k, v in row.items() if k != "id"}
        for combo in combos:
            suffix = ".".join(str(i) for i in combo)
            swept = {s.column: s.values[i] for s, i in zip(settings, combo, strict=True)}
            out.append({"id": f"{source}{SEPARATOR}{suffix}", **rest, "source_row": source, **swept})
    return out

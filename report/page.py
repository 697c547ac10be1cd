"""The report as one self-contained HTML page: inline CSS, images and plots as data URIs, no script, no network.

Numbers in tables also sit in ``data-*`` attributes (``data-mean``, ``data-low``, ``data-high``, full precision),
so a reader (or a test) can take them from the page without parsing the rounded text.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from . import plots, sections
from .folder import Batch, Row
from .stages import saved_image
from .stats import LEVEL, RESAMPLES, SEED, Estimate
from .thumbs import Thumbs, data_uri, thumbnails

logger = logging.getLogger(__name__)

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d1d1f;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th:first-child,td:first-child,td.note{text-align:left}th{background:#f4f4f6}.note{color:#555;max-width:1000px}
.missing{color:#a33}.grid{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;padding:6px}
.card img{height:128px;margin-right:2px;image-rendering:auto}.card .cap{font-size:12px;max-width:400px}
code{background:#f4f4f6;padding:0 3px}.plot{max-width:100%;border:1px solid #eee}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def cell(e: Estimate | None) -> str:
    if e is None:
        return "<td>–</td>"
    attrs = f' data-mean="{e.mean!r}" data-rows="{e.rows}" data-clusters="{e.clusters}"'
    if e.low is not None and e.high is not None:
        attrs += f' data-low="{e.low!r}" data-high="{e.high!r}"'
    return f"<td{attrs}>{esc(e.text())}</td>"


def table(head: Iterable[str], body: Iterable[Iterable[str]], attrs: str = "") -> str:
    top = "".join(f"<th>{esc(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(r) + "</tr>" for r in body)
    return f"<table{attrs}><tr>{top}</tr>{rows}</table>"


def header(batch: Batch, configs: dict[str, str]) -> str:
    counts = {s: sum(r.status == s for r in batch.rows) for s in ("done", "failed", "pending")}
    unit = {"radiograph": "radiograph", "source_row": "source_row (the sweep's original row)"}.get(
        batch.cluster_column, "row (no radiograph column)")
    return (f"<h1>Batch report: {esc(batch.path.name)}</h1><p>{len(batch.rows)} rows: {counts['done']} done, "
            f"{counts['failed']} failed, {counts['pending']} pending; {len(set(configs.values()))} stage "
            f"configuration(s); {len({r.cluster for r in batch.done})} radiograph(s) among the finished rows. "
            f"Generated {esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}.</p><p class='note'>Intervals: bootstrap "
            f"{LEVEL:.0%} percentile intervals over {RESAMPLES} resamples of whole {esc(unit)} clusters (seed {SEED}), "
            "not of rows: rows of one radiograph are not independent. A value without an interval rests on one "
            "radiograph.</p>")


def ablation_html(a: sections.Ablation) -> str:
    if not a.configurations:
        return "<h2 id='ablation'>Ablation</h2><p class='missing'>No finished rows.</p>"
    head = ["metric", *(f"{c} ({a.counts[c][0]} rows, {a.counts[c][1]} radiographs)" for c in a.configurations)]
    main = [m for m in a.metrics if not sections.per_pathology(m)]
    pathologies = [m for m in a.metrics if sections.per_pathology(m)]

    def body(metrics: list[str]):
        return ([f"<th>{esc(m)}</th>", *(cell(a.cells[(c, m)]) for c in a.configurations)] for m in metrics)

    more = "" if not pathologies else (
        "<details><summary>Classifier probability per pathology (source and edit)</summary>"
        + table(head, body(pathologies), " class='pathologies'") + "</details>")
    return ("<h2 id='ablation'>Ablation by stage configuration</h2><p class='note'>A row's configuration is the set of "
            "the pack's stages (gate, boost, refinement) upstream of the image its metrics evaluate and not switched "
            "off by their inputs (gate strength and token_strength 0, boost factors 1 with damping 1, refinement "
            "iterations 0); none on = stock. Cells: mean [95% interval].</p>"
            + table(head, body(main), " class='ablation'") + more)


def dose_html(doses: list[sections.DoseResponse]) -> str:
    out = ["<h2 id='dose'>Dose–response</h2>"]
    if not doses:
        return out[0] + ("<p class='note'>No swept setting: no <code>Title.input</code> column takes two or more "
                         "values among the finished rows (run with <code>--sweep \"Title.input=v1,v2\"</code>).</p>")
    missing = plots.matplotlib_missing()
    if missing:
        out.append(f"<p class='missing'>{esc(missing)}</p>")
    alone = [d for d in doses if d.panels]
    confounded = [d.setting for d in doses if not d.panels]
    if confounded:
        out.append("<p class='note'>Swept but never changed alone (always together with another swept setting), so "
                   "no dose–response line: " + esc(", ".join(confounded)) + ".</p>")
    for dose in alone:
        out.append(f"<h3>{esc(dose.setting)}</h3>")
        panels = dose.panels
        if not missing:
            png = plots.dose_response_png(dose.setting if dose.numeric else f"{dose.setting} (category)", panels)
            out.append(f"<img class='plot' alt='dose-response: {esc(dose.setting)}' "
                       f"src='{data_uri(png, 'image/png')}'>")
        if not dose.numeric:
            out.append("<p class='note'>x positions: " + esc(", ".join(f"{i}={v}" for i, v in enumerate(dose.labels)))
                       + "</p>")
        body = []
        for metric, series in panels.items():
            for label, points in series.items():
                for x, e in points:
                    shown = x if dose.numeric else dose.labels[int(x)]
                    body.append([f"<td>{esc(metric)}</td>", f"<td>{esc(label or '–')}</td>",
                                 f"<td data-x='{x!r}'>{esc(shown)}</td>", cell(e)])
        out.append(table(["metric", "other swept settings", dose.setting, "mean [95% interval]"], body,
                         f" class='dose' data-setting='{esc(dose.setting)}'"))
    return "".join(out)


def realism_html(r: sections.RealismSection) -> str:
    out = ["<h2 id='realism'>Set-level realism (Fréchet distance on classifier features)</h2>"]
    if not r.available:
        return out[0] + f"<p class='missing'>{esc(r.note)}</p>"
    info = ", ".join(f"{k}: {v}" for k, v in r.classifier.items() if not isinstance(v, (list, dict)))
    out.append(f"<p class='note'>Reference set: each radiograph's source once; compared set: the edits. Squared "
               f"Fréchet distance of the feature Gaussians (FID convention). Classifier: {esc(info)}. "
               f"{esc(r.note)}</p>")
    body = [[f"<td>{esc(name)}</td>", f"<td data-fid='{res.distance!r}'>{res.distance:.4g}</td>",
             f"<td>{res.n_reference}</td>", f"<td>{res.n_compared}</td>", f"<td class='note'>{esc(res.caveat)}</td>"]
            for name, res in r.results.items()]
    body += [[f"<td>{esc(name)}</td>", f"<td colspan='4' class='missing'>{esc(why)}</td>"]
             for name, why in r.skipped.items()]
    out.append(table(["edits", "distance", "sources (n)", "edits (n)", "caveat"], body, " class='realism'"))
    return "".join(out)


def anatomy_html(a: sections.Anatomy) -> str:
    out = ["<h2 id='anatomy'>Anatomy consistency</h2>"]
    sources = "; ".join(f"{s} ({n} rows)" for s, n in a.mask_sources.items()) or "no finished rows"
    source_sides = "; ".join(f"{s} ({n} rows)" for s, n in a.source_mask_sources.items()) or "no finished rows"
    out.append(f"<p>Edit masks from: {esc(sources)}. Source masks from: {esc(source_sides)}.</p>")
    if a.mixed_rows:
        out.append(f"<p class='note'>In {a.mixed_rows} rows the source's and the edit's masks come from different "
                   "methods: their Dice stays below 1 even where nothing changed (the methods disagree), so compare "
                   "it between configurations, not with 1.</p>")
    out += [f"<p class='note'>{esc(text)}</p>" for text in a.limits]
    if not a.organs:
        return "".join(out) + ("<p class='missing'>No organ Dice in this batch: run the batch with --organ-dice "
                               "atlas (or --organ-dice PSPNET_FILE), or connect edit_organ_masks of CXR Evaluate Edit "
                               "to the atlas or segmentation node run on the edit.</p>")
    body = ([f"<th>{esc(o)}</th>", *(cell(a.cells[(o, c)]) for c in a.configurations)] for o in a.organs)
    out.append(table(["Dice (source vs edit masks)", *a.configurations], body, " class='anatomy'"))
    return "".join(out)


def _source_path(batch: Batch, row: Row) -> tuple[Path | None, str]:
    saved = saved_image(row.record, "source")
    if saved and row.folder is not None and (row.folder / saved).is_file():
        return row.folder / saved, "saved source"
    path = batch.radiograph_path(row)
    if path is not None:
        return path, "manifest radiograph"
    why = "no batch.json: the manifest's folder is unknown" if not batch.manifest_folders else "file not found"
    return None, f"source not found ({why})"


def _edit_path(row: Row) -> Path | None:
    if row.folder is None:
        return None
    name = saved_image(row.record, "edited")
    if name is None:  # no save node on the evaluated image: the first image file named like a counterfactual
        images = [f for f in row.files if f.lower().endswith((".png", ".jpg", ".jpeg", ".dcm"))]
        name = next((f for f in images if "counterfactual" in f), images[0] if images else None)
    return row.folder / name if name and (row.folder / name).is_file() else None


def _row_thumbs(batch: Batch, row: Row) -> Thumbs | str:
    """The row's thumbnails with a note saying where the source came from, or why there are none."""
    edit = _edit_path(row)
    if edit is None:
        return "no saved edit image in the row"
    source, how = _source_path(batch, row)
    try:
        t = thumbnails(edit, source)
    except Exception as err:  # noqa: BLE001 - one unreadable file must not lose the whole report
        logger.warning("thumbnails of %s: %s", row.key, err)
        return f"unreadable image ({type(err).__name__})"
    return Thumbs(t.edit, t.source, t.difference, how if source is None else "; ".join(x for x in (how, t.note) if x))


def thumbs_html(batch: Batch, configs: dict[str, str], top: int) -> str:
    out = ["<h2 id='thumbnails'>Worst rows per metric (source / edit / |difference|)</h2>"]
    ranked = sections.rankings(batch, top)
    if not ranked:
        return out[0] + "<p class='missing'>No finished row has a ranking metric.</p>"
    cache: dict[str, Thumbs | str] = {}
    for metric, lowest, rows in ranked:
        out.append(f"<h3>{esc(metric)}: {'lowest' if lowest else 'highest'} first ({len(rows)} of "
                   f"{sum(metric in r.metrics for r in batch.done)} rows)</h3><div class='grid'>")
        for row in rows:
            if row.key not in cache:
                cache[row.key] = _row_thumbs(batch, row)
            t = cache[row.key]
            images = "" if isinstance(t, str) else "".join(
                f"<img class='thumb' alt='{esc(kind)}' title='{esc(kind)}' src='{uri}'>"
                for kind, uri in (("source", t.source), ("edit", t.edit), ("|difference|", t.difference)) if uri)
            note = t if isinstance(t, str) else t.note
            caption = f"<b>{esc(row.name)}</b> · {esc(configs[row.key])} · {esc(metric)} = {row.metrics[metric]:.4g}"
            out.append(f"<div class='card'>{images}<div class='cap'>{caption}<br>"
                       f"<span class='note'>{esc(note)}</span></div></div>")
        out.append("</div>")
    return "".join(out)


def not_done_html(batch: Batch) -> str:
    rows = batch.not_done
    out = "<h2 id='unfinished'>Failed and pending rows</h2>"
    if not rows:
        return out + "<p>None: every row finished.</p>"
    body = ([f"<td>{esc(r.name)}</td>", f"<td>{esc(r.status)}</td>", f"<td>{esc(r.key)}</td>",
             f"<td class='note'>{esc(r.error or '–')}</td>"] for r in rows)
    return out + table(["row", "status", "key", "error"], body, " class='unfinished'")


def provenance_html(batch: Batch) -> str:
    out = "<h2 id='provenance'>Provenance</h2>"
    if batch.provenance is None:
        return out + "<p class='missing'>no batch.json: batch made before provenance was recorded.</p>"
    keys = ("started_at", "argv", "workflow", "manifest", "overrides", "sweep", "pack_version", "comfyui_version",
            "rows")
    body = [[f"<td>{i + 1}</td>", *(f"<td class='note'>{esc(_show(run.get(k)))}</td>" for k in keys)]
            for i, run in enumerate(batch.runs)]
    return out + table(["run", *keys], body, " class='provenance'")


def _show(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(batch: Batch, top: int = 12) -> str:
    configs = sections.configurations(batch)
    ablation = sections.ablation(batch, configs)
    settings = sections.swept_settings(batch)
    doses = [sections.dose_response(batch, s, [o for o in settings if o != s]) for s in settings]
    parts = [header(batch, configs), ablation_html(ablation), dose_html(doses),
             realism_html(sections.realism(batch, configs)),
             anatomy_html(sections.anatomy(batch, configs, ablation.configurations)),
             thumbs_html(batch, configs, top), not_done_html(batch), provenance_html(batch)]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Batch report: "
            f"{esc(batch.path.name)}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")

"""Dose–response sweeps (``run --sweep``): parsing, the cartesian product as manifest rows, validation before anything
runs (against a real server's /object_info), and a real sweep on the tiny checkpoint that resumes and records its
provenance in batch.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_runner import CHEXMASK, chexmask_id, cli, results, small
from test_runner_graph import write_manifest

import cxr_counterfactual
from cxr_counterfactual.runner import cli as run_cli
from cxr_counterfactual.runner import sweep as sw

BOOST = "Stage 3: pathology boost"
GATE = "Stage 2: anatomy gate"
SAMPLER = "Sampler (img2img in the edit region)"


def test_two_settings_over_two_radiographs_make_twelve_rows_with_stable_ids():
    rows = [{"id": "nih", "radiograph": "a.png", "label": "effusion"}, {"radiograph": "b.dcm", "seed": "4"}]
    # Given in the "wrong" order on purpose: settings are ordered by column, so ids do not depend on flag order.
    settings = sw.parse_all([f"{BOOST}.factor=1, 3,5", f"{GATE}.strength=0,1"])
    assert [s.column for s in settings] == [f"{GATE}.strength", f"{BOOST}.factor"]
    out = sw.expand(rows, settings)
    assert len(out) == 12
    assert [r["id"] for r in out[:6]] == ["nih~0.0", "nih~0.1", "nih~0.2", "nih~1.0", "nih~1.1", "nih~1.2"]
    assert [r["id"] for r in out[6:]] == [f"row00002~{i}.{j}" for i in range(2) for j in range(3)]
    assert {(r[f"{GATE}.strength"], r[f"{BOOST}.factor"]) for r in out[:6]} == {
        (s, f) for s in ("0", "1") for f in ("1", "3", "5")}
    assert all(r["source_row"] == "nih" and r["radiograph"] == "a.png" and r["label"] == "effusion" for r in out[:6])
    assert all(r["source_row"] == "row00002" and r["seed"] == "4" and "label" not in r for r in out[6:])
    # Appending a value keeps every existing combination's id (so its finished result is reused).
    more = sw.expand(rows, sw.parse_all([f"{BOOST}.factor=1,3,5,8", f"{GATE}.strength=0,1"]))
    old = {r["id"]: r for r in out}
    assert all(old[r["id"]] == r for r in more if r["id"] in old) and len(more) == 16
    assert sw.spec(settings) == {f"{GATE}.strength": ["0", "1"], f"{BOOST}.factor": ["1", "3", "5"]}


def test_values_follow_the_csv_quote_rules():
    setting = sw.parse('Edit prompt + token map.text="chest x-ray, effusion", plain ,"say ""hi"""')
    assert setting.title == "Edit prompt + token map" and setting.name == "text"
    assert setting.values == ("chest x-ray, effusion", "plain", 'say "hi"')
    for bad, words in (("Stage 3: pathology boost.factor=", "empty value"), ("Stage.x=1,,2", "empty value"),
                       ("factor=1,2", "expected 'Node title.input="), ('T.text="open', "quote")):
        with pytest.raises(sw.SweepError, match=words):
            sw.parse(bad)


def manifest(tmp_path: Path, data_dir: Path, extra: dict[str, str] | None = None) -> Path:
    row = {"id": "nih", "radiograph": str(data_dir / "cxr" / "nih" / "00000001_000.png"), **(extra or {})}
    return write_manifest(tmp_path / "rows.csv", [row])


BAD_SWEEPS = [  # (sweep flags, extra manifest column, --set, words the message must hold)
    (["Stage 9: nothing.factor=1,2"], None, None, ["no node titled 'Stage 9: nothing'", BOOST]),
    ([f"{BOOST}.facto=1,2"], None, None, [f"'{BOOST}'.facto", "has no input 'facto'", "factor"]),
    ([f"{BOOST}.factor=1,60"], None, None, [f"'{BOOST}'.factor", "60.0 is out of its range 0.05..50"]),
    ([f"{BOOST}.factor=1,lots"], None, None, [f"'{BOOST}'.factor", "'lots' is not a FLOAT"]),
    ([f"{BOOST}.blocks=all,nowhere"], None, None, [f"'{BOOST}'.blocks", "'nowhere' is not one of its options", "all"]),
    ([f"{GATE}.apply_to_uncond=true,maybe"], None, None, [f"'{GATE}'.apply_to_uncond", "'maybe' is not a BOOLEAN"]),
    ([f"{SAMPLER}.steps=2,0"], None, None, [f"'{SAMPLER}'.steps", "out of its range 1.."]),
    ([f"{BOOST}.model=1,2"], None, None, [f"'{BOOST}'.model is linked"]),
    ([f"{BOOST}.factor=1,3,1.0"], None, None, [f"{BOOST}.factor lists 1.0 more than once"]),
    ([f"{BOOST}.factor=1,3", f"{BOOST}.factor=5"], None, None, ["already swept", "one --sweep"]),
    ([f"{BOOST}.factor=1,3"], {f"{BOOST}.factor": "2"}, None, [f"column '{BOOST}.factor' also sets"]),
    ([f"{SAMPLER}.seed=1,2"], {"seed": "3"}, None, ["column 'seed' also sets", f"{SAMPLER}.seed"]),
    ([f"{BOOST}.factor=1,3"], None, f"{BOOST}.factor=2", [f"--set '{BOOST}.factor=2' also sets"]),
    ([f"{BOOST}.factor="], None, None, ["empty value", f"'{BOOST}'.factor"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("sweeps, column, override, words", BAD_SWEEPS, ids=[
    "title", "input", "range", "number", "combo", "boolean", "int-range", "linked", "twice-value", "twice-setting",
    "manifest-column", "manifest-seed", "set", "empty"])
def test_a_bad_sweep_is_a_usage_error_before_anything_runs(comfy_server, data_dir, tmp_path, capsys, sweeps, column,
                                                           override, words):
    runs_before = len(comfy_server._request("GET", "/history"))
    out = tmp_path / "out"
    argv = [CHEXMASK, "--server", comfy_server.url, "--manifest", str(manifest(tmp_path, data_dir, column)),
            "--out", str(out), *[a for s in sweeps for a in ("--sweep", s)], *(["--set", override] if override else [])]
    assert run_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--sweep" in err and all(w in err for w in words), err
    assert not out.exists()  # nothing written, nothing queued
    assert len(comfy_server._request("GET", "/history")) == runs_before


@pytest.mark.slow
def test_a_sweep_runs_resumes_and_records_its_provenance(comfy_server, tiny_checkpoint, pack_import_path, data_dir,
                                                         tmp_path):
    """A single run (``--radiograph``) swept over the boost factor runs as a one-row manifest; a value added later
    runs only its own row; batch.json keeps both starts."""
    out = tmp_path / "out"
    nih = data_dir / "cxr" / "nih" / "00000001_000.png"
    base = [CHEXMASK, "--server", comfy_server.url, "--out", str(out), "--no-progress", "--radiograph", str(nih),
            "--input", str(data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"), *small(tiny_checkpoint),
            "--set", f"Organ masks from a CheXmask row.image_id={chexmask_id(data_dir)}"]
    history = len(comfy_server._request("GET", "/history"))
    first = cli(pack_import_path, *base, "--sweep", f"{BOOST}.factor=1,3")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "rows: 2; finished now: 2; finished before: 0" in first.stdout
    rows = results(out)
    assert [(r["id"], r["source_row"], r[f"{BOOST}.factor"], r["status"]) for r in rows] == [
        ("row00001~0", "row00001", "1", "done"), ("row00001~1", "row00001", "3", "done")]
    for row in rows:  # the swept value reached the graph that ran (node 12 is the boost of cxr_chexmask_edit)
        graph = json.loads((out / row["output_dir"] / "row.json").read_text())["graph"]
        assert graph["12"]["inputs"]["factor"] == float(row[f"{BOOST}.factor"])
        assert float(row["metric_keep_ssim"]) > 0.5

    again = cli(pack_import_path, *base, "--sweep", f"{BOOST}.factor=1,3,5")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "rows: 3; finished now: 1; finished before: 2" in again.stdout
    assert [r[f"{BOOST}.factor"] for r in results(out)] == ["1", "3", "5"]
    # The runner deletes its runs' history entries once read (ComfyUI would keep 10,000: memory per row).
    assert len(comfy_server._request("GET", "/history")) == history

    runs = json.loads((out / "batch.json").read_text())["runs"]
    assert [r["sweep"] for r in runs] == [{f"{BOOST}.factor": ["1", "3"]}, {f"{BOOST}.factor": ["1", "3", "5"]}]
    assert [r["rows"] for r in runs] == [2, 3]
    first_run = runs[0]
    assert first_run["workflow"] == CHEXMASK and Path(first_run["workflow_path"]).name == f"{CHEXMASK}.json"
    assert first_run["manifest"] is None and Path(first_run["root"]).is_absolute()
    assert first_run["overrides"] == base[base.index("--set") + 1::2]
    assert first_run["argv"][:2] == [CHEXMASK, "--server"] and "--sweep" in first_run["command"]
    assert first_run["pack_version"] == cxr_counterfactual.__version__ and first_run["comfyui_version"] == \
        comfy_server.system_stats()["system"]["comfyui_version"]
    assert first_run["servers"] == [{"url": comfy_server.url, "comfyui_version": first_run["comfyui_version"]}]
    assert not list(out.glob(".batch.*"))  # written through a temporary file, renamed

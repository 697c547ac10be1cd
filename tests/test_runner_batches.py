"""``--batch-size``: manifest rows run N at a time in one graph, against a real headless ComfyUI with the tiny
checkpoint and real radiographs (the NIH radiograph and flipped / inverted copies of it: same size, different
pixels), and the graph rewrite on the shipped workflows with the server's own node definitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_runner import cli, results
from test_runner_graph import write_manifest

from cxr_counterfactual.runner import graph as g
from cxr_counterfactual.runner.batching import BatchJob, CannotBatch, batch_graph, plan
from cxr_counterfactual.runner.manifest import prepare, read_manifest
from cxr_counterfactual.testing.batch_graphs import img2img_graph, same_size_radiographs

pytestmark = pytest.mark.slow

PX = 64  # every image is scaled to 64 px before the model: 8×8 latents, a second or so per batch on one core


def batchable_workflow(path: Path, checkpoint: str, masks: bool = False) -> Path:
    """The batch-ready img2img graph (CXR Evaluate Edit: the runner adds CXR Save Metrics) saving its scaled source
    and latent too. With ``masks``, organ mask files shown on the radiograph (a per-row mask source read by an
    output node only)."""
    graph = img2img_graph(checkpoint, PX, steps=2, cfg=2.0, denoise=0.5)
    graph.update({
        "13": {"class_type": "SaveImage", "_meta": {"title": "Save: source"},
               "inputs": {"images": ["2", 0], "filename_prefix": "batches/source"}},
        "12": {"class_type": "SaveLatent", "_meta": {"title": "Save: latent"},
               "inputs": {"samples": ["7", 0], "filename_prefix": "batches/latent"}},
    })
    if masks:
        graph["14"] = {"class_type": "CXRLoadOrganMasks", "_meta": {"title": "Organ masks"},
                       "inputs": {"right_lung": "(none)", "left_lung": "(none)", "heart": "(none)", "threshold": 0.5}}
        graph["15"] = {"class_type": "CXRPreviewOrganMasks", "_meta": {"title": "Preview: organs"},
                       "inputs": {"image": ["1", 0], "organ_masks": ["14", 0], "opacity": 0.35}}
    path.write_text(json.dumps(graph))
    return path


@pytest.fixture(scope="module")
def radiographs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return same_size_radiographs(tmp_path_factory.mktemp("radiographs"))


def rows_of(radiographs: list[Path], **values: str) -> list[dict[str, str]]:
    return [{"id": p.stem, "radiograph": str(p), **values} for p in radiographs]


def grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((PX, PX)), dtype=np.float64)


def test_rows_run_as_batches_and_each_keeps_its_own_outputs(comfy_server, tiny_checkpoint, pack_import_path,
                                                            radiographs, tmp_path):
    workflow = batchable_workflow(tmp_path / "wf.json", tiny_checkpoint.name)
    manifest = write_manifest(tmp_path / "rows.csv", rows_of(radiographs))
    out = tmp_path / "out"
    args = [str(workflow), "--manifest", str(manifest), "--server", comfy_server.url, "--out", str(out),
            "--no-progress", "--batch-size", "4"]
    run = cli(pack_import_path, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = results(out)
    assert [r["status"] for r in rows] == ["done"] * 4
    assert [r["batch_size"] for r in rows] == ["4"] * 4 and [r["batch_index"] for r in rows] == ["0", "1", "2", "3"]
    assert {r["batch_seed"] for r in rows} == {"5"}
    records = [json.loads((out / r["output_dir"] / "row.json").read_text()) for r in rows]
    assert len({rec["prompt_id"] for rec in records}) == 1  # one graph ran them all
    assert all(rec["graph"]["1"]["class_type"] == "LoadImage" and "1_row3" in rec["batch"]["graph"]
               for rec in records)
    edits, saved_sources = [], []
    for row, rec in zip(rows, records, strict=True):
        folder = out / row["output_dir"]
        # One file per output node, as a row run alone gets: its own image, latent and metrics.
        assert {"save-edit.png", "save-latent.latent"} <= set(rec["files"])
        assert sum(name.endswith(".png") and name.startswith("save-edit") for name in rec["files"]) == 1
        assert row["metric_image"] == "0" and float(row["metric_edit_mad"]) > 0  # Evaluate Edit saw this pair alone
        edits.append(grey(folder / "save-edit.png"))
        saved_sources.append(grey(folder / "save-source.png"))
    sources = [grey(p) for p in radiographs]
    for i, saved in enumerate(saved_sources):  # row i's outputs are of row i's radiograph, not a neighbour's
        corr = [np.corrcoef(saved.ravel(), s.ravel())[0, 1] for s in sources]
        assert int(np.argmax(corr)) == i and corr[i] > 0.95, corr
    # Random weights make no recognisable edit, but each row's is its own (its image, its noise index).
    assert all(np.abs(edits[i] - edits[j]).max() > 0 for i in range(4) for j in range(i))
    # Metrics per image differ between rows (a shared first-pair metric would repeat one value).
    assert len({r["metric_edit_mad"] for r in rows}) == 4

    # Reproduce row 2 alone, as docs/runner.md says: Repeat Latent Batch (3) and Latent From Batch (index 2) before
    # the sampler give it noise index 2 of the seed. The model then runs on a batch of 1 instead of 4: float32 sums
    # in another order, so equal within a float32 tolerance (2 euler steps from unit-variance noise).
    alone = json.loads(workflow.read_text())
    alone["20"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["6", 0], "amount": 3}}
    alone["21"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["20", 0], "batch_index": 2, "length": 1}}
    alone["7"]["inputs"]["latent_image"] = ["21", 0]
    (tmp_path / "alone.json").write_text(json.dumps(alone))
    single = cli(pack_import_path, str(tmp_path / "alone.json"), "--manifest",
                 str(write_manifest(tmp_path / "one.csv", rows_of(radiographs[2:3]))), "--server", comfy_server.url,
                 "--out", str(tmp_path / "alone"), "--no-progress")
    assert single.returncode == 0, single.stdout + single.stderr
    from safetensors.numpy import load_file

    batched = load_file(out / rows[2]["output_dir"] / "save-latent.latent")["latent_tensor"]
    own = load_file(tmp_path / "alone" / results(tmp_path / "alone")[0]["output_dir"] /
                    "save-latent.latent")["latent_tensor"]
    assert batched.shape == own.shape == (1, 4, PX // 8, PX // 8)
    assert np.abs(batched - own).max() < 1e-3, np.abs(batched - own).max()

    more = write_manifest(tmp_path / "rows.csv", rows_of(radiographs) + [
        {"id": f"again-{p.stem}", "radiograph": str(p), "seed": "9"} for p in radiographs[:2]])
    again = cli(pack_import_path, str(workflow), "--manifest", str(more), *args[3:])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "finished now: 2; finished before: 4" in again.stdout  # resumed: the batch's rows were kept
    rows = results(out)
    assert [r["batch_size"] for r in rows[4:]] == ["2", "2"] and [r["batch_seed"] for r in rows[4:]] == ["9", "9"]


def test_rows_with_other_values_are_batched_apart(comfy_server, tiny_checkpoint, pack_import_path, radiographs,
                                                  tmp_path):
    """Prompts and seeds split batches; a row alone in its group runs alone."""
    workflow = batchable_workflow(tmp_path / "wf.json", tiny_checkpoint.name)
    rows = (rows_of(radiographs[:2], seed="1") + rows_of(radiographs[2:3], seed="2")
            + [{"id": "prompted", "radiograph": str(radiographs[3]), "seed": "1", "prompt": "chest x-ray"}])
    manifest = write_manifest(tmp_path / "rows.csv", rows)
    info = comfy_server.object_info()
    base = g.load_workflow(workflow)
    g.add_metrics_saver(base)
    jobs, problems = prepare(base, read_manifest(manifest), manifest.parent, info)
    assert not problems
    units = plan(jobs, 4, info)
    assert [[j.row["id"] for j in u.rows] if isinstance(u, BatchJob) else u.row["id"] for u in units] == [
        ["nih", "mirrored"], "flipped", "prompted"]  # groups in manifest order; a group of one runs alone
    out = tmp_path / "out"
    run = cli(pack_import_path, str(workflow), "--manifest", str(manifest), "--server", comfy_server.url,
              "--out", str(out), "--no-progress", "--batch-size", "4")
    assert run.returncode == 0, run.stdout + run.stderr
    by_id = {r["id"]: r for r in results(out)}
    assert [by_id[i]["batch_size"] for i in ("nih", "mirrored", "flipped", "prompted")] == ["2", "2", "1", "1"]
    assert by_id["flipped"]["batch_seed"] == "2"
    prompt = json.loads((out / by_id["prompted"]["output_dir"] / "row.json").read_text())["graph"]["4"]
    assert prompt["inputs"]["text"] == "chest x-ray"


def test_a_failing_row_does_not_lose_its_batch(comfy_server, tiny_checkpoint, pack_import_path, chexmask_example,
                                               data_dir, tmp_path):
    """Four copies of the CheXmask example radiograph with its organ masks; one row's heart mask is another image's
    (512×512, not 899×786), so its mask loader fails and with it the batch. The rows then run one at a time: the
    three good ones finish (no attempt lost), the bad one fails alone with its own error."""
    workflow = batchable_workflow(tmp_path / "wf.json", tiny_checkpoint.name, masks=True)
    example = np.asarray(Image.open(chexmask_example / "utils_example1.jpg").convert("L"))
    rows = []
    for name, pixels in (("example", example), ("mirrored", example[:, ::-1]), ("bad", example[::-1]),
                         ("flipped", example[::-1])):
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / f"{name}.png")
        rows.append({"id": name, "radiograph": str(tmp_path / f"{name}.png"),
                     "mask_right_lung": str(chexmask_example / "RL_mask.png"),
                     "mask_left_lung": str(chexmask_example / "LL_mask.png"),
                     "mask_heart": str(data_dir / "cxr" / "nih" / "00000001_000.png") if name == "bad"
                     else str(chexmask_example / "H_mask.png")})
    out = tmp_path / "out"
    run = cli(pack_import_path, str(workflow), "--manifest", str(write_manifest(tmp_path / "rows.csv", rows)),
              "--server", comfy_server.url, "--out", str(out), "--no-progress", "--batch-size", "4", "--retries", "0")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "batch of 4 rows" in run.stderr and "its rows run again one at a time" in run.stderr
    by_id = {r["id"]: r for r in results(out)}
    good = ("example", "mirrored", "flipped")
    assert [by_id[i]["status"] for i in good] == ["done"] * 3
    assert all(by_id[i]["batch_size"] == "1" and by_id[i]["attempts"] == "1" for i in good)
    assert all((out / by_id[i]["output_dir"] / "preview-organs.png").is_file() for i in good)
    assert by_id["bad"]["status"] == "failed" and by_id["bad"]["attempts"] == "1"
    assert "different sizes" in by_id["bad"]["error"]


def test_graphs_that_cannot_batch_say_which_node(comfy_server, data_dir, chexmask_example, tmp_path, caplog):
    """The shipped DICOM workflow's 'Fit to model' reads the loader's geometry, which no node joins over rows: its
    rows run one at a time, with one log line naming the node. The CheXmask workflow's per-row nodes are the
    loader and the mask source, repeated per row; its output nodes read their own row's copies."""
    info = comfy_server.object_info()
    # The ORGAN_MASKS join (CXR Batch Organ Masks) as the pack declares it where the server lacks it, so the
    # rewrite is checked either way; without it on the server, the join is what stops a batch (asserted below).
    joinable = {"CXRBatchOrganMasks": {"input": {"optional": {f"organ_masks_{i}": ["ORGAN_MASKS"] for i in (1, 2, 3)}},
                                       "output": ["ORGAN_MASKS"]}, **info}
    rows = [{"id": f"r{i}", "radiograph": str(chexmask_example / "utils_example1.jpg"),
             "mask_right_lung": str(chexmask_example / "RL_mask.png"),
             "mask_left_lung": str(chexmask_example / "LL_mask.png"),
             "mask_heart": str(chexmask_example / "H_mask.png")} for i in range(3)]
    manifest = write_manifest(tmp_path / "rows.csv", rows)
    dicom = g.load_workflow("cxr_dicom_masked_edit")
    jobs, _ = prepare(dicom, read_manifest(manifest), manifest.parent, info)
    with caplog.at_level("WARNING", logger="cxr_counterfactual.runner.batching"):
        units = plan(jobs, 2, joinable)
    assert units == jobs
    assert len(caplog.records) == 1 and "'Fit to model' (CXRFitToModel)" in caplog.text
    assert "output 1" in caplog.text and "'Radiograph (DICOM)' (CXRLoadDICOM)" in caplog.text

    chexmask = g.load_workflow("cxr_chexmask_edit")
    g.add_metrics_saver(chexmask)
    jobs, _ = prepare(chexmask, read_manifest(manifest), manifest.parent, info)
    if "CXRBatchOrganMasks" not in info:
        with pytest.raises(CannotBatch, match="CXRBatchOrganMasks, which the server does not have"):
            batch_graph(jobs[:2], info)
    batch = batch_graph(jobs, joinable)
    graph = batch.graph
    assert graph["2_row1"]["class_type"] == "CXRLoadOrganMasks" and graph["1_row2"]["inputs"]["dicom_file"]
    assert graph["4"]["inputs"]["image"] == ["join_1_0_2", 0]  # Fit to model gets the batch, in row order
    assert graph["join_1_0_1"]["inputs"] == {"image1": ["1_row0", 0], "image2": ["1_row1", 0]}
    assert graph["4"]["inputs"]["organ_masks"] == ["join_2_0_2", 0]  # the masks joined the same way, in row order
    assert graph["join_2_0_1"]["inputs"] == {"organ_masks_1": ["2_row0", 0], "organ_masks_2": ["2_row1", 0]}
    assert graph["join_2_0_1"]["class_type"] == "CXRBatchOrganMasks"
    # Evaluate Edit of row 1: its own radiograph and masks, and image 1 of the composite and its region.
    evaluate = graph["18_row1"]["inputs"]
    assert evaluate["source"] == ["1_row1", 0] and evaluate["organ_masks"] == ["2_row1", 0]
    assert graph[evaluate["edited"][0]]["inputs"] == {"image": ["16", 0], "batch_index": 1, "length": 1}
    assert graph[evaluate["edited"][0]]["class_type"] == "ImageFromBatch"
    assert graph[evaluate["edit_region"][0]]["class_type"] == "ImageToMask"
    assert batch.row_nodes[2]["17_row2"] == "17"
    # a chain of pairwise joins: any batch size joins (12 rows: 11 joins, the last one read by Fit to model)
    many = batch_graph((jobs * 4)[:12], joinable).graph
    assert many["4"]["inputs"]["organ_masks"] == ["join_2_0_11", 0]
    assert many["join_2_0_11"]["inputs"] == {"organ_masks_1": ["join_2_0_10", 0], "organ_masks_2": ["2_row11", 0]}


def test_batch_size_is_checked_before_anything_runs(pack_import_path, tmp_path):
    one = cli(pack_import_path, "cxr_chexmask_edit", "--batch-size", "2", "--server", "http://127.0.0.1:9")
    assert one.returncode != 0 and "--batch-size batches the rows of a --manifest" in one.stderr
    rows = write_manifest(tmp_path / "rows.csv", [{"radiograph": "x.png"}])
    ray = cli(pack_import_path, "cxr_chexmask_edit", "--manifest", str(rows), "--batch-size", "2", "--ray", "local")
    assert ray.returncode != 0 and "not supported with --ray" in ray.stderr


def test_exported_rows_carry_their_trail_and_one_hash_per_recipe(comfy_server, tiny_checkpoint, pack_import_path,
                                                                  radiographs, tmp_path):
    """An export reads the batch's CXR_FIT, which the runner cannot split: such rows run one by one (warned), and each
    row's folder holds its own provenance sidecar; results.csv gives rows made the same way one hash."""
    graph = json.loads(batchable_workflow(tmp_path / "wf.json", tiny_checkpoint.name).read_text())
    graph["16"] = {"class_type": "CXRFitToModel", "_meta": {"title": "Fit"}, "inputs": {"image": ["2", 0],
                                                                                          "max_side": PX}}
    graph["17"] = {"class_type": "CXRExportCounterfactual", "_meta": {"title": "Export"}, "inputs": {
        "image": ["8", 0], "fit": ["16", 2], "filename_prefix": "batches/export", "format": "png",
        "bit_depth": "auto", "keep_patient_data": False, "include_workflow": False}}  # saved before segment_organs
    (tmp_path / "export.json").write_text(json.dumps(graph))
    rows = rows_of(radiographs[:2]) + [{"id": "seed9", "radiograph": str(radiographs[0]), "seed": "9"}]
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "r.csv", rows)
    run = cli(pack_import_path, str(tmp_path / "export.json"), "--manifest", str(manifest), "--server",
              comfy_server.url, "--out", str(out), "--no-progress", "--batch-size", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    done = results(out)
    trails = [json.loads((out / r["output_dir"] / "export.json").read_text()) for r in done]
    assert all(t["graph"]["complete"] and "export.png" in json.loads(
        (out / r["output_dir"] / "row.json").read_text())["files"] for t, r in zip(trails, done, strict=True))
    assert [r["provenance_sha256"] for r in done] == [t["provenance_sha256"] for t in trails]
    assert done[0]["provenance_sha256"] == done[1]["provenance_sha256"] != done[2]["provenance_sha256"]

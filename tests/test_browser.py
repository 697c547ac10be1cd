"""The shipped workflows in the real ComfyUI frontend (the version ComfyUI pins), in a real headless Chromium.

For each UI workflow: load it as a dropped file is loaded (``app.loadGraphData``) and check that no dialog, toast or
frontend error appears; check that the frontend's own conversion (``app.graphToPrompt``) equals the API twin in
``workflows/api/``; shrink the run by editing widgets in the page (the changes ``small()`` of test_workflows.py makes,
at the shipped checkpoint name, which is linked to the tiny checkpoint); queue it as the Run button does and check
that the server ran exactly that and that every output node produced its outputs. Screenshots of the graph and of
the outputs go to the test's tmp dir (paths printed; ``pytest -s`` shows them), and to ``$CXR_SCREENSHOTS_DIR``
when set (``docs/images/frontend_*.png`` are made that way).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from host_fixtures import upload_shipped_inputs
from test_workflows import FOLDER, NAMES, by_type, load, small

from conftest import need
from cxr_counterfactual.runner.protocol import RunResult
from cxr_counterfactual.runner.server import ComfyServer
from cxr_counterfactual.testing.browser import SETTINGS, FrontendPage, missing_browser

pytestmark = pytest.mark.slow
SHIPPED_CHECKPOINT = "tiny-sd15.safetensors"  # the name every shipped workflow's loader holds


def chexmask_row(data_dir: Path) -> str:
    """An image id of the test CSV that the CheXmask workflow can decode (as test_workflows.py picks it)."""
    rows = data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"
    with rows.open(newline="") as f:
        return next(r["Image Index"] for r in csv.DictReader(f) if float(r["Dice RCA (Mean)"]) >= 0.7
                    and float(r["Height"] or 1024) == float(r["Width"] or 1024))


@pytest.fixture(scope="session", autouse=True)
def browser_present() -> None:
    """Checked before the session's server and checkpoint are built (autouse fixtures of a scope come first)."""
    reason = missing_browser()
    need(reason is None, str(reason))


@pytest.fixture(scope="module")
def server(comfy_server: ComfyServer, tiny_checkpoint: Path, data_dir: Path, chexmask_example: Path) -> ComfyServer:
    """The session's server with every input the shipped graphs name, and the settings a fresh user would change."""
    link = comfy_server.base_dir / "models" / "checkpoints" / SHIPPED_CHECKPOINT
    if not link.exists():
        link.symlink_to(tiny_checkpoint.resolve())
    upload_shipped_inputs(comfy_server, data_dir, chexmask_example)
    comfy_server._request("POST", "/settings", SETTINGS)
    return comfy_server


@pytest.fixture(scope="module")
def page(server: ComfyServer) -> Iterator[FrontendPage]:
    """One headless Chromium for the module (a fresh profile), reloaded by each test."""
    with FrontendPage(server.url, Path(tempfile.mkdtemp(prefix="cxr-chromium-"))) as browser_page:
        yield browser_page


def differences(frontend: dict, ours: dict) -> list[str]:
    """Per node id: what the frontend's conversion has that the twin does not (class, each input, title)."""
    lines = []
    for node_id in sorted(set(frontend) | set(ours), key=int):
        a, b = frontend.get(node_id), ours.get(node_id)
        if a is None or b is None:
            lines.append(f"node {node_id}: only in {'the twin' if a is None else 'the frontend'}")
            continue
        if a.get("class_type") != b.get("class_type"):
            lines.append(f"node {node_id}: class_type frontend {a.get('class_type')!r} vs twin {b.get('class_type')!r}")
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            if a["inputs"].get(name, "<absent>") != b["inputs"].get(name, "<absent>"):
                lines.append(f"node {node_id} ({b['class_type']}) input {name!r}: frontend "
                             f"{a['inputs'].get(name, '<absent>')!r} vs twin {b['inputs'].get(name, '<absent>')!r}")
        if a.get("_meta") != b.get("_meta"):
            lines.append(f"node {node_id}: _meta frontend {a.get('_meta')!r} vs twin {b.get('_meta')!r}")
    return lines


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_converts_and_runs_in_the_frontend(server, page, data_dir, name, tmp_path):
    page.open()
    # 1. Loading: no missing-node or missing-model dialog, no validation toast, no frontend error.
    problems = page.load_workflow(load(FOLDER / f"{name}.json"), name)
    assert problems == {"dialogs": [], "toasts": [], "errors": []}, problems
    graph_png = page.screenshot(tmp_path / f"{name}-graph.png")
    print(f"\n{name}: frontend {page.version}, graph screenshot {graph_png}")
    if page.startup_errors:  # the frontend's own, before any workflow is loaded: reported, not ours to fix
        print(f"{name}: errors while the frontend started: {page.startup_errors}")

    # 2. The frontend's conversion is the API twin, node by node (class, inputs, titles).
    twin = load(FOLDER / "api" / f"{name}.json")
    assert differences(page.graph_to_prompt(), twin) == []

    # 3. Shrink the run by editing widgets in the page, queue it as the Run button does.
    expected = small(copy.deepcopy(twin), SHIPPED_CHECKPOINT)
    for loader in by_type(expected, "CXRLoadCheXmask"):
        expected[loader]["inputs"]["image_id"] = chexmask_row(data_dir)  # the rows' own images are not test data
    page.set_widgets({node_id: {k: v for k, v in entry["inputs"].items() if twin[node_id]["inputs"][k] != v}
                      for node_id, entry in expected.items()})
    prompt_id = page.queue(timeout=780)

    # 4. The server ran what the frontend sent, and that is the shrunk twin; every output node has its outputs.
    entry = server.history(prompt_id)
    assert differences(entry["prompt"][2], expected) == []
    object_info = server.object_info()
    output_nodes = [k for k, v in expected.items() if object_info[v["class_type"]].get("output_node")]
    result = RunResult(prompt_id=prompt_id, outputs=entry["outputs"], folders=server.folders)
    missing = [k for k in output_nodes if not result.outputs.get(k)]
    assert not missing, f"output nodes without outputs: {missing}"
    with_images = [k for k in output_nodes if result.outputs[k].get("images")]
    assert with_images and all(p.is_file() for k in with_images for p in result.files(k)), result.outputs

    # 5. The page shows them: screenshot around the output nodes once their images are decoded.
    assert page.wait_for_images(with_images), "the frontend did not show every output image"
    outputs_png = page.screenshot(tmp_path / f"{name}-outputs.png", with_images)
    print(f"{name}: outputs screenshot {outputs_png}")
    if os.environ.get("CXR_SCREENSHOTS_DIR"):  # the README's frontend pictures come from here
        keep = Path(os.environ["CXR_SCREENSHOTS_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        for png in (graph_png, outputs_png):
            shutil.copyfile(png, keep / f"frontend_{png.name}")
    after = page.problems()
    assert not after["dialogs"] and not after["errors"], after
    assert json.dumps(entry["status"]["status_str"]) == '"success"', entry["status"]


def test_the_checks_see_a_broken_workflow(server, page):
    """The load check is not vacuous: a node type the server lacks opens the missing-nodes dialog, and the
    frontend's conversion then differs from the twin."""
    page.open()
    ui = load(FOLDER / "cxr_chexmask_edit.json")
    broken = next(n for n in ui["nodes"] if n["type"] == "CXRPasteKeepRegion")
    broken["type"] = "CXRNoSuchNode"
    problems = page.load_workflow(ui, "broken")
    assert any("CXRNoSuchNode" in d for d in problems["dialogs"]), problems
    diff = differences(page.graph_to_prompt(), load(FOLDER / "api" / "cxr_chexmask_edit.json"))
    assert any(f"node {broken['id']}:" in line for line in diff), diff

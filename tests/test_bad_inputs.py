"""Bad inputs through a real headless ComfyUI: every case of tests/bad_input_cases.py either stops with the pack's
clear error (node, input and fix; no tensor-shape trace), is refused by ComfyUI's own range check, or runs to a
finite, correctly shaped latent. None takes the server down, and a known-good graph queued after them gives
exactly the latent it gave before any bad case (no state leaked into the cached model, clip or masks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pydicom.data
import pytest
import torch
from api_graph import Graph
from bad_input_cases import CASES
from bad_input_files import CSV_ROWS, first_row_id, write_input_files
from bad_input_graphs import Bound, Case, Error, Works, pipeline
from safetensors.torch import load_file

from cxr_counterfactual.runner.protocol import ExecutionFailed, PromptRejected
from cxr_counterfactual.runner.server import ComfyServer

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

# What a message shows when a raw torch / Python error leaked through instead of the pack's own.
RAW_TRACE = ("size of tensor", "shape '[", "mat1 and mat2", "Sizes of tensors", "RuntimeError", "Traceback",
             "cannot convert float NaN", "out of range", "must match the size", "NoneType", "has no attribute",
             "KeyError", "not enough values", "expected input", "Expected ")
GOOD_EVERY = 8  # queue the known-good graph after every GOOD_EVERY cases


class Harness:
    """The session server with the cases' input files, and the known-good graph's reference latent."""

    def __init__(self, server: ComfyServer, checkpoint: str, row_id: str) -> None:
        self.server, self.checkpoint, self.row_id = server, checkpoint, row_id
        self.object_info = server.object_info()
        self.good_runs = 0
        self.reference = self.good_latent()  # before any bad case

    def graph(self, build) -> Graph:
        g = Graph(self.checkpoint, self.object_info, row_id=self.row_id)
        build(g)
        return g

    def good_latent(self) -> torch.Tensor:
        """The known-good graph (all stages, keep region, two steps), under a fresh image name each time, so
        ComfyUI's cache cannot answer it: every node from the image on runs again, on the cached model."""
        self.good_runs += 1
        name = f"bi_good_{self.good_runs}.jpg"
        self.server.upload_bytes(name, (self.server.folders["input"] / "bi_cxr.jpg").read_bytes())
        g = self.graph(lambda g: pipeline(g, gate={}, boost={}, capture={}, keep={}, steps=2, image=name))
        result = self.server.run(g.nodes, timeout=300)
        sampler = next(nid for nid, n in g.nodes.items() if n["class_type"] == "KSampler")
        assert sampler in result.executed and sampler not in result.cached, "the good graph came from the cache"
        (path,) = result.files(g.output, "latents")
        latent = load_file(str(path))["latent_tensor"]
        assert latent.shape == (1, 4, 8, 7) and torch.isfinite(latent).all()
        return latent

    def assert_still_good(self) -> None:
        assert self.server.is_running(), "the server died"
        latent = self.good_latent()
        assert torch.equal(latent, self.reference), (
            f"the known-good graph changed after bad inputs: max |diff| {float((latent - self.reference).abs().max())}")


@pytest.fixture(scope="module")
def harness(comfy_server, tiny_checkpoint, chexmask_example, data_dir) -> Iterator[Harness]:
    rows = data_dir / "cxr" / "chexmask-rows"
    write_input_files(comfy_server.upload_bytes, chexmask_example, rows, pydicom.data.get_testdata_file("RG1_UNCR.dcm"))
    yield Harness(comfy_server, tiny_checkpoint.name, first_row_id(rows / CSV_ROWS))
    # The NaN cases stay in the server's history, which ComfyUI serves as JSON with bare NaN: the frontend cannot
    # parse that (later browser tests on this server would see its error), so the history goes with the cases.
    comfy_server.clear_history()


def rejection_text(err: PromptRejected) -> dict[str, str]:
    """node id → every error message and detail ComfyUI's validation gave for it."""
    return {nid: " | ".join(f"{e.get('message', '')}: {e.get('details', '')}" for e in info.get("errors", []))
            for nid, info in err.node_errors.items()}


def assert_clear(text: str, expect: Error) -> None:
    assert expect.fix, "a case must say which fix its message gives"
    assert f"[{expect.node}]" in text, f"the node is not named: {text}"
    assert f"input '{expect.input}'" in text, f"the input is not named: {text}"
    assert "Fix:" in text and expect.fix in text.split("Fix:", 1)[1], f"no fix (or not the expected one): {text}"
    assert not any(raw in text for raw in RAW_TRACE), f"a raw trace leaked into the message: {text}"
    assert "\ufffd" not in text, f"undecodable bytes of a file leaked into the message: {text}"


def check(h: Harness, case: Case) -> str:
    """Run one case and check its expectation; returns a one-line outcome for the log."""
    g = h.graph(case.build)
    expect = case.expect
    assert case.node in {n["class_type"] for n in g.nodes.values()}, "the case's graph lacks its node"
    try:
        result = h.server.run(g.nodes, timeout=300)
    except PromptRejected as err:
        texts = rejection_text(err)
        assert not isinstance(expect, Works), f"refused, expected to work: {err}"
        assert not isinstance(expect, Error) or expect.stage == "validate", f"refused before running: {err}"
        nodes = [nid for nid, info in err.node_errors.items() if info.get("class_type") == case.node]
        assert nodes, f"another node was refused: {err}"
        if isinstance(expect, Bound):
            kinds = {e["type"] for e in err.node_errors[nodes[0]]["errors"]}
            assert kinds <= {"value_bigger_than_max", "value_smaller_than_min"}, err
            assert any(e["details"] == expect.input for e in err.node_errors[nodes[0]]["errors"]), err
            return f"refused by ComfyUI's range check: {texts[nodes[0]]}"
        assert_clear(texts[nodes[0]], expect)
        return texts[nodes[0]]
    except ExecutionFailed as err:
        assert isinstance(expect, Error) and expect.stage == "run", f"failed, expected {expect}: {err}\n{err.traceback}"
        assert err.exception_type.endswith("CXRInputError"), f"not the pack's error: {err}\n{err.traceback}"
        assert_clear(err.exception_message, expect)
        return err.exception_message
    assert isinstance(expect, Works), f"ran, expected {expect}"
    (path,) = result.files(g.output, "latents")
    latent = load_file(str(path))["latent_tensor"]
    assert tuple(latent.shape) == expect.shape, f"shape {tuple(latent.shape)}, expected {expect.shape}"
    assert torch.isfinite(latent).all(), "non-finite values in the output"
    return f"works: latent {tuple(latent.shape)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(harness: Harness, case: Case) -> None:
    outcome = check(harness, case)
    logger.info("%s → %s", case.id, outcome)  # the matrix's outcomes: pytest -o log_cli=true -o log_cli_level=INFO
    assert harness.server.is_running(), "the server died"
    if CASES.index(case) % GOOD_EVERY == GOOD_EVERY - 1:
        harness.assert_still_good()


def test_the_known_good_graph_still_runs_after_the_matrix(harness: Harness) -> None:
    harness.assert_still_good()


def test_the_matrix_covers_every_node_of_the_pack(comfy_server) -> None:
    pack = {name for name, info in comfy_server.object_info().items()
            if str(info.get("python_module", "")).endswith("cxr_counterfactual")}
    assert len(pack) >= 30, sorted(pack)
    assert pack <= {c.node for c in CASES}, f"nodes without a bad-input case: {sorted(pack - {c.node for c in CASES})}"
    assert len(CASES) >= 40


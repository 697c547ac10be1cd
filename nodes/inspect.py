"""Previews of captured attention, run after the sampler (they take its LATENT, which orders them after it)."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..attention.run_record import RunRecord
from ..attention.run_state import find_run
from ..errors import CXRInputError
from ..hosts.comfy.patch import result_store
from ..imaging.attention_view import labelled_grid, overlay_heat, share_plot
from .schema import CATEGORY_INSPECT, described

SLOTS = 3


def captured_run(title: str, slot: int, model, latent: dict) -> RunRecord:
    """The capture of the run that produced ``latent`` with ``model`` (never a stale run)."""
    return find_run(result_store(model), latent["samples"], "capture", source="model",
                    node=title, input_name=f"latent_{slot}", problem="this preview is wired to a run that captured "
                    "nothing", fix=f"Put CXR Capture Attention on model_{slot} and wire the LATENT of the sampler "
                    "that used it.")


class CXRAttentionPreview(io.ComfyNode):
    """Shows what each stage does to attention: per-word cross-attention maps over the radiograph (rows = runs, e.g.
    stock / gated / boosted from one graph; columns = words) and the pathology words' attention share inside the
    target per step. Reads the capture of exactly the run that produced each LATENT."""

    TITLE = "CXR Attention Preview"

    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs: list = [io.Image.Input("image", tooltip="The radiograph to draw on (the fitted image).")]
        for i in range(1, SLOTS + 1):
            opt = i > 1
            inputs += [
                io.Model.Input(f"model_{i}", optional=opt, tooltip=f"Run {i}: the model with CXR Capture Attention."),
                io.Latent.Input(f"latent_{i}", optional=opt, tooltip=f"Run {i}: that sampler's LATENT output."),
            ]
        return io.Schema(
            node_id="CXRAttentionPreview", display_name=cls.TITLE, category=CATEGORY_INSPECT, is_output_node=True,
            description=described(cls),
            inputs=inputs,
            outputs=[
                io.Image.Output(display_name="maps", tooltip="Rows of per-word attention maps, one row per run."),
                io.Image.Output(display_name="share_plot", tooltip="In-target pathology share per captured step."),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, **runs) -> io.NodeOutput:
        rows, labels, series, words = [], [], {}, None
        for i in range(1, SLOTS + 1):
            model, latent = runs.get(f"model_{i}"), runs.get(f"latent_{i}")
            if model is None and latent is None:
                continue
            if model is None or latent is None:
                raise CXRInputError("a run needs both its model and its LATENT.", node=cls.TITLE,
                                    input_name=f"model_{i}" if model is None else f"latent_{i}",
                                    fix="Connect both, or neither.")
            record = captured_run(cls.TITLE, i, model, latent)
            for label, capture in record.capture.items():
                maps, shares = capture.mean_maps()
                words = words or list(maps)
                rows.append([overlay_heat(image[0], maps[w]) if w in maps else image[0, ..., :3] for w in words])
                labels.append(label)
                if shares:
                    series[label] = shares
        grid = labelled_grid(rows, labels, words or [])[None]
        plot = share_plot(series)[None]
        return io.NodeOutput(grid, plot, ui=ui.PreviewImage(grid, cls=cls))


NODES: list[type[io.ComfyNode]] = [CXRAttentionPreview]

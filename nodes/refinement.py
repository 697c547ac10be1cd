"""The refinement nodes: CXR Refinement Sampler (a SAMPLER for SamplerCustom; the sampling itself is in
:mod:`..hosts.comfy.refinement_sampler`) and CXR Refinement Preview (energies per refined step, from the run's
record)."""

from __future__ import annotations

import comfy.samplers
import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw

from ..attention.organs import OrganMasks
from ..attention.refinement import RefineConfig, Refinement, parse_thresholds
from ..attention.run_record import RunRecord
from ..attention.run_state import find_run
from ..attention.stage_builders import GRID_FACTORS, check_window, parse_grid_factor, target_region
from ..attention.tokens import TokenMap
from ..errors import CXRInputError
from ..hosts.comfy.dit_refinement import energy_pass, is_dit
from ..hosts.comfy.dit_stages import check_stage_on_dit
from ..hosts.comfy.refinement_energy import TITLE
from ..hosts.comfy.refinement_sampler import RefinementSampler
from ..hosts.comfy.sampler_methods import METHODS, method_of
from ..imaging.attention_view import PLOT_COLOURS
from ..imaging.overlay import sized_font
from .common import check_inputs, user_errors
from .schema import CATEGORY_ATTENTION, CATEGORY_INSPECT, WINDOW_TIP, OrganMasksType, TokensType, described


def energy_plot(series: dict[str, list[float]], width: int = 640, height: int = 360) -> torch.Tensor:
    """A line plot of energies (0–1) per refined step, one line per series."""
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    x0, r, t, b, font = 56, width - 16, 28, height - 40, sized_font(13)
    draw.rectangle([x0, t, r, b], outline=(60, 60, 60))
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((8, b - v * (b - t) - 7), f"{v:.2f}", fill=(40, 40, 40), font=font)
    draw.text((x0, height - 22), "refined step (early to late)", fill=(40, 40, 40), font=font)
    draw.text((x0, 6), "attention-concentration energy (lower = more inside the target)", fill=(40, 40, 40), font=font)
    longest = max((len(v) for v in series.values()), default=1)
    for n, (name, values) in enumerate(series.items()):
        colour = PLOT_COLOURS[n % len(PLOT_COLOURS)]
        pts = [(x0 + (j + 0.5) * (r - x0) / longest, b - float(v) * (b - t)) for j, v in enumerate(values)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((r - 220, t + 6 + 16 * n), name, fill=colour, font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


class CXRRefinementSampler(io.ComfyNode):
    """A SAMPLER for SamplerCustom: your sampler (the optional 'sampler' input, e.g. KSamplerSelect's dpmpp_2m;
    Euler when empty) that, before each of its steps inside the early window, moves the latent down the gradient
    of an attention-concentration energy E = 1 − (pathology attention inside the target ÷ all pathology
    attention) (+ an optional extent term): a latent update in the manner of Attend-and-Excite, with our own
    energy and step rule. Once per step, however many model calls the sampler makes in it. 0 iterations = your
    sampler exactly. Multistep samplers (dpmpp_2m, lms, uni_pc, ...) restart their history after each refined
    step. Energies per step go to the run's record (see CXR Refinement Preview)."""

    TITLE = TITLE

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRRefinementSampler", display_name=TITLE, category=CATEGORY_ATTENTION, is_experimental=True,
            description=described(cls),
            inputs=[
                TokensType.Input("tokens", tooltip="From CXR Text Encode: the pathology words whose attention moves."),
                OrganMasksType.Input("organ_masks", tooltip="Fitted organ masks; the target is 'target_organs'."),
                io.String.Input("target_organs", default="left_lung", tooltip="Organs forming the target region."),
                io.Int.Input("iterations", default=1, min=0, max=50,
                             tooltip="Gradient steps on the latent per sampling step in the window (0 = the "
                             "sampler alone, bit-identical)."),
                io.Float.Input("step_size", default=0.1, min=0.0, max=5.0, step=0.005,
                               tooltip="Move per iteration: the latent shifts by step_size·σ (RMS over the cells "
                               "that may change: under a keep region, its edit region) along the normalised "
                               "gradient; kept cells do not move."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Refinement starts here." + WINDOW_TIP),
                io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Refinement ends here (A&E's code: the first 25 of 50 steps)." + WINDOW_TIP),
                io.String.Input("thresholds", default="",
                                tooltip="Optional early stop 'percent:energy, ...' (e.g. 0:0.95, 0.2:0.5, 0.4:0.2): "
                                "a step's iterations stop once the energy is at or below the value in force."),
                io.Combo.Input("grid_factor", options=list(GRID_FACTORS), default="4",
                               tooltip="Energy maps from the encoder layers whose grid is the latent ÷ this "
                               "(4 = A&E's attention_res 16 at 512 px). Smaller = finer grid but more weights copied. "
                               "A diffusion transformer (SD3/SD3.5, Flux) has one grid, its patch grid: use its "
                               "patch size (2); its energy reads the first half of its joint blocks."),
                io.Float.Input("smoothing", default=0.5, min=0.0, max=3.0, step=0.05,
                               tooltip="Gaussian σ (in cells) applied to the maps (A&E's code: 0.5; 0 = none)."),
                io.Float.Input("extent_weight", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Weight of the extent term (map area above the threshold vs target area)."),
                io.Float.Input("extent_threshold", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Level of the max-normalised map that counts as covered (extent term)."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the checkpoint the sampler will run (the loader's MODEL or any "
                               "patched copy). Connected, this node refuses a grid_factor the UNet has no "
                               "cross-attention at (on a diffusion transformer: other than its patch size) as soon "
                               "as it runs, before any sampler or inversion starts."),
                io.Sampler.Input("sampler", optional=True,
                                 tooltip="Optional: the sampler to refine (KSamplerSelect, or SamplerEulerAncestral, "
                                 "SamplerDPMPP_2M_SDE, SamplerDPMPP_SDE, SamplerLMS with their settings). Empty = "
                                 "euler. Supported: " + ", ".join(METHODS) + ". Multistep samplers restart their "
                                 "history after each refined step (first-order steps inside the window)."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="Connect to SamplerCustom's sampler input.")],
        )

    @classmethod
    def execute(cls, tokens: TokenMap, organ_masks: OrganMasks, target_organs: str, iterations: int,
                step_size: float, start_percent: float, end_percent: float, thresholds: str, grid_factor: str,
                smoothing: float, extent_weight: float, extent_threshold: float, model=None,
                sampler=None) -> io.NodeOutput:
        with user_errors(TITLE):
            factor = parse_grid_factor(grid_factor)
        method = METHODS["euler"] if sampler is None else method_of(sampler, TITLE)
        check_inputs(cls, step_size=step_size, start_percent=start_percent, end_percent=end_percent,
                     smoothing=smoothing, extent_weight=extent_weight, extent_threshold=extent_threshold)
        with user_errors(TITLE):
            check_window(start_percent, end_percent)
        if not tokens.pathology:
            raise CXRInputError("the token map has no pathology word.", node=TITLE, input_name="tokens",
                                fix="List pathology words in CXR Text Encode (e.g. effusion).")
        with user_errors(TITLE, "tokens"):
            positions = {w: tokens.indices(w) for w in tokens.pathology}
        with user_errors(TITLE, "thresholds"):
            stops = parse_thresholds(thresholds)
        if model is not None:  # the sampler checks its model again when sampling starts (same rule)
            dm = model.get_model_object("diffusion_model")
            with user_errors(TITLE, "model"):  # neither a UNet nor a supported diffusion transformer
                dit = is_dit(dm)
            if dit:  # its patch grid, and a token map made for its context
                check_stage_on_dit(dm, TITLE, tokens=tokens, grid_factor=factor)
            energy_pass(dm).energy_keys(dm, factor)
        with user_errors(TITLE):
            target = target_region(organ_masks, target_organs)
        config = RefineConfig(iterations, step_size, start_percent, end_percent, stops, smoothing, extent_weight,
                              extent_threshold)
        options = {} if sampler is None else dict(sampler.extra_options)
        fn = RefinementSampler(Refinement(config, target, positions, tokens.cond_len, factor), method, options)
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn, {}, dict(method.inpaint_options)))


class CXRRefinementPreview(io.ComfyNode):
    """Plots the refinement energy per refined step: before and after each step's gradient iterations, and
    optionally a reference run (e.g. the same sampler at 0 iterations = unrefined). Reads the record of exactly the
    run that produced each LATENT."""

    TITLE = "CXR Refinement Preview"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRRefinementPreview", display_name=cls.TITLE, category=CATEGORY_INSPECT,
            is_output_node=True,
            description=described(cls),
            inputs=[
                io.Sampler.Input("sampler", tooltip="The CXR Refinement Sampler of the refined run."),
                io.Latent.Input("latent", tooltip="That run's LATENT (SamplerCustom's output)."),
                io.Sampler.Input("reference_sampler", optional=True,
                                 tooltip="A CXR Refinement Sampler of a reference run (e.g. iterations 0)."),
                io.Latent.Input("reference_latent", optional=True, tooltip="The reference run's LATENT."),
            ],
            outputs=[io.Image.Output(display_name="energy_plot", tooltip="Energy per refined step, per series.")],
        )

    @classmethod
    def _record(cls, sampler, latent, name: str) -> RunRecord:
        fn = getattr(sampler, "sampler_function", None)
        return find_run(fn.store if isinstance(fn, RefinementSampler) else None, latent["samples"], "refine",
                        source="sampler", node=cls.TITLE, input_name=name,
                        problem="no refinement record for this LATENT",
                        fix="Wire the CXR Refinement Sampler and the LATENT of the SamplerCustom that used it.")

    @classmethod
    def execute(cls, sampler, latent, reference_sampler=None, reference_latent=None) -> io.NodeOutput:
        steps = cls._record(sampler, latent, "latent").refine or []
        series = {"refined: before step": [s.before for s in steps], "refined: after step": [s.after for s in steps]}
        if reference_sampler is not None and reference_latent is not None:
            reference = cls._record(reference_sampler, reference_latent, "reference_latent").refine or []
            series["reference"] = [s.before for s in reference]
        plot = energy_plot(series)[None]
        return io.NodeOutput(plot, ui=ui.PreviewImage(plot, cls=cls))


NODES: list[type[io.ComfyNode]] = [CXRRefinementSampler, CXRRefinementPreview]

"""Pathology-token boosting and attention capture: two MODEL patch nodes."""

from __future__ import annotations

import re

import torch
from comfy_api.latest import io

from ..attention.organs import OrganMasks, parse_names
from ..attention.stages import BoostStage, CaptureStage
from ..attention.tokens import TokenMap
from ..errors import CXRInputError
from ..hosts.comfy.patch import install_stage, percent_window
from ..hosts.comfy.unet_layout import grid_factor_keys, transformer_keys
from .common import check_inputs, user_errors
from .schema import (
    BLOCK_CHOICES,
    CATEGORY_ATTENTION,
    GRID_FACTORS,
    TokensType,
    described,
    fraction_input,
    organ_masks_input,
    patched_model_output,
    target_organs_input,
    window_inputs,
)

FACTOR_MAX = 50.0


def _target(title: str, organ_masks: OrganMasks | None, organs: str, mask: torch.Tensor | None) -> OrganMasks:
    """The one-region target: a MASK when connected, else the union of organs from ORGAN_MASKS."""
    if mask is not None:
        batch = mask.reshape(-1, *mask.shape[-2:]).float().cpu()
        if batch.shape[0] != 1:
            raise CXRInputError(f"got a batch of {batch.shape[0]} target masks; the target is one region.",
                                node=title, input_name="target_mask",
                                fix="Connect one mask (e.g. pick one with a batch-select node).")
        m = batch[0]
        if not bool(torch.isfinite(m).all()):
            raise CXRInputError("the target mask contains NaN or infinite values.", node=title,
                                input_name="target_mask",
                                fix="Fix the node that made the MASK (values must be 0 to 1).")
        if float(m.max()) <= 0:
            raise CXRInputError("the target mask is empty.", node=title, input_name="target_mask",
                                fix="Connect a mask that marks the target region (1 = inside).")
        return OrganMasks(("target",), m.clamp(0, 1)[None])
    if organ_masks is None:
        raise CXRInputError("no target region.", node=title, input_name="organ_masks",
                            fix="Connect the fitted organ masks (and name target organs) or a target MASK.")
    with user_errors(title, "target_organs"):
        return OrganMasks(("target",), organ_masks.union(parse_names(organs))[None])


def _factors(title: str, spec: str, tokens: TokenMap, default: float) -> dict[str, float]:
    """``"effusion=3, consolidation"`` → per-word factors; empty = every pathology word at ``default``."""
    words: dict[str, float] = {}
    for part in re.split(r"[,;\n]+", spec):
        if not part.strip():
            continue
        word, _, value = part.partition("=")
        try:
            words[word.strip()] = float(value) if value.strip() else default
        except ValueError:
            raise CXRInputError(f"'{value.strip()}' is not a number.", node=title, input_name="words",
                                fix="Write word=factor, e.g. effusion=3.") from None
    if not words:
        words = {w: default for w in tokens.pathology}
    if not words:
        raise CXRInputError("no pathology word to boost.", node=title, input_name="words",
                            fix="List pathology words in CXR Text Encode (e.g. effusion).")
    for w, f in words.items():
        if not 0 < f <= FACTOR_MAX:  # also refuses NaN and infinity, which would make every share NaN
            raise CXRInputError(f"factor {f} for '{w}' is not a number above 0 and at most {FACTOR_MAX:g}.",
                                node=title, input_name="words",
                                fix=f"Use a factor above 0 and at most {FACTOR_MAX:g} (1 = unchanged, 2–5 = boost).")
    return words


def _window(title: str, model, start: float, end: float) -> tuple[float, float]:
    if start > end:
        raise CXRInputError(f"start {start} is after end {end}.", node=title, input_name="start_percent",
                            fix="Use start_percent ≤ end_percent.")
    with user_errors(title, "model"):
        transformer_keys(model)
    return percent_window(model, start, end)


class CXRPathologyBoost(io.ComfyNode):
    """Stage 3 of the method: strengthens the cross-attention of pathology words ('effusion') inside the target
    region (e.g. the left lung) during early denoising, and optionally damps them outside, so the lesion appears
    where asked. A query's pathology share P becomes fP / (fP + 1 − P). Composes with the gate in either order."""

    TITLE = "CXR Pathology Boost"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRPathologyBoost", display_name=cls.TITLE, category=CATEGORY_ATTENTION, is_experimental=True,
            description=described(cls),
            inputs=[
                io.Model.Input("model", tooltip="The model (plain or already gated)."),
                TokensType.Input("tokens", tooltip="From CXR Text Encode: where the pathology words sit."),
                organ_masks_input("Fitted organ masks; the target is the union of 'target_organs'.", optional=True),
                target_organs_input(),
                io.Mask.Input("target_mask", optional=True,
                              tooltip="A target MASK on the latent's field of view (overrides target_organs)."),
                io.Float.Input("factor", default=3.0, min=0.05, max=FACTOR_MAX, step=0.05,
                               tooltip="Boost inside the target (1 = no change)."),
                io.String.Input("words", default="",
                                tooltip="Per-word factors 'effusion=3, consolidation=2'; empty = every pathology "
                                "word of the token map at 'factor'."),
                fraction_input("outside_damping", 1.0,
                               "Multiplier for the same words outside the target (1 = leave, 0 = hide)."),
                io.Combo.Input("blocks", options=list(BLOCK_CHOICES), default="all",
                               tooltip="Which UNet parts are boosted."),
                *window_inputs("Boosting starts here.",
                               "Boosting ends here (default: the early, layout-forming steps).", end=0.4),
            ],
            outputs=[patched_model_output()],
        )

    @classmethod
    def execute(cls, model, tokens: TokenMap, target_organs: str, factor: float, words: str,
                outside_damping: float, blocks: str, start_percent: float, end_percent: float,
                organ_masks: OrganMasks | None = None, target_mask: torch.Tensor | None = None) -> io.NodeOutput:
        check_inputs(cls, blocks=blocks, factor=factor, outside_damping=outside_damping, start_percent=start_percent,
                     end_percent=end_percent)
        factors = _factors(cls.TITLE, words, tokens, factor)
        if all(f == 1.0 for f in factors.values()) and outside_damping == 1.0:
            return io.NodeOutput(model)  # nothing to do: exactly the unpatched model
        with user_errors(cls.TITLE, "words"):
            positions = {w: tokens.indices(w) for w in factors}
        target = _target(cls.TITLE, organ_masks, target_organs, target_mask)
        sigma_start, sigma_end = _window(cls.TITLE, model, start_percent, end_percent)
        stage = BoostStage(cls.TITLE, sigma_start, sigma_end, frozenset(BLOCK_CHOICES[blocks]),
                           target=target, positions=positions, factors=factors, damping=outside_damping,
                           cond_len=tokens.cond_len)
        return io.NodeOutput(install_stage(model, stage, ["attn2"]))


class CXRCaptureAttention(io.ComfyNode):
    """Records, while the sampler runs, each word's cross-attention map (mean over heads and over the layers at one
    resolution) and the pathology words' attention share inside the target, per step. Never changes the result. It
    records the maps with every CXR stage of the sampled model applied, wherever it sits among gate and boost; view
    it with CXR Attention Preview wired to the sampler's LATENT."""

    TITLE = "CXR Capture Attention"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRCaptureAttention", display_name=cls.TITLE, category=CATEGORY_ATTENTION,
            description=described(cls),
            inputs=[
                io.Model.Input("model", tooltip="The model to observe (stock, gated or boosted)."),
                TokensType.Input("tokens", tooltip="From CXR Text Encode: the words to map."),
                io.String.Input("label", default="run", tooltip="A name for this capture (shown in previews)."),
                io.Combo.Input("grid_factor", options=list(GRID_FACTORS), default="2",
                               tooltip="Capture the layers whose grid is the latent's size ÷ this (2 = half)."),
                organ_masks_input("Fitted organ masks, for the in-target share.", optional=True),
                target_organs_input(),
                *window_inputs("Capture from here.", "Capture until here."),
            ],
            outputs=[patched_model_output("The model with capture on (same output).")],
        )

    @classmethod
    def execute(cls, model, tokens: TokenMap, label: str, grid_factor: str, target_organs: str,
                start_percent: float, end_percent: float, organ_masks: OrganMasks | None = None) -> io.NodeOutput:
        check_inputs(cls, grid_factor=grid_factor, start_percent=start_percent, end_percent=end_percent)
        positions = dict(tokens.positions)
        if not positions:
            raise CXRInputError("the token map has no words.", node=cls.TITLE, input_name="tokens",
                                fix="List anatomy or pathology words in CXR Text Encode.")
        target = _target(cls.TITLE, organ_masks, target_organs, None) if organ_masks is not None else None
        sigma_start, sigma_end = _window(cls.TITLE, model, start_percent, end_percent)
        # A grid without cross-attention would capture nothing, found out only by the previews after sampling.
        grid_factor_keys(model.get_model_object("diffusion_model"), int(grid_factor), cls.TITLE)
        stage = CaptureStage(cls.TITLE, sigma_start, sigma_end, frozenset(("input", "middle", "output")),
                             label=label or "run", positions=positions, pathology=tuple(tokens.pathology),
                             grid_factor=int(grid_factor), target=target, cond_len=tokens.cond_len)
        return io.NodeOutput(install_stage(model, stage, ["attn2"]))


NODES: list[type[io.ComfyNode]] = [CXRPathologyBoost, CXRCaptureAttention]

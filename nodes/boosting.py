"""Pathology-token boosting and attention capture: two MODEL patch nodes."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.organs import OrganMasks
from ..attention.stage_builders import (
    BLOCK_CHOICES,
    FACTOR_MAX,
    FACTOR_MIN,
    GRID_FACTORS,
    boost_stage,
    capture_stage,
    target_region,
)
from ..attention.tokens import TokenMap
from ..hosts.comfy.dit_stages import check_model, check_stage_on_dit
from ..hosts.comfy.patch import install_stage, percent_to_sigma
from ..hosts.comfy.unet_layout import grid_factor_keys
from . import schema  # attention nodes read the shared declarations as schema.X
from .common import check_inputs, user_errors


class CXRPathologyBoost(io.ComfyNode):
    """Stage 3 of the pack: strengthens the cross-attention of pathology words ('effusion') inside the target
    region (e.g. the left lung) during early denoising, and optionally damps them outside, so the lesion appears
    where asked. A query's pathology share P becomes fP / (fP + 1 − P). Composes with the gate in either order. On
    SD3/SD3.5 and Flux diffusion transformers it acts on each block's image→text attention (P is then the share of
    the joint softmax over text and image keys)."""

    TITLE = "CXR Pathology Boost"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRPathologyBoost", display_name=cls.TITLE, category=schema.CATEGORY_ATTENTION,
            is_experimental=True,
            description=schema.described(cls),
            inputs=[
                io.Model.Input("model", tooltip="The model (plain or already gated)."),
                schema.TokensType.Input("tokens", tooltip="From CXR Text Encode: where the pathology words sit."),
                schema.organ_masks_input("Fitted organ masks; the target is the union of 'target_organs'.",
                                         optional=True),
                schema.target_organs_input(),
                io.Mask.Input("target_mask", optional=True,
                              tooltip="A target MASK on the latent's field of view (overrides target_organs)."),
                io.Float.Input("factor", default=3.0, min=FACTOR_MIN, max=FACTOR_MAX, step=0.05,
                               tooltip="Boost inside the target (1 = no change)."),
                io.String.Input("words", default="",
                                tooltip="Per-word factors 'effusion=3, consolidation=2'; empty = every pathology "
                                "word of the token map at 'factor'. A word means every occurrence in the prompt; "
                                "'effusion#1=3' only the 1st (counted in prompt order). Two boost nodes chain: "
                                "their biases add where both act, so each can boost its own word in its own "
                                "target."),
                schema.fraction_input("outside_damping", 1.0,
                               "Multiplier for the same words outside the target (1 = leave, 0 = hide)."),
                io.Combo.Input("blocks", options=list(BLOCK_CHOICES), default="all",
                               tooltip="Which UNet parts are boosted ('all' on a diffusion transformer)."),
                *schema.window_inputs("Boosting starts here.",
                               "Boosting ends here (default: the early, layout-forming steps).", end=0.4),
            ],
            outputs=[schema.patched_model_output()],
        )

    @classmethod
    def execute(cls, model, tokens: TokenMap, target_organs: str, factor: float, words: str,
                outside_damping: float, blocks: str, start_percent: float, end_percent: float,
                organ_masks: OrganMasks | None = None, target_mask: torch.Tensor | None = None) -> io.NodeOutput:
        check_inputs(cls, factor=factor, outside_damping=outside_damping, start_percent=start_percent,
                     end_percent=end_percent)
        check_model(model, cls.TITLE, blocks=blocks, tokens=tokens)
        with user_errors(cls.TITLE):
            connected = organ_masks is not None or target_mask is not None
            target = target_region(organ_masks, target_organs, target_mask) if connected else None
            stage = boost_stage(tokens, target, percent_to_sigma(model), factor=factor, words=words,
                                outside_damping=outside_damping, blocks=blocks, start_percent=start_percent,
                                end_percent=end_percent, title=cls.TITLE)
        if stage.neutral:
            return io.NodeOutput(model)  # nothing to do: exactly the unpatched model
        return io.NodeOutput(install_stage(model, stage))


class CXRCaptureAttention(io.ComfyNode):
    """Records, while the sampler runs, each word's cross-attention map (mean over heads and over the layers at one
    resolution) and the pathology words' attention share inside the target, per step. Never changes the result. It
    records the maps with every CXR stage of the sampled model applied, wherever it sits among gate and boost; view
    it with CXR Attention Preview wired to the sampler's LATENT. On a diffusion transformer it records every block's
    image→text attention at the patch grid (grid_factor = the patch size, 2)."""

    TITLE = "CXR Capture Attention"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRCaptureAttention", display_name=cls.TITLE, category=schema.CATEGORY_ATTENTION,
            description=schema.described(cls),
            inputs=[
                io.Model.Input("model", tooltip="The model to observe (stock, gated or boosted)."),
                schema.TokensType.Input("tokens", tooltip="From CXR Text Encode: the words to map."),
                io.String.Input("label", default="run", tooltip="A name for this capture (shown in previews)."),
                io.Combo.Input("grid_factor", options=list(GRID_FACTORS), default="2",
                               tooltip="Capture the layers whose grid is the latent's size ÷ this (2 = half)."),
                schema.organ_masks_input("Fitted organ masks, for the in-target share.", optional=True),
                schema.target_organs_input(),
                *schema.window_inputs("Capture from here.", "Capture until here."),
            ],
            outputs=[schema.patched_model_output("The model with capture on (same output).")],
        )

    @classmethod
    def execute(cls, model, tokens: TokenMap, label: str, grid_factor: str, target_organs: str,
                start_percent: float, end_percent: float, organ_masks: OrganMasks | None = None) -> io.NodeOutput:
        check_inputs(cls, start_percent=start_percent, end_percent=end_percent)
        dit = check_model(model, cls.TITLE, tokens=tokens)
        with user_errors(cls.TITLE):
            target = target_region(organ_masks, target_organs) if organ_masks is not None else None
            stage = capture_stage(tokens, percent_to_sigma(model), label=label, grid_factor=grid_factor,
                                  target=target, start_percent=start_percent, end_percent=end_percent,
                                  title=cls.TITLE)
        # A grid without cross-attention would capture nothing, found out only by the previews after sampling.
        if dit is None:
            grid_factor_keys(model.get_model_object("diffusion_model"), stage.grid_factor, cls.TITLE)
        else:
            check_stage_on_dit(dit, cls.TITLE, tokens=tokens, grid_factor=stage.grid_factor)
        return io.NodeOutput(install_stage(model, stage))


NODES: list[type[io.ComfyNode]] = [CXRPathologyBoost, CXRCaptureAttention]

"""The anatomy-aware attention gate: organ-confined self-attention and anatomy-token cross-attention."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.organs import OrganMasks, parse_names
from ..attention.stages import GateStage
from ..attention.tokens import TokenMap
from ..errors import CXRInputError
from ..hosts.comfy.patch import install_stage, percent_window
from ..hosts.comfy.unet_layout import transformer_keys
from .common import check_inputs, user_errors
from .schema import (
    BACKGROUNDS,
    BLOCK_CHOICES,
    CATEGORY_ATTENTION,
    TokensType,
    described,
    fraction_input,
    organ_masks_input,
    patched_model_output,
    window_inputs,
)


class CXRAnatomyAttentionGate(io.ComfyNode):
    """Stage 2 of the method: keeps each organ's structure to itself. Self-attention of every UNet transformer block
    is confined to the organ a token belongs to (strength 1: hard; less: other regions leak in with weight 1 −
    strength), and anatomy words of the prompt ('left lung', 'heart') are hidden from image tokens outside their
    organ. Returns a patched copy of the model; composes with other attention patches applied before it."""

    TITLE = "CXR Anatomy Attention Gate"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRAnatomyAttentionGate",
            display_name=cls.TITLE,
            category=CATEGORY_ATTENTION,
            is_experimental=True,
            description=described(cls),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x / SD2.x / SDXL UNet)."),
                organ_masks_input("Organ masks on the latent's field of view: use the masks output of Fit Radiograph "
                                  "to Model."),
                TokensType.Input(
                    "tokens", optional=True,
                    tooltip="From CXR Text Encode: enables anatomy-token masking in cross-attention.",
                ),
                fraction_input("strength", 1.0, "Self-attention gating: 1 = each token attends only to its own "
                               "organ (hard, and faster than stock); 0 = off. Cross-organ weights are scaled by 1 − "
                               "strength."),
                fraction_input("token_strength", 1.0, "Anatomy-token masking: 1 = tokens outside an anatomy word's "
                               "organ do not see that word; 0 = off. Needs 'tokens'."),
                io.String.Input(
                    "organs", default="right_lung, left_lung, heart",
                    tooltip="Organs that form regions, in priority order (a token covered by two organs goes "
                    "to the one covering more of it, ties to the first listed). Everything else is background.",
                ),
                io.Combo.Input(
                    "background", options=list(BACKGROUNDS), default="free",
                    tooltip="free: background tokens attend to everything (stock); confined: background is one "
                    "more region.",
                ),
                io.Int.Input(
                    "margin_px", default=0, min=0, max=256,
                    tooltip="Grow each organ by this many pixels of the masks' grid before labelling tokens.",
                ),
                io.Combo.Input(
                    "blocks", options=list(BLOCK_CHOICES), default="all",
                    tooltip="Which UNet parts are gated (every transformer block in them).",
                ),
                *window_inputs("Gating starts at this point of denoising.", "Gating ends at this point of denoising."),
                io.Boolean.Input(
                    "apply_to_uncond", default=False,
                    tooltip="Also gate the negative (uncond) pass's self-attention. Token masking always acts "
                    "on the positive prompt only.",
                ),
            ],
            outputs=[patched_model_output()],
        )

    @classmethod
    def execute(
        cls,
        model,
        organ_masks: OrganMasks,
        strength: float,
        token_strength: float,
        organs: str,
        background: str,
        margin_px: int,
        blocks: str,
        start_percent: float,
        end_percent: float,
        apply_to_uncond: bool,
        tokens: TokenMap | None = None,
    ) -> io.NodeOutput:
        check_inputs(cls, background=background, blocks=blocks)
        for name, value in (("strength", strength), ("token_strength", token_strength)):
            if not 0.0 <= value <= 1.0:
                raise CXRInputError(f"{value} is outside [0, 1].", node=cls.TITLE, input_name=name,
                                    fix="Use 0 (off) to 1 (hard).")
        check_inputs(cls, start_percent=start_percent, end_percent=end_percent)
        if start_percent > end_percent:
            raise CXRInputError(f"start {start_percent} is after end {end_percent}.", node=cls.TITLE,
                                input_name="start_percent", fix="Use start_percent ≤ end_percent.")
        with user_errors(cls.TITLE, "model"):
            transformer_keys(model)
        with user_errors(cls.TITLE, "organs"):
            names = tuple(parse_names(organs))
            organ_masks.select(names)
        token_words = cls._token_words(organ_masks, tokens) if tokens is not None and token_strength > 0 else ()
        if strength == 0.0 and not token_words:
            return io.NodeOutput(model)  # nothing to do: exactly the unpatched model
        sigma_start, sigma_end = percent_window(model, start_percent, end_percent)
        stage = GateStage(
            title=cls.TITLE, masks=organ_masks, organs=names, self_leak=1.0 - strength,
            token_leak=1.0 - token_strength, background=background, margin_px=margin_px,
            sigma_start=sigma_start, sigma_end=sigma_end, blocks=frozenset(BLOCK_CHOICES[blocks]),
            apply_to_uncond=apply_to_uncond, cond_len=tokens.cond_len if tokens else 77, token_words=token_words,
        )
        kinds = [k for k, on in (("attn1", strength > 0), ("attn2", bool(token_words))) if on]
        return io.NodeOutput(install_stage(model, stage, kinds))

    @classmethod
    def _token_words(cls, masks: OrganMasks, tokens: TokenMap):
        words = []
        for word, organs in tokens.anatomy.items():
            missing = [o for o in organs if o not in masks]
            if missing:
                raise CXRInputError(
                    f"the anatomy word '{word}' is tied to {', '.join(missing)}, which the organ masks lack "
                    f"(present: {', '.join(masks.names)}).",
                    node=cls.TITLE, input_name="tokens",
                    fix="Tie the word to a present organ in CXR Text Encode (e.g. 'lungs=right_lung+left_lung').",
                )
            words.append((tokens.indices(word), organs))
        return tuple(words)


NODES: list[type[io.ComfyNode]] = [CXRAnatomyAttentionGate]

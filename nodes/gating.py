"""The anatomy-aware attention gate: organ-confined self-attention and anatomy-token cross-attention."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.gating import BACKGROUNDS, ISOLATIONS
from ..attention.organs import OrganMasks
from ..attention.stage_builders import BLOCK_CHOICES, GATE_APPLY_TO_UNCOND, MARGIN_MAX, gate_stage
from ..attention.tokens import TokenMap
from ..hosts.comfy.dit_stages import check_model
from ..hosts.comfy.patch import install_stage, percent_to_sigma
from ..hosts.comfy.prompt_isolation import projector
from . import schema  # attention nodes read the shared declarations as schema.X
from .common import check_inputs, user_errors


class CXRAnatomyAttentionGate(io.ComfyNode):
    """Stage 2 of the pack: keeps each organ's structure to itself. Self-attention of every UNet transformer block
    is confined to the organ a token belongs to (strength 1: hard; less: other regions leak in with weight 1 −
    strength), and anatomy words of the prompt ('left lung', 'heart') are hidden from image tokens outside their
    organ. On SD3/SD3.5 and Flux diffusion transformers the same acts on each block's joint attention: image→image
    confined, image→text hidden; text tokens attend as stock, so isolation is exact within a block and the text
    stream links regions across blocks. Returns a patched copy of the model; composes with other attention patches
    applied before it."""

    TITLE = "CXR Anatomy Attention Gate"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRAnatomyAttentionGate",
            display_name=cls.TITLE,
            category=schema.CATEGORY_ATTENTION,
            is_experimental=True,
            description=schema.described(cls),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model: an SD1.x / SD2.x / SDXL UNet, or an SD3/SD3.5 or "
                               "Flux diffusion transformer."),
                schema.organ_masks_input("Organ masks on the latent's field of view: use the masks output of Fit "
                                         "Radiograph to Model."),
                schema.TokensType.Input(
                    "tokens", optional=True,
                    tooltip="From CXR Text Encode: enables anatomy-token masking in cross-attention.",
                ),
                schema.fraction_input("strength", 1.0, "Self-attention gating: 1 = each token attends only to its own "
                               "organ (hard, and faster than stock); 0 = off. Cross-organ weights are scaled by 1 − "
                               "strength."),
                schema.fraction_input("token_strength", 1.0, "Anatomy-token masking: 1 = tokens outside an anatomy "
                                      "word's organ do not see that word; 0 = off. Needs 'tokens'."),
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
                    "margin_px", default=0, min=0, max=MARGIN_MAX,
                    tooltip="Grow each organ by this many pixels of the masks' grid before labelling tokens.",
                ),
                io.Combo.Input(
                    "blocks", options=list(BLOCK_CHOICES), default="all",
                    tooltip="Which UNet parts are gated (every transformer block in them). A diffusion transformer "
                    "takes 'all' (every block).",
                ),
                *schema.window_inputs("Gating starts at this point of denoising.",
                                      "Gating ends at this point of denoising."),
                io.Boolean.Input(
                    "apply_to_uncond", default=GATE_APPLY_TO_UNCOND,
                    tooltip="Also gate the negative (uncond) pass's self-attention (default on: off, CFG "
                    "multiplies the gate's change by cfg; README, 'Defaults for the negative prompt's pass'). "
                    "Token masking always acts on the positive prompt only.",
                ),
                io.Combo.Input(
                    "anatomy_isolation", options=list(ISOLATIONS), default="tokens",
                    tooltip="tokens: hide an anatomy word's own tokens from image tokens outside its organ (CLIP has "
                    "already mixed the word into later tokens, which they still see). prompt: those image tokens "
                    "attend over the prompt encoded without the word: nothing of it reaches them. Costs one more "
                    "text encode per subset of anatomy words (3 for two words) and, in every gated layer, the "
                    "outside tokens' attention again over those prompts. Needs token_strength 1.",
                ),
            ],
            outputs=[schema.patched_model_output()],
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
        anatomy_isolation: str = "tokens",
    ) -> io.NodeOutput:
        check_inputs(cls, start_percent=start_percent, end_percent=end_percent)
        # an unsupported model first: it has no noise range to turn percents into
        check_model(model, cls.TITLE, blocks=blocks, tokens=tokens, isolation=anatomy_isolation)
        with user_errors(cls.TITLE):
            stage = gate_stage(organ_masks, percent_to_sigma(model), tokens=tokens, strength=strength,
                               token_strength=token_strength, organs=organs, background=background,
                               margin_px=margin_px, blocks=blocks, start_percent=start_percent,
                               end_percent=end_percent, apply_to_uncond=apply_to_uncond, title=cls.TITLE,
                               anatomy_isolation=anatomy_isolation, project=projector(model))
        if stage.neutral:
            return io.NodeOutput(model)  # nothing to do: exactly the unpatched model
        return io.NodeOutput(install_stage(model, stage))


NODES: list[type[io.ComfyNode]] = [CXRAnatomyAttentionGate]

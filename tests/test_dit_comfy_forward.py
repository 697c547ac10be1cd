"""The DiT glue sketch inside ComfyUI's real MMDiT and Flux forwards (tiny random models, CPU, in-process).

Checks what the glue rests on (``docs/dit-progress.md``): a block replace's copy of ``transformer_options`` reaches
every attention call of the block, the override sees the joint call as text + patch-grid tokens (odd latents padded
to ``ceil(n / 2)`` tokens a side) and MMDiT-X's image-only call as the grid's tokens, and with nothing to regulate
the model's output is bit-identical to stock.
"""

from __future__ import annotations

import sys

import pytest
import torch

from cxr_counterfactual.attention.joint import JointGate
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.patch_grid import patch_fit, patch_grid
from cxr_counterfactual.attention.regions import partition
from cxr_counterfactual.hosts.comfy.dit import TEXT_KEY, dit_family, install, uniform

LATENT, TEXT = (9, 7), 6
GRID = patch_grid(LATENT, 2)


@pytest.fixture(scope="module")
def comfy_dit(comfyui_path):
    """ComfyUI's DiT modules, imported on the CPU (no nodes, no server)."""
    if str(comfyui_path) not in sys.path:
        sys.path.insert(0, str(comfyui_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
    import comfy.ldm.flux.model as flux
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops

    return mmdit, flux, comfy.ops.disable_weight_init


def initialised(model: torch.nn.Module) -> torch.nn.Module:
    """ComfyUI's ops skip weight init: seeded small weights instead of NaN."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tiny(comfy_dit, family: str):
    mmdit, flux, ops = comfy_dit
    if family == "mmdit":
        model = mmdit.OpenAISignatureMMDITWrapper(
            patch_size=2, in_channels=4, depth=2, context_embedder_config={
                "target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 128}},
            x_block_self_attn_layers=[1], operations=ops)
        return initialised(model), 2, 0
    model = flux.Flux(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=16, hidden_size=64, mlp_ratio=2.0,
                      num_heads=2, depth=2, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
                      qkv_bias=True, guidance_embed=False, operations=ops)
    return initialised(model), 2, 1


def options_of(blocks: int, singles: int, plan) -> dict:
    """Our patches on empty options, and the context length tag_text_length (APPLY_MODEL) would add."""
    options = install({"transformer_options": {}}, blocks, uniform(plan), singles)["transformer_options"]
    return {**options, TEXT_KEY: TEXT} if singles else options


def run(model, family: str, options: dict, blank_prompt: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, *LATENT, generator=g), torch.randn(1, TEXT, 16, generator=g)
    if blank_prompt:
        context = torch.zeros_like(context)  # every text token the same
    t = torch.tensor([0.5])
    with torch.no_grad():
        if family == "mmdit":
            return model(x, t, context=context, transformer_options=options)
        return model(x, t, context, y=torch.randn(1, 8, generator=g), transformer_options=options)


def lung_gate() -> JointGate:
    rl, ll = torch.zeros(72, 56), torch.zeros(72, 56)
    rl[10:60, 4:26] = 1
    ll[10:60, 30:52] = 1
    masks = OrganMasks.from_dict({"right_lung": rl, "left_lung": ll})
    return JointGate(partition(masks, ("right_lung", "left_lung"), *GRID, fit=patch_fit(LATENT, 2)), 0.0)


@pytest.mark.parametrize("family", ["mmdit", "flux"])
def test_glue_in_the_real_forward(comfy_dit, family):
    model, blocks, singles = tiny(comfy_dit, family)
    assert dit_family(model) == family
    stock = run(model, family, {})
    seen = []

    def neutral(call, device):
        seen.append(call)
        return None, None

    out = run(model, family, options_of(blocks, singles, neutral))
    assert torch.equal(out, stock)  # nothing to regulate: every call took the stock path
    image = GRID[0] * GRID[1]
    want = {(("double_block", i), TEXT, image) for i in range(blocks)}
    want |= {(("single_block", i), TEXT, image) for i in range(singles)}
    assert {(c.block, c.text_len, c.image_len) for c in seen} == want
    # one joint call per block, plus MMDiT-X's image-only call in block 1
    assert len(seen) == blocks + singles + (1 if family == "mmdit" else 0)
    gate = lung_gate()
    regulated = run(model, family, options_of(blocks, singles, lambda call, device: (gate, None)))
    assert torch.isfinite(regulated).all() and not torch.equal(regulated, stock)


@pytest.mark.parametrize("family", ["mmdit", "flux"])
def test_joint_sequence_is_text_first_and_a_previous_override_still_runs(comfy_dit, family):
    # With a blank prompt every text token is the same vector, so in the first block the text tokens' values are
    # equal rows while the image tokens' differ: the equal rows are where text sits in the joint sequence.
    model, blocks, singles = tiny(comfy_dit, family)
    values = []

    def theirs(func, *args, **kwargs):  # another pack's override, set before ours
        values.append(args[2])
        return func(*args, **kwargs)

    options = install({"transformer_options": {"optimized_attention_override": theirs}}, blocks,
                      uniform(lambda call, device: (None, None)), singles)["transformer_options"]
    run(model, family, {**options, TEXT_KEY: TEXT}, blank_prompt=True)
    v = values[0]
    tokens = v if family == "flux" else v.transpose(1, 2)  # [B, H, N, D] (MMDiT hands v as [B, N, H, D])
    assert tokens.shape[2] == TEXT + GRID[0] * GRID[1]
    text, image = tokens[:, :, :TEXT], tokens[:, :, TEXT:]
    assert torch.equal(text, text[:, :, :1].expand_as(text))
    assert not torch.equal(image, image[:, :, :1].expand_as(image))

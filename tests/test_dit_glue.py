"""The DiT glue sketch (``hosts/comfy/dit.py``) against ComfyUI 0.3.64's calling conventions, with stand-ins.

No ComfyUI import: the stand-ins call the glue exactly as ``wrap_attn`` and the MMDiT/Flux forwards do
(``docs/dit-progress.md`` has the lines), so these stay pure, fast tests.
"""

from __future__ import annotations

import pytest
import torch

from cxr_counterfactual.attention.gating import gated_self_attention
from cxr_counterfactual.attention.joint import JointGate, joint_attention
from cxr_counterfactual.attention.kernels import sdpa, to_flat, to_heads
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.patch_grid import patch_fit, patch_grid
from cxr_counterfactual.attention.regions import partition
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.hosts.comfy.dit import (
    CALL_KEY,
    TEXT_KEY,
    BlockReplace,
    DitCall,
    JointOverride,
    dit_family,
    install,
    tag_text_length,
    uniform,
)

HEADS, DIM, TEXT = 2, 8, 5
LATENT, PATCH = (9, 7), 2
GRID = patch_grid(LATENT, PATCH)
IMAGE = GRID[0] * GRID[1]


def backend(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """A stand-in for ComfyUI's undecorated attention backend (``attention_pytorch``'s conventions)."""
    if not skip_reshape:
        q, k, v = (to_heads(x, heads) for x in (q, k, v))
    out = sdpa(q, k, v)
    return out if skip_output_reshape else to_flat(out)


def gate() -> JointGate:
    rl, ll = torch.zeros(72, 56), torch.zeros(72, 56)
    rl[10:60, 4:26] = 1
    ll[10:60, 30:52] = 1
    masks = OrganMasks.from_dict({"right_lung": rl, "left_lung": ll})
    return JointGate(partition(masks, ("right_lung", "left_lung"), *GRID, fit=patch_fit(LATENT, PATCH)), 0.0)


def heads_qkv(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(3))


def tagged():
    return {CALL_KEY: DitCall(("double_block", 0), TEXT, IMAGE)}


@pytest.mark.parametrize(("module", "name", "family"), [
    ("comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper", "mmdit"),  # SD3/SD3.5's
    ("comfy.ldm.flux.model", "Flux", "flux"),
    ("comfy.ldm.aura.mmdit", "MMDiT", None),  # AuraFlow: a class of the same name in another module
    ("comfy.ldm.hunyuan_video.model", "HunyuanVideo", None),
])
def test_family_by_comfyuis_class_and_unknown_family_named(comfy, module, name, family):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    model = cls.__new__(cls)  # the family is read from the class alone: no weights needed
    if family is not None:
        assert dit_family(model) == family
        return
    with pytest.raises(CXRInputError, match=f"{name} \\(from {module}\\)") as err:
        dit_family(model)
    assert "MMDiT" in err.value.fix and "Flux" in err.value.fix


def test_block_replace_tags_a_copy_and_wraps_the_previous_replace():
    options = {"other": 1}
    seen = {}

    def original_block(args):
        seen["options"] = args["transformer_options"]
        return {"txt": args["txt"], "img": args["img"]}

    def theirs(args, extra):  # another pack's replace: runs the block itself
        seen["theirs"] = True
        return extra["original_block"](args)

    args = {"txt": torch.zeros(1, TEXT, 4), "img": torch.zeros(1, IMAGE, 4), "vec": None,
            "transformer_options": options}
    BlockReplace(("double_block", 3), theirs)(args, {"original_block": original_block})
    assert seen["theirs"] and seen["options"][CALL_KEY] == DitCall(("double_block", 3), TEXT, IMAGE)
    assert seen["options"]["other"] == 1 and CALL_KEY not in options  # the model's own options untouched


@pytest.mark.parametrize("family", ["mmdit", "flux"])
def test_override_regulates_the_joint_call_in_each_familys_convention(family):
    q, k, v = heads_qkv(TEXT + IMAGE)
    g = gate()
    bias = torch.zeros(IMAGE, TEXT)
    bias[:, 2] = float("-inf")
    override = JointOverride(uniform(lambda call, device: (g, bias)))
    if family == "mmdit":  # flat layout, heads by keyword (mmdit.py _block_mixing)
        out = override(backend, to_flat(q), to_flat(k), to_flat(v), heads=HEADS, transformer_options=tagged(),
                       _inside_attn_wrapper=True)
    else:  # heads layout, heads positional, skip_reshape (flux/math.py attention)
        out = override(backend, q, k, v, HEADS, skip_reshape=True, mask=None, transformer_options=tagged(),
                       _inside_attn_wrapper=True)
    want = to_flat(joint_attention(q, k, v, DitCall(("double_block", 0), TEXT, IMAGE).layout, g, bias))
    assert torch.equal(out, want)


def test_override_leaves_other_calls_to_the_previous_override_or_backend():
    calls = []

    def previous(func, *args, **kwargs):  # another pack's override, set before ours
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    g = gate()
    override = JointOverride(uniform(lambda call, device: (g, None)), previous)
    q, k, v = heads_qkv(TEXT + IMAGE)
    flat = [to_flat(x) for x in (q, k, v)]
    # untagged (another model part), masked, or of another length: the previous override, untouched
    assert torch.equal(override(backend, *flat, heads=HEADS, transformer_options={}), backend(*flat, heads=HEADS))
    override(backend, *flat, heads=HEADS, mask=torch.zeros(1), transformer_options=tagged())
    override(backend, *(x[:, :3] for x in flat), heads=HEADS, transformer_options=tagged())
    assert len(calls) == 3
    # neutral plan: the stock call itself, through the previous override
    neutral = JointOverride(uniform(lambda call, device: (None, None)), previous)
    assert torch.equal(neutral(backend, *flat, heads=HEADS, transformer_options=tagged()), backend(*flat, heads=HEADS))
    assert len(calls) == 4


def test_override_gates_mmdit_x_image_only_attention():
    g = gate()
    q, k, v = heads_qkv(IMAGE, seed=2)
    override = JointOverride(uniform(lambda call, device: (g, torch.zeros(IMAGE, TEXT))))
    out = override(backend, *(to_flat(x) for x in (q, k, v)), heads=HEADS, transformer_options=tagged())
    assert torch.equal(out, to_flat(gated_self_attention(q, k, v, g.part, 0.0)))


def test_install_wraps_what_was_there_and_copies():
    def theirs(args, extra):
        return extra["original_block"](args)

    def their_override(func, *args, **kwargs):
        return func(*args, **kwargs)

    model_options = {"transformer_options": {"patches_replace": {"dit": {("double_block", 1): theirs}},
                                             "optimized_attention_override": their_override}}
    new = install(model_options, 3, uniform(lambda call, device: (None, None)))
    dit = new["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", i) for i in range(3)}
    assert dit[("double_block", 1)].inner is theirs and dit[("double_block", 0)].inner is None
    assert new["transformer_options"]["optimized_attention_override"].previous is their_override
    assert model_options["transformer_options"]["patches_replace"]["dit"] == {("double_block", 1): theirs}


def test_single_blocks_split_at_the_tagged_text_length():
    seen = []

    def original_block(args):
        seen.append(args["transformer_options"].get(CALL_KEY))
        return {"img": args["img"]}

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        args = {"img": torch.zeros(1, TEXT + IMAGE, 4), "vec": None, "transformer_options": transformer_options}
        return BlockReplace(("single_block", 0))(args, {"original_block": original_block})

    options: dict = {}
    tag_text_length(executor, None, None, None, torch.zeros(1, TEXT, 16), None, options)
    assert TEXT_KEY not in options  # the wrapper tagged a copy
    BlockReplace(("single_block", 0))({"img": torch.zeros(1, TEXT + IMAGE, 4), "transformer_options": {}},
                                      {"original_block": original_block})  # untagged: runs stock
    assert seen == [DitCall(("single_block", 0), TEXT, IMAGE), None]


def test_regulated_mask_free_parts_still_go_through_the_previous_override():
    seen = []

    def previous(func, *args, **kwargs):
        seen.append((args[2].shape[2], kwargs.get("skip_reshape"), kwargs.get("skip_output_reshape")))
        return func(*args, **kwargs)

    g = gate()  # hard, no text bias: text rows and each region's call are mask-free, through the override
    q, k, v = heads_qkv(TEXT + IMAGE)
    out = JointOverride(uniform(lambda call, device: (g, None)), previous)(
        backend, *(to_flat(x) for x in (q, k, v)), heads=HEADS, transformer_options=tagged())
    assert torch.equal(out, to_flat(joint_attention(q, k, v, DitCall(("double_block", 0), TEXT, IMAGE).layout, g)))
    regions = [e - s for label, s, e in g.part.slices]
    assert seen == [(TEXT + IMAGE, True, True)] + [(TEXT + n, True, True) for n in regions]

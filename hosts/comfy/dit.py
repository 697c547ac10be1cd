"""ComfyUI glue for diffusion transformers (MMDiT/SD3, Flux): a SKETCH, not wired to any node yet (issue 24).

ComfyUI 0.3.64 hands ``transformer_options`` to every DiT attention call and lets an
``optimized_attention_override`` in it take the call (``wrap_attn``), but says nothing there about the block or
where text ends. Its DiT forwards accept block replaces ``("double_block", i)`` / ``("single_block", i)`` under
``patches_replace["dit"]``, called as ``replace(args, {"original_block": run})``. So, without monkeypatching:

- :class:`BlockReplace` (one per block) hands the block a **copy** of ``transformer_options`` that also holds a
  :class:`DitCall` (block key, text and image lengths, order) under :data:`CALL_KEY`, and runs the block through
  the replace that held the key before it (another pack's), else through ComfyUI's ``original_block``; Flux's
  single blocks learn where text ends from :func:`tag_text_length` (an APPLY_MODEL wrapper);
- :class:`JointOverride` (the model's ``optimized_attention_override``) sees every attention call: a call whose
  sequence is text + image tokens of a :class:`DitCall` is the joint call, one of image tokens alone is MMDiT-X's
  image-only attention; ``plan`` says what to do there (None: stock). Everything else goes, untouched, to the
  override that was set before ours, else to ComfyUI's backend.

Facts and line numbers: ``docs/dit-progress.md``. Still missing: the stages' plan (gate partition at the patch
grid, the anatomy/boost biases at the family's text positions, sigma windows, batch rows), Flux's
``attention_mask``, Kontext's reference tokens (appended after the grid's), node wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...attention.gating import gated_self_attention
from ...attention.joint import JointGate, JointLayout, joint_attention
from ...attention.kernels import to_flat, to_heads
from ...errors import CXRInputError

#: The key of our per-call info in the copy of ``transformer_options`` a block hands its attention calls.
CALL_KEY = "cxr_dit_call"

#: The key of the context's length, tagged by :func:`tag_text_length` (APPLY_MODEL): Flux's single blocks get
#: ``txt ‖ img`` as one sequence and nothing saying where text ends.
TEXT_KEY = "cxr_dit_text_len"

#: DiT families the pack knows, by the class name of ComfyUI's diffusion model (or a base class of it).
FAMILIES = {"MMDiT": "mmdit", "Flux": "flux"}


def dit_family(diffusion_model: object) -> str:
    """``"mmdit"`` or ``"flux"`` for ComfyUI's diffusion model (subclasses included, e.g. SD3's
    ``OpenAISignatureMMDITWrapper``).

    Raises:
        CXRInputError: another family, named with the supported ones.
    """
    for cls in type(diffusion_model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise CXRInputError(
        f"the model's diffusion transformer is {type(diffusion_model).__name__}, which this pack does not know.",
        fix=f"Use a supported family: SD3/SD3.5 (MMDiT) or Flux (classes {', '.join(FAMILIES)}), or a UNet model.",
    )


@dataclass(frozen=True)
class DitCall:
    """What a block tells its attention calls (ComfyUI passes no block index and no text/image split)."""

    block: tuple[str, int]
    text_len: int
    image_len: int
    text_first: bool = True

    @property
    def layout(self) -> JointLayout:
        return JointLayout(self.text_len, self.image_len, self.text_first)


def tag_text_length(executor: Callable, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
    """APPLY_MODEL wrapper (``add_wrapper_with_key``): hands the model a copy of ``transformer_options`` with the
    context's length under :data:`TEXT_KEY` (ComfyUI 0.3.64 ``comfy/model_base.py:160-166``)."""
    options = dict(transformer_options or {})
    if c_crossattn is not None:
        options[TEXT_KEY] = c_crossattn.shape[1]
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


class BlockReplace:
    """A block replace: tags the block's attention calls with a :class:`DitCall`, then runs the block through
    ``inner`` (the replace that held this key before ours: wrapped, never shadowed) or ComfyUI's own.

    A double block's args hold ``txt`` and ``img`` apart; a single block's ``img`` is ``txt ‖ img``, split at the
    length :func:`tag_text_length` tagged (untagged: the block runs stock).
    """

    def __init__(self, block: tuple[str, int], inner: Callable | None = None):
        self.block, self.inner = block, inner

    def __call__(self, args: dict, extra: dict) -> dict:
        options = dict(args.get("transformer_options") or {})  # a copy: the model's options stay untouched
        if "txt" in args:
            options[CALL_KEY] = DitCall(self.block, args["txt"].shape[1], args["img"].shape[1])
        elif TEXT_KEY in options:
            text = options[TEXT_KEY]
            options[CALL_KEY] = DitCall(self.block, text, args["img"].shape[1] - text)
        args = {**args, "transformer_options": options}
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)


#: ``plan(call, device)`` → the gate and the ``[N_img, N_txt]`` text bias of this call (both None: stock).
Plan = Callable[[DitCall, torch.device], tuple[JointGate | None, torch.Tensor | None]]


class JointOverride:
    """The model's ``optimized_attention_override``: regulates the joint and image-only calls of tagged blocks.

    ComfyUI calls it as ``override(func, q, k, v, heads?, **kwargs)`` (``func``: the backend, undecorated).
    MMDiT passes the flat layout ``[B, N, H·D]`` with ``heads=`` by keyword; Flux the heads layout ``[B, H, N, D]``
    (``skip_reshape=True``, heads positional, RoPE already applied). Both expect the flat layout back unless
    ``skip_output_reshape``.
    """

    def __init__(self, plan: Plan, previous: Callable | None = None):
        self.plan, self.previous = plan, previous

    def _stock(self, func: Callable, args: tuple, kwargs: dict):
        return self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)

    def __call__(self, func: Callable, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        call = options.get(CALL_KEY)
        if not isinstance(call, DitCall) or kwargs.get("mask") is not None:
            return self._stock(func, args, kwargs)  # not a tagged block, or a masked call: untouched
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        heads_layout = bool(kwargs.get("skip_reshape", False))
        n = q.shape[2] if heads_layout else q.shape[1]
        if n not in (call.text_len + call.image_len, call.image_len):
            return self._stock(func, args, kwargs)
        gate, text_bias = self.plan(call, q.device)
        image_only = n == call.image_len  # MMDiT-X's image-only self-attention: the UNet's gate as it is
        if (gate is None or gate.neutral) and (text_bias is None or image_only):
            return self._stock(func, args, kwargs)  # nothing to change: the stock call itself
        qh, kh, vh = (x if heads_layout else _heads(x, heads) for x in (q, k, v))
        kernel = self._mask_free(func, heads, kwargs)
        if image_only and gate is not None:
            out = gated_self_attention(qh, kh, vh, gate.part, gate.leak, gate.background, kernel)
        else:
            out = joint_attention(qh, kh, vh, call.layout, gate, text_bias, kernel)
        return out if kwargs.get("skip_output_reshape", False) else to_flat(out)

    def _mask_free(self, func: Callable, heads: int, kwargs: dict) -> Callable:
        """Mask-free attention in the heads layout through the previous override and the backend (the text rows,
        hard gating's regions without a text bias): what the user and other packs chose still runs there. The
        parts that need a log-sum-exp use the core's kernels (as the UNet's soft gating does without an LSE
        backend: ``hosts/comfy/attention_backend.py``)."""
        rest = {key: val for key, val in kwargs.items() if key not in ("heads", "mask")}
        rest.update(skip_reshape=True, skip_output_reshape=True)

        def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._stock(func, (q, k, v, heads), rest)

        return kernel


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The flat layout to the heads layout; MMDiT hands v over as ``[B, N, H, D]`` (``split_qkv`` reshapes only
    q and k back to ``[B, N, H·D]``), which ComfyUI's backends accept, so this does too."""
    return to_heads(x.reshape(x.shape[0], x.shape[1], -1), heads)


def install(model_options: dict, blocks: int, plan: Plan, single_blocks: int = 0) -> dict:
    """SKETCH: the ``model_options`` of a cloned ModelPatcher with our block replaces and attention override,
    each wrapping what was there (copies, as ComfyUI's ``set_model_options_patch_replace`` makes them).

    ``blocks``: the number of double/joint blocks (``len(diffusion_model.joint_blocks)`` for MMDiT,
    ``len(diffusion_model.double_blocks)`` for Flux); ``single_blocks``: Flux's ``len(single_blocks)``, which also
    need :func:`tag_text_length` as an APPLY_MODEL wrapper (``ModelPatcher.add_wrapper_with_key``).
    """
    options = dict(model_options.get("transformer_options", {}))
    replaces = dict(options.get("patches_replace", {}))
    dit = dict(replaces.get("dit", {}))
    for i in range(blocks):
        key = ("double_block", i)
        dit[key] = BlockReplace(key, dit.get(key))
    for i in range(single_blocks):
        key = ("single_block", i)
        dit[key] = BlockReplace(key, dit.get(key))
    replaces["dit"] = dit
    options["patches_replace"] = replaces
    options["optimized_attention_override"] = JointOverride(plan, options.get("optimized_attention_override"))
    return {**model_options, "transformer_options": options}

"""ComfyUI glue for diffusion transformers (MMDiT/SD3, Flux): how a joint attention call is found and handed over.

ComfyUI 0.3.64 hands ``transformer_options`` to every DiT attention call and lets an
``optimized_attention_override`` in it take the call (``wrap_attn``), but says nothing there about the block or
where text ends. Its DiT forwards accept block replaces ``("double_block", i)`` / ``("single_block", i)`` under
``patches_replace["dit"]``, called as ``replace(args, {"original_block": run})``. So, without monkeypatching:

- :class:`BlockReplace` (one per block) hands the block a **copy** of ``transformer_options`` that also holds a
  :class:`DitCall` (block key, text and image lengths, order, the block's stages) under :data:`CALL_KEY`, and runs
  the block through the replace that held the key before it (another pack's), else through ComfyUI's
  ``original_block``; Flux's single blocks learn where text ends from :func:`tag_text_length` (an APPLY_MODEL
  wrapper, which also tags the input's shape);
- :class:`JointOverride` (the model's ``optimized_attention_override``) sees every attention call: a call whose
  sequence is text + image tokens of a :class:`DitCall` is the joint call, one of image tokens alone is MMDiT-X's
  image-only attention; its ``regulate`` hook says what happens there (None: stock; the stages' rule is
  :func:`.dit_stages.regulate`). Everything else goes, untouched, to the override that was set before ours, else
  to ComfyUI's backend. Masked calls (Flux's ``attention_mask``) run stock; ``masked`` is told (the stages report it).

Facts and line numbers: ``docs/dit-progress.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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

#: DiT families the pack knows, by ComfyUI's class of the diffusion model (or a base class of it), module and name:
#: the name alone is not enough (AuraFlow's diffusion model is also a class named ``MMDiT``, in ``comfy.ldm.aura``).
FAMILIES = {("comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT"): "mmdit", ("comfy.ldm.flux.model", "Flux"): "flux"}


def dit_family(diffusion_model: object) -> str:
    """``"mmdit"`` or ``"flux"`` for ComfyUI's diffusion model (subclasses included, e.g. SD3's
    ``OpenAISignatureMMDITWrapper``).

    Raises:
        CXRInputError: another family, named with the supported ones.
    """
    for cls in type(diffusion_model).__mro__:
        family = FAMILIES.get((cls.__module__, cls.__name__))
        if family is not None:
            return family
    kind = type(diffusion_model)
    raise CXRInputError(
        f"the model's diffusion transformer is {kind.__name__} (from {kind.__module__}), a family this pack does not "
        "know.", fix="Use a supported family: SD3/SD3.5 (MMDiT) or Flux, or a UNet model (SD1.x, SD2.x, SDXL).",
    )


@dataclass(frozen=True)
class DitCall:
    """What a block tells its attention calls (ComfyUI passes no block index and no text/image split).

    ``stages``: the CXR stages installed on this block (``()`` for a bare :class:`BlockReplace`); ``patch``: the
    model's patch size (its image tokens are ``patch×patch`` latent cells).
    """

    block: tuple[str, int]
    text_len: int
    image_len: int
    text_first: bool = True
    stages: tuple = field(default=(), compare=False)
    patch: int = 2

    @property
    def layout(self) -> JointLayout:
        return JointLayout(self.text_len, self.image_len, self.text_first)


def tag_text_length(executor: Callable, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
    """APPLY_MODEL wrapper (``add_wrapper_with_key``): hands the model a copy of ``transformer_options`` with the
    context's length under :data:`TEXT_KEY` (Flux's single blocks) and the model's input shape as
    ``original_shape`` (a UNet sets it itself; a DiT does not, and the rows' fields are read from it), ComfyUI
    0.3.64 ``comfy/model_base.py:160-166``."""
    options = dict(transformer_options or {})
    if c_crossattn is not None:
        options[TEXT_KEY] = c_crossattn.shape[1]
    if x is not None:
        options.setdefault("original_shape", list(x.shape))
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


class BlockReplace:
    """A block replace: tags the block's attention calls with a :class:`DitCall`, then runs the block through
    ``inner`` (the replace that held this key before ours: wrapped, never shadowed) or ComfyUI's own.

    A double block's args hold ``txt`` and ``img`` apart; a single block's ``img`` is ``txt ‖ img``, split at the
    length :func:`tag_text_length` tagged (untagged: the block runs stock).
    """

    def __init__(self, block: tuple[str, int], inner: Callable | None = None, stages: tuple = (), patch: int = 2):
        self.block, self.inner, self.stages, self.patch = block, inner, stages, patch

    def with_stage(self, stage) -> BlockReplace:
        return BlockReplace(self.block, self.inner, (*self.stages, stage), self.patch)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = dict(args.get("transformer_options") or {})  # a copy: the model's options stay untouched
        if "txt" in args:
            options[CALL_KEY] = DitCall(self.block, args["txt"].shape[1], args["img"].shape[1], stages=self.stages,
                                        patch=self.patch)
        elif TEXT_KEY in options:
            text = options[TEXT_KEY]
            options[CALL_KEY] = DitCall(self.block, text, args["img"].shape[1] - text, stages=self.stages,
                                        patch=self.patch)
        args = {**args, "transformer_options": options}
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)


#: A stock attention call in the heads layout ``[B, H, N, D]`` → ``[B, H, N, D]`` (no mask).
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: ``regulate(call, options, q, k, v, image_only, kernel, func)`` → the call's output in the heads layout, or None
#: for the stock call itself. ``q, k, v``: heads layout; ``image_only``: MMDiT-X's image-only attention;
#: ``kernel``: the stock attention (the previous override and ComfyUI's backend) for the parts left stock;
#: ``func``: the backend itself (for its log-sum-exp, where it has one).
Regulate = Callable[..., "torch.Tensor | None"]

#: ``masked(call, options)``: told of a tagged call that carries an attention mask, which runs stock (to report it).
Masked = Callable[[DitCall, dict], None]

#: ``plan(call, device)`` → the gate and the ``[N_img, N_txt]`` text bias of a call, for every row alike (tests and
#: tools: :func:`uniform`); the stages' per-row rule is :func:`.dit_stages.regulate`.
Plan = Callable[[DitCall, torch.device], tuple[JointGate | None, torch.Tensor | None]]


def uniform(plan: Plan) -> Regulate:
    """A :data:`Regulate` that applies ``plan``'s gate and text bias to every row of every tagged call."""

    def regulate(call: DitCall, options: dict, q, k, v, image_only: bool, kernel: Kernel, func=None):
        gate, text_bias = plan(call, q.device)
        if (gate is None or gate.neutral) and (text_bias is None or image_only):
            return None
        if image_only:
            return gated_self_attention(q, k, v, gate.part, gate.leak, gate.background, kernel)
        return joint_attention(q, k, v, call.layout, gate, text_bias, kernel)

    return regulate


class JointOverride:
    """The model's ``optimized_attention_override``: regulates the joint and image-only calls of tagged blocks.

    ComfyUI calls it as ``override(func, q, k, v, heads?, **kwargs)`` (``func``: the backend, undecorated).
    MMDiT passes the flat layout ``[B, N, H·D]`` with ``heads=`` by keyword; Flux the heads layout ``[B, H, N, D]``
    (``skip_reshape=True``, heads positional, RoPE already applied). Both expect the flat layout back unless
    ``skip_output_reshape``. ``regulate`` decides what a tagged call does (None: the stock call itself).
    """

    def __init__(self, regulate: Regulate, previous: Callable | None = None, masked: Masked | None = None):
        self.regulate, self.previous, self.masked = regulate, previous, masked

    def _stock(self, func: Callable, args: tuple, kwargs: dict):
        return self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)

    def __call__(self, func: Callable, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        call = options.get(CALL_KEY)
        if not isinstance(call, DitCall):
            return self._stock(func, args, kwargs)  # not a tagged block: untouched
        if kwargs.get("mask") is not None:  # Flux's attention_mask (e.g. Redux's attn_bias): not regulated
            if self.masked is not None:
                self.masked(call, options)
            return self._stock(func, args, kwargs)
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        heads_layout = bool(kwargs.get("skip_reshape", False))
        n = q.shape[2] if heads_layout else q.shape[1]
        if n not in (call.text_len + call.image_len, call.image_len):
            return self._stock(func, args, kwargs)
        image_only = n == call.image_len  # MMDiT-X's image-only self-attention: the UNet's gate as it is
        qh, kh, vh = (x if heads_layout else _heads(x, heads) for x in (q, k, v))
        out = self.regulate(call, options, qh, kh, vh, image_only, self._mask_free(func, heads, kwargs), func)
        if out is None:
            return self._stock(func, args, kwargs)  # nothing to change: the stock call itself
        out = out.to(q.dtype)
        return out if kwargs.get("skip_output_reshape", False) else to_flat(out)

    def _mask_free(self, func: Callable, heads: int, kwargs: dict) -> Kernel:
        """Mask-free attention in the heads layout through the previous override and the backend (the text rows,
        hard gating's regions without a text bias, rows left stock): what the user and other packs chose still
        runs there. The parts that need a log-sum-exp take the backend's own where it has one
        (:mod:`.attention_backend`)."""
        rest = {key: val for key, val in kwargs.items() if key not in ("heads", "mask")}
        rest.update(skip_reshape=True, skip_output_reshape=True)

        def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._stock(func, (q, k, v, heads), rest)

        return kernel


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The flat layout to the heads layout; MMDiT hands v over as ``[B, N, H, D]`` (``split_qkv`` reshapes only
    q and k back to ``[B, N, H·D]``), which ComfyUI's backends accept, so this does too."""
    return to_heads(x.reshape(x.shape[0], x.shape[1], -1), heads)


def install(model_options: dict, blocks: int, regulate: Regulate, single_blocks: int = 0, stage=None,
            patch: int = 2, masked: Masked | None = None) -> dict:
    """The ``model_options`` of a cloned ModelPatcher with our block replaces and attention override, each
    wrapping what was there (copies, as ComfyUI's ``set_model_options_patch_replace`` makes them). A key that
    already holds our replace gains ``stage`` (when given); our override is installed once.

    ``blocks``: the number of double/joint blocks (``len(diffusion_model.joint_blocks)`` for MMDiT,
    ``len(diffusion_model.double_blocks)`` for Flux); ``single_blocks``: Flux's ``len(single_blocks)``, which also
    need :func:`tag_text_length` as an APPLY_MODEL wrapper (``ModelPatcher.add_wrapper_with_key``); ``masked``:
    see :data:`Masked`.
    """
    options = dict(model_options.get("transformer_options", {}))
    replaces = dict(options.get("patches_replace", {}))
    dit = dict(replaces.get("dit", {}))
    keys = [("double_block", i) for i in range(blocks)] + [("single_block", i) for i in range(single_blocks)]
    added = (stage,) if stage is not None else ()
    for key in keys:
        current = dit.get(key)
        if isinstance(current, BlockReplace) and added:
            dit[key] = current.with_stage(stage)
        elif not isinstance(current, BlockReplace):
            dit[key] = BlockReplace(key, current, added, patch)
    replaces["dit"] = dit
    options["patches_replace"] = replaces
    previous = options.get("optimized_attention_override")
    if not isinstance(previous, JointOverride):
        options["optimized_attention_override"] = JointOverride(regulate, previous, masked)
    return {**model_options, "transformer_options": options}

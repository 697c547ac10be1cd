"""Which attention kernel a gated layer runs in ComfyUI: the backend ComfyUI chose, and a log-sum-exp for soft gating.

- **Hard gating** (and any mask-free per-region call: leak 1, the free background's queries) runs each region
  through ``comfy.ldm.modules.attention.optimized_attention``, read from the module at call time, in the heads
  layout (``skip_reshape`` / ``skip_output_reshape``), with the layer's ``attn_precision`` and
  ``transformer_options``: the backend the user started ComfyUI with (``--use-pytorch-cross-attention``,
  ``--use-split-cross-attention``, sage, flash, xformers, sub-quadratic on a CPU), or one another pack installed
  the way ComfyUI installs one (by setting that module attribute). ``wrap_attn`` inside it hands the call to
  ``transformer_options["optimized_attention_override"]`` when another pack set one.
- **Soft gating** needs each pass's log-sum-exp (:func:`...attention.gating.gated_self_attention`). The backend's
  own where it has one: PyTorch SDPA (torch's fused kernels, :func:`...attention.kernels.sdpa_with_lse`), flash_attn
  (``return_attn_probs``), xformers (``memory_efficient_attention_partial``), sage (``return_lse``). Otherwise the
  exact fallback :func:`...attention.kernels.sdpa_with_lse` (torch's fused kernels on the device, else chunked
  float32), with one warning per run naming the backend and the cost. The flash, xformers and sage branches need a
  CUDA GPU and those packages: they are **unverified** (never run; the CPU tests cover the fallback and PyTorch).
- **Soft gating with an override** keeps the override in the loop: the layer's attention goes through it with a
  dense ``N × N`` float mask (exact; memory N² per call), also warned once per run. Taking an LSE from the backend
  would bypass the override, and the override (another pack's kernel) returns none.

Each run records which kernel each kind of gated call used (``RunRecord.attention``) and logs it once.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable

import comfy.ldm.modules.attention as comfy_attention
import torch

from ...attention.kernels import Kernel, LseKernel, sdpa_with_lse
from ...attention.run_state import RunState

logger = logging.getLogger("cxr_counterfactual")

#: The run record's report kind of the soft-gating warning (one fixed key: one warning per run).
SOFT_REPORT = "soft-gate-backend"


def backend_name(extra: dict) -> str:
    """The name of the backend ComfyUI runs attention with now, and the override that wraps it (if any)."""
    fn = comfy_attention.optimized_attention
    name = getattr(fn, "__name__", type(fn).__name__)
    override = extra.get("optimized_attention_override")
    if override is not None:
        name += f" via optimized_attention_override {getattr(override, '__qualname__', type(override).__name__)}"
    return name


def backend_kernel(heads: int, extra: dict) -> Kernel:
    """Mask-free attention in the heads layout through the backend ComfyUI chose (and its override)."""
    fn = comfy_attention.optimized_attention  # read per layer call: a backend installed after import is used
    precision = extra.get("attn_precision")

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(q, k, v, heads, skip_reshape=True, skip_output_reshape=True, attn_precision=precision,
                  transformer_options=extra)

    return kernel


@functools.cache
def _flash_lse() -> LseKernel | None:
    """flash_attn's kernel with its log-sum-exp (UNVERIFIED: needs a CUDA GPU and flash-attn)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    def lse_kernel(q, k, v):
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            return sdpa_with_lse(q, k, v)  # flash_attn runs half precision on CUDA only
        # flash_attn takes [B, N, H, D]; with return_attn_probs it returns (out, softmax_lse [B, H, N], ...)
        result = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True)
        return result[0].transpose(1, 2), result[1].float()

    return lse_kernel


@functools.cache
def _xformers_lse() -> LseKernel | None:
    """xformers' attention that returns its log-sum-exp (UNVERIFIED: needs a CUDA GPU and xformers)."""
    if importlib.util.find_spec("xformers") is None:
        return None
    import xformers.ops.fmha as fmha

    partial = getattr(fmha, "memory_efficient_attention_partial", None)
    if partial is None:
        return None

    def lse_kernel(q, k, v):
        if q.device.type != "cuda":
            return sdpa_with_lse(q, k, v)
        # [B, N, H, D] in; returns (out, lse [B, H, N]), out in float32 unless output_dtype says otherwise
        out, lse = partial(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), output_dtype=q.dtype)
        return out.transpose(1, 2), lse[..., : q.shape[2]].float()

    return lse_kernel


@functools.cache
def _sage_lse() -> LseKernel | None:
    """SageAttention with ``return_lse`` (UNVERIFIED: needs a CUDA GPU and a sageattention release that has it)."""
    if importlib.util.find_spec("sageattention") is None:
        return None
    from sageattention import sageattn

    try:
        if "return_lse" not in inspect.signature(sageattn).parameters:
            return None
    except (TypeError, ValueError):
        return None

    def lse_kernel(q, k, v):
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            return sdpa_with_lse(q, k, v)
        out, lse = sageattn(q, k, v, tensor_layout="HND", is_causal=False, return_lse=True)
        return out, lse.float()

    return lse_kernel


def guarded(lse_kernel: LseKernel, name: str) -> LseKernel:
    """``lse_kernel``, falling back to the exact :func:`...attention.kernels.sdpa_with_lse` when it fails other than by
    running out of memory: the flash / xformers / sage branches have never run here (no GPU), and an optional
    package's API that differs from the one assumed must cost speed, not the user's run. Logged once per kernel."""
    failed: list[str] = []

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not failed:
            try:
                return lse_kernel(q, k, v)
            except torch.OutOfMemoryError:
                raise
            except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError) as err:
                failed.append(f"{type(err).__name__}: {err}")
                logger.warning("CXR Counterfactual: the log-sum-exp kernel of %s failed (%s); soft gating uses "
                               "torch's exact fallback from now on", name, failed[0])
        return sdpa_with_lse(q, k, v)

    return kernel


@functools.cache
def _guarded_once(lse_kernel: LseKernel, name: str) -> LseKernel:
    return guarded(lse_kernel, name)


def _own_lse(fn: Callable) -> LseKernel | None:
    """The log-sum-exp kernel of backend ``fn`` (None: it has none)."""
    if fn is comfy_attention.attention_pytorch:
        return sdpa_with_lse  # the same torch fused kernels, which expose their log-sum-exp
    for name, make in (("attention_flash", _flash_lse), ("attention_xformers", _xformers_lse),
                       ("attention_sage", _sage_lse)):
        if fn is getattr(comfy_attention, name, None):
            try:
                made = make()
                return None if made is None else _guarded_once(made, name)
            except (ImportError, OSError, RuntimeError, AttributeError) as err:  # a broken optional install
                logger.debug("no log-sum-exp kernel for %s: %s", name, err)
                return None
    return None


def _fallback_cost(device: torch.device) -> str:
    if device.type in ("cpu", "cuda"):
        return (f"torch's fused attention with log-sum-exp on the {device.type.upper()} instead: exact, at torch's "
                "speed and memory, not the backend's")
    return "chunked float32 attention instead: exact, slower, with 1024×N scores per head in memory"


def _note(state: RunState | None, use: str, name: str) -> None:
    """Record (and log, once per run) which kernel ``use`` ran on."""
    if state is None or state.record.attention.get(use) == name:
        return
    state.record.attention[use] = name
    logger.info("CXR Counterfactual: %s runs on %s", use, name)


def hard_kernel(heads: int, extra: dict, state: RunState | None) -> Kernel:
    """The mask-free kernel of this layer's hard gating (recorded as the run's "hard gating" backend)."""
    _note(state, "hard gating", backend_name(extra))
    return backend_kernel(heads, extra)


def soft_kernels(heads: int, extra: dict, state: RunState | None,
                 device: torch.device) -> tuple[Kernel, LseKernel | None]:
    """Soft gating's kernels: the mask-free one and the log-sum-exp one; ``None`` for the latter means "hand the
    override a dense float mask" (an ``optimized_attention_override`` is set: see the module docstring)."""
    name = backend_name(extra)
    kernel = backend_kernel(heads, extra)
    if "optimized_attention_override" in extra:
        _note(state, "soft gating", f"{name} (dense N×N mask)")
        if state is not None:
            state.report(SOFT_REPORT, (), f"soft gating: attention goes through the optimized_attention_override "
                         f"({name}) with a dense N×N float mask: exact, N² memory per call.")
        return kernel, None
    own = _own_lse(comfy_attention.optimized_attention)
    if own is not None:
        _note(state, "soft gating", name)
        return kernel, own
    cost = _fallback_cost(device)
    _note(state, "soft gating", f"{name} (no log-sum-exp: fallback)")
    if state is not None:
        state.report(SOFT_REPORT, (), f"soft gating: the attention backend {name} gives no log-sum-exp; soft-gated "
                     f"layers use {cost}. Start ComfyUI with --use-pytorch-cross-attention to keep one kernel.")
    return kernel, sdpa_with_lse


def joint_lse_kernel(func, state: RunState | None, device: torch.device) -> LseKernel:
    """The log-sum-exp kernel of a diffusion transformer's joint call (soft gate, text bias): the backend ``func``'s
    own where it has one (ComfyUI hands an attention override the undecorated backend), else torch's exact fallback,
    noted once per run as for the UNet's soft gating."""
    name = getattr(func, "__name__", type(func).__name__)
    own = _own_lse(func) if func is not None else None
    if own is not None:
        _note(state, "joint attention", name)
        return own
    _note(state, "joint attention", f"{name} (no log-sum-exp: fallback)")
    if state is not None:
        state.report(SOFT_REPORT, (), f"joint attention: the attention backend {name} gives no log-sum-exp; the soft "
                     f"gate and text biases use {_fallback_cost(device)}.")
    return sdpa_with_lse

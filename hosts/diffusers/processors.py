"""The diffusers adapter: the core's gating, token masking, boosting and capture as attention processors of
a diffusers ``UNet2DConditionModel``. ComfyUI users never need it (``pip install "cxr-counterfactual[diffusers]"``).

This module never imports diffusers itself: it works on the UNet object it is given (its ``attn_processors``,
``set_attn_processor`` and the ``Attention`` modules' projections), so importing the pack needs no diffusers.

How it mirrors the ComfyUI adapter (:mod:`..comfy.patch`) so both hosts compute the same thing:
- every self-attention (``attn1``) and cross-attention (``attn2``) of every transformer block gets a
  :class:`CXRAttnProcessor`, keyed like ComfyUI's ``(block, number, transformer_index)`` (derived from the
  UNet's structure, never a hard-coded list), carrying the same core stage objects (:mod:`...attention.stages`);
  every layer of both kinds, whatever the stages' ``kinds``, since an energy probe reads cross-attention even
  where no stage acts;
- at each call the processor picks the active stages, the rows and the biases with :mod:`.layer_call` and
  runs the same core kernels (:func:`.gating.gated_self_attention`, :func:`.gating.token_masked_cross_attention`);
  outside every stage it calls the layer's original processor, so it is the stock model bit for bit;
- diffusers hands a processor no activation shape, sigma or cond/uncond layout: a :class:`StepContext`
  (latent ``H×W``, sigma, batch chunks) comes from ``cross_attention_kwargs={"cxr_step": ...}``, from
  :meth:`Regulation.step`, or (given a pipeline or scheduler) from a forward pre-hook on the UNet that reads
  the call's latent and timestep. Each layer's grid follows from its token count and the latent
  (:func:`.layer_call.layer_grid`: stride-2 convolutions that round up), never from a square root.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ...attention.field import Field
from ...attention.gating import gated_self_attention, token_masked_cross_attention
from ...attention.kernels import sdpa, sdpa_with_lse
from ...attention.layer_call import (
    COND,
    UNCOND,
    active_stages,
    cross_bias,
    layer_grid,
    pathology_maps,
    record_capture,
    regulated_rows,
    self_gate,
    wanted_captures,
)
from ...attention.run_record import RunRecord
from ...attention.run_state import RunState
from ...attention.schedule import DiscreteSchedule
from ...attention.stages import Grid, Key, Stage
from ...errors import CXRInputError

logger = logging.getLogger("cxr_counterfactual")

#: Processors the CXR processor may stand in for on regulated calls (plain torch attention).
STOCK_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_KINDS = ("attn1", "attn2")


@dataclass(frozen=True)
class StepContext:
    """What a processor needs to know about the UNet call it is part of.

    Attributes:
        latent: the latent's ``(H, W)`` of this call.
        sigma: the noise level (k-diffusion sigma, as the stages' windows use).
        cond_or_uncond: the batch's chunks in order, ``COND`` (0) or ``UNCOND`` (1), each ``B / len`` rows
            (diffusers pipelines put the negative prompt first: ``(UNCOND, COND)``).
    """

    latent: Grid
    sigma: float
    cond_or_uncond: tuple[int, ...] = (COND,)


class EnergyProbeDone(Exception):
    """Raised after the last layer an energy probe reads: the rest of the UNet is not run."""


@dataclass
class EnergyProbe:
    """Reads the pathology attention maps of some cross-attention layers (the refinement energy's input)."""

    layers: tuple[str, ...]
    columns: Callable[[int], torch.Tensor]
    maps: list[torch.Tensor] = field(default_factory=list)


def layer_keys(unet) -> dict[str, Key]:
    """ComfyUI's ``(block, number, transformer_index)`` of every transformer block of a diffusers UNet, by the
    block's module name (``down_blocks.0.attentions.0.transformer_blocks.0``), from the UNet's structure.

    ComfyUI numbers its ``input_blocks`` as conv_in, then per level one block per resnet and one for the
    downsampler; ``output_blocks`` one per up-level resnet; the middle block is ``("middle", 0)``.
    """
    keys: dict[str, Key] = {}

    def add(prefix: str, attentions, i: int, block: str, number: int) -> None:
        if attentions is not None and i < len(attentions):
            for t in range(len(attentions[i].transformer_blocks)):
                keys[f"{prefix}.attentions.{i}.transformer_blocks.{t}"] = (block, number, t)

    number = 1
    for x, down in enumerate(unet.down_blocks):
        for i in range(len(down.resnets)):
            add(f"down_blocks.{x}", getattr(down, "attentions", None), i, "input", number)
            number += 1
        number += 1 if getattr(down, "downsamplers", None) else 0
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        add("mid_block", getattr(mid, "attentions", None), 0, "middle", 0)
    number = 0
    for x, up in enumerate(unet.up_blocks):
        for i in range(len(up.resnets)):
            add(f"up_blocks.{x}", getattr(up, "attentions", None), i, "output", number)
            number += 1
    return keys


def _project(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, temb):
    """Queries, keys and values in the heads layout, exactly as diffusers' AttnProcessor2_0 prepares them,
    and a function that turns the attention output back into the layer's output."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
    if shape4 is not None:
        b, c, hh, ww = shape4
        hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = attn.to_k(context), attn.to_v(context)
    batch, heads = query.shape[0], attn.heads
    q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)

    def finish(out: torch.Tensor) -> torch.Tensor:
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    return q, k, v, finish


class CXRAttnProcessor:
    """The attention processor of one ``attn1``/``attn2`` layer: the active stages, or the original processor.

    Args:
        name: the attention module's name (``...transformer_blocks.0.attn1``).
        key: ComfyUI's key of its transformer block (the stages' ``covers`` reads its block part).
        regulation: the shared stages, step context, per-run state and energy probe.
        original: the processor it replaced (called for every stock computation).
    """

    def __init__(self, name: str, key: Key, regulation: Regulation, original) -> None:
        self.name, self.key, self.regulation, self.original = name, key, regulation, original
        self.kind = name.rsplit(".", 1)[-1]

    def _stock(self, attn, hidden_states, encoder_hidden_states, attention_mask, kwargs):
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, cxr_step: StepContext | None = None, **kwargs):
        reg = self.regulation
        step = cxr_step or reg.current
        if step is None:
            raise CXRInputError(
                "the regulated UNet was called without a step context (latent size, sigma, cond/uncond rows).",
                input_name="cxr_step", fix="Install the regulation on the pipeline (or pass its scheduler), wrap the "
                "UNet call in 'with regulation.step(...)', or pass cross_attention_kwargs={'cxr_step': ...}.")
        state, sigma, latent = reg.state, step.sigma, step.latent
        field = Field(latent)  # diffusers pipelines condition on the whole latent, and masks are one set (see install)
        active = active_stages(reg.stages, self.key, sigma)
        probe = reg.probe if reg.probe is not None and self.name in reg.probe.layers else None
        if hidden_states.ndim == 4:  # [B, C, h, w]: the grid is given
            h, w = int(hidden_states.shape[-2]), int(hidden_states.shape[-1])
        else:  # [B, N, C]: the grid follows from N and the latent (stride-2 steps round up)
            h, w = layer_grid(hidden_states.shape[1], latent)
        gate, bias, captures = None, None, []
        if self.kind == "attn1":
            gate = self_gate(active)
        elif encoder_hidden_states is not None:
            bias = cross_bias(active, h, w, field, encoder_hidden_states.shape[1], hidden_states.device)
            captures = wanted_captures(active, h, w, field)
        if gate is None and bias is None and not captures and probe is None:
            state.trace(self.kind, self.key, sigma, False)
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs)
        if attention_mask is not None or not math.isclose(attn.scale, (attn.inner_dim // attn.heads) ** -0.5):
            state.report("unsupported", self.key, f"{self.name} uses an attention mask or a non-default scale; "
                         "the CXR stages leave that layer stock.")
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs)
        if type(self.original).__name__ not in STOCK_PROCESSORS and (gate is not None or bias is not None):
            state.report("processor", self.key, f"{self.name} had the processor {type(self.original).__name__}; "
                         "where the CXR stages act, that layer attends with torch attention instead of it.")
        state.trace(self.kind, self.key, sigma, True)
        temb = kwargs.get("temb")
        q, k, v, finish = _project(attn, hidden_states, encoder_hidden_states, temb)
        include_uncond = gate is not None and gate.apply_to_uncond
        rows = regulated_rows(step.cond_or_uncond, q.shape[0], include_uncond)
        r = None if rows is None else rows.to(q.device)
        qr, kr, vr = (t if r is None else t.index_select(0, r) for t in (q, k, v))
        for cap in captures:
            record_capture(cap, [(qr, kr, bias, field)], h, w, sigma, state)
        if probe is not None:
            probe.maps.append(pathology_maps(qr, kr, bias, probe.columns(k.shape[2]), h, w))
            if self.name == probe.layers[-1]:
                raise EnergyProbeDone
        if gate is None and bias is None:  # capture or probe only: the layer attends exactly as without us
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs)
        if gate is not None:
            part = gate.partition(h, w, field, q.device)
            regulated = gated_self_attention(qr, kr, vr, part, gate.self_leak, gate.background, sdpa, sdpa_with_lse)
        else:
            assert bias is not None
            regulated = token_masked_cross_attention(qr, kr, vr, bias)
        if r is None:
            return finish(regulated)
        others = torch.tensor(sorted(set(range(q.shape[0])) - set(r.tolist())), dtype=torch.long, device=q.device)
        stock = sdpa(q.index_select(0, others), k.index_select(0, others), v.index_select(0, others))
        out = torch.empty(q.shape[0], *stock.shape[1:], dtype=stock.dtype, device=stock.device)
        out[others] = stock  # the other rows: stock attention (diffusers' default kernel)
        out[r] = regulated.to(stock.dtype)
        return finish(out)


class Regulation:
    """CXR processors installed on one diffusers UNet (see :func:`install_regulation`).

    Attributes:
        stages: the core stages every processor applies (gate, boost, capture), in order.
        state: the per-run holder; ``state.record`` holds captures, trace and conflicts of the current run.
        current: the step context of the call in progress (set by :meth:`step` or the pre-hook).
        probe: an energy probe the refinement loop sets for one call.
        original: the processors found on the UNet, restored by :meth:`remove`.
    """

    def __init__(self, unet, stages: Sequence[Stage], schedule: DiscreteSchedule | None, pipeline,
                 cond_or_uncond: tuple[int, ...] | None) -> None:
        self.unet, self.stages, self.schedule = unet, tuple(stages), schedule
        self._pipeline, self._chunks = pipeline, cond_or_uncond
        self.state = RunState()
        self.state.reset()
        self.current: StepContext | None = None
        self.probe: EnergyProbe | None = None
        self._explicit = 0
        self.original = dict(unet.attn_processors)
        if any(isinstance(p, CXRAttnProcessor) for p in self.original.values()):
            raise CXRInputError("this UNet already has CXR processors installed.", input_name="unet",
                                fix="Call remove() on the first regulation, or pass all stages to one install.")
        keys = layer_keys(unet)
        self.processors: dict[str, CXRAttnProcessor] = {}
        for name, proc in self.original.items():
            module = name.removesuffix(".processor")
            block, _, kind = module.rpartition(".")
            if kind in _KINDS and block in keys:
                self.processors[name] = CXRAttnProcessor(module, keys[block], self, proc)
        if not self.processors:
            raise CXRInputError(f"unsupported model: {type(unet).__name__} has no transformer-block attention.",
                                input_name="unet", fix="Use an SD1.x/SD2.x/SDXL-family UNet2DConditionModel.")
        unet.set_attn_processor({**self.original, **self.processors})  # a fresh dict: diffusers pops from it
        self._hook = None
        if schedule is not None:
            self._hook = unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)

    # ----------------------------------------------------------------------------------------------
    def new_run(self) -> RunRecord:
        """Start a new run's record (captures, trace, conflicts) and return it."""
        return self.state.reset().record

    @property
    def record(self) -> RunRecord:
        return self.state.record

    @contextlib.contextmanager
    def step(self, latent: Grid, sigma: float, cond_or_uncond: Sequence[int] = (COND,)) -> Iterator[StepContext]:
        """The context of the UNet calls inside the block (takes precedence over the pre-hook)."""
        previous = self.current
        self.current = StepContext((int(latent[0]), int(latent[1])), float(sigma), tuple(cond_or_uncond))
        self._explicit += 1
        try:
            yield self.current
        finally:
            self._explicit -= 1
            self.current = previous

    def _before_unet(self, module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: the step context of a pipeline's UNet call, from its latent and timestep."""
        if self._explicit or self.schedule is None:
            return
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(torch.as_tensor(timestep).flatten()[0])
        chunks = self._chunks or (COND,)
        if self._pipeline is not None:
            cfg = bool(getattr(self._pipeline, "do_classifier_free_guidance", False))
            chunks = (UNCOND, COND) if cfg and sample.shape[0] % 2 == 0 else (COND,)
        self.current = StepContext((int(sample.shape[-2]), int(sample.shape[-1])), self.schedule.sigma(t), chunks)

    def remove(self) -> None:
        """Restore the original processor objects and drop the hook."""
        self.unet.set_attn_processor(dict(self.original))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> Regulation:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_regulation(target, stages: Sequence[Stage], *, scheduler=None,
                       cond_or_uncond: Sequence[int] | None = None) -> Regulation:
    """Install CXR processors applying ``stages`` on a diffusers pipeline or ``UNet2DConditionModel``.

    Args:
        target: a pipeline (with ``.unet`` and ``.scheduler``) or a UNet.
        stages: core stages (gate, boost, capture; built by :mod:`.stages`, i.e. the core stage builders).
        scheduler: for a bare UNet, the scheduler whose timesteps its callers pass (enables the pre-hook).
        cond_or_uncond: for a bare UNet with a scheduler, the batch layout of its calls (default: all cond).
            A pipeline's layout follows its ``do_classifier_free_guidance`` (negative first, diffusers' order).

    Returns:
        The :class:`Regulation` (a context manager: leaving it restores the original processors).
    """
    for stage in stages:
        if stage.mask_count > 1:  # one set per image needs the per-row fields the ComfyUI host groups by
            raise CXRInputError(
                f"the stage holds {stage.mask_count} mask sets (one per image); the diffusers host applies one set "
                "to every image of a call.", node=stage.title or "install_regulation", input_name="organ_masks",
                fix="Regulate one image per pipeline call with its own mask set, or use the ComfyUI nodes for a "
                    "batch of radiographs.")
    unet = getattr(target, "unet", target)
    pipeline = target if unet is not target else None
    scheduler = scheduler if scheduler is not None else getattr(pipeline, "scheduler", None)
    schedule = DiscreteSchedule.from_scheduler(scheduler) if scheduler is not None else None
    chunks = tuple(cond_or_uncond) if cond_or_uncond is not None else None
    return Regulation(unet, stages, schedule, pipeline, chunks)


def remove_regulation(regulation: Regulation) -> None:
    """Restore the UNet's original processors (same as ``regulation.remove()``)."""
    regulation.remove()



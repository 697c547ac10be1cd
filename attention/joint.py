"""One joint (text + image) attention call of a diffusion transformer (MMDiT/SD3, Flux), regulated.

A DiT attends over one sequence holding the prompt's tokens and the image's patch tokens together, in the
family's order (text first in SD3 and Flux; image first where a block is "flipped"). Its softmax for an image
query therefore spans both key sets, and the stages act on the parts of it:

- image → image: the gate (:mod:`.gating`: hard or soft, grouped by region, no N×N mask);
- image → text: an additive ``[N_img, T]`` bias, the sum of the anatomy-token bias
  (:func:`.gating.anatomy_token_bias`) and the pathology boost (:func:`.boosting.pathology_boost_bias`);
- text → anything: stock (text queries over every key).

The two key sets of an image query are attended separately and merged exactly by their log-sum-exps
(:func:`.kernels.merge_by_lse`), so the gate's region-grouped kernels and the small text bias compose into
the one softmax the model computes, without a mask over the whole sequence. With nothing to regulate the call
is the stock call itself (the same kernel on the same tensors), so neutral settings change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gating import BACKGROUNDS, gated_self_attention, gated_self_attention_lse, self_attention_bias
from .kernels import Kernel, LseKernel, biased_with_lse, masked_reference, merge_by_lse, sdpa, sdpa_with_lse
from .regions import RegionPartition


@dataclass(frozen=True)
class JointLayout:
    """Where text and image tokens sit in one joint sequence.

    Attributes:
        text_len: text tokens (the DiT's context as the block sees it: registers included, for MMDiT).
        image_len: image tokens (the patch grid's ``h·w``).
        text_first: True for SD3's MMDiT and Flux (``torch.cat((txt, img))``); False for image-first blocks.
    """

    text_len: int
    image_len: int
    text_first: bool = True

    @property
    def total(self) -> int:
        return self.text_len + self.image_len

    @property
    def text(self) -> slice:
        return slice(0, self.text_len) if self.text_first else slice(self.image_len, self.total)

    @property
    def image(self) -> slice:
        return slice(self.text_len, self.total) if self.text_first else slice(0, self.image_len)

    def join(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Concatenate per-part tensors (token axis 2) in this layout's order."""
        return torch.cat((text, image) if self.text_first else (image, text), dim=2)


@dataclass(frozen=True)
class JointGate:
    """The image → image gate of a joint call (see :func:`.gating.gated_self_attention`)."""

    part: RegionPartition
    leak: float = 0.0
    background: str = "confined"

    def __post_init__(self) -> None:
        if not 0.0 <= self.leak <= 1.0:
            raise ValueError(f"leak must be in [0, 1], got {self.leak}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")

    @property
    def neutral(self) -> bool:
        return self.leak == 1.0


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: JointLayout, gate: JointGate | None,
           text_bias: torch.Tensor | None) -> None:
    if q.ndim != 4 or q.shape[2] != layout.total or k.shape[2] != layout.total or v.shape[2] != layout.total:
        raise ValueError(f"joint attention over {tuple(q.shape)} does not match {layout.text_len} text + "
                         f"{layout.image_len} image tokens")
    if gate is not None and gate.part.height * gate.part.width != layout.image_len:
        raise ValueError(f"the gate's {gate.part.height}×{gate.part.width} grid does not hold the call's "
                         f"{layout.image_len} image tokens")
    if text_bias is not None and tuple(text_bias.shape) != (layout.image_len, layout.text_len):
        raise ValueError(f"the text bias is {tuple(text_bias.shape)}, the call needs "
                         f"({layout.image_len}, {layout.text_len}) (image tokens × text tokens)")


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: JointLayout,
    gate: JointGate | None = None,
    text_bias: torch.Tensor | None = None,
    kernel: Kernel = sdpa,
    lse_kernel: LseKernel = sdpa_with_lse,
) -> torch.Tensor:
    """A joint attention call with the image rows regulated.

    Args:
        q, k, v: ``[B, H, N_txt + N_img, D]`` in ``layout``'s order (heads layout: :func:`.kernels.to_heads`).
        layout: the text and image lengths and their order.
        gate: the image → image gate (None or leak 1: every image key at full weight).
        text_bias: ``[N_img, N_txt]`` additive bias on image → text scores (``-inf`` hides a token; None: none).
        kernel: mask-free attention for the stock parts (text rows, and the whole call when neutral).
        lse_kernel: mask-free attention with its log-sum-exp (the image rows' key parts).

    Returns:
        ``[B, H, N, D]`` in q's dtype and the layout's order.
    """
    _check(q, k, v, layout, gate, text_bias)
    if (gate is None or gate.neutral) and text_bias is None:
        return kernel(q, k, v)  # the stock call itself
    t, i = layout.text, layout.image
    text_out = kernel(q[:, :, t], k, v)  # text rows: stock, over every key in the family's order
    qi, ki, vi = q[:, :, i], k[:, :, i], v[:, :, i]
    if gate is not None and gate.leak == 0.0 and text_bias is None:
        # Hard gate, text unbiased: each region's queries over the text keys and the region's own, one mask-free
        # call per region (any backend, no log-sum-exp); free background queries over every key.
        kt, vt = k[:, :, t], v[:, :, t]

        def with_text(qr: torch.Tensor, kr: torch.Tensor, vr: torch.Tensor) -> torch.Tensor:
            return kernel(qr, torch.cat((kt, kr), dim=2), torch.cat((vt, vr), dim=2))

        img = gated_self_attention(qi, ki, vi, gate.part, 0.0, gate.background, with_text)
        return layout.join(text_out, img)
    if gate is None or gate.neutral:
        img_out, img_lse = lse_kernel(qi, ki, vi)
    else:
        img_out, img_lse = gated_self_attention_lse(qi, ki, vi, gate.part, gate.leak, gate.background, lse_kernel)
    if text_bias is None:
        txt_out, txt_lse = lse_kernel(qi, k[:, :, t], v[:, :, t])
    else:
        txt_out, txt_lse = biased_with_lse(qi, k[:, :, t], v[:, :, t], text_bias)
    out, _ = merge_by_lse(img_out, img_lse, txt_out, txt_lse)  # one softmax over both key sets
    return layout.join(text_out, out.to(q.dtype))


def joint_bias(layout: JointLayout, gate: JointGate | None, text_bias: torch.Tensor | None) -> torch.Tensor:
    """The dense ``[N, N]`` additive bias equivalent to :func:`joint_attention` (tests, and a documented fallback
    for backends that give no log-sum-exp: N² floats)."""
    bias = torch.zeros(layout.total, layout.total)
    rows = torch.arange(layout.total)[layout.image]
    if gate is not None and not gate.neutral:
        bias[rows[:, None], rows[None, :]] = self_attention_bias(gate.part, gate.leak, gate.background).cpu()
    if text_bias is not None:
        cols = torch.arange(layout.total)[layout.text]
        bias[rows[:, None], cols[None, :]] = text_bias.float().cpu()
    return bias


def joint_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: JointLayout,
                          gate: JointGate | None = None, text_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference implementation of :func:`joint_attention` with the dense bias of :func:`joint_bias`."""
    _check(q, k, v, layout, gate, text_bias)
    return masked_reference(q, k, v, joint_bias(layout, gate, text_bias).to(q.device))


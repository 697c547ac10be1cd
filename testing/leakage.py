"""Anatomy leakage: how much of an anatomy word still reaches image tokens outside its organ (real ComfyUI).

The gate hides an anatomy word's own tokens ("left lung") from cross-attention queries outside the word's organ.
CLIP's text encoder is causal, so the word has already been mixed into every later token of the prompt (later
words, the end token, the padding), which those queries still see. This module measures what is left.

Definition (per cross-attention layer, on the positive prompt's rows of one real sampling call):

- a query is *outside* when some anatomy word's organ(s) do not cover its token (the gate's own coverage rule,
  :func:`..attention.regions.coverage`, at the layer's grid); ``S`` is the set of words it is outside of;
- ``out_gated``: the layer's attention output (before the output projection) as the gated model computes it;
- ``out_removed``: the same query's attention over the prompt encoded with every word of ``S`` removed from the
  text (the words and their tokens gone, the rest re-encoded), projected by the layer's own ``to_k``/``to_v``;
- ``out_stock``: the same query's stock attention over the prompt as typed.

Over all outside queries of the layer (Frobenius norms over batch rows, queries and channels)::

    leakage = ‖out_gated − out_removed‖ / ‖out_stock − out_removed‖

the fraction of the words' effect on outside queries that masking leaves in: 0 = masking is as good as removing
the words, 1 = masking removes nothing. ``relative`` = ‖out_gated − out_removed‖ / ‖out_removed‖ is reported too
(the change relative to the output itself; small because the start token dominates every query's attention).

Queries are the ones the gated model itself produces at that layer (the same call gives ``out_gated``), so the
figure isolates the layer: earlier layers' differences do not add up in it. With random weights the figures
show the mechanism (how much a causal encoder spreads a word), not what a trained CXR model would do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..attention.kernels import to_heads
from ..attention.layer_call import COND
from ..attention.organs import OrganMasks
from ..attention.regions import coverage
from ..attention.tokens import parse_anatomy

ORGANS = "right_lung, left_lung, heart"


@dataclass(frozen=True)
class LayerLeak:
    key: tuple[str, int, int]
    grid: tuple[int, int]
    outside: int  # outside query tokens of the layer (per batch row)
    leakage: float  # ‖gated − removed‖ / ‖stock − removed‖
    relative: float  # ‖gated − removed‖ / ‖removed‖


def without_words(text: str, words: Sequence[str]) -> str:
    """``text`` with every whole-word occurrence of each phrase removed (what a user would type without it)."""
    for word in words:
        text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", "", text)
    return text


class _Recorder:
    """Wraps one layer's attn2 replace: keeps the first call's positive-prompt queries, keys, values, output."""

    def __init__(self, inner: Callable | None):
        self.inner, self.seen = inner, None

    def __call__(self, q, k, v, extra):
        import comfy.ldm.modules.attention as comfy_attention

        if self.inner is not None:
            out = self.inner(q, k, v, extra)
        else:
            out = comfy_attention.optimized_attention(q, k, v, extra["n_heads"], transformer_options=extra)
        if self.seen is None:
            labels = list(extra.get("cond_or_uncond") or [COND])
            per = q.shape[0] // len(labels)
            rows = [c * per + r for c, lab in enumerate(labels) if lab == COND for r in range(per)]
            h, w = (int(n) for n in extra["activations_shape"][-2:])
            latent = tuple(int(n) for n in extra["original_shape"][-2:])
            self.seen = dict(q=q[rows].float(), k=k[rows].float(), v=v[rows].float(), out=out[rows].float(),
                             heads=extra["n_heads"], grid=(h, w), latent=latent)
        return out


def record_layers(node, model, positive, negative, latent: dict, *, cfg: float = 4.0, denoise: float = 0.6,
                  seed: int = 3) -> dict:
    """Every attn2 layer's first call in one KSampler step of ``model`` (a patched or stock MODEL)."""
    from ..hosts.comfy.unet_layout import transformer_keys

    m = model.clone()
    table = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    recorders = {}
    for key in transformer_keys(m):
        recorders[key] = _Recorder(table.get(key))
        m.set_model_attn2_replace(recorders[key], *key)
    with torch.inference_mode():
        node("KSampler")().sample(m, seed, 1, cfg, "euler", "normal", positive, negative, latent, denoise=denoise)
    return {key: r.seen for key, r in recorders.items() if r.seen is not None}


def layer_leakage(node, model, clip, text: str, anatomy: str, masks: OrganMasks, latent: dict,
                  gate_inputs: dict | None = None, cfg: float = 4.0) -> list[LayerLeak]:
    """The leakage of every cross-attention layer (module docstring) for ``text`` with the ``anatomy`` words
    gated (CXR Text Encode + CXR Anatomy Attention Gate at token strength 1, self-attention not gated, so only
    the token masking acts); ``gate_inputs`` adds or overrides the gate's inputs."""
    from ..hosts.comfy.prompt_isolation import attn2_module

    run = _runner(node)
    positive, tokens = run("CXRTextEncode", clip=clip, text=text, anatomy=anatomy, pathology="")
    negative = node("CLIPTextEncode")().encode(clip, "")[0]
    with torch.inference_mode():
        gated = run("CXRAnatomyAttentionGate", model=model, organ_masks=masks, tokens=tokens,
                    **{"strength": 0.0, "token_strength": 1.0, "organs": ORGANS, **(gate_inputs or {})})[0]
    seen = record_layers(node, gated, positive, negative, latent, cfg=cfg)
    words = parse_anatomy(anatomy)
    dm = model.get_model_object("diffusion_model")
    contexts: dict[frozenset[str], torch.Tensor] = {}

    def removed_context(subset: frozenset[str]) -> torch.Tensor:
        if subset not in contexts:
            cond = node("CLIPTextEncode")().encode(clip, without_words(text, sorted(subset, key=len, reverse=True)))
            contexts[subset] = cond[0][0][0].float()
        return contexts[subset]

    out: list[LayerLeak] = []
    for key, rec in seen.items():
        h, w = rec["grid"]
        inside = {word: coverage(masks, organs, h, w, latent=rec["latent"]) for word, organs in words.items()}
        module = attn2_module(dm, key)
        heads = rec["heads"]
        qh = to_heads(rec["q"], heads)
        stock = torch.nn.functional.scaled_dot_product_attention(qh, to_heads(rec["k"], heads),
                                                                 to_heads(rec["v"], heads))
        gated_h = to_heads(rec["out"], heads)
        diff = base = ref = 0.0
        outside = 0
        patterns: dict[frozenset[str], list[int]] = {}
        for n in range(h * w):
            subset = frozenset(word for word, ins in inside.items() if not bool(ins[n]))
            if subset:
                patterns.setdefault(subset, []).append(n)
        for subset, rows in patterns.items():
            ctx = removed_context(subset)
            with torch.inference_mode():
                k_rm = module.to_k(ctx.to(module.to_k.weight.dtype)).float()
                v_rm = module.to_v(ctx.to(module.to_v.weight.dtype)).float()
            idx = torch.tensor(rows)
            b = qh.shape[0]
            removed = torch.nn.functional.scaled_dot_product_attention(
                qh[:, :, idx], to_heads(k_rm.expand(b, -1, -1), heads), to_heads(v_rm.expand(b, -1, -1), heads))
            diff += float(((gated_h[:, :, idx] - removed) ** 2).sum())
            base += float(((stock[:, :, idx] - removed) ** 2).sum())
            ref += float((removed ** 2).sum())
            outside += len(rows)
        if outside:
            out.append(LayerLeak(key, (h, w), outside, (diff / base) ** 0.5 if base else 0.0, (diff / ref) ** 0.5))
    return out


def _runner(node):
    """Run a V3 node by id as ComfyUI's executor does, its unset inputs at their declared defaults."""
    def run(name: str, **inputs):
        cls = node(name)
        defaults = {}
        for group in ("required", "optional"):
            for input_name, spec in cls.INPUT_TYPES().get(group, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                defaults[input_name] = options.get("default")
        return cls.PREPARE_CLASS_CLONE({}).execute(**{**defaults, **inputs}).result
    return run

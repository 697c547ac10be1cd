"""A small random LoRA for the tiny SD1.5 UNet, in the kohya key format ComfyUI's ``LoraLoader`` maps.

Kohya names a UNet layer by its diffusers path with ``_`` for ``.`` (``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn2_to_k``) and stores ``.lora_down.weight`` ``[rank, in]``, ``.lora_up.weight``
``[out, rank]`` and ``.alpha``; ComfyUI (``comfy.lora.model_lora_keys_unet``) maps the names onto the UNet's own
keys through ``comfy.utils.unet_to_diffusers`` and adds ``strength · alpha / rank · up @ down`` to each weight.

The default targets are the attention projections on the refinement's gradient path in the tiny SD1.5 UNet
(``tiny_checkpoint.UNET_CONFIG``): self- and cross-attention ``to_q``/``to_k`` of the level-0 transformer
(``input_blocks.1.1``, 320 channels) and cross-attention ``to_q``/``to_k`` of the level-1 one (``input_blocks.3.1``,
320 channels), whose maps the energy reads. Weights are seeded: same seed, same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..demo.tiny_checkpoint import UNET_CONFIG, save_checkpoint

if TYPE_CHECKING:
    import torch

RANK = 4
#: Standard deviation of the up and down factors: ΔW = up @ down has element std √rank · 0.2² = 0.08, four times
#: the base weights' 0.02. The random UNet's attention logits are small (near-uniform maps), so a ΔW at the base
#: weights' scale (0.02, the first recipe's choice) moved the SD1.5-shaped UNet's refinement energy by only 2e-5;
#: at 0.08 the LoRA changes the maps the energy reads clearly (energies of strengths 0 / 0.5 / 1 differ by > 1e-3)
#: while the model stays finite and its refinement still lowers the energy.
FACTOR_STD = 0.2


def tiny_sd15_lora_targets() -> dict[str, tuple[int, int]]:
    """Kohya layer name → ``(out_features, in_features)`` of the default targets in the tiny SD1.5 UNet."""
    width = int(UNET_CONFIG["model_channels"])  # type: ignore[call-overload]
    mult = list(UNET_CONFIG["channel_mult"])  # type: ignore[call-overload]
    context = int(UNET_CONFIG["context_dim"])  # type: ignore[call-overload]
    targets: dict[str, tuple[int, int]] = {}
    for level, attns in ((0, ("attn1", "attn2")), (1, ("attn2",))):
        channels = width * mult[level]
        for attn in attns:
            for proj in ("to_q", "to_k"):
                fan_in = context if (attn, proj) == ("attn2", "to_k") else channels
                name = f"lora_unet_down_blocks_{level}_attentions_0_transformer_blocks_0_{attn}_{proj}"
                targets[name] = (channels, fan_in)
    return targets


def build_tiny_lora(path: Path, seed: int = 0, targets: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write a rank-:data:`RANK` LoRA (float32, ``alpha = rank``) for ``targets`` (default
    :func:`tiny_sd15_lora_targets`) to ``path`` as safetensors, atomically.

    Args:
        path: The ``.safetensors`` file to write; its folder is created if needed.
        seed: Seed of the generator that draws the factors (targets in sorted order, down then up).
        targets: Kohya layer name → ``(out_features, in_features)``.

    Returns:
        ``path``.
    """
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (out_features, in_features) in sorted((targets or tiny_sd15_lora_targets()).items()):
        state[f"{name}.lora_down.weight"] = torch.randn(RANK, in_features, generator=generator) * FACTOR_STD
        state[f"{name}.lora_up.weight"] = torch.randn(out_features, RANK, generator=generator) * FACTOR_STD
        state[f"{name}.alpha"] = torch.tensor(float(RANK))
    return save_checkpoint(state, Path(path), f"tiny-sd15-lora rank {RANK} seed {seed}")

"""The UNet's attention layout, read from the model itself: every SpatialTransformer's key and level.

Never a hard-coded block list: SD1.5 has cross-attention at levels 0-2 and in the middle block, SDXL at
levels 1-2 and in the middle block, and a DiT has none (refused by name).
"""

from __future__ import annotations

from collections.abc import Sequence

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ...attention.stages import Key
from ...errors import CXRInputError


def transformer_keys(model) -> list[Key]:
    """``(block, number, transformer_index)`` of every transformer block in the model's UNet.

    Raises:
        CXRInputError: the model has no SpatialTransformer (e.g. a DiT): unsupported.
    """
    dm = model.get_model_object("diffusion_model")
    groups: list[tuple[str, Sequence]] = []
    for name, attr in (("input", "input_blocks"), ("output", "output_blocks")):
        if hasattr(dm, attr):
            groups.append((name, getattr(dm, attr)))
    if hasattr(dm, "middle_block"):
        groups.append(("middle", [dm.middle_block]))
    keys: list[Key] = []
    for name, blocks in groups:
        for i, block in enumerate(blocks):
            for module in block.modules():
                if isinstance(module, SpatialTransformer):
                    keys.extend((name, i, j) for j in range(len(module.transformer_blocks)))
    if not keys:
        kind = type(dm).__name__
        raise CXRInputError(
            f"unsupported model: {kind} has no UNet SpatialTransformer blocks (a DiT or another architecture).",
            input_name="model",
            fix="Use an SD1.x, SD2.x or SDXL-family checkpoint (CXR models such as RoentGen are SD1.5).",
        )
    return sorted(keys, key=lambda k: ({"input": 0, "middle": 1, "output": 2}[k[0]], k[1], k[2]))


def transformer_levels(dm) -> dict[Key, int]:
    """Every transformer block's key → its level: the number of 2× downsamples before it, so its token grid
    is the latent ÷ 2**level (each downsample rounds up). Read from the UNet's own Downsample/Upsample
    layers, never from a block list: SD1.5 has cross-attention at levels 0–2 and in the middle block (3),
    SDXL at levels 1–2 and in the middle block (2)."""
    levels: dict[Key, int] = {}

    def add(kind: str, number: int, block, level: int) -> None:
        for module in block.modules():
            if isinstance(module, SpatialTransformer):
                levels.update({(kind, number, j): level for j in range(len(module.transformer_blocks))})

    level = 0
    for i, block in enumerate(getattr(dm, "input_blocks", ())):
        add("input", i, block, level)
        level += sum(isinstance(m, Downsample) for m in block.modules())
    if hasattr(dm, "middle_block"):
        add("middle", 0, dm.middle_block, level)
    for i, block in enumerate(getattr(dm, "output_blocks", ())):
        add("output", i, block, level)  # an output block's Upsample comes after its transformer
        level -= sum(isinstance(m, Upsample) for m in block.modules())
    return levels


def grid_factor_keys(dm, grid_factor: int, title: str, blocks: Sequence[str] = ("input", "middle", "output"),
                     where: str = "UNet") -> list[Key]:
    """Keys of the transformer blocks in ``blocks`` of the UNet ``dm`` (``model.get_model_object(
    "diffusion_model")``) whose grid is the latent ÷ ``grid_factor`` at any latent size (a power of two: a
    level of :func:`transformer_levels`). Nodes call it when they execute with the model, before anything samples.

    Raises:
        CXRInputError: the model has no UNet transformer blocks (input ``model``), or none in ``blocks`` at
            that grid (input ``grid_factor``; the message lists the grid factors this model has).
    """
    all_levels = transformer_levels(dm)
    if not all_levels:
        raise CXRInputError(f"unsupported model: {type(dm).__name__} has no UNet SpatialTransformer blocks.",
                            node=title, input_name="model",
                            fix="Use an SD1.x, SD2.x or SDXL-family checkpoint (RoentGen is SD1.5).")
    levels = {k: v for k, v in all_levels.items() if k[0] in blocks}
    keys = [k for k, level in levels.items() if 2**level == grid_factor]
    if not keys:
        have = sorted({2**level for level in levels.values()})
        raise CXRInputError(
            f"the {where} has no cross-attention at the grid latent ÷ {grid_factor} (it has some at latent ÷ "
            f"{', '.join(map(str, have)) or 'none'}).", node=title, input_name="grid_factor",
            fix=f"Pick grid_factor {' or '.join(map(str, have))} for this model." if have else
            "Use an SD1.x, SD2.x or SDXL-family checkpoint.")
    return keys

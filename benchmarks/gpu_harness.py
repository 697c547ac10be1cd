"""What the GPU check's sections share (``benchmarks/gpu.py`` runs them): ComfyUI imported in this process on the chosen
device, the :class:`Context` (arguments, nodes, the test checkpoints and UNet weights built once), timing and peak
memory, the issue's targets."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cxr_counterfactual.runner.comfyui_path import require_comfyui

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The folder holding the ``cxr_counterfactual`` link ``benchmarks/gpu.py`` made (ComfyUI's loader imports the pack
#: from there under that name).
LINK_PARENT = Path(sys.modules["cxr_counterfactual"].__path__[0]).parent

TARGETS = {
    "gated_boosted_time": 1.05,  # × stock sampling, 512 px SD1.5 float16
    "soft_gating_time": 1.3,  # × stock attention, 4096 tokens
    "refined_time": 1.5,  # × stock sampling
    "refined_peak_pct": 25.0,  # % over stock's peak memory
}
#: The core test files parametrised over devices (their device ids select them: ``-k cuda``).
CORE_TESTS = ("tests/test_gating_core.py", "tests/test_regions_properties.py", "tests/test_boosting.py",
              "tests/test_refinement.py", "tests/test_device_placement.py")


class Skip(Exception):
    """A section that does not apply here (the reason goes to the JSON and the table)."""

# --------------------------------------------------------------------------------------------------
# ComfyUI in this process, on the chosen device
def import_comfy(device: str, novram: bool = False):
    """ComfyUI's ``nodes`` with its built-in nodes and this pack loaded; the device flags are set before
    ``comfy.model_management`` is imported (they only take effect then)."""
    root = require_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if device == "cpu":
        comfy.cli_args.args.cpu = True
    if novram:
        comfy.cli_args.args.novram = True
    import asyncio

    import comfy.utils
    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False  # (no node here reads or writes ComfyUI's input/output folders)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    cwd = os.getcwd()
    os.chdir(LINK_PARENT)
    try:
        ok = asyncio.run(nodes.load_custom_node("cxr_counterfactual"))
    finally:
        os.chdir(cwd)
    if not ok:
        raise RuntimeError("ComfyUI's loader failed to load the pack")
    return nodes


def sampling_helpers():
    """benchmarks/sampling.py's helpers (the stages as the nodes apply them, the prepared inputs)."""
    from cxr_counterfactual.benchmarks import sampling

    return sampling


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 3)


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    if device != "cuda":
        return None  # RSS on a CPU is not this script's question (benchmarks/sampling.py measures it)
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


# --------------------------------------------------------------------------------------------------
class Context:
    """What the sections share: the arguments, ComfyUI's nodes, the tiny checkpoint and the UNet weights built."""

    def __init__(self, args) -> None:
        self.args, self.device, self.quick = args, args.device, args.quick
        self.cache = Path(args.cache)
        self.start = time.perf_counter()
        self.nodes = None
        self._states: dict[str, dict] = {}
        self._ckpt: Path | None = None

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def tiny_checkpoint(self) -> Path:
        """The tiny SD1.5-shaped checkpoint (its full-size CLIP-L and TAESD serve every SD1.5 case), registered as a
        ComfyUI checkpoint."""
        if self._ckpt is None:
            import folder_paths

            from cxr_counterfactual.demo.tiny_checkpoint import ensure_tiny_checkpoint

            self._ckpt = ensure_tiny_checkpoint(self.cache)
            folder_paths.add_model_folder_path("checkpoints", str(self.cache))
        return self._ckpt

    def seed_state(self, config: dict, state: dict) -> None:
        """Use ``state`` (a UNet state dict of this layout) for :meth:`unet_model` instead of drawing one."""
        self._states.setdefault(json.dumps(config, sort_keys=True, default=str),
                                {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()})

    def unet_model(self, config: dict, model_options: dict | None = None):
        """A ComfyUI MODEL of an SD1.x-layout UNet with seeded random weights (float16 state dict, drawn once per
        layout), loaded by ComfyUI's own loader with ``model_options`` (UNETLoader's: ``dtype``,
        ``fp8_optimizations``)."""
        import comfy.ops
        import comfy.sd
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        from cxr_counterfactual.demo.tiny_checkpoint import _init_module_

        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._states:
            unet = UNetModel(**config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
            _init_module_(unet, torch.Generator().manual_seed(0))
            self._states[key] = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
            del unet
        model = comfy.sd.load_diffusion_model_state_dict(dict(self._states[key]), model_options=model_options or {})
        if model is None:
            raise RuntimeError("ComfyUI did not recognise the random UNet's layout")
        return model

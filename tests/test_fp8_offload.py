"""Weights as users store and load them on a GPU, exercised in-process on the CPU: a UNet stored in float8_e4m3fn
(``UNETLoader`` weight_dtype ``fp8_e4m3fn`` / ``fp8_e4m3fn_fast``), a partial (low-VRAM) load with a LoRA, a
ControlNet beside an fp8 UNet, and out of memory inside the refinement's gradient pass.

Every test runs all four stages (gate, boost with capture, refinement) on the CheXmask radiograph at 64 px (latent
8×7), 2 steps, and checks the refinement's gradient pass against ComfyUI's ordinary forward of the same model
(``energy_probe.comfy_energy``: a capture during a no-grad sampler step at the same latent and sigma).

What runs on the CPU: fp8 weights cast per layer to float32 (``manual_cast``); ``fp8_ops`` with the real
``torch._scaled_mm`` (CPU float8 matmul works in torch ≥ 2.10) once ``supports_fp8_compute`` is forced during the
load; the low-VRAM load ComfyUI makes on a GPU short of memory, forced on the CPU device, where
``load_models_gpu`` always loads fully. What the GPU script covers: the same paths on CUDA, with fp16/bf16
compute, and ``--novram``.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from types import SimpleNamespace

import pytest
import torch
from cxr_helpers import chexmask_radiograph, fitted_chest, gate
from energy_probe import comfy_energy
from node_run import run

from cxr_counterfactual.errors import CXRInputError

pytestmark = pytest.mark.slow  # every test samples the model

STEPS, CFG, SEED = 2, 5.0, 3
# Energy grid 4×4 at grid factor 2 (input blocks 3 and 4); the rest at the node's defaults (window 0–0.3: the first
# of the 2 steps is refined).
REFINE = dict(iterations=1, step_size=0.5, grid_factor="2", smoothing=0.0)
UNET_FILE = "tiny-sd15-unet.safetensors"
#: The gradient pass and ComfyUI's forward read the same weights through the same kernels; they differ only in how
#: the call is assembled around them (measured 6e-8, one float32 rounding step of an energy ≈ 0.9; partial vs full
#: load of the LoRA model: 0, the same merge formula in float32), so agreement is asked to 1e-5, a hundred times
#: below the smallest effect a test tells apart with it (the LoRA's on the energy: 0.04).
SAME_MODEL = 1e-5


@pytest.fixture(scope="module")
def unet_name(comfy, tiny_checkpoint, tmp_path_factory) -> str:
    """The tiny checkpoint's UNet alone (as stored: float16), in a folder registered as ComfyUI's
    "diffusion_models" (as extra_model_paths.yaml would): what ``UNETLoader`` lists."""
    import folder_paths
    from safetensors.torch import load_file, save_file

    prefix = "model.diffusion_model."
    folder = tmp_path_factory.mktemp("diffusion_models")
    state = load_file(str(tiny_checkpoint))
    save_file({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, str(folder / UNET_FILE))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return UNET_FILE


@pytest.fixture(scope="module")
def c(comfy, tiny_model, chexmask_example) -> SimpleNamespace:
    """The radiograph fitted to 64 px (latent 8×7), masks, conditioning (CLIP and VAE of the tiny checkpoint, as
    users pair a UNETLoader UNet with CheckpointLoaderSimple's CLIP/VAE), the 2-step schedule and the fitted image."""
    chest = fitted_chest(comfy, tiny_model, chexmask_example, max_side=64, steps=STEPS)
    image, masks = chexmask_radiograph(chexmask_example)
    with torch.inference_mode():
        chest.image = run(comfy.node("CXRFitToModel"), image=image, max_side=64, organ_masks=masks)[0]
    return chest


def load_unet(comfy, name: str, weight_dtype: str, monkeypatch=None):
    """``UNETLoader`` as users run it. With ``monkeypatch``, ComfyUI is told the device computes in fp8 while it
    loads (``supports_fp8_compute``, what an H100/H200 answers), so ``fp8_e4m3fn_fast`` picks ``comfy.ops.fp8_ops``
    on the CPU too."""
    import comfy.model_management as model_management  # aliased: the fixture is called comfy

    with monkeypatch.context() if monkeypatch else contextlib.nullcontext() as patch:
        if patch is not None:
            patch.setattr(model_management, "supports_fp8_compute", lambda device=None: True)
        with torch.inference_mode():
            return comfy.node("UNETLoader")().load_unet(name, weight_dtype)[0]


def sample(comfy, model, c, sampler, positive=None, negative=None) -> torch.Tensor:
    with torch.inference_mode():
        return comfy.node("SamplerCustom")().sample(model, True, SEED, CFG, positive or c.positive,
                                                   negative or c.negative, sampler, c.sigmas, c.latent)[0]["samples"]


def euler(comfy):
    return comfy.node("KSamplerSelect")().get_sampler("euler")[0]


def refiner(comfy, c):
    return run(comfy.node("CXRRefinementSampler"), tokens=c.tokens, organ_masks=c.masks, **REFINE)[0]


def boost(comfy, model, c):
    return run(comfy.node("CXRPathologyBoost"), model=model, tokens=c.tokens, organ_masks=c.masks,
               end_percent=0.5)[0]


def capture(comfy, model, c, label):
    return run(comfy.node("CXRCaptureAttention"), model=model, tokens=c.tokens, label=label, grid_factor="1",
               organ_masks=c.masks)[0]


def every_stage(comfy, model, c, controls=None) -> SimpleNamespace:
    """Gate, boost with capture, and refinement on ``model`` (``controls``: positive and negative with a ControlNet);
    asserts what each stage must do whatever the weights' dtype or load, and returns what the caller compares.

    - boost: raises the captured in-target share of "effusion" at the boosted step;
    - gate: changes the sampled latent, which stays finite;
    - refinement: lowers the energy at its refined step, and the energy its gradient pass measured equals ComfyUI's
      ordinary forward of the same (gated) model at that latent, so the pass differentiated that model's weights.
    """
    from cxr_counterfactual.hosts.comfy.patch import run_state

    pos, neg = controls or (c.positive, c.negative)
    outs, shares = {}, {}
    for label, m in (("stock", model), ("boosted", boost(comfy, model, c))):
        m = capture(comfy, m, c, label)  # capture only reads (tests/test_boosting.py): "stock" is the stock run
        outs[label] = sample(comfy, m, c, euler(comfy), pos, neg)
        steps = run_state(m).store.latest().capture[label].steps
        first = max(steps)  # the first step's sigma: inside the boost's window 0–0.5
        shares[label] = steps[first].share_sum / steps[first].share_layers
    assert shares["boosted"] > shares["stock"] + 0.01, shares
    gated = sample(comfy, gate(comfy, model, c), c, euler(comfy), pos, neg)
    assert torch.isfinite(gated).all() and float((gated - outs["stock"]).abs().mean()) > 1e-4
    sampler = refiner(comfy, c)
    g = gate(comfy, model, c)
    out = sample(comfy, g, c, sampler, pos, neg)
    record = sampler.sampler_function.store.for_latent(out)
    (step,) = record.refine
    assert torch.isfinite(out).all() and step.iterations == REFINE["iterations"] and step.after < step.before
    cc = SimpleNamespace(**{**vars(c), "positive": pos, "negative": neg})
    forward = comfy_energy(comfy, g, cc, step.latent_before, step.sigma, grid_factor=2, smoothing=0.0)
    assert forward == pytest.approx(step.before, abs=SAME_MODEL)
    return SimpleNamespace(out=out, step=step, record=record, gated=gated)


def path_megabytes(dm, dtype: torch.dtype) -> float:
    """Size in ``dtype`` of the weights the grid-factor-2 gradient pass runs: the time embedding and the input
    blocks up to the last energy layer (input block 3 of the tiny UNet, its only transformer at latent ÷ 2)."""
    from cxr_counterfactual.hosts.comfy.refinement_energy import energy_keys

    last = max(k[1] for k in energy_keys(dm, 2))
    prefixes = ("time_embed.", *(f"input_blocks.{i}." for i in range(last + 1)))
    return sum(p.numel() for n, p in dm.named_parameters() if n.startswith(prefixes)) * dtype.itemsize / 2**20


def test_fp8_unet_runs_every_stage_and_the_gradient_pass_upcasts_its_copies(comfy, c, unet_name):
    m = load_unet(comfy, unet_name, "fp8_e4m3fn")
    dm = m.model.diffusion_model
    assert {p.dtype for p in dm.parameters()} == {torch.float8_e4m3fn}
    assert m.model.manual_cast_dtype == torch.float32  # ComfyUI's compute dtype for fp8 weights on the CPU
    got = every_stage(comfy, m, c)
    # the copies are the compute dtype's (4 bytes a weight), not fp8's (1): upcast once, not per layer call
    assert got.record.weights_copied_mb == pytest.approx(path_megabytes(dm, torch.float32))
    assert {p.dtype for p in dm.parameters()} == {torch.float8_e4m3fn}  # the model's own weights untouched


def test_fp8_fast_matmul_in_sampling_and_upcast_weights_in_the_gradient_pass(comfy, c, unet_name, monkeypatch,
                                                                             caplog):
    """``fp8_e4m3fn_fast`` where the device computes in fp8: ``fp8_ops`` Linear layers run ``torch._scaled_mm``,
    which autograd cannot differentiate (``derivative for aten::_scaled_mm is not implemented``).

    ``fp8_ops.Linear`` calls ``fp8_linear`` only when the module is not in training mode, and ComfyUI 0.3.64 leaves
    an SD-family UNet in training mode (it calls ``.eval()`` only on Stable Cascade's), so there ``fp8_e4m3fn_fast``
    runs the cast path. The test puts the UNet in eval mode, as a later ComfyUI or another pack may, so that
    ``_scaled_mm`` really runs in sampling: the gradient pass must still differentiate (its upcast weights make
    ``fp8_linear`` return None: the cast path), call no ``_scaled_mm`` under grad, and log no fp8 op failure.
    """
    import comfy.ops as ops  # aliased: the fixture is called comfy

    fast = load_unet(comfy, unet_name, "fp8_e4m3fn_fast", monkeypatch)
    dm = fast.model.diffusion_model
    assert isinstance(dm.input_blocks[1][1].transformer_blocks[0].attn2.to_q, ops.fp8_ops.Linear)
    assert dm.training
    dm.eval()
    calls = {True: 0, False: 0}  # _scaled_mm calls with grad mode on / off
    scaled_mm = torch._scaled_mm

    def counting(*args, **kwargs):
        calls[torch.is_grad_enabled()] += 1
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    caplog.set_level(logging.INFO)
    sampler = refiner(comfy, c)
    out = sample(comfy, gate(comfy, fast, c), c, sampler)
    (step,) = sampler.sampler_function.store.for_latent(out).refine
    assert calls[False] > 0, "the sampling forward must run fp8 matmuls"
    assert calls[True] == 0, "the gradient pass must not reach torch._scaled_mm"
    assert not [r for r in caplog.records if "fp8 op" in r.getMessage()]
    assert torch.isfinite(out).all() and step.iterations == REFINE["iterations"] and step.after < step.before
    # The pass computed exactly what the fp8 model computes on the cast path (ComfyUI's plain fp8_e4m3fn load).
    plain = load_unet(comfy, unet_name, "fp8_e4m3fn")
    forward = comfy_energy(comfy, gate(comfy, plain, c), c, step.latent_before, step.sigma, grid_factor=2,
                           smoothing=0.0)
    assert forward == pytest.approx(step.before, abs=SAME_MODEL)


def test_fp8_unet_with_a_controlnet(comfy, c, unet_name, tiny_controlnet):
    """An fp8 UNet (compute float32 here, float16/bfloat16 on a GPU) with the float16-stored tiny ControlNet, loaded
    by ControlNetLoader at its own dtype: ComfyUI adds its residuals in place (``h += ctrl``, a same-kind cast), so it
    acts, and every stage works with it (the gradient pass treats its residuals as constants)."""
    m = load_unet(comfy, unet_name, "fp8_e4m3fn")
    with torch.inference_mode():
        net = comfy.node("ControlNetLoader")().load_controlnet(tiny_controlnet)[0]
        controls = comfy.node("ControlNetApplyAdvanced")().apply_controlnet(c.positive, c.negative, net, c.image,
                                                                           1.0, 0.0, 1.0)
    with_control = every_stage(comfy, m, c, controls)
    without = sample(comfy, gate(comfy, m, c), c, euler(comfy))
    assert float((with_control.gated - without).abs().mean()) > 1e-3, "the ControlNet must act"


# --------------------------------------------------------------------------------------------------
# Offloading
def force_partial_load(monkeypatch, budget: int) -> None:
    """Make ComfyUI load UNets partially, as ``load_models_gpu`` does on a GPU short of memory: a weight budget of
    ``budget`` bytes, less what is already loaded (its own formula). On a CPU device ``load_models_gpu`` always
    loads fully (--lowvram is ignored), so the budget is handed to the patcher here."""
    import comfy.model_base as model_base
    import comfy.model_management as model_management

    model_load = model_management.LoadedModel.model_load

    def partial(self, lowvram_model_memory=0, force_patch_weights=False):
        if isinstance(self.model.model, model_base.BaseModel):
            lowvram_model_memory = max(0.1, budget - self.model.loaded_size())
        return model_load(self, lowvram_model_memory, force_patch_weights)

    monkeypatch.setattr(model_management.LoadedModel, "model_load", partial)


def budget_above(dm, module: str) -> int:
    """A weight budget that holds exactly the layers larger than ``module``: ComfyUI's partial load takes layers
    largest first while they fit, and leaves the rest to the per-layer cast."""
    from comfy.model_management import module_size

    limit = module_size(dm.get_submodule(module))
    return sum(s for m in dm.modules() if hasattr(m, "comfy_cast_weights") and (s := module_size(m)) > limit) + 1


@pytest.fixture
def unloaded(comfy):
    """Models unloaded before and after: a partial load starts from nothing, and later tests load fully again."""
    import comfy.model_management as model_management  # aliased: the fixture is called comfy

    model_management.unload_all_models()
    yield
    model_management.unload_all_models()


def refined_step(comfy, model, c):
    sampler = refiner(comfy, c)
    out = sample(comfy, gate(comfy, model, c), c, sampler)
    (step,) = sampler.sampler_function.store.for_latent(out).refine
    return out, step


def test_partial_load_with_a_lora(comfy, c, tiny_model, lora_name, monkeypatch, unloaded):
    """A low-VRAM load of a LoRA model (the layers larger than a 320×320 projection loaded, among them the LoRA's
    cross-attention ``to_k`` with its patch merged; the rest, among them the LoRA's ``to_q`` and self-attention
    projections, cast per layer by comfy.ops): every stage works, and the gradient pass differentiates the merged
    weights, including those of layers left offloaded, whose LoRA ComfyUI applies in the per-layer cast
    (``LowVramPatch`` in ``weight_function``)."""
    import comfy.model_management as model_management  # aliased: the fixture is called comfy
    import comfy.model_patcher as model_patcher

    with torch.inference_mode():
        lora = comfy.node("LoraLoaderModelOnly")().load_lora_model_only(tiny_model.model, lora_name, 1.0)[0]
    full_out, full = refined_step(comfy, lora, c)  # loaded fully, as ComfyUI does on the CPU
    base_out, base = refined_step(comfy, tiny_model.model, c)
    model_management.unload_all_models()

    dm = lora.model.diffusion_model
    force_partial_load(monkeypatch, budget_above(dm, "input_blocks.1.1.transformer_blocks.0.attn1.to_q"))
    got = every_stage(comfy, lora, c)
    assert lora.model.model_lowvram
    cast = {n for n, m in dm.named_modules() if getattr(m, "comfy_cast_weights", False)}
    loaded = {n for n, m in dm.named_modules() if getattr(m, "comfy_patched_weights", False)}
    patched = {k.removeprefix("diffusion_model.").removesuffix(".weight") for k in lora.patches}
    assert cast and loaded and not cast & loaded
    per_layer = {n for n in patched & cast
                 if any(isinstance(f, model_patcher.LowVramPatch) for f in dm.get_submodule(n).weight_function)}
    assert per_layer, "some LoRA-patched layers must be left to the per-layer cast"
    assert patched & loaded, "and some merged when loaded"  # both ways of applying the LoRA are on the path
    # the same first step from the same noise: the same energy and gradient step as the fully loaded LoRA model
    assert torch.equal(got.step.latent_before, full.latent_before)
    assert got.step.before == pytest.approx(full.before, abs=SAME_MODEL)
    assert abs(full.before - base.before) > 100 * SAME_MODEL, "the LoRA must change the energy"
    # the refined latent: the steps' rounding differences are far below the LoRA's effect on it
    moved = float((full.latent_after - base.latent_after).abs().max())
    assert float((got.step.latent_after - full.latent_after).abs().max()) < 1e-3 * moved
    assert float((got.out - full_out).abs().max()) < 1e-3 * float((full_out - base_out).abs().max())


# --------------------------------------------------------------------------------------------------
# Out of memory
class OutOfMemoryOnce:
    """An attention backend installed as another pack installs one (``optimized_attention_override``): it raises
    ``torch.OutOfMemoryError`` at its first call in a gradient pass (the way CUDA fails an allocation there), then
    attends as ComfyUI would."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, func, *args, **kwargs):
        if torch.is_grad_enabled() and not self.raised:
            self.raised = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return func(*args, **kwargs)


def with_backend(model, backend):
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = backend
    return m


def test_out_of_memory_in_the_gradient_pass_is_a_clear_error_and_the_next_run_is_clean(comfy, c, tiny_model):
    backend = OutOfMemoryOnce()
    model = with_backend(tiny_model.model, backend)
    sampler = refiner(comfy, c)
    with pytest.raises(CXRInputError) as caught:
        sample(comfy, model, c, sampler)
    err = caught.value
    assert backend.raised and err.node == "CXR Refinement Sampler" and err.input_name == "grid_factor"
    assert "out of memory" in err.problem and "Tried to allocate 2.00 GiB" in err.problem
    assert all(word in err.fix for word in ("grid_factor", "iterations", "start_percent/end_percent"))
    assert err.__context__ is None and err.__cause__ is None  # nothing chained keeps the failed pass alive
    # no frame the error keeps holds a tensor of the pass (its graph) or a weight copy (a plain float tensor)
    for frame, _ in traceback.walk_tb(err.__traceback__):
        for name, value in frame.f_locals.items():
            assert not (isinstance(value, torch.Tensor) and value.grad_fn is not None), (frame.f_code.co_name, name)
            assert not (isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values())
                        and name == "params"), frame.f_code.co_name
    # the next run in the same process, same model and sampler: what a run that never failed gives
    again = sample(comfy, model, c, sampler)
    past = OutOfMemoryOnce()
    past.raised = True  # the same backend, past its one failure
    clean = sample(comfy, with_backend(tiny_model.model, past), c, refiner(comfy, c))
    assert torch.equal(again, clean)

"""Latent refinement by attention-concentration energy in ComfyUI: the ``sampler_function`` behind CXR Refinement
Sampler (the node is :mod:`..nodes.refinement`; the loop, its window and its record are the core's,
:mod:`...attention.refinement`).

A MODEL patch cannot change the latent the sampler carries, so refinement wraps the user's sampler: at each step
whose sigma lies in the window, the core's :func:`~...attention.refinement.refine_step` moves the latent, then the
user's own sampler function takes that one step (:mod:`.sampler_methods`: how a sampler runs in segments, its
noise and its history). The refinement runs once per sampling step, however many model evaluations the sampler
makes in it (heun, dpm_2, dpmpp_sde, uni_pc: two). At 0 iterations, or with no step in the window, the stock
sampler function runs the whole schedule in one call: the stock path, bit-identical to the sampler alone; its
callback only reads the energy of the latents of the window's steps, for the record.

The energy and its gradient pass are :mod:`.refinement_energy` for a UNet, :mod:`.dit_refinement` for a diffusion
transformer (:func:`.dit_refinement.energy_pass` picks one by the model); the weight clones that pass differentiates
through are made at the first refined step and dropped when the window ends (never alive after sampling); their
size goes to the run's record.
"""

from __future__ import annotations

import dataclasses
import traceback

import comfy.model_management
import comfy.utils
import torch

from ...attention.refinement import Refinement, RefineWindow, refine_step, refine_window
from ...attention.run_record import RunRecord
from ...attention.run_state import ResultStore, latent_fingerprint
from ...errors import CXRInputError
from . import audit
from .cond_areas import area_node
from .control_checks import check_controls
from .dit_refinement import energy_pass, is_dit
from .patch import HOLDER_KEY
from .refinement_energy import TITLE
from .sampler_methods import METHODS, SamplerMethod, plan, run_noise_sampler, run_segment


def check_no_area(conds: dict | None) -> None:
    """Refuse a positive prompt with an area (ConditioningSetArea / ...Percentage / SetMask "mask bounds"): ComfyUI
    runs it on the area's crop, so the energy pass would read a crop's attention against the whole latent's target.

    Raises:
        CXRInputError: naming the area's node and the fix.
    """
    for cond in (conds or {}).get("positive") or ():
        if cond.get("area") is not None:
            raise CXRInputError(
                "the positive prompt has an area: ComfyUI runs it on the area's crop of the latent, while the "
                "refinement's energy measures the pathology attention over the whole latent.",
                node=area_node(cond), input_name="conditioning",
                fix=f"Connect a positive prompt without an area to the sampler that uses {TITLE} (the gate and the "
                    "boost follow areas), or sample an area-conditioned prompt with a stock sampler.")


class RefinementSampler:
    """The ``sampler_function`` of our KSAMPLER: the user's sampler (``method`` with its SAMPLER's ``options``),
    with energy refinement before each step inside the window."""

    def __init__(self, refinement: Refinement, method: SamplerMethod = METHODS["euler"],
                 options: dict | None = None) -> None:
        self.refinement, self.method, self.options = refinement, method, dict(options or {})
        self.store = ResultStore()

    def __deepcopy__(self, memo: dict) -> RefinementSampler:
        return self  # immutable settings; the store is shared on purpose

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        """The user's sampler over ``sigmas``, refining the latent before each step inside the window."""
        extra_args, ref = ({} if extra_args is None else extra_args), self.refinement
        c = ref.config
        base = model.inner_model.inner_model
        sampling = base.model_sampling
        window = refine_window(c, sampling.percent_to_sigma, [float(s) for s in sigmas])
        # Settings that cannot work are refused here, before the first model call of this run: the grid (the
        # node checks it too when its model input is connected) and a window that holds none of the steps.
        dm = base.diffusion_model
        energy = energy_pass(dm)  # a UNet's energy layers, or a diffusion transformer's blocks
        energy.energy_keys(dm, ref.grid_factor)
        check_controls(model.inner_model.conds, x.shape, base.diffusion_model)  # ControlNet hint, T2I-Adapter fit
        ref.check_batch(int(x.shape[0]), TITLE)  # one target per image of the batch, or one all share
        check_no_area(model.inner_model.conds)
        if window.steps:  # and a target that covers no cell of the energy grid
            latent = (int(x.shape[-2]), int(x.shape[-1]))
            ref.cells(energy.energy_layers(dm, latent, ref.grid_factor)[1], latent, TITLE, _patch(dm))
        if c.iterations and not window.steps:
            raise CXRInputError(
                f"the window {c.start_percent:g}–{c.end_percent:g} (sigma {window.sigma_start:.4g} down to "
                f"{window.sigma_end:.4g}) holds none of the sampler's {len(sigmas) - 1} steps (sigma "
                f"{float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}).", node=TITLE, input_name="end_percent",
                fix="Widen the window so it overlaps the steps (e.g. after an inversion that starts at 0.5, "
                "end_percent above 0.5), or set iterations to 0.")
        record = self.store.new_run()
        record.refine = []  # also shared with the model's RunState record, when the model has one
        state = extra_args.get("model_options", {}).get("transformer_options", {}).get(HOLDER_KEY)
        if state is not None:
            state.record.refine = record.refine
        if c.iterations:
            x = self._refined(model, x, sigmas, extra_args, callback, disable, window, record)
        else:  # the stock path: one call of the user's sampler; the callback only reads energies
            x = self.method.function(model, x, sigmas, extra_args=extra_args, disable=disable, **self.options,
                                     callback=self._recording(model, sigmas, extra_args, callback, window, record))
        out = base.process_latent_out(sampling.inverse_noise_scaling(sigmas[-1], x).to(torch.float32))
        record.latent = latent_fingerprint(out)  # the preview finds this run by the latent it produced
        audit.note("refinement", record.audit())  # the sampler node's refinement, for the export's audit trail
        return x

    def _refined(self, model, x, sigmas, extra_args, callback, disable, window: RefineWindow,
                 record: RunRecord) -> torch.Tensor:
        """The sampler in calls of one step inside the window (each after the refinement), one call per run of
        steps outside it, sharing the noise sampler the stock sampler would have built for the whole run."""
        c, dm = self.refinement.config, model.inner_model.inner_model.diffusion_model
        bar = comfy.utils.ProgressBar(c.iterations * len(window.steps))
        noise = run_noise_sampler(self.method, x, sigmas, extra_args)
        params = None
        for first, end, refined in plan(len(sigmas) - 1, window.steps):
            if refined:
                if params is None:
                    energy = energy_pass(dm)
                    keys = energy.energy_layers(dm, tuple(x.shape[-2:]), self.refinement.grid_factor)[0]
                    params = energy.path_parameters(dm, keys, model.inner_model.inner_model.manual_cast_dtype)
                    record.weights_copied_mb = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
                try:
                    x = self._refine(model, x, sigmas[first], extra_args, params, record, first, window, bar.update)
                except CXRInputError as err:  # e.g. out of memory: the error must not keep the clones alive
                    traceback.clear_frames(err.__traceback__)  # the frames below hold the clones and the energy
                    params = None
                    comfy.model_management.soft_empty_cache()
                    raise
            elif first > window.steps[-1]:
                params = None  # the window is over: drop the weight clones
            x = run_segment(self.method, model, x, sigmas[first:end + 1], extra_args, callback, disable, first,
                            noise, self.options)
        return x

    def _recording(self, model, sigmas, extra_args, callback, window: RefineWindow, record: RunRecord):
        """The stock path's callback: the energy of the latent at each window step (a probe that leaves the latent
        alone), then the caller's callback."""
        unrefined = dataclasses.replace(self.refinement.config, iterations=0)
        last = len(sigmas) - 2

        def recording(d: dict) -> None:
            i = int(d["i"])
            if i in window.steps and not (self.method.unipc_variant and i == last):
                sigma = d.get("sigma_hat", sigmas[i])
                x = d["x"]
                if self.method.unipc_variant:  # UniPC reports its variance-preserving latent (at sigmas[i])
                    x = x * torch.sqrt(1.0 + sigmas[i] ** 2.0)
                self._refine(model, x, sigma, extra_args, None, record, i, window, None, unrefined)
            if callback is not None:
                callback(d)
        return recording

    def _refine(self, model, x, sigma, extra_args, params, record: RunRecord, i: int, window: RefineWindow,
                progress, config=None) -> torch.Tensor:
        dm = model.inner_model.inner_model.diffusion_model
        energy = energy_pass(dm).energy_function(self.refinement, model, sigma, extra_args, params)
        x, step = refine_step(energy, x, float(sigma), config or self.refinement.config, step=i,
                              stop=window.stop_at(float(sigma)), edit_mask=extra_args.get("denoise_mask"),
                              progress=progress, node=TITLE)
        assert record.refine is not None
        record.refine.append(step)
        return x


def _patch(dm) -> int:
    """A diffusion transformer's patch size (the energy grid is its patch grid), 0 for a UNet."""
    return int(dm.patch_size) if is_dit(dm) else 0

"""Latent refinement by attention-concentration energy in ComfyUI: the ``sampler_function`` behind CXR Refinement
Sampler (the node is :mod:`..nodes.refinement`; the loop, its window and its record are the core's,
:mod:`...attention.refinement`).

A MODEL patch cannot change the latent the sampler carries, so refinement is a sampler of our own: Euler
steps (``sample_euler`` without churn, so 0 iterations is exactly plain Euler) and, at the steps whose
sigma lies in the window, the core's :func:`~...attention.refinement.refine_step` on the latent.

The energy and its gradient pass are :mod:`.refinement_energy`; the weight clones that pass differentiates
through are made at the first refined step and dropped when the window ends (never alive after sampling); their
size goes to the run's record.
"""

from __future__ import annotations

import comfy.utils
import torch
from comfy.k_diffusion.sampling import to_d
from tqdm.auto import trange

from ...attention.refinement import Refinement, refine_step, refine_window
from ...attention.run_record import RunRecord
from ...attention.run_state import ResultStore, latent_fingerprint
from ...errors import CXRInputError
from .patch import HOLDER_KEY
from .refinement_energy import TITLE, energy_function, energy_keys, energy_layers, path_parameters


class RefinementSampler:
    """The ``sampler_function`` of our KSAMPLER: Euler steps with energy refinement inside the window."""

    def __init__(self, refinement: Refinement) -> None:
        self.refinement = refinement
        self.store = ResultStore()

    def __deepcopy__(self, memo: dict) -> RefinementSampler:
        return self  # immutable settings; the store is shared on purpose

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        """Euler (as ``sample_euler`` without churn) with refinement before each step inside the window."""
        extra_args, ref = ({} if extra_args is None else extra_args), self.refinement
        c = ref.config
        base = model.inner_model.inner_model
        sampling = base.model_sampling
        window = refine_window(c, sampling.percent_to_sigma, [float(s) for s in sigmas])
        # Settings that cannot work are refused here, before the first model call of this run: the grid (the
        # node checks it too when its model input is connected) and a window that holds none of the steps.
        energy_keys(base.diffusion_model, ref.grid_factor)
        if window.steps:  # and a target that covers no cell of the energy grid
            latent = (int(x.shape[-2]), int(x.shape[-1]))
            ref.cells(energy_layers(base.diffusion_model, latent, ref.grid_factor)[1], latent, TITLE)
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
        bar = comfy.utils.ProgressBar(c.iterations * len(window.steps)) if c.iterations and window.steps else None
        params = None
        s_in = x.new_ones([x.shape[0]])
        for i in trange(len(sigmas) - 1, disable=disable):
            sigma = sigmas[i]
            if i in window.steps:
                if params is None and c.iterations:
                    dm = base.diffusion_model
                    params = path_parameters(dm, energy_layers(dm, tuple(x.shape[-2:]), ref.grid_factor)[0])
                    record.weights_copied_mb = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
                x = self._refine(model, x, sigma, extra_args, params, record, i, window, bar)
            elif params is not None and i > window.steps[-1]:
                params = None  # the window is over: drop the weight clones
            denoised = model(x, sigma * s_in, **extra_args)
            d = to_d(x, sigma, denoised)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma, "denoised": denoised})
            x = x + d * (sigmas[i + 1] - sigma)
        del params
        out = base.process_latent_out(sampling.inverse_noise_scaling(sigmas[-1], x).to(torch.float32))
        record.latent = latent_fingerprint(out)  # the preview finds this run by the latent it produced
        return x

    def _refine(self, model, x, sigma, extra_args, params, record: RunRecord, i: int, window, bar) -> torch.Tensor:
        energy = energy_function(self.refinement, model, sigma, extra_args, params)
        x, step = refine_step(energy, x, float(sigma), self.refinement.config,
                              step=i, stop=window.stop_at(float(sigma)), edit_mask=extra_args.get("denoise_mask"),
                              progress=None if bar is None else bar.update, node=TITLE)
        assert record.refine is not None
        record.refine.append(step)
        return x

"""Build API-format graphs (what ``POST /prompt`` takes) for the tests that run a real headless ComfyUI.

The pack's nodes are filled from the server's ``/object_info`` (the schema's defaults, see tests/node_run.py),
so a graph names only what a test sets. Node ids are numbers in insertion order unless a test names one.
The file names default to the bad-input matrix's uploads (``bi_*``, tests/bad_input_files.py); other tests
name their own (:data:`CHEXMASK_FILES`).

``runner/graph.py`` edits a loaded workflow by node title; it adds no nodes, so it is not this builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cxr_helpers import PROMPT
from node_run import fill

Link = list  # [node id, output slot]
MASK_KEYS = {"right_lung": "RL", "left_lung": "LL", "heart": "H"}
# The CheXmask example's radiograph and masks as uploaded under their own names.
CHEXMASK_IMAGE = "utils_example1.jpg"
CHEXMASK_FILES = {organ: f"{key}_mask.png" for organ, key in MASK_KEYS.items()}


@dataclass
class Graph:
    """An API-format graph under construction; ``nodes`` is the prompt."""

    checkpoint: str
    object_info: Mapping[str, Any]  # the server's /object_info: the inputs and defaults of every node type
    row_id: str = ""  # the CheXmask row a CSV case asks for
    nodes: dict[str, dict] = field(default_factory=dict)
    output: str | None = None  # the last SaveLatent node
    _ckpt: str | None = None

    def add(self, class_type: str, node_id: str | None = None, **inputs) -> str:
        """A node with exactly ``inputs``; its id (``node_id``, else the next number)."""
        nid = node_id or str(len(self.nodes) + 1)
        assert nid not in self.nodes, f"node id {nid} is taken"
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    def node(self, class_type: str, node_id: str | None = None, **inputs) -> str:
        """A node with every input at its schema default except ``inputs``; an unconnected optional input
        (default None) is left out, as the editor leaves it."""
        filled = fill(self.object_info[class_type]["input"], class_type, **inputs)
        return self.add(class_type, node_id, **{k: v for k, v in filled.items() if v is not None})

    def _loader(self) -> str:
        if self._ckpt is None:
            self._ckpt = self.add("CheckpointLoaderSimple", ckpt_name=self.checkpoint)
        return self._ckpt

    @property
    def model(self) -> Link:
        return [self._loader(), 0]

    @property
    def clip(self) -> Link:
        return [self._loader(), 1]

    @property
    def vae(self) -> Link:
        return [self._loader(), 2]

    # ---- inputs ----------------------------------------------------------------------------------------------
    def image(self, name: str = "bi_cxr.jpg") -> Link:
        return [self.add("LoadImage", image=name), 0]

    def file_masks(self, size: tuple[int, int] | None = None, **files: str) -> Link:
        """CXRLoadOrganMasks of the real masks (at ``size`` when given); ``files`` replaces some."""
        names = {o: f"bi_{k}.png" if size is None else f"bi_{k}_{size[0]}x{size[1]}.png" for o, k in MASK_KEYS.items()}
        return [self.add("CXRLoadOrganMasks", **{**names, **files}, threshold=0.5), 0]

    def solid(self, value: float, width: int, height: int, batch: int = 1) -> Link:
        mask = [self.add("SolidMask", value=value, width=width, height=height), 0]
        return self.batch_mask(mask, batch) if batch > 1 else mask

    def batch_mask(self, mask: Link, amount: int) -> Link:
        image = [self.add("MaskToImage", mask=mask), 0]
        repeated = [self.add("RepeatImageBatch", image=image, amount=amount), 0]
        return [self.add("ImageToMask", image=repeated, channel="red"), 0]

    def from_mask(self, **masks) -> Link:
        return [self.add("CXROrganMasksFromMask", other_name="", **masks), 0]

    def fitted(self, masks: Link | None = None, image: Link | None = None,
               max_side: int = 64) -> tuple[Link, Link, Link]:
        """(image, organ masks, fit) of the radiograph and its masks fitted to the model grid."""
        inputs = {"image": image or self.image(), "max_side": max_side,
                  "organ_masks": masks or self.file_masks()}
        fit = self.add("CXRFitToModel", **inputs)
        return [fit, 0], [fit, 1], [fit, 2]

    def encode(self, text: str = PROMPT, anatomy: str = "left lung, heart", pathology: str = "effusion") -> Link:
        return [self.add("CXRTextEncode", clip=self.clip, text=text, anatomy=anatomy, pathology=pathology), 0]

    def negative(self, text: str = "") -> Link:
        return [self.add("CLIPTextEncode", clip=self.clip, text=text), 0]

    def latent(self, image: Link) -> Link:
        return [self.add("VAEEncode", pixels=image, vae=self.vae), 0]

    # ---- stages (schema defaults, but for the window and grid each names) ------------------------------------
    def gate(self, model: Link, masks: Link, tokens: Link | None, node_id: str | None = None, **overrides) -> Link:
        return [self.node("CXRAnatomyAttentionGate", node_id, model=model, organ_masks=masks, tokens=tokens,
                          **overrides), 0]

    def boost(self, model: Link, tokens: Link, masks: Link | None, node_id: str | None = None, **overrides) -> Link:
        """Over the whole schedule (the node's default stops at 0.4) unless ``end_percent`` says otherwise."""
        inputs = dict(model=model, tokens=tokens, organ_masks=masks, end_percent=1.0)
        return [self.node("CXRPathologyBoost", node_id, **{**inputs, **overrides}), 0]

    def capture(self, model: Link, tokens: Link, masks: Link | None, node_id: str | None = None,
                **overrides) -> Link:
        return [self.node("CXRCaptureAttention", node_id, model=model, tokens=tokens, organ_masks=masks,
                          **overrides), 0]

    def refiner(self, tokens: Link, masks: Link, node_id: str | None = None, **overrides) -> Link:
        """CXR Refinement Sampler on the 2× grid over the whole schedule unless ``overrides`` say otherwise."""
        inputs = dict(tokens=tokens, organ_masks=masks, grid_factor="2", end_percent=1.0)
        return [self.node("CXRRefinementSampler", node_id, **{**inputs, **overrides}), 0]

    def edit_keep(self, masks: Link, **overrides) -> tuple[Link, Link, Link]:
        node = self.node("CXREditKeepRegions", organ_masks=masks, **{"margin_px": 4, "feather_px": 2.0, **overrides})
        return [node, 0], [node, 1], [node, 2]

    def sample(self, model: Link, positive: Link, negative: Link, latent: Link, steps: int = 1,
               cfg: float = 5.0, seed: int = 7, node_id: str | None = None) -> Link:
        return [self.add("KSampler", node_id, model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                         scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                         denoise=1.0), 0]

    def refine_sample(self, positive: Link, negative: Link, latent: Link, sampler: Link, steps: int = 2) -> Link:
        sigmas = [self.add("BasicScheduler", model=self.model, scheduler="normal", steps=steps, denoise=1.0), 0]
        return [self.add("SamplerCustom", model=self.model, add_noise=True, noise_seed=7, cfg=5.0, positive=positive,
                         negative=negative, sampler=sampler, sigmas=sigmas, latent_image=latent), 0]

    # ---- outputs ---------------------------------------------------------------------------------------------
    def save_latent(self, latent: Link, prefix: str = "bad_inputs/latent", node_id: str | None = None) -> str:
        self.output = self.add("SaveLatent", node_id, samples=latent, filename_prefix=prefix)
        return self.output

    def save_image(self, image: Link, size: tuple[int, int] | None = None) -> None:
        """VAE-encode and save (first scaled to ``size`` = (w, h) by area: a native-size image is slow to
        encode on a CPU); a NaN anywhere in the image reaches the saved latent."""
        if size is not None:
            image = [self.add("ImageScale", image=image, upscale_method="area", width=size[0], height=size[1],
                              crop="disabled"), 0]
        self.save_latent(self.latent(image))

    def save_mask(self, mask: Link, size: tuple[int, int] | None = None) -> None:
        self.save_image([self.add("MaskToImage", mask=mask), 0], size)

    def save_organs(self, masks: Link, organs: str = "right_lung, left_lung, heart",
                    size: tuple[int, int] | None = None) -> None:
        combined = self.add("CXRCombineOrgans", organ_masks=masks, organs=organs, subtract="", name="all_organs")
        self.save_mask([combined, 1], size)

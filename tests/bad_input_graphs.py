"""API-format graphs for the bad-input matrix (tests/test_bad_inputs.py): a small builder, the input files the
graphs read, and the expectations a case can have.

Every graph is small: the real CheXmask radiograph fitted to 64 px (latent 8×7), the tiny checkpoint, one or
two sampler steps. File names all start with ``bi_`` and are written into the server's input folder by
:func:`write_input_files` from real data (the CheXmask example, pydicom-data's RG1 DICOM, real CheXmask rows),
corrupt ones by truncating or flipping bytes of a copy.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "chest x-ray, left lung with large pleural effusion, normal heart"
# 45 × "clear," is 90 tokens: the anatomy and pathology words land in the second 77-token chunk.
LONG_PROMPT = "chest x-ray, " + "clear, " * 45 + "left lung with large pleural effusion, normal heart"
ORGANS = ("right_lung", "left_lung", "heart")
MASK_FILES = {"right_lung": "RL", "left_lung": "LL", "heart": "H"}
# (width, height) of the resized copies: 1×1, 8×8, 7×21, 21×7 and 3×9 latents, and a small image for full-size
# masks.
SIZES = ((8, 8), (64, 64), (168, 56), (56, 168), (72, 24), (112, 128))
CSV_ROWS = "VinDr-CXR.csv"
NAN = float("nan")

Link = list  # [node id, output slot]


# --------------------------------------------------------------------------------------------------------------------
# expectations
@dataclass(frozen=True)
class Error:
    """The pack refuses the input: the message names ``[node]``, ``input 'input'`` and a fix containing ``fix``.

    ``stage`` is where it is refused: ``validate`` (POST /prompt answers 400, nothing runs) or ``run`` (the
    node raises while the graph runs; ComfyUI reports an execution_error).
    """

    node: str
    input: str
    fix: str
    stage: str = "run"


@dataclass(frozen=True)
class Bound:
    """ComfyUI's own range check refuses a number beyond an input's declared min/max (HTTP 400 naming it)."""

    class_type: str
    input: str


@dataclass(frozen=True)
class Works:
    """The graph runs; the latent it saves has this shape and only finite values."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Case:
    id: str
    node: str  # class_type of the node under test
    build: Callable[[Graph], None]
    expect: Error | Bound | Works


# --------------------------------------------------------------------------------------------------------------------
# the builder
@dataclass
class Graph:
    """An API-format graph under construction; node ids are numbers in insertion order."""

    checkpoint: str
    row_id: str = ""  # the CheXmask row the CSV cases ask for
    nodes: dict[str, dict] = field(default_factory=dict)
    output: str | None = None  # the SaveLatent node a Works check reads
    _ckpt: str | None = None

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

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
        names = {o: f"bi_{k}.png" if size is None else f"bi_{k}_{size[0]}x{size[1]}.png" for o, k in MASK_FILES.items()}
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

    # ---- stages ----------------------------------------------------------------------------------------------
    def gate(self, model: Link, masks: Link, tokens: Link | None, **overrides) -> Link:
        inputs = dict(model=model, organ_masks=masks, strength=1.0, token_strength=1.0,
                      organs="right_lung, left_lung, heart", background="free", margin_px=0, blocks="all",
                      start_percent=0.0, end_percent=1.0, apply_to_uncond=False)
        if tokens is not None:
            inputs["tokens"] = tokens
        return [self.add("CXRAnatomyAttentionGate", **{**inputs, **overrides}), 0]

    def boost(self, model: Link, tokens: Link, masks: Link | None, **overrides) -> Link:
        inputs = dict(model=model, tokens=tokens, target_organs="left_lung", factor=3.0, words="",
                      outside_damping=1.0, blocks="all", start_percent=0.0, end_percent=1.0)
        if masks is not None:
            inputs["organ_masks"] = masks
        return [self.add("CXRPathologyBoost", **{**inputs, **overrides}), 0]

    def capture(self, model: Link, tokens: Link, masks: Link | None, **overrides) -> Link:
        inputs = dict(model=model, tokens=tokens, label="run", grid_factor="2", target_organs="left_lung",
                      start_percent=0.0, end_percent=1.0)
        if masks is not None:
            inputs["organ_masks"] = masks
        return [self.add("CXRCaptureAttention", **{**inputs, **overrides}), 0]

    def edit_keep(self, masks: Link, **overrides) -> tuple[Link, Link, Link]:
        inputs = dict(organ_masks=masks, edit_organs="left_lung", margin_px=4, feather_px=2.0, protect="heart")
        node = self.add("CXREditKeepRegions", **{**inputs, **overrides})
        return [node, 0], [node, 1], [node, 2]

    def sample(self, model: Link, positive: Link, negative: Link, latent: Link, steps: int = 1,
               cfg: float = 5.0) -> Link:
        return [self.add("KSampler", model=model, seed=7, steps=steps, cfg=cfg, sampler_name="euler",
                         scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                         denoise=1.0), 0]

    def refine_sample(self, positive: Link, negative: Link, latent: Link, sampler: Link, steps: int = 2) -> Link:
        sigmas = [self.add("BasicScheduler", model=self.model, scheduler="normal", steps=steps, denoise=1.0), 0]
        return [self.add("SamplerCustom", model=self.model, add_noise=True, noise_seed=7, cfg=5.0, positive=positive,
                         negative=negative, sampler=sampler, sigmas=sigmas, latent_image=latent), 0]

    # ---- outputs ---------------------------------------------------------------------------------------------
    def save_latent(self, latent: Link) -> None:
        self.output = self.add("SaveLatent", samples=latent, filename_prefix="bad_inputs/latent")

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


def pipeline(g: Graph, *, size: tuple[int, int] | None = None, text: str = PROMPT, negative: str = "",
             gate: dict | None = None, boost: dict | None = None, capture: dict | None = None,
             keep: dict | None = None, batch: int = 1, steps: int = 1, image: str = "bi_cxr.jpg") -> None:
    """Radiograph + masks (fitted to 64 px, or files resized to ``size`` = (w, h)) → text encode → the stages
    given (a dict of input overrides; None leaves a stage out) → KSampler → SaveLatent."""
    if size is None:
        img, masks, _ = g.fitted(image=g.image(image))
    else:
        img, masks = g.image(f"bi_cxr_{size[0]}x{size[1]}.png"), g.file_masks(size)
    positive, neg = g.encode(text), g.negative(negative)
    tokens = [positive[0], 1]
    latent = g.latent(img)
    if batch > 1:
        latent = [g.add("RepeatLatentBatch", samples=latent, amount=batch), 0]
    model = g.model
    if gate is not None:
        model = g.gate(model, masks, tokens, **gate)
    if boost is not None:
        model = g.boost(model, tokens, masks, **boost)
    if capture is not None:
        model = g.capture(model, tokens, masks, **capture)
    if keep is not None:
        region = g.edit_keep(masks, **keep)[0]
        latent = [g.add("CXRApplyKeepRegion", latent=latent, edit_region=region, image=img), 0]
    g.save_latent(g.sample(model, positive, neg, latent, steps=steps))


def keep_region(g: Graph, region: str = "organs", mask_batch: int = 1, latent_batch: int = 1,
                value: float = 0.5) -> None:
    """Apply Keep Region with an edit region from the fitted (or full-size) organs, or a solid mask."""
    image, masks, _ = g.fitted()
    if region == "solid":
        edit = g.solid(value, 56, 64)
    else:
        edit = g.edit_keep(g.file_masks() if region == "full_size" else masks)[0]
    if mask_batch > 1:
        edit = g.batch_mask(edit, mask_batch)
    latent = g.latent(image)
    if latent_batch > 1:
        latent = [g.add("RepeatLatentBatch", samples=latent, amount=latent_batch), 0]
    kept = [g.add("CXRApplyKeepRegion", latent=latent, edit_region=edit, image=image), 0]
    g.save_latent(g.sample(g.model, g.encode(), g.negative(), kept))


def boost_target(g: Graph, value: float = 1.0, batch: int = 1, words: str = "", **overrides) -> None:
    """Boost with a solid target MASK (``batch`` of them) instead of organ masks."""
    image, _, _ = g.fitted()
    positive = g.encode()
    target = g.solid(value, 56, 64, batch)
    model = g.boost(g.model, [positive[0], 1], None, target_mask=target, words=words, **overrides)
    g.save_latent(g.sample(model, positive, g.negative(), g.latent(image)))


def refine(g: Graph, size: tuple[int, int] | None = None, **overrides) -> None:
    """SamplerCustom with CXR Refinement Sampler (two steps) on the fitted radiograph or one resized to ``size``."""
    if size is None:
        image, masks, _ = g.fitted()
    else:
        image, masks = g.image(f"bi_cxr_{size[0]}x{size[1]}.png"), g.file_masks(size)
    positive = g.encode()
    inputs = dict(tokens=[positive[0], 1], organ_masks=masks, target_organs="left_lung", iterations=1,
                  step_size=0.1, start_percent=0.0, end_percent=1.0, thresholds="", grid_factor="2",
                  smoothing=0.5, extent_weight=0.0, extent_threshold=0.5)
    sampler = [g.add("CXRRefinementSampler", **{**inputs, **overrides}), 0]
    g.save_latent(g.refine_sample(positive, g.negative(), g.latent(image), sampler))


def mask_op(g: Graph, class_type: str, **inputs) -> None:
    """One mask node on the fitted organ masks; saves its MASK output (its organs for Select / Morph)."""
    _, masks, _ = g.fitted()
    node = g.add(class_type, organ_masks=masks, **inputs)
    if class_type in ("CXRSelectOrgans", "CXRMorphOrgans"):
        g.save_organs([node, 0], "left_lung")
    else:  # Organ to MASK, Edit / Keep Regions: the MASK is output 0; Combine Organs: output 1
        g.save_mask([node, 1 if class_type == "CXRCombineOrgans" else 0])


def invert(g: Graph, empty: bool = False, **overrides) -> None:
    """Invert Radiograph (two steps) of the fitted radiograph's latent, or of an empty one."""
    image, _, _ = g.fitted()
    latent = [g.add("EmptyLatentImage", width=56, height=64, batch_size=1), 0] if empty else g.latent(image)
    positive = g.encode()
    inputs = dict(model=g.model, positive=positive, negative=g.negative(), latent=latent, cfg=1.0, steps=2,
                  scheduler="karras", start_percent=0.5, refine=0)
    g.save_latent([g.add("CXRInvertLatent", **{**inputs, **overrides}), 0])


# --------------------------------------------------------------------------------------------------------------------
# input files
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _flipped(data: bytes, start: int, length: int) -> bytes:
    """``data`` with ``length`` bytes from ``start`` inverted (a damaged copy)."""
    raw = bytearray(data)
    for i in range(start, min(start + length, len(raw))):
        raw[i] ^= 0xFF
    return bytes(raw)


def _csv_with(rows_file: Path, change: Callable[[list[list[str]]], None]) -> bytes:
    with open(rows_file, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    change(rows)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def first_row_id(rows_file: Path) -> str:
    with open(rows_file, newline="", encoding="utf-8") as f:
        return next(iter(csv.DictReader(f)))["image_id"]


def write_input_files(put: Callable[[str, bytes], object], example: Path, rows_dir: Path, dicom: str | Path) -> None:
    """Write every ``bi_*`` file the cases read, through ``put(name, bytes)`` (the server's input folder)."""
    put("bi_cxr.jpg", (example / "utils_example1.jpg").read_bytes())
    radiograph = Image.open(example / "utils_example1.jpg").convert("L")
    masks = {k: Image.open(example / f"{k}_mask.png").convert("L") for k in MASK_FILES.values()}
    for key, mask in masks.items():
        put(f"bi_{key}.png", (example / f"{key}_mask.png").read_bytes())
        for w, h in SIZES:
            small = np.asarray(mask.resize((w, h), Image.BILINEAR)) >= 128
            put(f"bi_{key}_{w}x{h}.png", _png(small.astype(np.uint8) * 255))
    for w, h in SIZES:
        put(f"bi_cxr_{w}x{h}.png", _png(np.asarray(radiograph.resize((w, h), Image.BILINEAR))))
    put("bi_black.png", _png(np.zeros((899, 786), np.uint8)))
    ll = (example / "LL_mask.png").read_bytes()
    put("bi_truncated.png", ll[: len(ll) // 2])
    put("bi_flipped.png", _flipped(ll, len(ll) // 3, 64))
    put("bi_text.png", b"organ mask? no: plain text\n")
    labels = np.zeros((899, 786), np.uint8)
    for value, key in ((1, "RL"), (2, "LL"), (3, "H")):
        labels[np.asarray(masks[key]) >= 128] = value
    label_png = _png(labels)
    put("bi_labels.png", label_png)
    put("bi_labels_truncated.png", label_png[: len(label_png) // 2])

    rg1 = Path(dicom).read_bytes()
    put("bi_rg1.dcm", rg1)
    put("bi_truncated.dcm", rg1[: len(rg1) // 2])
    put("bi_header_flipped.dcm", _flipped(rg1, 132, 400))  # the bytes right after the 'DICM' magic
    put("bi_garbage.dcm", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("bi_empty.dcm", b"")

    _radiograph_files(put, example)

    rows_file = rows_dir / CSV_ROWS
    text = rows_file.read_bytes()
    put("bi_rows.csv", text)
    put("bi_garbage.csv", np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    put("bi_header_only.csv", text.split(b"\n", 1)[0] + b"\n")
    first_line_end = text.index(b"\n")
    put("bi_truncated.csv", text[: first_line_end + 2000])  # the first row, cut inside its RLE columns

    def bad_rle(rows: list[list[str]]) -> None:
        rows[1][rows[0].index("Left Lung")] = "17 4 x9 12"

    def nan_dice(rows: list[list[str]]) -> None:
        rows[1][rows[0].index("Dice RCA (Mean)")] = "nan"

    put("bi_bad_rle.csv", _csv_with(rows_file, bad_rle))
    put("bi_nan_dice.csv", _csv_with(rows_file, nan_dice))


def _radiograph_files(put: Callable[[str, bytes], object], example: Path) -> None:
    """The radiograph loader's files: a 16-bit PNG, a real non-chest radiograph, a two-frame and a colour DICOM, and
    PNG/JPEG files it must refuse (1 pixel, truncated, transparent, a decompression bomb)."""
    from dicom_helpers import write_dicom
    from radiograph_files import bomb_png, extremity_png, png_bytes, quantise, rg1_stored
    from radiograph_files import example as example_grey

    grey = example_grey(example)
    put("bi_cxr16.png", png_bytes(quantise(grey, 16), 16))
    put("bi_extremity.png", extremity_png())
    put("bi_one_pixel.png", png_bytes(np.array([[128]]), 8))
    jpg = (example / "utils_example1.jpg").read_bytes()
    put("bi_truncated.jpg", jpg[: len(jpg) // 2])
    rgba = np.concatenate([np.stack([quantise(grey, 8)] * 3, -1), np.full((*grey.shape, 1), 255)], -1)
    rgba[: grey.shape[0] // 4, : grey.shape[1] // 4, 3] = 0  # a transparent corner
    put("bi_transparent.png", png_bytes(rgba, 8))
    put("bi_bomb.png", bomb_png())
    with tempfile.TemporaryDirectory() as folder:
        stored, ds = rg1_stored()
        frames = np.stack([stored, stored.max() - stored])
        put("bi_frames.dcm", write_dicom(Path(folder) / "f.dcm", frames, photometric="MONOCHROME1",
                                         bits_stored=int(ds.BitsStored)).read_bytes())
        rgb = np.stack([quantise(grey, 8)] * 3, -1)
        put("bi_rgb.dcm", write_dicom(Path(folder) / "c.dcm", rgb, photometric="RGB", bits_stored=8).read_bytes())

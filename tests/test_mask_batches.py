"""Per-sample masks in the nodes: a batch of real radiographs gets one organ mask set per image.

Every producer and per-image node runs the same code on image ``i`` of a batch as on image ``i`` alone, so the
batch's set ``i`` (and mask ``i``) equals the lone run's exactly. Real radiographs (the CheXmask example, the NIH
image, and a crop of the example) are brought to one small size, as an IMAGE batch needs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from node_run import run, run_node
from PIL import Image

from cxr_counterfactual.attention.mask_batch import OrganMaskBatch, mask_sets
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.errors import CXRInputError

SIZE = (288, 252)  # H×W: the CheXmask example's aspect ratio (899×786), small enough for fast atlas fits
MASK_FILES = {"right_lung": "RL_mask.png", "left_lung": "LL_mask.png", "heart": "H_mask.png"}


def _grey(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)


def _image(grey: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` grey → ``[1, *SIZE, 3]`` IMAGE (area resampling: one size for the batch)."""
    small = F.interpolate(grey[None, None], size=SIZE, mode="area")[0, 0].clamp(0, 1)
    return small[None, ..., None].repeat(1, 1, 1, 3)


@pytest.fixture(scope="module")
def images(chexmask_example, data_dir) -> list[torch.Tensor]:
    """Three real radiographs, each ``[1, *SIZE, 3]``: the example, the NIH image, a crop of the example."""
    example = _grey(chexmask_example / "utils_example1.jpg")
    nih = _grey(data_dir / "cxr" / "nih" / "00000001_000.png")
    return [_image(example), _image(nih), _image(example[60:, 20:-40])]


@pytest.fixture(scope="module")
def batch(images) -> torch.Tensor:
    return torch.cat(images)


@pytest.fixture(scope="module")
def atlas_single(comfy, images) -> list[tuple]:
    """The atlas node run on each image alone: (masks, overlay, report)."""
    with torch.inference_mode():  # as ComfyUI runs nodes
        return [run(comfy.node("CXRAtlasOrgans"), image=image) for image in images]


@pytest.fixture(scope="module")
def atlas_batch(comfy, batch) -> tuple:
    with torch.inference_mode():
        return run(comfy.node("CXRAtlasOrgans"), image=batch)


def _same(a: OrganMasks, b: OrganMasks) -> None:
    assert type(a) is type(b) is OrganMasks
    assert a.names == b.names and torch.equal(a.data, b.data)


def _same_sets(batched, singles: list) -> None:
    assert isinstance(batched, OrganMaskBatch) and batched.count == len(singles)
    for got, alone in zip(mask_sets(batched), singles, strict=True):
        _same(got, alone)


# --------------------------------------------------------------------------------------------------
# producers
def test_atlas_fits_every_image_of_a_batch_as_alone(atlas_batch, atlas_single):
    masks, overlay, report = atlas_batch
    _same_sets(masks, [m for m, _, _ in atlas_single])
    assert torch.equal(overlay, torch.cat([o for _, o, _ in atlas_single]))
    lines = report.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"image {i + 1}: Atlas fit quality") for i, line in
                                   enumerate(lines))
    # Different radiographs: different masks (the batch is not one set repeated).
    assert not torch.equal(masks.sample(0).data, masks.sample(1).data)


def test_atlas_names_the_image_that_does_not_fit(comfy, images):
    grey = torch.full_like(images[0], 0.5)
    with pytest.raises(CXRInputError) as err, torch.inference_mode():
        run(comfy.node("CXRAtlasOrgans"), image=torch.cat([images[0], grey]))
    text = str(err.value)
    assert text.startswith("[Organ Masks from Atlas (approximate)] input 'image': image 2 of 2: the lung/heart atlas "
                           "does not fit") and "Fix:" in text


def test_fit_to_model_fits_each_images_masks(comfy, batch, images, atlas_batch, atlas_single):
    cls = comfy.node("CXRFitToModel")
    image, masks, fit = run(cls, image=batch, max_side=128, organ_masks=atlas_batch[0])
    alone = [run(cls, image=im, max_side=128, organ_masks=m) for im, (m, _, _) in zip(images, atlas_single,
                                                                                         strict=True)]
    assert torch.equal(image, torch.cat([a[0] for a in alone])) and all(a[2] == fit for a in alone)
    _same_sets(masks, [a[1] for a in alone])
    assert (masks.height, masks.width) == (fit.height, fit.width) == (128, 112)
    # One set every image shares stays one set, fitted as for one image.
    shared = run(cls, image=batch, max_side=128, organ_masks=atlas_single[0][0])[1]
    _same(shared, alone[0][1])
    with pytest.raises(CXRInputError) as err:
        run(cls, image=batch[:2], max_side=128, organ_masks=atlas_batch[0])
    text = str(err.value)
    assert text.startswith("[Fit Radiograph to Model] input 'organ_masks': the organ masks hold 3 mask sets but the "
                           "batch has 2 images.") and "Fix:" in text


def test_segmentation_gives_a_batch_one_list_of_structures(atlas_batch):
    from cxr_counterfactual.imaging.segmentation import ORGAN_NAMES
    from cxr_counterfactual.nodes.segmentation import common_structures

    # The atlas's sets with their structures in the network's order, as the segmentation gives them.
    sets = [s.select([n for n in ORGAN_NAMES if n in s]) for s in mask_sets(atlas_batch[0])]
    assert common_structures(sets) == sets  # the same structures everywhere: the sets unchanged
    # A structure found in one image only (the heart) becomes an empty mask in the others, in the network's order.
    lungs = sets[1].select("left_lung, right_lung")
    padded = common_structures([sets[0], lungs])
    assert torch.equal(padded[0].data, sets[0].data) and padded[1].names == sets[0].names
    assert torch.equal(padded[1].get("right_lung"), sets[1].get("right_lung"))
    assert float(padded[1].get("heart").abs().max()) == 0.0


def test_chexmask_refuses_a_batch_for_one_row(comfy, batch):
    with pytest.raises(CXRInputError) as err:
        run(comfy.node("CXRLoadCheXmask"), csv_file="any.csv", image_id="x", image=batch)
    text = str(err.value)
    assert text.startswith("[Load Organ Masks (CheXmask)] input 'image': got a batch of 3 images") and \
        "CXR Batch Organ Masks" in text


# --------------------------------------------------------------------------------------------------
# joining sets into a batch
@pytest.fixture(scope="module")
def file_masks(comfy, chexmask_example) -> OrganMasks:
    import folder_paths

    root = Path(folder_paths.get_input_directory())
    for name in MASK_FILES.values():
        shutil.copy(chexmask_example / name, root / name)
    return run(comfy.node("CXRLoadOrganMasks"), **MASK_FILES, threshold=0.5)[0]


def test_batch_node_joins_sets_and_batches_in_order(comfy, atlas_batch, file_masks):
    cls = comfy.node("CXRBatchOrganMasks")
    sets = mask_sets(atlas_batch[0])
    # A set, then a batch (its sets in order), an unconnected input skipped, then a set.
    joined = run(cls, organ_masks_1=sets[2], organ_masks_2=atlas_batch[0], organ_masks_4=sets[0])[0]
    assert joined.count == 5 and [s for s in joined.samples] == [sets[2], *sets, sets[0]]
    # One input alone stays as it is.
    assert run(cls, organ_masks_1=sets[1])[0] is sets[1]
    # Chained like Image Batch.
    chained = run(cls, organ_masks_1=joined, organ_masks_2=sets[1])[0]
    assert chained.samples == (*joined.samples, sets[1])
    # Masks loaded from files at native size, fitted to the batch's grid, join the atlas sets.
    fitted = file_masks.resampled(*SIZE)
    with_files = run(cls, organ_masks_1=fitted, organ_masks_2=atlas_batch[0])[0]
    assert with_files.count == 4 and with_files.sample(0) is fitted


def test_batch_node_refuses_other_organs_or_grids(comfy, atlas_batch, file_masks):
    cls = comfy.node("CXRBatchOrganMasks")
    first = mask_sets(atlas_batch[0])[0]
    heart = run(comfy.node("CXRSelectOrgans"), organ_masks=first, organs="heart")[0]
    with pytest.raises(CXRInputError) as err:
        run(cls, organ_masks_1=first, organ_masks_3=heart)
    text = str(err.value)
    assert text.startswith("[CXR Batch Organ Masks] input 'organ_masks_3': these masks (heart; 288×252) differ from "
                           "organ_masks_1's (right_lung, left_lung, heart; 288×252).") and "Select Organs" in text
    with pytest.raises(CXRInputError) as err:  # the files' native grid: another size than the batch's
        run(cls, organ_masks_1=atlas_batch[0], organ_masks_2=file_masks)
    text = str(err.value)
    assert "input 'organ_masks_2'" in text and "899×786" in text and "Fit Radiograph to Model" in text


# --------------------------------------------------------------------------------------------------
# per-image nodes
def test_mask_nodes_work_per_image(comfy, atlas_batch):
    masks = atlas_batch[0]
    sets = mask_sets(masks)
    cases = [
        ("CXRSelectOrgans", {"organs": "heart, left_lung"}),
        ("CXRCombineOrgans", {"organs": "right_lung, left_lung", "subtract": "heart", "name": "lungs"}),
        ("CXRMorphOrgans", {"organs": "left_lung", "operation": "dilate", "size_px": 5.0}),
        ("CXRMorphOrgans", {"organs": "", "operation": "feather", "size_px": 2.0}),
        ("CXROrganToMask", {"organs": "right_lung, heart"}),
        ("CXREditKeepRegions", {"edit_organs": "left_lung", "margin_px": 6, "feather_px": 2.0, "protect": "heart"}),
    ]
    for node, inputs in cases:
        cls = comfy.node(node)
        batched = run(cls, organ_masks=masks, **inputs)
        alone = [run(cls, organ_masks=s, **inputs) for s in sets]
        for k, out in enumerate(batched):
            if isinstance(out, torch.Tensor):  # a MASK: one per image
                assert out.shape == (3, *SIZE), node
                assert torch.equal(out, torch.cat([a[k] for a in alone])), node
            else:
                _same_sets(out, [a[k] for a in alone])
    # An error in one image names it.
    with pytest.raises(CXRInputError, match=r"image 1 of 3: the edit region covers the whole image"):
        run(comfy.node("CXREditKeepRegions"), organ_masks=masks, edit_organs="left_lung", margin_px=512,
            feather_px=0.0, protect="")


def test_masks_from_mask_batches_and_extending_a_batch(comfy, atlas_batch):
    cls = comfy.node("CXROrganMasksFromMask")
    sets = mask_sets(atlas_batch[0])
    lesion = torch.zeros(3, *SIZE)
    for i in range(3):
        lesion[i, 150 + 10 * i: 190, 160:200] = 1
    batched = run(cls, other_name="lesion", other=lesion, organ_masks=atlas_batch[0])[0]
    _same_sets(batched, [run(cls, other_name="lesion", other=lesion[i:i + 1], organ_masks=s)[0]
                         for i, s in enumerate(sets)])
    assert torch.equal(batched.sample(2).get("lesion"), lesion[2])
    # MASK batches alone make one set per image; a MASK of batch 1 is shared.
    built = run(cls, other_name="", left_lung=lesion, heart=lesion[:1])[0]
    assert built.count == 3 and all(torch.equal(s.get("heart"), lesion[0]) for s in built.samples)
    with pytest.raises(CXRInputError, match=r"input 'left_lung': got a batch of 2 masks where the batch has 3 "
                                            r"images"):
        run(cls, other_name="", left_lung=lesion[:2], organ_masks=atlas_batch[0])
    with pytest.raises(CXRInputError, match=r"input 'organ_masks': the organ masks hold 2 mask sets but the batch "
                                            r"has 3 images"):
        run(cls, other_name="", left_lung=lesion, organ_masks=OrganMaskBatch(sets[:2]))


def test_preview_draws_each_image_with_its_masks(comfy, batch, images, atlas_batch):
    cls = comfy.node("CXRPreviewOrganMasks")
    out = run_node(cls, image=batch, organ_masks=atlas_batch[0], opacity=0.4)
    alone = [run(cls, image=im, organ_masks=s, opacity=0.4)[0] for im, s in zip(images, atlas_batch[0].samples,
                                                                                 strict=True)]
    assert torch.equal(out.result[0], torch.cat(alone)) and out.ui is not None
    with pytest.raises(CXRInputError, match=r"\[Preview Organ Masks\] input 'organ_masks': the organ masks hold 3 "
                                            r"mask sets but the batch has 1 images"):
        run(cls, image=images[0], organ_masks=atlas_batch[0], opacity=0.4)


def test_evaluate_measures_each_pair_with_its_masks(comfy, batch, images, atlas_batch, atlas_single):
    masks = atlas_batch[0]
    edit, _, _ = run(comfy.node("CXREditKeepRegions"), organ_masks=masks, edit_organs="left_lung", margin_px=4,
                     feather_px=2.0, protect="heart")
    edited = (batch + 0.2 * edit[..., None]).clamp(0, 1)  # each image brightened in its own edit region
    # The "edited" images' masks: the next image's, so the Dice differs per pair and the pairing shows.
    shifted = OrganMaskBatch((*masks.samples[1:], masks.samples[0]))
    cls = comfy.node("CXREvaluateEdit")
    report = run(cls, source=batch, edited=edited, edit_region=edit, organ_masks=masks,
                 edit_organ_masks=shifted)[1]
    alone = [run(cls, source=batch[i:i + 1], edited=edited[i:i + 1], edit_region=edit[i:i + 1],
                 organ_masks=masks.sample(i), edit_organ_masks=shifted.sample(i))[1].pairs[0] for i in range(3)]
    assert report.pairs == tuple(alone)
    assert len({p.organ_dice["heart"] for p in report.pairs}) == 3
    with pytest.raises(CXRInputError, match=r"input 'edit_organ_masks': the organ masks hold 3 mask sets but the "
                                            r"batch has 2 images"):
        run(cls, source=batch[:2], edited=edited[:2], edit_region=edit[:2], organ_masks=masks.sample(0),
            edit_organ_masks=shifted)

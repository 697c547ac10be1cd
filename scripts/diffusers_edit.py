"""Edit a radiograph with an SD1.5-style diffusers pipeline (e.g. RoentGen) and the pack's attention regulation.

    pip install "cxr-counterfactual[diffusers]"
    python scripts/diffusers_edit.py --pipeline ./roentgen --image chest.png \\
        --masks right_lung=RL.png,left_lung=LL.png,heart=H.png \\
        --prompt "chest x-ray, large left pleural effusion" --anatomy "left lung, heart" --pathology effusion \\
        --edit-organs left_lung --target left_lung --out edited.png
    # masks from a CheXmask row instead of files:
    #   --chexmask MIMIC-CXR-JPG.csv --image-id <dicom_id>

Steps (each one a function of the pack): read the radiograph (PNG/JPEG, or DICOM through the pack's reader) and
its organ masks (mask files, or a CheXmask row mapped onto the image); fit both to the model's grid
(``imaging.geometry``); encode with the pipeline's VAE; gate + boost the UNet's attention (stages from the core
builders through ``hosts.diffusers.stages``, processors from ``hosts.diffusers.processors``); run
``hosts.diffusers.pipeline.img2img`` with the keep region (only the edit organs may change) and optional latent
refinement; decode, bring back to native size and composite so every pixel outside the edit region is the
source's own.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr_counterfactual.attention.organs import OrganMasks, edit_and_keep, parse_names
from cxr_counterfactual.attention.refinement import RefineConfig, Refinement
from cxr_counterfactual.attention.schedule import DiscreteSchedule
from cxr_counterfactual.attention.stage_builders import target_region
from cxr_counterfactual.hosts.diffusers.pipeline import img2img
from cxr_counterfactual.hosts.diffusers.processors import install_regulation
from cxr_counterfactual.hosts.diffusers.stages import boost_stage, gate_stage, token_map
from cxr_counterfactual.imaging.geometry import apply_fit, composite_native, plan_fit
from cxr_counterfactual.imaging.mask_files import read_mask_image

logger = logging.getLogger("cxr_counterfactual.scripts")


def read_radiograph(path: Path) -> torch.Tensor:
    """``[H, W]`` grey in [0, 1] through the pack's reader (DICOM, PNG or JPEG, as ComfyUI's loader node reads
    them: a 16-bit PNG keeps its full range, which Pillow's ``convert("L")`` would clip)."""
    from cxr_counterfactual.imaging.radiograph import read_radiograph as read

    return read(path).pixels


def read_masks(args: argparse.Namespace, grey: torch.Tensor) -> OrganMasks:
    """Organ masks on the radiograph's own grid: ``--masks organ=file,...`` or a CheXmask row."""
    if args.chexmask:
        from cxr_counterfactual.imaging.chexmask import plan_native, row_masks
        from cxr_counterfactual.imaging.chexmask_index import open_index

        index = open_index(args.chexmask)
        row = index.row(args.image_id)
        native = plan_native(row, (grey.numpy() * 255).astype(np.uint8), index.dataset)
        return row_masks(row, native).masks
    pairs = [p.split("=", 1) for p in args.masks.split(",") if p.strip()]
    return OrganMasks.from_dict({organ.strip(): read_mask_image(Path(file.strip())) for organ, file in pairs})


def edit_radiograph(pipe, grey: torch.Tensor, masks: OrganMasks, args: argparse.Namespace):
    """The edit at native size ``[H, W]`` and the img2img result (records: refinement energies, captures)."""
    fit = plan_fit(*grey.shape, args.size)
    image = apply_fit(grey[None, None], fit)  # [1, 1, h, w]
    fitted = OrganMasks(masks.names, apply_fit(masks.data[None], fit)[0].contiguous())
    vae, device = pipe.vae, pipe.unet.device
    with torch.no_grad():
        x = (image.expand(-1, 3, -1, -1) * 2 - 1).to(device, vae.dtype)
        source = vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor
        cond, uncond = pipe.encode_prompt(args.prompt, device, 1, True, args.negative)
    schedule = DiscreteSchedule.from_scheduler(pipe.scheduler)
    tokens = token_map(pipe.tokenizer, args.prompt, anatomy=args.anatomy, pathology=args.pathology)
    target = target_region(fitted, args.target)
    stages = [gate_stage(fitted, schedule, tokens=tokens, strength=args.gate_strength)]
    if tokens.pathology:
        stages.append(boost_stage(tokens, target, schedule, factor=args.boost))
    edit, _ = edit_and_keep(fitted, parse_names(args.edit_organs), margin_px=args.margin, feather_px=args.feather,
                            protect=parse_names(args.protect))
    refine = None
    if args.refine_iterations and tokens.pathology:
        refine = Refinement(RefineConfig(iterations=args.refine_iterations, step_size=0.1), target,
                            {w: tokens.indices(w) for w in tokens.pathology}, tokens.cond_len, grid_factor=4)
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    with install_regulation(pipe, stages) as regulation:
        result = img2img(regulation, source, cond, schedule.normal_sigmas(args.steps, args.denoise), noise,
                         uncond=uncond, guidance_scale=args.guidance, edit_mask=edit.to(device), refine=refine)
    with torch.no_grad():
        decoded = vae.decode((result.latent / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    decoded = ((decoded + 1) / 2).clamp(0, 1).mean(1, keepdim=True).movedim(1, -1).cpu()  # [1, h, w, 1]
    out, _ = composite_native(grey[None, ..., None], decoded, edit.cpu(), fit)
    return out[0, ..., 0], result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", type=Path, required=True, help="diffusers SD1.x pipeline folder (model_index.json)")
    p.add_argument("--image", type=Path, required=True, help="the radiograph (PNG/JPEG/DICOM)")
    p.add_argument("--masks", default="", help="organ=file pairs, e.g. right_lung=RL.png,left_lung=LL.png,heart=H.png")
    p.add_argument("--chexmask", type=Path, help="a CheXmask CSV (instead of --masks)")
    p.add_argument("--image-id", default="", help="the radiograph's id in the CheXmask CSV")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--anatomy", default="", help="anatomy words of the prompt, tied to organs (gate)")
    p.add_argument("--pathology", default="", help="pathology words of the prompt (boost, refinement)")
    p.add_argument("--edit-organs", default="left_lung", help="organs the edit may change (the rest is kept)")
    p.add_argument("--protect", default="heart", help="organs kept even inside the edit's margin")
    p.add_argument("--target", default="left_lung", help="where the pathology should appear")
    p.add_argument("--margin", type=int, default=8, help="edit region margin (px of the fitted image)")
    p.add_argument("--feather", type=float, default=4.0, help="edit region feather (px)")
    p.add_argument("--gate-strength", type=float, default=1.0)
    p.add_argument("--boost", type=float, default=3.0)
    p.add_argument("--refine-iterations", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="longer side on the model grid (multiple of 8)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--denoise", type=float, default=0.7, help="img2img strength (fraction of the schedule)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True, help="the edited radiograph (8-bit PNG, native size)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.masks and not args.chexmask:
        raise SystemExit("error: give --masks organ=file,... or --chexmask CSV --image-id ID")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(args.device)
    grey = read_radiograph(args.image)
    edited, result = edit_radiograph(pipe, grey, read_masks(args, grey), args)
    Image.fromarray((edited.numpy() * 255).round().astype(np.uint8)).save(args.out)
    for step in result.refine:
        logger.info("refined step %d: energy %.3f -> %.3f", step.step, step.before, step.after)
    logger.info("wrote %s (%d×%d)", args.out, edited.shape[1], edited.shape[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

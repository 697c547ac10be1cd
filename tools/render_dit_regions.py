"""Draw the gate's regions at a diffusion transformer's patch grid over the CheXmask example radiograph.

    python tools/render_dit_regions.py OUT.png [--sides 512 200] [--height 480]

For each image size: the latent (the image ÷ 8, as Fit Radiograph to Model makes it), its 2×2 patch grid (SD3/SD3.5,
Flux), and each token tinted with the region the gate gives it (``attention/regions.partition`` with the patch grid's
``fit``, the example's human masks: right lung, left lung, heart; background untinted). On a latent with an odd side
the last token row/column also reads the first latent row/column (ComfyUI pads circularly): its cells are drawn
over the padded strip below/right of the image. The picture in docs/dit.md was made with the defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_link = Path(tempfile.mkdtemp()) / "cxr_counterfactual"
_link.symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_link.parent))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cxr_counterfactual.attention.organs import OrganMasks  # noqa: E402
from cxr_counterfactual.attention.patch_grid import patch_fit, patch_grid  # noqa: E402
from cxr_counterfactual.attention.regions import partition  # noqa: E402
from cxr_counterfactual.imaging.mask_files import read_mask_image  # noqa: E402
from cxr_counterfactual.imaging.overlay import organ_colour, sized_font  # noqa: E402
from cxr_counterfactual.testing.data import test_data_dir  # noqa: E402

ORGANS = ("right_lung", "left_lung", "heart")
PATCH = 2


def example() -> tuple[Image.Image, OrganMasks]:
    folder = test_data_dir() / "cxr" / "chexmask-example"
    image = Image.open(folder / "utils_example1.jpg").convert("RGB")
    masks = OrganMasks.from_dict({name: read_mask_image(folder / f"{key}_mask.png")
                                  for name, key in (("right_lung", "RL"), ("left_lung", "LL"), ("heart", "H"))})
    return image, masks


def panel(image: Image.Image, masks: OrganMasks, side: int, height: int) -> Image.Image:
    """The radiograph at ``side`` px (longer side), its patch tokens tinted by region, drawn ``height`` px tall."""
    w0, h0 = image.size
    scale = side / max(w0, h0)
    latent = (max(1, round(h0 * scale / 8)), max(1, round(w0 * scale / 8)))
    grid = patch_grid(latent, PATCH)
    part = partition(masks, ORGANS, *grid, fit=patch_fit(latent, PATCH))
    cell = height / (grid[0] * PATCH)  # px per latent cell, the padded latent filling the panel's height
    padded = (round(grid[0] * PATCH * cell), round(grid[1] * PATCH * cell))
    canvas = Image.new("RGB", (padded[1], padded[0]), (40, 40, 40))
    canvas.paste(image.resize((round(latent[1] * cell), round(latent[0] * cell))), (0, 0))
    tint = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    labels = part.labels.reshape(grid)
    names = part.names
    for i in range(grid[0]):
        for j in range(grid[1]):
            box = (j * PATCH * cell, i * PATCH * cell, (j + 1) * PATCH * cell - 1, (i + 1) * PATCH * cell - 1)
            label = int(labels[i, j])
            if label:
                r, g, b = organ_colour(names[label], label - 1)
                draw.rectangle(box, fill=(int(255 * r), int(255 * g), int(255 * b), 110))
            draw.rectangle(box, outline=(255, 255, 255, 45))
    out = Image.alpha_composite(canvas.convert("RGBA"), tint).convert("RGB")
    text = ImageDraw.Draw(out)
    note = f"{side} px: latent {latent[0]}x{latent[1]}, {grid[0]}x{grid[1]} tokens"
    if grid[0] * PATCH != latent[0] or grid[1] * PATCH != latent[1]:
        note += "\nodd side: the last tokens also read\nthe wrapped first cells (dark strip: pad)"
    text.multiline_text((6, 6), note, fill=(255, 255, 255), font=sized_font(max(12, height // 32)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 200])
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args(argv)
    image, masks = example()
    panels = [panel(image, masks, side, args.height) for side in args.sides]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), args.height), (255, 255, 255))
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 8
    sheet.save(args.out)
    print(args.out, sheet.size, "regions:", ", ".join(ORGANS), np.asarray(sheet).shape)


if __name__ == "__main__":
    main()

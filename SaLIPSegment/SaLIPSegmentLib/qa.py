"""A QA picture from a `salip segment --report`: scores by slice, and the slices to look at.

Top: each slice's retrieval score and SAM's predicted IoU, the mask area, flagged slices
marked. Bottom: a montage of the flagged slices (or, when none is, a few segmented ones)
with the mask outline over the windowed image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
from scipy import ndimage

from .errors import InputError
from .io import read_image, write_atomically

MONTAGE_SLICES = 8


def _load_mask(path: Path, shape) -> np.ndarray:
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim == 4:  # several layers: any segment counts
        voxels = voxels.any(axis=0)
    mask = voxels.transpose(2, 1, 0) > 0  # slicerio is (i, j, k)
    if mask.shape != tuple(shape):
        raise InputError(f"{path} has grid {mask.shape}, the input {tuple(shape)}; was it written for this input?")
    return mask


def _montage_slices(rows: List[dict]) -> List[dict]:
    flagged = [r for r in rows if r.get("flags")]
    if flagged:
        return flagged[:MONTAGE_SLICES]
    segmented = [r for r in rows if r.get("area", 0) > 0]
    if not segmented:
        return []
    picks = np.linspace(0, len(segmented) - 1, min(MONTAGE_SLICES, len(segmented))).round().astype(int)
    return [segmented[i] for i in sorted(set(picks))]


def render_qa(report_path: Path, output: Path) -> Path:
    """Draw the QA picture for a report (its input and output files must still exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        report = json.loads(Path(report_path).read_text(encoding="utf-8"))
        rows, axis, window = report["slices"], int(report["axis"]), report["window"]
        image = read_image(report["input"])
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{report_path} is not a readable `salip segment --report` file: {error}") from error
    mask = _load_mask(Path(report["output"]), image.array.shape)
    volume = np.moveaxis(image.array, axis, 0)
    mask = np.moveaxis(mask, axis, 0)

    index = np.array([r["index"] for r in rows])
    score = np.array([min(r["clip_scores"]) if r["clip_scores"] else np.nan for r in rows])
    iou = np.array([min(r["predicted_ious"]) if r["predicted_ious"] else np.nan for r in rows])
    area = np.array([r["area"] for r in rows])
    flagged = np.array([bool(r.get("flags")) for r in rows])
    shown = _montage_slices(rows)

    columns = max(1, min(4, len(shown)))
    montage_rows = -(-len(shown) // columns) if shown else 0
    figure = plt.figure(figsize=(3.2 * max(columns, 3), 5 + 3.2 * montage_rows))
    grid = figure.add_gridspec(2 + montage_rows, max(columns, 1), height_ratios=[1.3, 1] + [1.6] * montage_rows)
    top = figure.add_subplot(grid[0, :])
    top.plot(index, score, ".-", label="retrieval score (min over parts)")
    top.plot(index[flagged], score[flagged], "rx", markersize=10, label="flagged")
    top.set_ylabel("score")
    top.set_title(f"{report['prompt']['display_name']}: {Path(report['input']).name}, "
                  f"{report['sam']} + {report['clip']}, {int(flagged.sum())} flagged of {len(rows)} slices")
    twin = top.twinx()
    twin.plot(index, iou, "g.", alpha=0.6, label="SAM predicted IoU")
    twin.set_ylabel("predicted IoU", color="g")
    top.legend(loc="lower left", fontsize=8)
    middle = figure.add_subplot(grid[1, :], sharex=top)
    middle.bar(index, area, color=np.where(flagged, "tab:red", "tab:blue"))
    middle.set_xlabel(f"slice (numpy axis {axis})")
    middle.set_ylabel("mask area (pixels)")
    low, high = window
    for n, row in enumerate(shown):
        panel = figure.add_subplot(grid[2 + n // columns, n % columns])
        k = row["index"]
        panel.imshow(volume[k], cmap="gray", vmin=low, vmax=high)
        outline = mask[k] & ~ndimage.binary_erosion(mask[k])
        panel.imshow(np.ma.masked_where(~outline, outline), cmap="autumn", interpolation="nearest")
        panel.set_title(f"slice {k}: {', '.join(row.get('flags') or []) or 'ok'}", fontsize=9)
        panel.axis("off")
    if not shown:
        middle.text(0.5, 0.5, "nothing segmented", transform=middle.transAxes, ha="center")
    figure.tight_layout()
    try:
        write_atomically(output, lambda tmp: figure.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(figure)
    return Path(output)

"""A QA picture from a `salip segment --report`: scores by slice, and the slices to look at.

From a `salip evaluate --simulate-corrections N --json` file it draws the correction curves instead.

Top: each slice's retrieval score and SAM's predicted IoU, the mask area, flagged slices
marked, and the volume's verdict ("12 of 52 slices need a look") in the title. Bottom: a
montage of the flagged slices the engine trusts least (or, when none is flagged, a few
segmented ones) with the mask outline over the windowed image, each with its confidence
and the reasons it was flagged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
from scipy import ndimage

from .anatomy import anatomical_plane
from .errors import InputError
from .io import read_image, write_atomically

MONTAGE_SLICES = 8
SCORE_NOTE = ("Retrieval score: 100 x cosine similarity between CLIP's embedding of the chosen part (the slice masked "
              "to it, cropped to its box) and the prompt's sentences; higher is a closer match. Compare it between "
              "slices of one volume, not across volumes or CLIP models. Flagged: a slice a person should check "
              "(its flags are in the report); skipped: uniform after windowing, no model ran; propagated: prompted "
              "with its neighbour's box instead of the full cascade.")


ORACLE_NOTE = ("Oracle score: 100 x Dice between the chosen part and the reference mask (evaluation only). "
               "Flagged: a slice a person should check (its flags are in the report); skipped: uniform after "
               "windowing, no model ran; propagated: prompted with its neighbour's box instead of the full cascade.")
KIND_COLOURS = {"cascade": "tab:blue", "propagated": "lightsteelblue", "skipped": "0.7"}


def _plot_scores(axes, rows: List[dict], oracle: bool = False) -> np.ndarray:
    """Scores and predicted IoU by slice; full-cascade, propagated, skipped and flagged slices marked apart."""
    index = np.array([r["index"] for r in rows])
    score = np.array([min(r["clip_scores"]) if r["clip_scores"] else np.nan for r in rows])
    iou = np.array([min(r["predicted_ious"]) if r["predicted_ious"] else np.nan for r in rows])
    method = np.array([r.get("method", "cascade") for r in rows])
    flagged = np.array([bool(r.get("flags")) for r in rows])
    axes.plot(index, score, "-", color="tab:blue", alpha=0.4)
    for kind, marker, label in (("cascade", "o", "full cascade (key slice)"),
                                ("propagated", "^", "propagated from a neighbour")):
        chosen = method == kind
        axes.plot(index[chosen], score[chosen], marker, color="tab:blue", markersize=4, linestyle="none",
                  fillstyle="full" if kind == "cascade" else "none", label=label)
    axes.plot(index[flagged], score[flagged], "rx", markersize=10, linestyle="none", label="flagged")
    for k in index[method == "skipped"]:
        axes.axvspan(k - 0.5, k + 0.5, color="0.85", linewidth=0)
    handles, labels = axes.get_legend_handles_labels()
    if (method == "skipped").any():
        from matplotlib.patches import Patch

        handles.append(Patch(color="0.85"))
        labels.append("skipped (uniform slice)")
    axes.set_ylabel("oracle score\n(100 x Dice)" if oracle else "retrieval score\n(100 x cosine)")
    twin = axes.twinx()
    twin.plot(index, iou, "g.", alpha=0.6, label="SAM predicted IoU")
    twin.set_ylabel("SAM predicted IoU", color="g")
    axes.legend(handles, labels, loc="lower left", fontsize=7, ncol=2)
    return flagged


def _plot_areas(axes, rows: List[dict], flagged: np.ndarray) -> None:
    index = np.array([r["index"] for r in rows])
    area = np.array([r["area"] for r in rows])
    method = [r.get("method", "cascade") for r in rows]
    colours = ["tab:red" if flag else KIND_COLOURS.get(kind, "tab:blue") for flag, kind in zip(flagged, method)]
    axes.bar(index, np.maximum(area, 0), color=colours)
    axes.set_ylabel("mask area (pixels)")
    from matplotlib.patches import Patch

    kinds = [("cascade", "full cascade"), ("propagated", "propagated"), ("skipped", "skipped")]
    handles = [Patch(color=KIND_COLOURS[k], label=label) for k, label in kinds if k in method]
    handles += [Patch(color="tab:red", label="flagged")] if flagged.any() else []
    axes.legend(handles=handles, loc="upper right", fontsize=7, ncol=len(handles) or 1)


def _load_mask(path: Path, shape) -> np.ndarray:
    import slicerio

    from .outputs import output_kind

    if output_kind(path) == "labelmap":
        mask = read_image(path).array > 0
        if mask.shape != tuple(shape):
            raise InputError(f"{path} has grid {mask.shape}, the input {tuple(shape)}; was it written for this input?")
        return mask
    segmentation = slicerio.read_segmentation(str(path))
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim == 4:  # several layers: any segment counts
        voxels = voxels.any(axis=0)
    mask = voxels.transpose(2, 1, 0) > 0  # slicerio is (i, j, k)
    if mask.shape != tuple(shape):
        raise InputError(f"{path} has grid {mask.shape}, the input {tuple(shape)}; was it written for this input?")
    return mask


def _montage_slices(rows: List[dict]) -> List[dict]:
    """The flagged slices the engine trusts least (lowest confidence first), or a few segmented ones."""
    flagged = sorted((r for r in rows if r.get("flags")), key=lambda r: (r.get("confidence") or 0.0, r["index"]))
    if flagged:
        return sorted(flagged[:MONTAGE_SLICES], key=lambda r: r["index"])
    segmented = [r for r in rows if r.get("area", 0) > 0]
    if not segmented:
        return []
    picks = np.linspace(0, len(segmented) - 1, min(MONTAGE_SLICES, len(segmented))).round().astype(int)
    return [segmented[i] for i in sorted(set(picks))]


def _panel_title(plane: str, row: dict) -> str:
    """The slice, its confidence (reports before it had none) and its flags, one per line."""
    confidence = row.get("confidence")
    head = f"{plane} slice {row['index']}" + (f", confidence {confidence:.2f}" if confidence is not None else "")
    return "\n".join([head] + list(row.get("flags") or ["ok"]))


def render_qa(report_path: Path, output: Path) -> Path:
    """Draw the QA picture for a report (its input and output files must still exist) into a PNG."""
    import matplotlib.pyplot as plt

    corrections = _corrections_in(report_path)
    figure = draw_qa(report_path) if corrections is None else draw_corrections(corrections, Path(report_path).name)
    try:
        write_atomically(output, lambda tmp: figure.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(figure)
    return Path(output)


def _corrections_in(path: Path):
    """The `corrections` field of an evaluate --json file, or None for anything else (a segment report)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # draw_qa says what is wrong with it
    return data.get("corrections") if isinstance(data, dict) else None


def draw_corrections(found: dict, title: str):
    """3D Dice after each simulated correction, one line per way of choosing the slice, and the box bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (dice_axes, time_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"qa": "slice the QA ranks worst (label-free)", "worst-dice": "slice worst by Dice (needs labels)"}
    for name, steps in found["curves"].items():
        xs = [s["step"] for s in steps]
        dice_axes.plot(xs, [s["dice_volume"] for s in steps], marker="o", label=labels.get(name, name))
        time_axes.plot(xs[1:], [s["seconds"] for s in steps[1:]], marker="o", label=labels.get(name, name))
    dice_axes.axhline(found["box_bound_dice_volume"], color="0.5", linestyle="--",
                      label="box bound (the reference's box on every slice)")
    dice_axes.set(xlabel="corrections (0: the automatic pass)", ylabel="3D Dice", ylim=(0, 1),
                  title=f"{title}: Dice after each correction")
    time_axes.set(xlabel="correction", ylabel="seconds", title="seconds per correction")
    dice_axes.legend(fontsize=8, loc="lower right")
    time_axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def draw_qa(report_path: Path):
    """The QA picture as a matplotlib figure (the caller closes it)."""
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

    plane = anatomical_plane(image.direction, axis)
    shown = _montage_slices(rows)
    columns = max(1, min(4, len(shown)))
    montage_rows = -(-len(shown) // columns) if shown else 0
    figure = plt.figure(figsize=(3.2 * max(columns, 3), 5.6 + 3.2 * montage_rows))
    grid = figure.add_gridspec(2 + montage_rows, max(columns, 1), height_ratios=[1.3, 1] + [1.6] * montage_rows)
    top = figure.add_subplot(grid[0, :])
    middle = figure.add_subplot(grid[1, :], sharex=top)
    oracle = report.get("clip") == "oracle"
    flagged = _plot_scores(top, rows, oracle)
    verdict = report.get("summary", {}).get("verdict") or f"{int(flagged.sum())} flagged"
    top.set_title(f"{report['prompt']['display_name']}: {Path(report['input']).name}, "
                  f"{report['sam']} + {report['clip']}, {len(rows)} {plane} slices: {verdict}")
    _plot_areas(middle, rows, flagged)
    middle.set_xlabel(f"{plane} slice (index along numpy axis {axis} of the input)")
    figure.text(0.01, 0.005, ORACLE_NOTE if oracle else SCORE_NOTE, fontsize=7, va="bottom", ha="left", wrap=True)
    low, high = window
    for n, row in enumerate(shown):
        panel = figure.add_subplot(grid[2 + n // columns, n % columns])
        k = row["index"]
        panel.imshow(volume[k], cmap="gray", vmin=low, vmax=high)
        outline = mask[k] & ~ndimage.binary_erosion(mask[k])
        panel.imshow(np.ma.masked_where(~outline, outline), cmap="autumn", interpolation="nearest")
        panel.set_title(_panel_title(plane, row), fontsize=8)
        panel.axis("off")
    if not shown:
        middle.text(0.5, 0.5, "nothing segmented", transform=middle.transAxes, ha="center")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return figure

"""Evaluate the cascade against a reference mask, stage by stage, to see where quality is lost.

Per slice with reference tissue:
  ceiling    the best Dice any single proposal reaches (what the propose step allows);
  retrieved  Dice of the retrieved candidates (what the score step chose);
  refined    Dice of the final mask (after the refine step);
  box bound  Dice of the segmenter prompted with the reference's own boxes (one per
             connected part, up to top-k) on the same embedding: the best a box can do.
Over the volume: Dice, the mean of per-slice Dice (as the paper reports it), and HD95 in mm.
Every slice gets the full cascade here (no propagation), so each stage is measured everywhere.

The product is measured apart (evaluate_modes): the volume runner as `salip segment` runs it,
per mode, over the whole range: 3D Dice, HD95, slices painted without target, missed slices,
and how well the per-slice flags find the slices a person would reject (Dice under 0.5).
Numpy in, numbers out; no Slicer, no files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .cascade import segment_slice
from .cleanup import cleaned_run_mask
from .errors import InputError
from .imaging import dice, mask_to_box, window_to_uint8
from .models.base import Scorer, Segmenter
from .settings import VolumeSettings
from .volume import VolumeResult, as_volume, check_slice_range, choose_window, segment_volume


@dataclass
class SliceEvaluation:
    index: int
    reference_area: int
    predicted_area: int
    candidate_count: int
    ceiling: Optional[float]
    retrieved: Optional[float]
    refined: float
    box_bound: Optional[float]


@dataclass
class Evaluation:
    dice_volume: float
    dice_mean_per_slice: float
    """The refined masks' Dice averaged over slices with reference tissue, as the paper reports."""
    hd95_mm: float
    ceiling_mean: float
    retrieved_mean: float
    box_bound_mean: float
    slices_with_reference: int
    false_positive_slices: int
    """Slices without reference tissue where the cascade still drew something."""
    seconds: float
    slices: List[SliceEvaluation] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain data; NaN and infinity (no tissue, an empty prediction) become None for JSON."""
        def clean(value):
            if isinstance(value, float) and not np.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(asdict(self))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distance, in the units of `spacing`.

    `spacing` is in the masks' axis order. Both empty: 0; one empty: infinity.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


def _reference_boxes(reference: np.ndarray, top_k: int) -> List[Tuple[int, int, int, int]]:
    """Boxes of the reference's largest connected parts, up to top_k (two lungs, two kidneys)."""
    labels, count = ndimage.label(reference)
    if count == 0:
        return []
    sizes = ndimage.sum(reference, labels, index=np.arange(1, count + 1))
    largest = np.argsort(-sizes)[:top_k] + 1
    return [mask_to_box(labels == label) for label in largest]


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def evaluate_volume(
    volume: np.ndarray,
    reference: np.ndarray,
    segmenter: Segmenter,
    scorer: Scorer,
    sentences: Sequence[str],
    settings: Optional[VolumeSettings] = None,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    progress: Optional[Callable[[int, int], None]] = None,
) -> Evaluation:
    """Run the cascade on every slice and measure each stage against `reference`.

    From `settings`: top-k, axis, slice range, window and proposal (every slice gets the
    full cascade whatever the mode). `spacing` is in numpy axis order (k, j, i), for HD95
    in millimetres; `progress(done, total)` follows the slices.
    """
    settings = settings or VolumeSettings()
    volume = as_volume(volume)
    reference = as_volume(reference).astype(bool)
    if reference.shape != volume.shape:
        raise InputError(f"Reference shape {reference.shape} differs from the volume's {volume.shape}.")
    axis = settings.axis % 3
    start, stop = check_slice_range(settings.slice_range or (0, volume.shape[axis]), volume.shape[axis])
    window = choose_window(volume, settings.window)
    slices = np.moveaxis(volume, axis, 0)
    ref_slices = np.moveaxis(reference, axis, 0)
    prediction = np.zeros(volume.shape, dtype=bool)
    pred_slices = np.moveaxis(prediction, axis, 0)
    rows: List[SliceEvaluation] = []
    started = time.perf_counter()
    for index in range(start, stop):
        if progress:
            progress(index - start, stop - start)
        row, mask = _evaluate_slice(index, window_to_uint8(slices[index], window), ref_slices[index],
                                    segmenter, scorer, sentences, settings)
        rows.append(row)
        if mask is not None:
            pred_slices[index] = mask
    if progress:
        progress(stop - start, stop - start)
    region = [slice(None)] * 3
    region[axis] = slice(start, stop)
    region = tuple(region)
    return _summarise(rows, prediction[region], reference[region], spacing, time.perf_counter() - started)


def _evaluate_slice(index: int, image: np.ndarray, ref: np.ndarray, segmenter: Segmenter, scorer: Scorer,
                    sentences: Sequence[str], settings: VolumeSettings):
    """One slice's row and its predicted mask (None for air, where nothing ran)."""
    if image.min() == image.max() and not ref.any():
        return SliceEvaluation(index, 0, 0, 0, None, None, 1.0, None), None  # air: nothing to find
    result = segment_slice(image, segmenter, scorer, sentences, top_k=settings.top_k, proposal=settings.proposal,
                           reference=ref, keep_candidates=True, shape=settings.shape)
    if not ref.any():
        return SliceEvaluation(index, 0, int(result.mask.sum()), result.candidate_count,
                               None, None, dice(result.mask, ref), None), result.mask
    ceiling = max((dice(c.mask, ref) for c in result.candidates), default=0.0)
    retrieved_mask = np.zeros_like(ref)
    for i in result.retrieved:
        retrieved_mask |= result.candidates[i].mask
    # The segmenter still holds this slice's embedding: the bound costs one decoder pass.
    bound_parts = segmenter.refine(_reference_boxes(ref, settings.top_k))
    bound = np.logical_or.reduce([p.mask for p in bound_parts])
    return SliceEvaluation(
        index, int(ref.sum()), int(result.mask.sum()), result.candidate_count, ceiling,
        dice(retrieved_mask, ref) if result.retrieved else 0.0, dice(result.mask, ref), dice(bound, ref),
    ), result.mask


def _summarise(rows: List[SliceEvaluation], prediction: np.ndarray, reference: np.ndarray,
               spacing: Sequence[float], seconds: float) -> Evaluation:
    """The volume's figures over the evaluated range."""
    with_reference = [r for r in rows if r.reference_area > 0]
    return Evaluation(
        dice_volume=dice(prediction, reference),
        dice_mean_per_slice=_mean(r.refined for r in with_reference),
        hd95_mm=hd95(prediction, reference, spacing),
        ceiling_mean=_mean(r.ceiling for r in with_reference),
        retrieved_mean=_mean(r.retrieved for r in with_reference),
        box_bound_mean=_mean(r.box_bound for r in with_reference),
        slices_with_reference=len(with_reference),
        false_positive_slices=sum(1 for r in rows if r.reference_area == 0 and r.predicted_area > 0),
        seconds=seconds,
        slices=rows,
    )


# A slice whose Dice is under this is one a person would redo: the flags should find it.
POOR_SLICE_DICE = 0.5


@dataclass
class SliceOutcome:
    """One slice of a product run against the reference."""

    index: int
    reference_area: int
    predicted_area: int
    dice: float
    """1.0 where both are empty (nothing to find, nothing drawn)."""
    flags: List[str]
    reason: Optional[str]
    """The run's reason for this slice (no tissue, beyond the organ, target absent...), or None."""

    @property
    def poor(self) -> bool:
        return self.dice < POOR_SLICE_DICE


@dataclass
class ModeEvaluation:
    """The product's figures for one mode over the evaluated range."""

    mode: str
    dice_volume: float
    hd95_mm: float
    slices_with_reference: int
    painted_without_target: int
    """Slices without reference tissue where the run drew something."""
    missed_slices: int
    """Slices with reference tissue where the run drew nothing."""
    poor_slices: int
    """Slices with Dice under POOR_SLICE_DICE (painted and missed slices included)."""
    flagged_slices: int
    flag_recall: float
    """Of the poor slices, the fraction flagged (NaN without poor slices)."""
    flag_precision: float
    """Of the flagged slices, the fraction poor (NaN when nothing is flagged)."""
    seconds: float
    slices: List[SliceOutcome] = field(default_factory=list)

    def to_dict(self) -> dict:
        return Evaluation.to_dict(self)  # the same JSON cleaning


def evaluate_modes(
    volume: np.ndarray,
    reference: np.ndarray,
    segmenter: Segmenter,
    scorer: Scorer,
    sentences: Sequence[str],
    settings: Optional[VolumeSettings] = None,
    modes: Sequence[str] = ("propagate", "every-slice"),
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[ModeEvaluation]:
    """Run the volume runner once per mode, as `salip segment` would, and measure each run."""
    settings = settings or VolumeSettings()
    reference = as_volume(reference).astype(bool)
    rows = []
    for mode in modes:
        run = replace(settings, mode=mode)
        result = segment_volume(volume, segmenter, scorer, sentences, run, reference=reference, progress=progress)
        rows.append(measure_run(result, reference, spacing, run))
    return rows


def measure_run(result: VolumeResult, reference: np.ndarray, spacing: Sequence[float],
                settings: Optional[VolumeSettings] = None) -> ModeEvaluation:
    """A run's mask, cleaned up as `salip segment` writes it (the clean-up of `settings`, the run's;
    None: the defaults'), and its flags against the reference, over the run's slice range."""
    region = [slice(None)] * 3
    region[result.axis] = slice(*result.slice_range)
    prediction = as_volume(cleaned_run_mask(result, settings or VolumeSettings()))[tuple(region)]
    truth = as_volume(reference)[tuple(region)]
    pred_slices, ref_slices = np.moveaxis(prediction, result.axis, 0), np.moveaxis(truth, result.axis, 0)
    outcomes = [SliceOutcome(record.index, int(ref.sum()), int(pred.sum()), dice(pred, ref), list(record.flags),
                             record.reason)
                for record, pred, ref in zip(result.slices, pred_slices, ref_slices)]
    poor = [o for o in outcomes if o.poor]
    flagged = [o for o in outcomes if o.flags]
    return ModeEvaluation(
        mode=result.mode, dice_volume=dice(prediction, truth), hd95_mm=hd95(prediction, truth, spacing),
        slices_with_reference=sum(1 for o in outcomes if o.reference_area),
        painted_without_target=sum(1 for o in outcomes if o.predicted_area and not o.reference_area),
        missed_slices=sum(1 for o in outcomes if o.reference_area and not o.predicted_area),
        poor_slices=len(poor), flagged_slices=len(flagged),
        flag_recall=sum(1 for o in poor if o.flags) / len(poor) if poor else float("nan"),
        flag_precision=sum(1 for o in flagged if o.poor) / len(flagged) if flagged else float("nan"),
        seconds=result.seconds, slices=outcomes,
    )

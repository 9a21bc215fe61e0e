"""The cascade over a volume: axis, slice range, intensity window, progress and cancel.

Numpy in, numpy out; no Slicer, no files. A 2D image is a one-slice volume.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cascade import SliceResult, segment_slice
from .errors import Cancelled, InputError
from .imaging import robust_window, window_to_uint8
from .models.base import ProposalSettings, Scorer, Segmenter

NO_TISSUE = "no tissue"

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


@dataclass
class SliceRecord:
    """One row of the per-slice table: what the cascade found and how long it took."""

    index: int
    reason: Optional[str]
    clip_scores: List[float] = field(default_factory=list)
    predicted_ious: List[float] = field(default_factory=list)
    candidate_count: int = 0
    area: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.reason == NO_TISSUE

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VolumeResult:
    """The mask (same shape as the input) and the per-slice table."""

    mask: np.ndarray
    slices: List[SliceRecord]
    axis: int
    slice_range: Tuple[int, int]
    window: Tuple[float, float]
    seconds: float

    def summary(self) -> dict:
        processed = [s for s in self.slices if not s.skipped]
        return {
            "slices_in_range": len(self.slices),
            "slices_processed": len(processed),
            "slices_with_mask": sum(1 for s in self.slices if s.area > 0),
            "voxels": int(self.mask.sum()),
            "seconds": round(self.seconds, 3),
        }


def as_volume(array: np.ndarray) -> np.ndarray:
    """Check an array is a usable scalar 2D or 3D image; a 2D image becomes one slice."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"Voxel type {array.dtype} is not supported: give a scalar integer or float image.")
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise InputError(
            f"Expected a 2D image or a 3D volume, got {array.ndim} dimensions {array.shape}; "
            "split 4D series and multi-component images into scalar volumes first."
        )
    if 0 in array.shape:
        raise InputError(f"The volume is empty (shape {array.shape}).")
    return array


def acquisition_axis(spacing: Sequence[float], shape: Optional[Sequence[int]] = None) -> int:
    """The numpy axis with the largest spacing: slices were acquired across it.

    `spacing` (and `shape`) are in numpy order (k, j, i). Ties go to the slowest axis,
    which is the acquisition axis of most files. A one-voxel-thick axis (a 2D image
    stored as a volume) is the slice axis whatever its spacing.
    """
    if shape is not None and 1 in shape:
        return list(shape).index(1)
    spacing = [float(s) for s in spacing]
    return int(np.argmax(spacing))


def parse_slice_range(text: Optional[str], count: int) -> Tuple[int, int]:
    """"A:B" (Python-style, B exclusive, either may be empty or negative) to (start, stop)."""
    if text is None or text.strip() in ("", ":"):
        return 0, count
    start_text, sep, stop_text = text.partition(":")
    try:
        start = int(start_text) if start_text.strip() else 0
        stop = int(stop_text) if sep and stop_text.strip() else (count if sep else start + 1)
    except ValueError:
        raise InputError(f"Slice range {text!r} must look like A:B with whole numbers.") from None
    return check_slice_range((start, stop), count)


def check_slice_range(slice_range: Tuple[int, int], count: int) -> Tuple[int, int]:
    start, stop = slice_range
    start = start + count if start < 0 else start
    stop = stop + count if stop < 0 else stop
    if not (0 <= start < stop <= count):
        raise InputError(
            f"Slice range {slice_range[0]}:{slice_range[1]} is outside this volume's {count} slices "
            f"(valid: 0:{count})."
        )
    return start, stop


def choose_window(volume: np.ndarray, window: Optional[Tuple[float, float]]) -> Tuple[float, float]:
    """The given window, checked, or a robust one over the whole volume."""
    if window is not None:
        low, high = (float(v) for v in window)
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise InputError(f"Window {window} needs two finite numbers with high > low.")
        return low, high
    found = robust_window(volume)
    if found is None:
        raise InputError("The volume has no contrast (constant, or no finite value): nothing to segment.")
    return found


def segment_volume(
    volume: np.ndarray,
    segmenter: Segmenter,
    scorer: Scorer,
    sentences: Sequence[str],
    *,
    top_k: int = 1,
    axis: int = 0,
    slice_range: Optional[Tuple[int, int]] = None,
    window: Optional[Tuple[float, float]] = None,
    proposal: Optional[ProposalSettings] = None,
    reference: Optional[np.ndarray] = None,
    skip_empty_slices: bool = True,
    reencode_for_refine: bool = False,
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
) -> VolumeResult:
    """Run the cascade on every slice of `volume` along `axis` within `slice_range`.

    Slices whose windowed image is uniform (air, padding) are skipped before any
    model runs. `progress(done, total)` is called after each slice; `should_cancel()`
    is checked between slices and a cancelled run raises Cancelled, handing back
    nothing partial. The mask has the input's shape (2D in, 2D out).
    """
    original_shape = np.shape(volume)
    volume = as_volume(volume)
    if not -3 <= axis < 3:
        raise InputError(f"Axis {axis} does not exist in a 3D volume (use 0, 1 or 2).")
    axis = 0 if len(original_shape) == 2 else axis % 3  # a 2D image has one slice
    if reference is not None:
        reference = as_volume(reference).astype(bool)
        if reference.shape != volume.shape:
            raise InputError(f"Reference shape {reference.shape} differs from the volume's {volume.shape}.")
    if scorer.needs_reference and reference is None:
        raise InputError(f"The {scorer.name} scorer needs a reference mask.")
    count = volume.shape[axis]
    start, stop = check_slice_range(slice_range or (0, count), count)
    window = choose_window(volume, window)

    slices = np.moveaxis(volume, axis, 0)
    ref_slices = np.moveaxis(reference, axis, 0) if reference is not None else None
    mask = np.zeros(volume.shape, dtype=bool)
    mask_slices = np.moveaxis(mask, axis, 0)  # a view: writing here fills `mask`
    records: List[SliceRecord] = []
    total = stop - start
    started = time.perf_counter()
    if progress:
        progress(0, total)
    for done, index in enumerate(range(start, stop), start=1):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"Cancelled after {done - 1} of {total} slices; nothing was written.")
        image = window_to_uint8(slices[index], window)
        if skip_empty_slices and image.min() == image.max():
            records.append(SliceRecord(index=index, reason=NO_TISSUE))
        else:
            result: SliceResult = segment_slice(
                image, segmenter, scorer, sentences, top_k=top_k, proposal=proposal,
                reference=None if ref_slices is None else ref_slices[index],
                reencode_for_refine=reencode_for_refine,
            )
            mask_slices[index] = result.mask
            records.append(SliceRecord(
                index=index, reason=result.reason, clip_scores=result.clip_scores,
                predicted_ious=result.predicted_ious, candidate_count=result.candidate_count,
                area=int(result.mask.sum()), seconds={k: round(v, 4) for k, v in result.seconds.items()},
            ))
        if progress:
            progress(done, total)
    return VolumeResult(
        mask=mask.reshape(original_shape),
        slices=records,
        axis=axis,
        slice_range=(start, stop),
        window=window,
        seconds=time.perf_counter() - started,
    )

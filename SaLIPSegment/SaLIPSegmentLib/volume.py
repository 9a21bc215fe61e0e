"""The cascade over a volume: axis, slice range, intensity window, progress and cancel.

Numpy in, numpy out; no Slicer, no files. A 2D image is a one-slice volume.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from .cascade import NO_CANDIDATE, SliceResult, segment_slice
from .errors import Cancelled, InputError, ModelError
from .imaging import (
    gray_to_rgb,
    mask_to_box,
    resize_mask,
    resize_uint8,
    robust_window,
    window_to_uint8,
    working_shape,
)
from .models.base import Candidate, ProposalSettings, Scorer, Segmenter
from .models.device import is_out_of_memory

NO_TISSUE = "no tissue"
BEYOND_ORGAN = "beyond the organ (propagation stopped)"

T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


@dataclass
class SliceRecord:
    """One row of the per-slice table: what the cascade found and how long it took."""

    index: int
    reason: Optional[str]
    method: str = "cascade"
    """cascade (full), propagated (neighbour's box), or skipped."""
    clip_scores: List[float] = field(default_factory=list)
    predicted_ious: List[float] = field(default_factory=list)
    candidate_count: int = 0
    area: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)
    flags: List[str] = field(default_factory=list)
    """Why a person should look at this slice (see flag_slices); empty when nothing is odd."""
    fallback: Optional[str] = None
    """Why a neighbour's boxes were refused here (area, predicted IoU, score), so the full cascade ran."""

    @property
    def skipped(self) -> bool:
        return self.method == "skipped"

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
    mode: str = "propagate"
    working_shape: Tuple[int, int] = (0, 0)
    """The slice size the models saw: the slice's own, or smaller for very large slices."""
    notices: List[str] = field(default_factory=list)
    """What the run had to change on the way (smaller batches, the CPU after a GPU ran out of memory)."""
    encoder_runtime: str = "torch"
    """What ran the image encoder at the end: torch, or onnxruntime on a CPU (models.cpu_runtime)."""
    decoder_runtime: str = "torch"
    """What ran the mask decoder at the end, likewise."""

    def summary(self) -> dict:
        processed = [s for s in self.slices if not s.skipped]
        return {
            "mode": self.mode,
            "slices_in_range": len(self.slices),
            "slices_processed": len(processed),
            "slices_full_cascade": sum(1 for s in self.slices if s.method == "cascade"),
            "slices_propagated": sum(1 for s in self.slices if s.method == "propagated"),
            "slices_flagged": sum(1 for s in self.slices if s.flags),
            "slices_with_mask": sum(1 for s in self.slices if s.area > 0),
            "voxels": int(self.mask.sum()),
            "working_shape": list(self.working_shape),
            "notices": list(self.notices),
            "encoder_runtime": self.encoder_runtime,
            "decoder_runtime": self.decoder_runtime,
            "seconds": round(self.seconds, 3),
        }


# The models work at 1024 px at most (SAM's input; LiteMedSAM's is 256), so a larger slice
# gains nothing but memory: each candidate mask would be kept at full size.
MAX_SLICE_SIDE = 1024


SMALLEST_BATCH = 4


class MemoryFallback:
    """When a GPU runs out of memory: halve the slices per encoder call, then the prompt and
    crop batches, and redo the slice; at the smallest batch, move both models to the CPU and
    go on there. Each step is noted."""

    def __init__(self, segmenter: Segmenter, scorer: Scorer, proposal: ProposalSettings,
                 forget: Callable[[], None] = lambda: None):
        self.segmenter, self.scorer, self.proposal = segmenter, scorer, proposal
        self.forget = forget  # drops what the runner holds on the GPU (slices encoded ahead)
        self.notices: List[str] = []

    def recover(self, error: BaseException) -> bool:
        """True when the slice is worth another try; False when nothing is left to give up."""
        import torch

        if not is_out_of_memory(error):
            return False
        self.forget()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        slices = getattr(self.segmenter, "encode_batch", 1)
        if slices > 1:
            self.segmenter.encode_batch = slices // 2
            self.notices.append(f"Out of GPU memory: retried encoding {slices // 2} slices per call.")
            return True
        batch = self.proposal.points_per_batch
        if batch > SMALLEST_BATCH:
            smaller = max(SMALLEST_BATCH, batch // 2)
            self.proposal = replace(self.proposal, points_per_batch=smaller)
            self.scorer.max_batch = smaller
            self.notices.append(f"Out of GPU memory: retried with {smaller} prompts and crops per batch.")
            return True
        device = getattr(self.segmenter, "device", None)
        if device is not None and torch.device(device).type != "cpu":
            self.segmenter.to_device(torch.device("cpu"))
            self.scorer.to_device(torch.device("cpu"))
            self.notices.append(f"Out of GPU memory even at {SMALLEST_BATCH} prompts per batch: "
                                "went on on the CPU (slower).")
            return True
        return False

    def run(self, step: Callable[..., T], *args) -> T:
        while True:
            try:
                return step(*args)
            except Exception as error:  # torch raises OutOfMemoryError, MPS a RuntimeError
                if self.recover(error):
                    continue
                if is_out_of_memory(error):
                    raise ModelError(f"Out of memory on the CPU too ({str(error).splitlines()[0]}). Close other "
                                     "programs, choose a smaller model, or segment fewer slices.") from error
                raise


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


@dataclass
class PropagationSettings:
    """Key-slice propagation: the full cascade on a few slices, a box prompt on the rest.

    Each slice next to a segmented one is prompted with its neighbour's boxes, grown by a
    margin, on its own embedding (one encoding, one decoder pass). The result is kept when
    SAM's predicted IoU and, for CLIP, the retrieval score hold up against the chain's
    anchor (the last slice the full cascade segmented); otherwise the slice gets the full
    cascade and anchors what follows. Propagation stops where the full cascade finds
    nothing either: the organ has ended.

    Between two key slices a chain runs from each, over the same embeddings, and each slice
    keeps the result the scorer ranks higher, as the full cascade's retrieval would: a key
    slice whose best candidate was a poor part no longer decides every slice up to the next
    one. Only where both chains are refused does a slice get the full cascade.
    """

    key_interval: int = 16
    """Key slices (full cascade) are the first and last slice with tissue and evenly between,
    at most this many slices apart (key_positions).

    16 and not more: an organ spanning at least this many slices always has a key slice of
    its own. Keys at both ends cost one full cascade more than every 16th slice, and put every
    other slice between two chains: on five 40-slice MNI152 windows (LiteMedSAM, oracle) mean
    Dice 0.390 against 0.333 with every 16th slice and 0.339 with the full cascade everywhere.
    """
    box_margin: float = 0.1
    """Grow the neighbour's box by this fraction of its width and height on each side."""
    max_iou_drop: float = 0.1
    """Keep a propagated mask whose predicted IoU is at most this much below its anchor's."""
    max_score_drop: float = 2.0
    """Keep a propagated mask whose CLIP score is at most this many points below its anchor's."""
    min_area_ratio: float = 0.2
    """A propagated mask smaller than this fraction of its source's goes to the full cascade."""


MODES = ("propagate", "every-slice")

# A slice's score is low when it sits this many median absolute deviations below the median
# of the volume's segmented slices (with a floor, so a very uniform volume flags nothing).
LOW_SCORE_MADS = 3.0
LOW_SCORE_MIN_MARGIN = 2.0
# An area jump: the mask is under half or over twice the median of its neighbours' areas.
AREA_JUMP_RATIO = 2.0


def flag_slices(records: Sequence[SliceRecord]) -> None:
    """Mark slices worth a look: no candidate, an empty mask, a low score, an area jump.

    Slices skipped before any model ran (air, or beyond the organ) are never flagged.
    Records are in slice order; flags are written into them.
    """
    segmented = [r for r in records if r.area > 0 and r.clip_scores]
    scores = np.array([min(r.clip_scores) for r in segmented]) if segmented else np.zeros(0)
    if scores.size >= 3:
        median = float(np.median(scores))
        margin = max(LOW_SCORE_MIN_MARGIN, LOW_SCORE_MADS * float(np.median(np.abs(scores - median))))
        low_score = median - margin
    else:
        low_score = -np.inf
    for position, record in enumerate(records):
        record.flags = []
        if record.skipped:
            continue
        if record.reason == NO_CANDIDATE:
            record.flags.append("no candidate")
        elif record.area == 0:
            record.flags.append("empty mask")
        if record.area > 0 and record.clip_scores and min(record.clip_scores) < low_score:
            record.flags.append("low score")
        # The median of up to two segmented slices on each side, so one outlier does not
        # make its neighbours look odd too.
        around = records[max(0, position - 2) : position] + records[position + 1 : position + 3]
        neighbour_areas = [n.area for n in around if n.area > 0]
        if record.area > 0 and len(neighbour_areas) >= 3:
            expected = float(np.median(neighbour_areas))
            if not expected / AREA_JUMP_RATIO <= record.area <= expected * AREA_JUMP_RATIO:
                record.flags.append("area jump")


@dataclass
class _Found:
    """What a segmented slice hands to its neighbours.

    The scores and IoUs are those of the chain's anchor, the last slice the full cascade
    segmented: measuring every step against the anchor, not against the previous step,
    stops a long chain from drifting a little per slice onto another structure.
    """

    parts: List[np.ndarray]
    anchor_scores: List[float]
    anchor_ious: List[float]


@dataclass
class _Attempt:
    """A neighbour's boxes tried on one slice, before it is decided whether they are kept."""

    pixels: np.ndarray
    parts: List[np.ndarray]
    ious: List[float]
    scores: List[float]
    fallback: Optional[str]
    """Why the result cannot be kept (area, predicted IoU, score), or None."""
    seconds: Dict[str, float]
    found: _Found
    """What the slice hands on if kept: its parts, measured against the same anchor."""


def key_positions(count: int, interval: int) -> List[int]:
    """Where the full cascade runs among `count` slices: the first, the last, and evenly between,
    at most `interval` apart, so that every other slice lies between two key slices."""
    if count <= 1:
        return list(range(count))
    keys = -(-(count - 1) // max(1, interval)) + 1
    return sorted({int(v + 0.5) for v in np.linspace(0, count - 1, keys)})


def _grow(box, margin: float, shape) -> Tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    dx = margin * (x1 - x0 + 1) + 2
    dy = margin * (y1 - y0 + 1) + 2
    return (int(max(0, x0 - dx)), int(max(0, y0 - dy)),
            int(min(shape[1] - 1, x1 + dx)), int(min(shape[0] - 1, y1 + dy)))


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
    mode: str = "propagate",
    propagation: Optional[PropagationSettings] = None,
    skip_empty_slices: bool = True,
    reencode_for_refine: bool = False,
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
    max_slice_side: int = MAX_SLICE_SIDE,
) -> VolumeResult:
    """Segment the prompt's target on the slices of `volume` along `axis` within `slice_range`.

    `mode="every-slice"` runs the full cascade on every slice, as the paper did;
    `mode="propagate"` (default) runs it on key slices and propagates boxes to the others
    (see PropagationSettings). Slices whose windowed image is uniform (air, padding) are
    skipped before any model runs. Slices longer than `max_slice_side` are shrunk for the
    models and their masks enlarged back (nearest), so memory stays bounded whatever the
    slice size. `progress(done, total)` follows the slices handled;
    `should_cancel()` is checked between slices and a cancelled run raises Cancelled,
    handing back nothing partial. The mask has the input's shape (2D in, 2D out).
    """
    if mode not in MODES:
        raise InputError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
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
    settings = propagation or PropagationSettings()
    ahead: Dict[int, object] = {}  # slice index -> embedding encoded in an earlier batch
    kept: Dict[int, object] = {}  # slice index -> embedding, while two chains work between key slices
    encode_seconds: Dict[int, float] = {}  # slice index -> encoding time not yet in its record
    memory = MemoryFallback(segmenter, scorer, proposal or ProposalSettings(),
                            forget=lambda: (ahead.clear(), kept.clear()))

    slices = np.moveaxis(volume, axis, 0)
    ref_slices = np.moveaxis(reference, axis, 0) if reference is not None else None
    mask = np.zeros(volume.shape, dtype=bool)
    mask_slices = np.moveaxis(mask, axis, 0)  # a view: writing here fills `mask`
    full_shape = slices.shape[1:]
    shape = working_shape(full_shape, max_slice_side)
    records: Dict[int, SliceRecord] = {}
    found: Dict[int, _Found] = {}
    total = stop - start
    started = time.perf_counter()
    if progress:
        progress(0, total)

    def windowed(index: int) -> np.ndarray:
        return window_to_uint8(slices[index], window)

    def image(index: int) -> np.ndarray:
        """The slice as the models see it: windowed, and shrunk when it is very large."""
        return resize_uint8(windowed(index), shape)

    def finish(record: SliceRecord, result_mask: Optional[np.ndarray] = None) -> None:
        if record.index in encode_seconds:
            spent = encode_seconds.pop(record.index) + record.seconds.get("encode", 0.0)
            record.seconds["encode"] = round(spent, 4)
        if result_mask is not None:
            mask_slices[record.index] = resize_mask(result_mask, full_shape)
            record.area = int(mask_slices[record.index].sum())
        records[record.index] = record
        if progress:
            progress(len(records), total)

    def check_cancel() -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"Cancelled after {len(records)} of {total} slices; nothing was written.")

    def embed(index: int, pixels: np.ndarray, upcoming: Sequence[int]) -> float:
        """Make slice `index` the segmenter's image; seconds spent encoding.

        A segmenter with encode_batch > 1 (on a GPU) encodes the next slices of `upcoming`
        (up to the first one done, where a walk would stop, or encoded already for the second
        chain between key slices) in the same call and keeps them for when their turn comes.
        """
        clock = time.perf_counter()
        batch = getattr(segmenter, "encode_batch", 1)
        if index in ahead:
            segmenter.use_embedding(ahead.pop(index))
        elif batch <= 1:
            segmenter.set_image(gray_to_rgb(pixels))
        else:
            ahead.clear()  # the walk moved on: what was encoded for elsewhere is not needed
            fresh = itertools.takewhile(lambda k: k not in records and k not in kept, upcoming)
            more = list(itertools.islice(fresh, batch - 1))
            embeddings = segmenter.embed_images([gray_to_rgb(pixels)] + [gray_to_rgb(image(k)) for k in more])
            segmenter.use_embedding(embeddings[0])
            ahead.update(zip(more, embeddings[1:]))
        return time.perf_counter() - clock

    def cascade_on(index: int, upcoming: Sequence[int] = ()) -> bool:
        pixels = image(index)
        if reencode_for_refine:  # the paper's way, kept for the benchmark: segment_slice encodes
            return full_cascade(index, pixels)
        return full_cascade(index, pixels, already_embedded=True,
                            seconds={"encode": embed(index, pixels, upcoming)})

    def full_cascade(index: int, pixels: np.ndarray, already_embedded: bool = False, seconds=None,
                     fallback: Optional[str] = None) -> bool:
        result: SliceResult = segment_slice(
            pixels, segmenter, scorer, sentences, top_k=top_k, proposal=memory.proposal,
            reference=None if ref_slices is None else resize_mask(ref_slices[index], shape),
            reencode_for_refine=reencode_for_refine, already_embedded=already_embedded,
        )
        timing = dict(seconds or {})
        for stage, value in result.seconds.items():
            timing[stage] = round(timing.get(stage, 0.0) + value, 4)
        finish(SliceRecord(index=index, reason=result.reason, method="cascade", clip_scores=result.clip_scores,
                           predicted_ious=result.predicted_ious, candidate_count=result.candidate_count,
                           seconds=timing, fallback=fallback), result.mask)
        if result.mask.any():
            found[index] = _Found(result.parts, result.clip_scores, result.predicted_ious)
            return True
        return False

    def attempt(index: int, source: _Found, upcoming: Sequence[int] = ()) -> _Attempt:
        """Prompt slice `index` with its neighbour's boxes and judge the result against the chain's anchor."""
        pixels = image(index)
        if index in kept:
            segmenter.use_embedding(kept[index])
        else:  # counted in the slice's record, whichever attempt ends up kept
            encode_seconds[index] = encode_seconds.get(index, 0.0) + embed(index, pixels, upcoming)
        timing: Dict[str, float] = {}
        clock = time.perf_counter()
        boxes = [_grow(mask_to_box(part), settings.box_margin, pixels.shape) for part in source.parts if part.any()]
        refined = segmenter.refine(boxes)
        timing["refine"] = time.perf_counter() - clock
        parts = [r.mask for r in refined]
        ious = [r.predicted_iou for r in refined]
        fallback = None
        if not all(p.sum() >= settings.min_area_ratio * s.sum() for p, s in zip(parts, source.parts)):
            fallback = "area"
        elif not all(iou >= src - settings.max_iou_drop for iou, src in zip(ious, source.anchor_ious)):
            fallback = "predicted IoU"
        scores: List[float] = []  # measured only with a label-free scorer; never inherited
        if fallback is None and not scorer.needs_reference:
            # The oracle would judge with the reference; acceptance stays label-free.
            clock = time.perf_counter()
            scores = score_parts(pixels, parts, ious)
            timing["score"] = time.perf_counter() - clock
            if len(scores) != len(parts) or min(scores) < min(source.anchor_scores) - settings.max_score_drop:
                fallback = "score"
        return _Attempt(pixels, parts, ious, scores, fallback, timing,
                        _Found(parts, source.anchor_scores, source.anchor_ious))

    def score_parts(pixels: np.ndarray, parts: List[np.ndarray], ious: List[float], reference=None) -> List[float]:
        candidates = [Candidate(mask=p, box=mask_to_box(p), predicted_iou=i, stability=1.0)
                      for p, i in zip(parts, ious) if p.any()]
        return [float(v) for v in scorer.score(gray_to_rgb(pixels), candidates, sentences, reference=reference)]

    def accept(index: int, result: _Attempt) -> None:
        finish(SliceRecord(index=index, reason=None, method="propagated", clip_scores=result.scores,
                           predicted_ious=result.ious, seconds={k: round(v, 4) for k, v in result.seconds.items()}),
               np.logical_or.reduce(result.parts))
        found[index] = result.found

    def propagate(index: int, source: _Found, upcoming: Sequence[int]) -> bool:
        """One chain's step: the neighbour's boxes, else the full cascade; False where the organ has ended."""
        result = attempt(index, source, upcoming)
        if result.fallback is None:
            accept(index, result)
            return True
        return full_cascade(index, result.pixels, already_embedded=True, seconds=result.seconds,
                            fallback=result.fallback)

    def walk(origin: int, step: int, until: int) -> None:
        """Propagate from the segmented slice at position `origin` by `step`, up to position `until` (excluded)."""
        source = found.get(tissue[origin])
        i = origin + step
        while source is not None and i != until and 0 <= i < len(tissue) and tissue[i] not in records:
            check_cancel()
            upcoming = tissue[i + 1 : until] if step > 0 else tissue[until + 1 : i][::-1]
            if not memory.run(propagate, tissue[i], source, upcoming):
                break
            source = found[tissue[i]]
            i += step

    def chain(first: int, last: int, step: int) -> Dict[int, _Attempt]:
        """Propagate from the key slice before position `first` over positions first..last, keeping
        each accepted attempt (and the slice's embedding) without writing it; stop at the first refusal."""
        source = found.get(tissue[first - step])
        accepted: Dict[int, _Attempt] = {}
        for i in range(first, last + step, step):
            if source is None or tissue[i] in records:
                break
            check_cancel()
            result = attempt(tissue[i], source, [tissue[j] for j in range(i + step, last + step, step)])
            current = getattr(segmenter, "embedding", None)
            if current is not None:
                kept[tissue[i]] = current
            if result.fallback is not None:
                break
            accepted[i] = result
            source = result.found
        return accepted

    def fill_between(low: int, high: int) -> None:
        """Slices between key positions low and high: a chain from each end, the better-scored kept.

        Each slice is encoded once (the backward chain re-uses the forward chain's embeddings).
        Where both chains refuse a slice, that stretch goes back to the single-chain walk, which
        runs the full cascade there.
        """
        if high - low < 2:
            return
        forward = memory.run(chain, low + 1, high - 1, 1)
        backward = memory.run(chain, high - 1, low + 1, -1)
        for i in range(low + 1, high):
            options = [o for o in (forward.get(i), backward.get(i)) if o is not None]
            if len(options) == 2:
                clock = time.perf_counter()
                reference = None if ref_slices is None else resize_mask(ref_slices[tissue[i]], shape)
                rank = [score_parts(o.pixels, o.parts, o.ious, reference) if scorer.needs_reference else o.scores
                        for o in options]
                best = max(range(2), key=lambda k: min(rank[k], default=-np.inf))
                options[best].seconds["score"] = options[best].seconds.get("score", 0.0) + time.perf_counter() - clock
                options = [options[best]]
            if options:
                accept(tissue[i], options[0])
        fill_gaps(low + 1, high)
        kept.clear()

    def fill_gaps(first: int, stop: int) -> None:
        """Slices at positions first..stop-1 left between segmented ones: a single chain walks
        into each from its segmented neighbour (the full cascade where the boxes are refused),
        forwards first; it stops where the organ seems to end."""
        for i in range(first, stop):
            if i > 0 and tissue[i] not in records and tissue[i - 1] in found:
                walk(i - 1, 1, stop)
        for i in range(stop - 1, first - 1, -1):
            if i + 1 < len(tissue) and tissue[i] not in records and tissue[i + 1] in found:
                walk(i + 1, -1, first - 1)

    tissue = []
    for index in range(start, stop):
        pixels = windowed(index)  # the uniformity check needs no resizing
        if skip_empty_slices and pixels.min() == pixels.max():
            finish(SliceRecord(index=index, reason=NO_TISSUE, method="skipped"))
        else:
            tissue.append(index)
    expect_encodings = getattr(segmenter, "expect_encodings", None)  # PromptableSegmenter's, like encode_batch
    if expect_encodings is not None:
        expect_encodings(len(tissue))  # a CPU segmenter weighs exporting its encoder against the job

    if mode == "every-slice":
        for position, index in enumerate(tissue):
            check_cancel()
            memory.run(cascade_on, index, tissue[position + 1 :])
    else:
        keys = key_positions(len(tissue), settings.key_interval)
        for number, key in enumerate(keys):
            check_cancel()
            memory.run(cascade_on, tissue[key], [tissue[k] for k in keys[number + 1 :]])
        for low, high in zip(keys, keys[1:]):
            fill_between(low, high)
        fill_gaps(0, len(tissue))
        for index in tissue:
            if index not in records:
                finish(SliceRecord(index=index, reason=BEYOND_ORGAN, method="skipped"))

    ordered = [records[index] for index in range(start, stop)]
    flag_slices(ordered)
    return VolumeResult(
        mask=mask.reshape(original_shape),
        slices=ordered,
        axis=axis,
        slice_range=(start, stop),
        window=window,
        seconds=time.perf_counter() - started,
        mode=mode,
        working_shape=shape,
        notices=memory.notices,
        encoder_runtime=getattr(segmenter, "encoder_runtime", "torch"),
        decoder_runtime=getattr(segmenter, "decoder_runtime", "torch"),
    )

"""The cascade over a volume: axis, slice range, intensity window, progress and cancel.

Numpy in, numpy out; no Slicer, no files. A 2D image is a one-slice volume.
`segment_volume` configures a `VolumeRunner` once and runs it; the runner's steps are
listed in its docstring, each a short method.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .cascade import SliceResult, segment_slice
from .errors import Cancelled, InputError
from .imaging import (
    Box,
    gray_to_rgb,
    mask_to_box,
    resize_mask,
    resize_uint8,
    robust_window,
    window_to_uint8,
    working_shape,
)
from .models.base import Candidate, Scorer, Segmenter
from .models.device import MemoryFallback
from .presence import (
    LOW_SCORE_ABSENT,
    OUTSIDE_RUN,
    candidate_floor,
    clear_absent,
    decide_presence,
    negative_ensembles,
    presence_signal,
)
from .quality import QualityRules, candidate_agreement, flag_records, verdict
from .settings import (
    MAX_SLICE_SIDE,
    MODES,
    PresenceSettings,
    PropagationSettings,
    VolumeSettings,
    check_slice_range,
    parse_slice_range,
)
from .shape import refine_in_shape

__all__ = [  # the settings are re-exported: callers have imported them from here
    "BEYOND_ORGAN", "LOW_SCORE_ABSENT", "MAX_SLICE_SIDE", "MODES", "NO_TISSUE", "OUTSIDE_RUN", "PresenceSettings",
    "PropagationSettings", "SliceRecord", "VolumeResult",
    "VolumeRunner", "VolumeSettings", "acquisition_axis", "as_volume", "check_slice_range", "choose_window",
    "decide_presence", "flag_slices", "key_positions", "parse_slice_range", "segment_volume",
]

NO_TISSUE = "no tissue"
BEYOND_ORGAN = "beyond the organ (propagation stopped)"

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
    anchor: Optional[int] = None
    """The slice whose full cascade started this slice's chain (itself for a full cascade)."""
    absent: Optional[str] = None
    """Why the target was judged absent here and the mask removed (decide_presence), or None."""
    candidate_agreement: Optional[float] = None
    """Dice of the retrieved candidate with its refined mask (the lowest over parts), full cascade only."""
    quality: Dict[str, float] = field(default_factory=dict)
    """The label-free quality signals of the slice's mask (quality.py), measured when flags are set."""
    confidence: Optional[float] = None
    """0-1: how far the slice's signals are from anything that flags it (quality.py); None without a mask."""
    presence_score: Optional[float] = None
    """The final mask's score for presence (presence.presence_signal), when presence ran."""
    candidates_median_score: Optional[float] = None
    """A full cascade's median score over all its candidates (presence's floor: mostly not the target)."""

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
    warnings: List[str] = field(default_factory=list)
    """What the user should look at in the result: a fix (hint) that gave no mask."""
    encoder_runtime: str = "torch"
    """What ran the image encoder at the end: torch, or onnxruntime on a CPU (models.cpu_runtime)."""
    decoder_runtime: str = "torch"
    """What ran the mask decoder at the end, likewise."""
    takes_points: bool = False
    """Whether the segmenter takes point prompts, so that a correction may give points (hints.py)."""

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
            "slices_judged_absent": sum(1 for s in self.slices if s.absent),
            "verdict": verdict(self.slices),
            "voxels": int(self.mask.sum()),
            "working_shape": list(self.working_shape),
            "notices": list(self.notices),
            "warnings": list(self.warnings),
            "encoder_runtime": self.encoder_runtime,
            "decoder_runtime": self.decoder_runtime,
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


def flag_slices(records: Sequence[SliceRecord], masks: Optional[Sequence[np.ndarray]] = None,
                rules: Optional[QualityRules] = None, thickness_mm: Optional[float] = None,
                presence_floor: Optional[float] = None) -> None:
    """Mark slices worth a look, with reasons and a confidence (quality.flag_records): no candidate,
    an empty mask, and masks whose label-free signals (fragments, solidity, agreement with the
    retrieved part and with the neighbouring slices, area change, predicted IoU, relative score)
    pass their limits.

    `masks` are the slices' masks in the records' order (without them, the mask signals measured
    before are kept). Slices skipped before any model ran (air, or beyond the organ) and slices
    where the target was judged absent (decide_presence) are not flagged, except near the kept masks
    (quality.flag_target_edges; `presence_floor`: VolumeRunner.presence_floor, where presence ran).
    Records are in slice order; flags are written into them.
    """
    flag_records(records, masks, rules, thickness_mm, presence_floor)


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
    anchor: Optional[int] = None
    """The anchor's slice index."""
    hint: Optional[int] = None
    """The hinted slice this chain descends from (through propagation and the cascades its refusals ran),
    or None: a chain of the automatic pass, or from a boundary a correction left as it was."""

    @property
    def mask(self) -> Optional[np.ndarray]:
        """The union of the parts: what the slice hands on as its mask (None without parts)."""
        return np.logical_or.reduce(self.parts) if self.parts else None


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
    rank: Optional[float] = None
    """The scorer's rank of this result, once asked (see VolumeRunner._rank)."""


def key_positions(count: int, interval: int) -> List[int]:
    """Where the full cascade runs among `count` slices: the first, the last, and evenly between,
    at most `interval` apart, so that every other slice lies between two key slices."""
    if count <= 1:
        return list(range(count))
    keys = -(-(count - 1) // max(1, interval)) + 1
    return sorted({int(v + 0.5) for v in np.linspace(0, count - 1, keys)})


def grow_box(box, margin: float, shape) -> Tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) grown by `margin` of its width and height and 2 pixels on each side,
    within an image of `shape` (rows, columns)."""
    x0, y0, x1, y1 = box
    dx = margin * (x1 - x0 + 1) + 2
    dy = margin * (y1 - y0 + 1) + 2
    return (int(max(0, x0 - dx)), int(max(0, y0 - dy)),
            int(min(shape[1] - 1, x1 + dx)), int(min(shape[0] - 1, y1 + dy)))




def _slice_axis(axis: int, original_shape: Sequence[int]) -> int:
    """The axis as 0, 1 or 2; a 2D image has one slice, along axis 0."""
    if not -3 <= axis < 3:
        raise InputError(f"Axis {axis} does not exist in a 3D volume (use 0, 1 or 2).")
    return 0 if len(original_shape) == 2 else axis % 3


def _check_reference(reference: Optional[np.ndarray], shape: Tuple[int, ...], scorer: Scorer):
    """The reference as a boolean volume of the input's shape, or None; the oracle needs one."""
    if reference is not None:
        reference = as_volume(reference).astype(bool)
        if reference.shape != shape:
            raise InputError(f"Reference shape {reference.shape} differs from the volume's {shape}.")
    if scorer.needs_reference and reference is None:
        raise InputError(f"The {scorer.name} scorer needs a reference mask.")
    return reference


class VolumeRunner:
    """One volume through the cascade: configured (and checked) once, then `run()`.

    The steps, in the order a run takes them:
      find_tissue      uniform slices (air, padding) are skipped before any model runs;
      run_every_slice  the paper's way: the full cascade on every slice; or
      run_propagate    the full cascade on key slices (key_positions), then between each two
                       (fill_between: a chain from each end, each slice keeping the better
                       scored result; a contested refusal splits the stretch), then outwards
                       past the first and last (fill_gaps), until the organ ends (see
                       PropagationSettings);
      judge_presence   slices where the target is judged absent lose their mask (decide_presence,
                       PresenceSettings).
    Underneath them: embed (the slice's encoding, a few upcoming ones in the same call on a
    GPU), cascade (one full cascade), attempt and judge (one propagation attempt, measured
    against the chain's anchor), chain and walk (a run of attempts), and the memory fallback
    (models.device.MemoryFallback), which redoes a step after the GPU ran out of memory.

    The attributes are the run's state: records and found (what each slice got and hands
    on), ahead and kept (embeddings encoded for later), encode_seconds (encoding time not
    yet in a record). A runner runs once.
    """

    def __init__(self, volume: np.ndarray, segmenter: Segmenter, scorer: Scorer, sentences: Sequence[str],
                 settings: Optional[VolumeSettings] = None, *, reference: Optional[np.ndarray] = None,
                 progress: Optional[ProgressCallback] = None, should_cancel: Optional[CancelCheck] = None):
        settings = settings or VolumeSettings()
        if settings.mode not in MODES:
            raise InputError(f"Unknown mode {settings.mode!r}; use one of {', '.join(MODES)}.")
        self.original_shape = np.shape(volume)
        volume = as_volume(volume)
        self.axis = _slice_axis(settings.axis, self.original_shape)
        reference = _check_reference(reference, volume.shape, scorer)
        count = volume.shape[self.axis]
        self.start, self.stop = check_slice_range(settings.slice_range or (0, count), count)
        self.window = choose_window(volume, settings.window)
        self.segmenter, self.scorer, self.sentences, self.settings = segmenter, scorer, sentences, settings
        self.progress, self.should_cancel = progress, should_cancel
        self.slices = np.moveaxis(volume, self.axis, 0)
        self.ref_slices = np.moveaxis(reference, self.axis, 0) if reference is not None else None
        self.mask = np.zeros(volume.shape, dtype=bool)
        self.mask_slices = np.moveaxis(self.mask, self.axis, 0)  # a view: writing here fills `mask`
        self.full_shape = self.slices.shape[1:]
        self.shape = working_shape(self.full_shape, settings.max_slice_side)
        self.total = self.stop - self.start
        self.records: Dict[int, SliceRecord] = {}
        self.found: Dict[int, _Found] = {}
        self.tissue: List[int] = []  # slice indices that reach the models, in order
        self.ahead: Dict[int, object] = {}  # slice index -> embedding encoded in an earlier batch
        self.kept: Dict[int, object] = {}  # slice index -> embedding, while two chains work between key slices
        self.encode_seconds: Dict[int, float] = {}  # slice index -> encoding time not yet in its record
        self.memory = MemoryFallback(segmenter, scorer, settings.proposal, forget=self._forget_embeddings)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> VolumeResult:
        started = time.perf_counter()
        if self.progress:
            self.progress(0, self.total)
        self.find_tissue()
        self.segmenter.expect_encodings(len(self.tissue))  # a CPU segmenter weighs exporting its encoder
        if self.settings.mode == "every-slice":
            self.run_every_slice()
        else:
            self.run_propagate()
        ordered = [self.records[index] for index in range(self.start, self.stop)]
        self.judge_presence(ordered)
        flag_slices(ordered, self.mask_slices[self.start : self.stop], thickness_mm=self.settings.slice_thickness_mm,
                    presence_floor=self.presence_floor(ordered))
        return VolumeResult(
            mask=self.mask.reshape(self.original_shape), slices=ordered, axis=self.axis,
            slice_range=(self.start, self.stop), window=self.window, seconds=time.perf_counter() - started,
            mode=self.settings.mode, working_shape=self.shape, notices=self.memory.notices,
            encoder_runtime=self.segmenter.encoder_runtime, decoder_runtime=self.segmenter.decoder_runtime,
            takes_points=self.segmenter.takes_points,
        )

    def judge_presence(self, ordered: List[SliceRecord], keep: Sequence[int] = (),
                       within: Optional[Set[int]] = None) -> List[int]:
        """Score each painted slice's final mask, then remove the mask where the target is judged absent
        (presence.decide_presence), saying why in the record; the target's run reaches every slice in
        `keep` (a user's hints), and only slices in `within` may lose their mask (None: any). The slices
        whose mask was removed."""
        if not self.settings.presence.enabled:
            return []
        self.score_presence(ordered)
        verdicts = decide_presence(ordered, self.settings.presence, self.presence_floor(ordered), keep)
        if within is not None:
            verdicts = {index: why for index, why in verdicts.items() if index in within}
        removed = clear_absent(self.records, self.mask_slices, verdicts)
        for index in removed:
            self.found.pop(index, None)
        return removed

    def presence_margins(self) -> bool:
        """Whether presence scores a mask as its margin over negative sentences (a scorer that reads text)."""
        return self.settings.presence.negatives and self.scorer.reads_sentences

    def presence_floor(self, ordered: List[SliceRecord]) -> Optional[float]:
        """What presence's scores read where the target is not: 0 for a margin (the crop reads as much as a
        negative), else the volume's candidate floor; None where presence is off."""
        if not self.settings.presence.enabled:
            return None
        return 0.0 if self.presence_margins() else candidate_floor(ordered)

    def score_presence(self, ordered: List[SliceRecord]) -> None:
        """One scorer call per painted slice on its final mask: a score even where propagation gave none.
        Slices scored already (a correction's untouched ones) keep their score."""
        negatives = negative_ensembles(self.sentences) if self.presence_margins() else []
        for record in ordered:
            if record.area <= 0 or record.presence_score is not None:
                continue
            self._check_cancel()
            clock = time.perf_counter()
            image = gray_to_rgb(self._image(record.index))
            mask = resize_mask(self.mask_slices[record.index], self.shape)
            record.presence_score = self.memory.run(presence_signal, self.scorer, image, mask, self.sentences,
                                                    negatives, self._reference(record.index))
            record.seconds["presence"] = round(time.perf_counter() - clock, 4)

    def find_tissue(self) -> None:
        """Record uniform slices as skipped; the others, in order, are `tissue`."""
        for index in range(self.start, self.stop):
            pixels = self._windowed(index)  # the uniformity check needs no resizing
            if self.settings.skip_empty_slices and pixels.min() == pixels.max():
                self._finish(SliceRecord(index=index, reason=NO_TISSUE, method="skipped"))
            else:
                self.tissue.append(index)

    def run_every_slice(self) -> None:
        for position, index in enumerate(self.tissue):
            self._check_cancel()
            self.memory.run(self._cascade_on, index, self.tissue[position + 1 :])

    def run_propagate(self) -> None:
        """Key slices first, then the slices between them, then outwards; the rest is beyond the organ."""
        tissue = self.tissue
        keys = key_positions(len(tissue), self.settings.propagation.key_interval)
        for number, key in enumerate(keys):
            self._check_cancel()
            self.memory.run(self._cascade_on, tissue[key], [tissue[k] for k in keys[number + 1 :]])
        for low, high in zip(keys, keys[1:]):
            self.fill_between(low, high)
        self.fill_gaps(0, len(tissue))
        for index in tissue:
            if index not in self.records:
                self._finish(SliceRecord(index=index, reason=BEYOND_ORGAN, method="skipped"))

    # -- between key slices ----------------------------------------------------------------

    def fill_between(self, low: int, high: int) -> None:
        """Slices between key positions low and high: a chain from each end, the better-scored kept.

        Each slice is encoded once (the backward chain re-uses the forward chain's embeddings).
        Where one chain is refused on a slice that the other reached, and its refused result ranks
        higher there, the other chain is the wrong one (say, from a key slice without the target):
        that slice gets the full cascade and splits the stretch (split_contested). Where both
        chains refuse a slice, that stretch goes back to the single-chain walk, which runs the
        full cascade there.
        """
        try:
            self._between(low, high)
        finally:
            self.kept.clear()

    def _between(self, low: int, high: int) -> None:
        if high - low < 2:
            return
        forward, forward_refusal = self.memory.run(self.chain, low + 1, high - 1, 1)
        backward, backward_refusal = self.memory.run(self.chain, high - 1, low + 1, -1)
        for refusal, other in ((forward_refusal, backward), (backward_refusal, forward)):
            if self.contested(refusal, other) is not None:
                self.memory.run(self.split_contested, refusal, other[refusal[0]])
                self._between(low, refusal[0])
                self._between(refusal[0], high)
                return
        for i in range(low + 1, high):
            options = [o for o in (forward.get(i), backward.get(i)) if o is not None]
            if options:
                self._accept(self.tissue[i], self._better(i, options))
        self.fill_gaps(low + 1, high)

    def chain(self, first: int, last: int, step: int) -> Tuple[Dict[int, _Attempt], Optional[Tuple[int, _Attempt]]]:
        """Propagate from the key slice before position `first` over positions first..last, keeping
        each accepted attempt (and the slice's embedding) without writing it; stop at the first refusal.
        The accepted attempts by position, and the refused one (position, attempt) or None."""
        tissue = self.tissue
        source = self.found.get(tissue[first - step])
        accepted: Dict[int, _Attempt] = {}
        for i in range(first, last + step, step):
            if source is None or tissue[i] in self.records:
                break
            self._check_cancel()
            result = self.attempt(tissue[i], source, [tissue[j] for j in range(i + step, last + step, step)])
            current = self.segmenter.embedding
            if current is not None:
                self.kept[tissue[i]] = current
            if result.fallback is not None:
                return accepted, (i, result)
            accepted[i] = result
            source = result.found
        return accepted, None

    def contested(self, refusal: Optional[Tuple[int, _Attempt]], other: Dict[int, _Attempt]
                  ) -> Optional[Tuple[int, _Attempt]]:
        """The refusal, when the other chain reached its slice and the scorer ranks the refused result higher."""
        if refusal is None or refusal[0] not in other:
            return None
        position, refused = refusal
        return refusal if self._rank(position, refused) > self._rank(position, other[position]) else None

    def split_contested(self, refusal: Tuple[int, _Attempt], reached: Optional[_Attempt] = None) -> None:
        """A contested slice becomes a boundary between two stretches: the full cascade runs on it (on
        the embedding its chains made), and the refused result is kept instead where it ranks higher
        (the cascade's retrieval can pick a poor part, which its chains would then carry). `reached`:
        the other chain's result there. The cascade proposes around whichever of the two chains
        fallback_region gives a region, the refused one first (see guiding_chain)."""
        position, refused = refusal
        index = self.tissue[position]
        if index in self.kept:
            self.segmenter.use_embedding(self.kept[index])
            guide = self.guiding_chain([refused.found] + ([reached.found] if reached is not None else []))
            self.cascade(index, refused.pixels, already_embedded=True, seconds=dict(refused.seconds),
                         fallback=refused.fallback, source=guide)
        else:  # no embedding kept (a segmenter without one): encode again
            self._cascade_on(index)
        self.keep_refused_if_better(position, refused, when_nothing_found=True)

    def keep_refused_if_better(self, position: int, refused: _Attempt, when_nothing_found: bool) -> bool:
        """After the full cascade on a slice whose chain was refused: the refused result instead where the
        scorer ranks it higher, or (`when_nothing_found`) where the cascade found nothing; True when taken."""
        index = self.tissue[position]
        found = self.found.get(index)
        if found is None and not when_nothing_found:
            return False
        cascaded = found and _Attempt(refused.pixels, found.parts, found.anchor_ious, [], None, {}, found)
        if not cascaded or self._rank(position, refused) > self._rank(position, cascaded):
            self._accept(index, refused)
            return True
        return False

    def _rank(self, position: int, option: _Attempt) -> float:
        """How the scorer ranks one chain's result on a slice: its weakest part's score (scored once)."""
        if option.rank is not None:
            return option.rank
        if self.scorer.scores_like_clip and option.scores:
            scores = option.scores
        else:
            clock = time.perf_counter()
            scores = self._score_parts(option.pixels, option.parts, option.ious, self._reference(self.tissue[position]))
            option.seconds["score"] = option.seconds.get("score", 0.0) + time.perf_counter() - clock
        option.rank = min(scores, default=-np.inf)
        return option.rank

    def _better(self, position: int, options: List[_Attempt]) -> _Attempt:
        """Of the two chains' results on one slice, the one the scorer ranks higher (the first on a tie)."""
        if len(options) == 1:
            return options[0]
        rank = [self._rank(position, o) for o in options]
        return options[0] if rank[0] >= rank[1] else options[1]

    # -- outwards from segmented slices ----------------------------------------------------

    def fill_gaps(self, first: int, stop: int) -> None:
        """Slices at positions first..stop-1 left between segmented ones: a single chain walks
        into each from its segmented neighbour (the full cascade where the boxes are refused),
        forwards first; it stops where the organ seems to end."""
        tissue = self.tissue
        for i in range(first, stop):
            if i > 0 and tissue[i] not in self.records and tissue[i - 1] in self.found:
                self.walk(i - 1, 1, stop)
        for i in range(stop - 1, first - 1, -1):
            if i + 1 < len(tissue) and tissue[i] not in self.records and tissue[i + 1] in self.found:
                self.walk(i + 1, -1, first - 1)

    def walk(self, origin: int, step: int, until: int) -> None:
        """Propagate from the segmented slice at position `origin` by `step`, up to position `until` (excluded)."""
        tissue = self.tissue
        source = self.found.get(tissue[origin])
        i = origin + step
        while source is not None and i != until and 0 <= i < len(tissue) and tissue[i] not in self.records:
            self._check_cancel()
            upcoming = tissue[i + 1 : until] if step > 0 else tissue[until + 1 : i][::-1]
            if not self.memory.run(self._propagate, i, source, upcoming):
                break
            source = self.found[tissue[i]]
            i += step

    def _propagate(self, position: int, source: _Found, upcoming: Sequence[int]) -> bool:
        """One walk's step at tissue `position`: the neighbour's boxes, else the full cascade; False where
        the organ has ended.

        On a walk from a user's fix (`source.hint`, corrections.py), a refused result is kept over what the
        cascade found where the scorer ranks it higher, as on a contested slice: next to a small, zoomed-in
        box the first step is often refused on predicted IoU with Dice 0.70-0.95, and the cascade's poor
        candidate, carried on, painted 9 slices wrong (RESULTS.md, issue 19, 2026-12-03, third)."""
        index = self.tissue[position]
        result = self.attempt(index, source, upcoming)
        if result.fallback is None:
            self._accept(index, result)
            return True
        found = self.cascade(index, result.pixels, already_embedded=True, seconds=dict(result.seconds),
                             fallback=result.fallback, source=source)
        if source.hint is not None:
            return self.keep_refused_if_better(position, result, when_nothing_found=False) or found
        return found

    def guiding_chain(self, chains: Sequence[_Found]) -> Optional[_Found]:
        """Of the chains that met on a slice, the first that fallback_region gives a region, or None.

        In a correction, the chain from the user's fix may be the one that reached a contested slice
        while the other, from a boundary the user never confirmed, was refused there: its region
        still says where the target is, and whole-slice proposals there were most of a slow
        correction's time (RESULTS.md, issue 19)."""
        return next((chain for chain in chains if self.fallback_region(chain) is not None), None)

    def fallback_region(self, source: _Found) -> Optional[Box]:
        """Where the full cascade proposes on a slice that a chain from `source` was refused on, or
        reached where the other chain was contested (ProposalSettings.region); None: the whole slice.

        The automatic pass proposes everywhere: a chain may carry the wrong structure, and its cascade
        is what finds the target again (CorrectionSession narrows it for a chain from a user's fix)."""
        return None

    # -- one slice -------------------------------------------------------------------------

    def attempt(self, index: int, source: _Found, upcoming: Sequence[int] = ()) -> _Attempt:
        """Prompt slice `index` with its neighbour's boxes and judge the result against the chain's anchor."""
        pixels = self._image(index)
        if index in self.kept:
            self.segmenter.use_embedding(self.kept[index])
        else:  # counted in the slice's record, whichever attempt ends up kept
            self.encode_seconds[index] = self.encode_seconds.get(index, 0.0) + self.embed(index, pixels, upcoming)
        seconds: Dict[str, float] = {}
        clock = time.perf_counter()
        boxes = self.prompt_boxes(source, pixels.shape)
        shaped = refine_in_shape(self.segmenter, gray_to_rgb(pixels), boxes, self.settings.shape)
        refined = shaped.parts
        seconds["refine"] = time.perf_counter() - clock - shaped.seconds.get("encode", 0.0)
        if "encode" in shaped.seconds:  # the padded slice's encoding (context_padding)
            seconds["encode"] = shaped.seconds["encode"]
        parts = [r.mask for r in refined]
        ious = [r.predicted_iou for r in refined]
        fallback, scores = self.judge(pixels, parts, ious, source, seconds, self._reference(index))
        return _Attempt(pixels, parts, ious, scores, fallback, seconds,
                        _Found(parts, source.anchor_scores, source.anchor_ious, source.anchor, source.hint))

    def prompt_boxes(self, source: _Found, shape: Tuple[int, int]) -> List[Box]:
        """The boxes a chain prompts its next slice with: each part's box grown by the margin
        (CorrectionSession bounds them between a fix and its boundary)."""
        margin = self.settings.propagation.box_margin
        return [grow_box(mask_to_box(part), margin, shape) for part in source.parts if part.any()]

    def judge(self, pixels: np.ndarray, parts: List[np.ndarray], ious: List[float], source: _Found,
              seconds: Dict[str, float], reference: Optional[np.ndarray] = None) -> Tuple[Optional[str], List[float]]:
        """Why a propagated result cannot be kept (area, predicted IoU, score) or None, and its scores.

        Scores are measured only with a CLIP-like scorer (CLIP, the noisy oracle) and never
        inherited: the exact oracle's zeros would give the answer away.
        """
        rules = self.settings.propagation
        if not all(p.sum() >= rules.min_area_ratio * s.sum() for p, s in zip(parts, source.parts)):
            return "area", []
        if not all(iou >= src - rules.max_iou_drop for iou, src in zip(ious, source.anchor_ious)):
            return "predicted IoU", []
        if not self.scorer.scores_like_clip:
            return None, []
        clock = time.perf_counter()
        scores = self._score_parts(pixels, parts, ious, reference)
        seconds["score"] = time.perf_counter() - clock
        if len(scores) != len(parts) or min(scores) < min(source.anchor_scores) - rules.max_score_drop:
            return "score", scores
        return None, scores

    def _cascade_on(self, index: int, upcoming: Sequence[int] = ()) -> bool:
        """The full cascade on a slice not yet encoded; True when it found something."""
        pixels = self._image(index)
        if self.settings.reencode_for_refine:  # the paper's way, kept for the benchmark: segment_slice encodes
            return self.cascade(index, pixels)
        return self.cascade(index, pixels, already_embedded=True,
                            seconds={"encode": self.embed(index, pixels, upcoming)})

    def cascade(self, index: int, pixels: np.ndarray, already_embedded: bool = False,
                seconds: Optional[Dict[str, float]] = None, fallback: Optional[str] = None,
                source: Optional[_Found] = None) -> bool:
        """One full cascade (propose, retrieve, refine), written into the mask; True when it found something.

        `source`: the chain that guides it here, if any (the one refused here; on a contested slice,
        the one guiding_chain picks). Retrieval prefers candidates that continue its mask
        (PropagationSettings.neighbour_weight). Where fallback_region gives it a region,
        proposals come from there only, the slice gives presence no floor (its candidates' median is
        not what the scorer gives what mostly is not the target), and what it finds descends from the
        same hint, so the chain's next refusal proposes around it again."""
        region = self.fallback_region(source) if source is not None else None
        proposal = self.memory.proposal if region is None else replace(self.memory.proposal, region=tuple(region))
        result: SliceResult = segment_slice(
            pixels, self.segmenter, self.scorer, self.sentences, top_k=self.settings.top_k,
            proposal=proposal, reference=self._reference(index),
            reencode_for_refine=self.settings.reencode_for_refine, already_embedded=already_embedded,
            shape=self.settings.shape, prior=source.mask if source is not None else None,
            prior_weight=self.settings.propagation.neighbour_weight,
            keep_candidates=True,  # only for the agreement below; dropped with the result
        )
        timing = dict(seconds or {})
        for stage, value in result.seconds.items():
            timing[stage] = round(timing.get(stage, 0.0) + value, 4)
        self._finish(SliceRecord(index=index, reason=result.reason, method="cascade", clip_scores=result.clip_scores,
                                 predicted_ious=result.predicted_ious, candidate_count=result.candidate_count,
                                 candidates_median_score=None if region else result.candidates_median_score,
                                 seconds=timing,
                                 fallback=fallback, anchor=index,
                                 candidate_agreement=candidate_agreement(result)), result.mask)
        if result.mask.any():
            lineage = source.hint if region is not None else None
            self.found[index] = _Found(result.parts, result.clip_scores, result.predicted_ious, index, lineage)
            return True
        return False

    def embed(self, index: int, pixels: np.ndarray, upcoming: Sequence[int]) -> float:
        """Make slice `index` the segmenter's image; seconds spent encoding.

        With more than one slice per encoder call (a GPU), the next slices of `upcoming` are
        encoded in the same call (up to the first one done, where a walk would stop, or encoded
        already for the second chain between key slices) and kept for when their turn comes.
        """
        clock = time.perf_counter()
        batch = self.memory.encode_batch
        if index in self.ahead:
            self.segmenter.use_embedding(self.ahead.pop(index))
        elif batch <= 1:
            self.segmenter.set_image(gray_to_rgb(pixels))
        else:
            self.ahead.clear()  # the walk moved on: what was encoded for elsewhere is not needed
            fresh = itertools.takewhile(lambda k: k not in self.records and k not in self.kept, upcoming)
            more = list(itertools.islice(fresh, batch - 1))
            images = [gray_to_rgb(pixels)] + [gray_to_rgb(self._image(k)) for k in more]
            embeddings = self.segmenter.embed_images(images)
            self.segmenter.use_embedding(embeddings[0])
            self.ahead.update(zip(more, embeddings[1:]))
        return time.perf_counter() - clock

    # -- bookkeeping -----------------------------------------------------------------------

    def _accept(self, index: int, result: _Attempt) -> None:
        self._finish(SliceRecord(index=index, reason=None, method="propagated", clip_scores=result.scores,
                                 predicted_ious=result.ious, anchor=result.found.anchor,
                                 seconds={k: round(v, 4) for k, v in result.seconds.items()}),
                     np.logical_or.reduce(result.parts))
        self.found[index] = result.found

    def _finish(self, record: SliceRecord, result_mask: Optional[np.ndarray] = None) -> None:
        """Write a slice's record (and mask, back at full size) and report progress."""
        if record.index in self.encode_seconds:
            spent = self.encode_seconds.pop(record.index) + record.seconds.get("encode", 0.0)
            record.seconds["encode"] = round(spent, 4)
        if result_mask is not None:
            self.mask_slices[record.index] = resize_mask(result_mask, self.full_shape)
            record.area = int(self.mask_slices[record.index].sum())
        self.records[record.index] = record
        self.report_progress(record.index)

    def report_progress(self, index: int) -> None:
        """Slice `index` has its record: the run's progress counts the slices of its range that have one."""
        if self.progress:
            self.progress(len(self.records), self.total)

    def _score_parts(self, pixels: np.ndarray, parts: List[np.ndarray], ious: List[float],
                     reference: Optional[np.ndarray] = None) -> List[float]:
        candidates = [Candidate(mask=p, box=mask_to_box(p), predicted_iou=i, stability=1.0)
                      for p, i in zip(parts, ious) if p.any()]
        scores = self.scorer.score(gray_to_rgb(pixels), candidates, self.sentences, reference=reference)
        return [float(v) for v in scores]

    def _check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"Cancelled after {len(self.records)} of {self.total} slices; nothing was written.")

    def _forget_embeddings(self) -> None:
        """Drop what the run holds on the GPU (slices encoded ahead), before the memory fallback retries."""
        self.ahead.clear()
        self.kept.clear()

    def _windowed(self, index: int) -> np.ndarray:
        return window_to_uint8(self.slices[index], self.window)

    def _image(self, index: int) -> np.ndarray:
        """The slice as the models see it: windowed, and shrunk when it is very large."""
        return resize_uint8(self._windowed(index), self.shape)

    def _reference(self, index: int) -> Optional[np.ndarray]:
        """The reference slice at the models' size (the oracle scores with it), or None."""
        return None if self.ref_slices is None else resize_mask(self.ref_slices[index], self.shape)


def segment_volume(
    volume: np.ndarray,
    segmenter: Segmenter,
    scorer: Scorer,
    sentences: Sequence[str],
    settings: Optional[VolumeSettings] = None,
    *,
    reference: Optional[np.ndarray] = None,
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
) -> VolumeResult:
    """Segment the prompt's target on the slices of `volume` along `settings.axis` within `settings.slice_range`.

    `mode="every-slice"` runs the full cascade on every slice, as the paper did;
    `mode="propagate"` (default) runs it on key slices and propagates boxes to the others
    (see PropagationSettings). Slices whose windowed image is uniform (air, padding) are
    skipped before any model runs. Slices longer than `max_slice_side` are shrunk for the
    models and their masks enlarged back (nearest), so memory stays bounded whatever the
    slice size. `reference` is for the oracle scorer. `progress(done, total)` follows the
    slices handled; `should_cancel()` is checked between slices and a cancelled run raises
    Cancelled, handing back nothing partial. The mask has the input's shape (2D in, 2D out).
    The settings' clean-up and adaptation are the caller's (pipeline.segment_image).
    """
    runner = VolumeRunner(volume, segmenter, scorer, sentences, settings, reference=reference,
                          progress=progress, should_cancel=should_cancel)
    return runner.run()

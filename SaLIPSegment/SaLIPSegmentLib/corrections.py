"""Corrections: a volume run that keeps its state, so that a hint re-runs only what it changes.

`CorrectionSession` is a VolumeRunner that keeps every slice's embedding after `run()`; its
`correct(hints)` segments each hinted slice from its hint (no retrieval) and re-propagates from
it in both directions up to the next boundary: a key slice, another hinted slice, or the target's
end (where the walk stops). Past a boundary the fix carries on slice by slice while the scorer
ranks the hint's chain above what the slice had (carry_past). Every other slice keeps its result
voxel for voxel, and only slices never encoded before are encoded. Numpy in, numpy out; no Slicer,
no files.

Memory: a kept embedding is the encoder's 256 x 64 x 64 float32 features (4 MiB, LiteMedSAM and
SAM alike) plus the slice's RGB image: 181 slices hold about 0.75 GB.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError
from .hints import HINT_METHOD, Hint, HintGeometry, rank_slices_to_fix  # noqa: F401 (re-exported)
from .imaging import Box, gray_to_rgb, intersect_boxes, mask_to_box, resize_mask, union_box
from .shape import Shaped, refine_in_shape
from .volume import (
    BEYOND_ORGAN,
    SliceRecord,
    VolumeResult,
    VolumeRunner,
    _Found,
    flag_slices,
    grow_box,
    key_positions,
)

ABSENT_BY_HINT = "no target (hint)"
BEYOND_ABSENT_HINT = "beyond a 'no target' hint"


@dataclass
class Correction:
    """What one call to correct() did."""

    hinted: List[int]
    """The slices whose hint was new or changed."""
    changed: List[int]
    """Every slice recomputed: the hinted ones, those between them and the next boundary, and those the
    fix carried onto past it."""
    encodings: int
    """Images encoded for this correction: slices never encoded before, and the views hints were refined on
    (small boxes' zoomed windows; the padded slice with context_padding)."""
    seconds: float

    def to_dict(self) -> dict:
        return {"hinted": self.hinted, "changed": self.changed, "encodings": self.encodings,
                "seconds": round(self.seconds, 3)}


@dataclass
class _Redo:
    """A correction's progress: it counts the slices the correction redoes, not the volume's (which all
    have a record already), so that a bar goes from 0 to the slices redone and never steps back."""

    planned: set = field(default_factory=set)
    done: set = field(default_factory=set)
    announced: bool = False
    """The plan is whole (the hints' slices and every stretch refill redoes): reports start here."""

    def report(self, progress) -> None:
        if progress and self.announced:
            total = len(self.planned | self.done)  # carry_past may go past the plan, slice by slice
            progress(len(self.done), total)

    def finish(self, progress) -> None:
        """Every slice planned is done (a stretch's slices left without a mask count too)."""
        self.done |= self.planned
        self.report(progress)


@dataclass
class _SavedState:
    records: Dict[int, SliceRecord]
    found: Dict[int, _Found]
    mask: np.ndarray
    hints: Dict[int, Hint] = field(default_factory=dict)


class CorrectionSession(VolumeRunner):
    """A run that can be corrected with hints (see the module's docstring).

    After `run()`: `embeddings` (slice index -> the encoder's output, kept for the session),
    `key_slices` (where the automatic pass ran the full cascade by plan), `hints` (slice -> the
    hint in force), `encodings` (images encoded so far).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embeddings: Dict[int, object] = {}
        self.hints: Dict[int, Hint] = {}
        self.key_slices: set = set()
        self.encodings = 0
        self.automatic_state: Optional[_SavedState] = None
        """The result of the automatic pass, to come back to when a hint is taken away."""
        self.envelope: Optional[Box] = None
        """While refill redoes a stretch between two boundaries: the box its chains prompt inside (stretch_envelope)."""
        self.redo: Optional[_Redo] = None
        """While correct() runs: what its progress counts (_Redo)."""

    # -- the automatic pass, remembered ----------------------------------------------------

    def run(self) -> VolumeResult:
        result = super().run()
        if self.settings.mode == "every-slice":
            self.key_slices = set(self.tissue)
        else:
            interval = self.settings.propagation.key_interval
            self.key_slices = {self.tissue[k] for k in key_positions(len(self.tissue), interval)}
        self.automatic_state = self.save_state()
        return result

    def fallback_region(self, source: _Found) -> Optional[Box]:
        """Around the boxes of a chain that descends from a user's box or clicks, still in force
        (PropagationSettings.correction_region_margin): the user said where the target is. A chain from
        anywhere else (the automatic pass, or a boundary a correction left as it was) may carry the wrong
        structure, and its cascade proposes everywhere."""
        margin = self.settings.propagation.correction_region_margin
        hint = self.hints.get(source.hint) if source.hint is not None else None
        if margin is None or hint is None or hint.kind == "absent" or not source.parts:
            return None
        box = mask_to_box(source.mask)
        return None if box is None else grow_box(box, margin, self.shape)

    def prompt_boxes(self, source: _Found, shape: Tuple[int, int]) -> List[Box]:
        """The runner's boxes, cut to the stretch's envelope while refill redoes one (a box wholly outside it
        stays as it was: the envelope bounds a walk, it does not move a chain)."""
        boxes = super().prompt_boxes(source, shape)
        if self.envelope is None:
            return boxes
        return [intersect_boxes(box, self.envelope) or box for box in boxes]

    def stretch_envelope(self, low: Optional[int], high: Optional[int]) -> Optional[Box]:
        """The union of the masks' boxes at tissue positions low and high, grown by
        PropagationSettings.correction_envelope_margin; None where a side is open (past the last boundary
        the walk goes on until the target ends), an end has no mask, or the setting is None."""
        margin = self.settings.propagation.correction_envelope_margin
        if margin is None or low is None or high is None:
            return None
        ends = [self.found.get(self.tissue[position]) for position in (low, high)]
        boxes = [mask_to_box(end.mask) if end is not None and end.parts else None for end in ends]
        if any(box is None for box in boxes):
            return None
        return grow_box(union_box(boxes), margin, self.shape)

    def embed(self, index: int, pixels: np.ndarray, upcoming: Sequence[int]) -> float:
        """The runner's embed, except that a slice encoded once in the session is never encoded again."""
        if index in self.embeddings:
            self.segmenter.use_embedding(self.embeddings[index])
            return 0.0
        seconds = super().embed(index, pixels, upcoming)
        self.encodings += 1
        current = self.segmenter.embedding
        if current is not None:
            self.embeddings[index] = current
        return seconds

    def _forget_embeddings(self) -> None:
        """The GPU ran out of memory: what the session kept goes too (it is encoded again when needed)."""
        super()._forget_embeddings()
        self.embeddings.clear()

    @property
    def embedding_bytes(self) -> int:
        """Memory held by the kept embeddings' features."""
        total = 0
        for embedding in self.embeddings.values():
            features = getattr(embedding, "features", None)
            total += int(features.element_size() * features.nelement()) if features is not None else 0
        return total

    def geometry(self, ijk_to_ras=None) -> HintGeometry:
        """What hints are checked against in this run."""
        return HintGeometry(axis=self.axis, slice_range=(self.start, self.stop), slice_shape=tuple(self.full_shape),
                            takes_points=self.segmenter.takes_points, segmenter_name=self.segmenter.name,
                            ijk_to_ras=ijk_to_ras)

    # -- corrections -----------------------------------------------------------------------

    def correct(self, hints: Sequence[Hint]) -> Tuple[VolumeResult, Correction]:
        """Apply hints (new or changed ones; the others are in force already) and re-propagate around them.

        All or nothing: a correction that fails or is cancelled half-way leaves the run (and the hints in
        force) as they were, so the preview it started from can be corrected again."""
        started, encoded = time.perf_counter(), self.encodings
        fresh = [h for h in hints if self.hints.get(h.slice) != h]
        for hint in fresh:
            self._check_hint(hint)
        before = self.save_state()
        try:
            changed = self._apply(fresh)
        except BaseException:
            self.restore_state(before)
            raise
        finally:
            self.kept.clear()
            self.redo = None
        seconds = time.perf_counter() - started
        correction = Correction(hinted=sorted(h.slice for h in fresh), changed=sorted(changed),
                                encodings=self.encodings - encoded, seconds=seconds)
        return self.result(seconds), correction

    def _apply(self, fresh: Sequence[Hint]) -> set:
        """correct()'s work on the session's state: the hinted slices, what "no target" clears, the stretches
        around each fix and the carry past them, then presence; the slices it changed."""
        self._check_cancel()  # stopped before anything: also where no hint is new (one was taken away)
        self.hints.update({h.slice: h for h in fresh})
        changed = {h.slice for h in fresh}
        self.redo = _Redo(planned=set(changed))
        for hint in fresh:
            self._check_cancel()
            self.memory.run(self.segment_hint, hint)
        away = {h.slice: self.side_without_target(h.slice) for h in fresh if h.kind == "absent"}
        for index, side in away.items():
            changed.update(self.clear_beyond(index, side))
        gaps = self._gaps_around([h.slice for h in fresh if h.slice in self.tissue], away)
        self.announce(gaps)
        for low, high in gaps:
            changed.update(self.refill(low, high))
            changed.update(self.carry_past(low, high))
        self.redo.finish(self.progress)
        ordered = [self.records[index] for index in range(self.start, self.stop)]
        boxed = [k for k, hint in self.hints.items() if hint.kind != "absent"]
        # What the refill painted past the target loses its mask; no other slice does: presence judged
        # again moved its run and cleared or kept far slices the correction never touched (RESULTS.md).
        changed.update(self.judge_presence(ordered, keep=boxed, within=set(changed)))
        return changed

    def announce(self, gaps: Sequence[Tuple[Optional[int], Optional[int]]]) -> None:
        """The correction's plan is whole: its progress reports from here (the hints' slices are done)."""
        self.redo.done |= self.redo.planned
        for low, high in gaps:
            first, stop = self._span(low, high)
            self.redo.planned.update(self.tissue[first:stop])
        self.redo.announced = True
        self.redo.report(self.progress)

    def report_progress(self, index: int) -> None:
        """In a correction, the slices it redid of those it redoes (_Redo); otherwise the runner's count."""
        if self.redo is None:
            super().report_progress(index)
            return
        self.redo.done.add(index)
        self.redo.report(self.progress)

    def _check_hint(self, hint: Hint) -> None:
        if not self.start <= hint.slice < self.stop:
            raise InputError(f"Slice {hint.slice} is outside the run's slices {self.start}:{self.stop}.")
        if hint.kind != "absent" and hint.slice not in self.tissue:
            raise InputError(f"Slice {hint.slice} is uniform (no tissue): there is nothing to segment there.")
        if hint.kind == "points" and not self.segmenter.takes_points:
            raise InputError(f"{self.segmenter.name} takes boxes only, not points: give a box instead.")

    def segment_hint(self, hint: Hint) -> None:
        """The hinted slice from its hint alone: the box or clicks refined, or no mask for "no target"."""
        index = hint.slice
        self.found.pop(index, None)
        self.mask_slices[index] = False
        if hint.kind == "absent":
            self.records[index] = SliceRecord(index=index, reason=ABSENT_BY_HINT, method=HINT_METHOD,
                                              absent=ABSENT_BY_HINT, anchor=index)
            return
        pixels = self._image(index)
        seconds = {"encode": self.embed(index, pixels, ())}
        shaped = self.refine_hint(hint, pixels)
        seconds["refine"] = shaped.seconds.get("refine", 0.0)
        if "encode" in shaped.seconds:  # a view encoded: a small box's zoomed window (or context_padding)
            seconds["encode"] += shaped.seconds["encode"]
            self.encodings += 1
        seconds = {name: round(value, 4) for name, value in seconds.items()}
        parts, ious = [r.mask for r in shaped.parts], [r.predicted_iou for r in shaped.parts]
        scores = self._score_parts(pixels, parts, ious, self._reference(index)) if any(p.any() for p in parts) else []
        mask = np.logical_or.reduce(parts)
        self._finish(SliceRecord(index=index, reason=None if mask.any() else "refined mask is empty",
                                 method=HINT_METHOD, clip_scores=scores, predicted_ious=ious, anchor=index,
                                 seconds=seconds), mask)
        if mask.any() and (scores or not self.scorer.scores_like_clip):
            self.found[index] = _Found(parts, scores, ious, index, hint=index)

    def refine_hint(self, hint: Hint, pixels: np.ndarray) -> Shaped:
        """The segmenter's masks (at the models' size) for a box or clicks on the slice's `pixels`,
        whose embedding is current.

        A box prompts grown by the settings' hint_box_margin through the shape steps a retrieved box
        takes, a small one zoomed in on (hint_zoom_factor), and its mask keeps only what lies inside
        the box as given (the user said the target is in there)."""
        scale = np.array(self.shape[::-1], dtype=float) / np.array(self.full_shape[::-1], dtype=float)
        if hint.kind == "box":
            margin = self.settings.propagation.hint_box_margin
            prompt = grow_box(hint.box, margin, self.full_shape) if margin > 0 else hint.box
            x0, y0, x1, y1 = hint.box
            inside = np.zeros(self.shape, dtype=bool)
            inside[int(y0 * scale[1]) : int(np.ceil((y1 + 1) * scale[1])),
                   int(x0 * scale[0]) : int(np.ceil((x1 + 1) * scale[0]))] = True
            box = tuple(int(v * scale[k % 2]) for k, v in enumerate(prompt))
            zoomed = replace(self.settings.shape, zoom_factor=self.settings.propagation.hint_zoom_factor)
            shaped = refine_in_shape(self.segmenter, gray_to_rgb(pixels), [box], zoomed)
            shaped.parts = [replace(r, mask=r.mask & inside) for r in shaped.parts]
            return shaped
        clock = time.perf_counter()
        clicked = self.segmenter.refine_points([tuple(np.asarray(p) * scale) for p in hint.points], hint.labels)
        return Shaped(parts=[clicked], seconds={"refine": time.perf_counter() - clock})

    def hint_mask(self, hint: Hint) -> np.ndarray:
        """What a hint alone gives on its slice, at full size, without changing the session's result."""
        if hint.kind == "absent":
            return np.zeros(self.full_shape, dtype=bool)
        pixels = self._image(hint.slice)
        self.embed(hint.slice, pixels, ())
        parts = self.refine_hint(hint, pixels).parts
        return resize_mask(np.logical_or.reduce([r.mask for r in parts]), self.full_shape)

    def side_without_target(self, index: int) -> Optional[int]:
        """Which side of a "no target" slice the target is not on either (+1: above, -1: below), or None.

        The target is one object along the axis: it lies on the side of a boxed or clicked slice, and,
        without one on either side, on the side holding more of the current mask.
        """
        positive = [k for k, hint in self.hints.items() if hint.kind != "absent"]
        below, above = any(k < index for k in positive), any(k > index for k in positive)
        if below or above:
            return None if below and above else (1 if below else -1)
        painted_below = sum(r.area for k, r in self.records.items() if k < index)
        painted_above = sum(r.area for k, r in self.records.items() if k > index)
        if painted_below == painted_above:
            return None
        return -1 if painted_below < painted_above else 1

    def clear_beyond(self, index: int, side: Optional[int]) -> List[int]:
        """Remove the mask from every slice past a "no target" slice on the side without the target."""
        if side is None:
            return []
        beyond = range(index + 1, self.stop) if side > 0 else range(self.start, index)
        cleared = [k for k in beyond if k not in self.hints]
        for k in cleared:
            self.found.pop(k, None)
            self.mask_slices[k] = False
            self.records[k] = SliceRecord(index=k, reason=BEYOND_ABSENT_HINT, method="skipped",
                                          absent=BEYOND_ABSENT_HINT)
        return cleared

    def _gaps_around(self, hinted: Sequence[int], away: Optional[Dict[int, Optional[int]]] = None
                     ) -> List[Tuple[Optional[int], Optional[int]]]:
        """(low, high) tissue positions around each hinted slice: the boundaries next to it, None past the ends;
        not on the side a "no target" hint cleared (`away`: slice -> side).

        Boundaries are the key slices, the hinted slices and every other slice the full cascade segmented
        (where chains were refused or contested): its result came from retrieval, as a key slice's, and
        redoing it from a hint's chain lost it (a 1 mm thalamus: three slices 0.14-0.15 Dice worse)."""
        away = away or {}
        position = {index: p for p, index in enumerate(self.tissue)}
        boundaries = self._boundaries()
        gaps = set()
        for index in hinted:
            p = position[index]
            below = [b for b in boundaries if b < p]
            above = [b for b in boundaries if b > p]
            if away.get(index) != -1:
                gaps.add((below[-1] if below else None, p))
            if away.get(index) != 1:
                gaps.add((p, above[0] if above else None))
        return sorted(gaps, key=lambda gap: (gap[0] if gap[0] is not None else -1, gap[1] or 0))

    def _boundaries(self) -> List[int]:
        """Tissue positions a correction's stretch ends at: key slices, hinted slices, cascaded slices."""
        position = {index: p for p, index in enumerate(self.tissue)}
        cascaded = {index for index, record in self.records.items() if record.method == "cascade"}
        return sorted(position[i] for i in self.key_slices | cascaded | set(self.hints) if i in position)

    def carry_past(self, low: Optional[int], high: Optional[int]) -> List[int]:
        """Carry a hint's stretch (low, high) on past the boundary at its far end, slice by slice, while the
        chain's result ranks above the slice's own (take_over); the slices carried.

        A boundary's result came from retrieval, and a chain from a poor hint mask must not overwrite it
        (see _gaps_around); but where the scorer prefers the chain's result, the hint's fix has more to
        give beyond it. The carry stops at the first slice it does not improve, a hint, or the end."""
        hinted = {p for p, index in enumerate(self.tissue) if index in self.hints}
        step = 1 if low in hinted else -1
        position = high if step > 0 else low
        carried: List[int] = []
        while position is not None and 0 <= position < len(self.tissue) and position not in hinted:
            self._check_cancel()
            if not self.take_over(position, step):
                break
            carried.append(self.tissue[position])
            position += step
        return carried

    def take_over(self, position: int, step: int) -> bool:
        """Prompt the slice at `position` from its neighbour at position - step; keep the result, and say
        True, when it is not refused and the scorer ranks it above the slice's current mask (each mask
        scored whole: a cascade's several parts are not judged by their weakest)."""
        index = self.tissue[position]
        source, current = self.found.get(self.tissue[position - step]), self.found.get(index)
        if source is None or current is None:
            return False  # nothing carried this far, or no target here: the carry ends
        result = self.attempt(index, source)
        if result.fallback is not None or not any(p.any() for p in result.parts):
            return False
        # One part, scored already by judge (a CLIP-like scorer): the same crop, not scored twice.
        single = len(result.parts) == 1 and len(result.scores) == 1
        chained = result.scores[0] if single else self._whole_score(index, result.pixels, result.parts)
        if chained <= self._whole_score(index, result.pixels, current.parts):
            return False
        self._accept(index, result)
        return True

    def _whole_score(self, index: int, pixels: np.ndarray, parts: List[np.ndarray]) -> float:
        """The scorer's score for the union of a slice's parts, as one candidate, with its holes filled where
        the run's clean-up fills them: two masks are compared as the user will see them."""
        union = np.logical_or.reduce(parts)
        if self.settings.cleanup.fill_holes:
            union = ndimage.binary_fill_holes(union)
        return max(self._score_parts(pixels, [union], [1.0], self._reference(index)), default=-np.inf)

    def refill(self, low: Optional[int], high: Optional[int]) -> List[int]:
        """Redo the slices strictly between tissue positions low and high (None: past the end); their indices.

        Between two boundaries a chain runs from each end (fill_between), its boxes inside the ends'
        envelope (stretch_envelope); past the last one a single walk goes outwards until the target ends
        (fill_gaps); what no chain reaches is beyond the organ.
        As in the automatic pass, a slice where both chains are refused gets the full cascade (measured:
        without it, the brain's Dice after 3 corrections was 0.50 instead of 0.58; a 3 mm lesion's 0.817
        instead of 0.869, as the cascade found the lesion's end slice the chain had lost).
        """
        first, stop = self._span(low, high)
        redone = self.tissue[first:stop]
        before = {index: (self.records[index], self.found[index], self.mask_slices[index].copy())
                  for index in redone if index in self.found and index not in self.hints}
        for index in redone:
            self.records.pop(index, None)
            self.found.pop(index, None)
            self.mask_slices[index] = False
        self.envelope = self.stretch_envelope(low, high)
        try:
            if low is not None and high is not None:
                self.fill_between(low, high)
            else:
                self.fill_gaps(first, stop)
        finally:
            self.envelope = None
        for index in redone:
            if index not in self.records:
                self._finish(SliceRecord(index=index, reason=BEYOND_ORGAN, method="skipped"))
        self.keep_better(before)
        return redone

    def _span(self, low: Optional[int], high: Optional[int]) -> Tuple[int, int]:
        """The tissue positions strictly between low and high (None: past the end), as (first, stop)."""
        return (0 if low is None else low + 1), (len(self.tissue) if high is None else high)

    def keep_better(self, before: Dict[int, Tuple[SliceRecord, _Found, np.ndarray]]) -> None:
        """Give a redone slice its mask from before the correction back where the scorer ranks that one
        higher (_kept_rank): a fix's chain can drift a few slices away from it, and a slice it did not
        improve keeps what it had (RESULTS.md, issue 19, 2026-12-03). Slices the chain left without a
        mask stay so."""
        for index, (record, found, mask) in before.items():
            now = self.found.get(index)
            if now is None:
                continue
            if self._kept_rank(index, record, found) > self._kept_rank(index, self.records[index], now):
                self.records[index], self.found[index] = record, found
                self.mask_slices[index] = mask

    def _kept_rank(self, index: int, record: SliceRecord, found: _Found) -> float:
        """How the scorer ranks a propagated slice's result: with a CLIP-like scorer, its weakest part's
        score from when the chain reached it (CLIP is not run again on every slice a correction redoes:
        0.3 s a crop on 2 CPU cores); with the exact oracle, the whole mask as the user will see it."""
        if self.scorer.scores_like_clip and record.clip_scores:
            return min(record.clip_scores)
        return self._whole_score(index, self._image(index), found.parts)

    def result(self, seconds: float) -> VolumeResult:
        """The session's current mask and table, flagged again (hinted slices are never flagged)."""
        ordered = [self.records[index] for index in range(self.start, self.stop)]
        flag_slices(ordered, thickness_mm=self.settings.slice_thickness_mm, presence_floor=self.presence_floor(ordered))
        for record in ordered:
            if record.method == HINT_METHOD:
                record.flags = []
        return VolumeResult(
            mask=self.mask.reshape(self.original_shape), slices=ordered, axis=self.axis,
            slice_range=(self.start, self.stop), window=self.window, seconds=seconds, mode=self.settings.mode,
            working_shape=self.shape, notices=self.memory.notices, warnings=self.empty_fixes(),
            encoder_runtime=self.segmenter.encoder_runtime,
            decoder_runtime=self.segmenter.decoder_runtime, takes_points=self.segmenter.takes_points,
        )

    def empty_fixes(self) -> List[str]:
        """A warning for each box or clicks that gave no mask: the user said the target is there, and
        nothing was painted (a box a pixel or two wide, or a target the model cannot see)."""
        return [f"Slice {index}: the model found nothing from its fix ({hint.kind}); draw a larger box, "
                "or paint the slice by hand." for index, hint in sorted(self.hints.items())
                if hint.kind != "absent" and not self.mask_slices[index].any()]

    # -- trying corrections from the same starting point ----------------------------------

    def save_state(self) -> _SavedState:
        """The current result, to come back to (the embeddings are kept either way)."""
        return _SavedState(copy.deepcopy(self.records), dict(self.found), self.mask.copy(), dict(self.hints))

    def restore_state(self, state: _SavedState) -> None:
        self.records = copy.deepcopy(state.records)
        self.found = dict(state.found)
        self.mask[...] = state.mask
        self.hints = dict(state.hints)


def reference_hint(reference_slice: np.ndarray, index: int) -> Hint:
    """What a user who knows the answer gives: the reference's box on the slice, or "no target" where it is empty."""
    box = mask_to_box(reference_slice)
    return Hint(slice=index, kind="absent") if box is None else Hint(slice=index, kind="box", box=box)

"""Label-free quality of each slice's mask: signals, a confidence (0-1) and flags with reasons.

Numpy in, numbers out; no Slicer, no files. The steps, for a volume's records in slice order:
  measure_signals   per slice with a mask: fragments, solidity, agreement of the retrieved
                    candidate with its refined mask, overlap with and area against the
                    neighbouring slices, predicted IoU, score against the volume's own;
  judge_slice       each signal against its limit (QualityRules): a confidence and the
                    reasons of the signals past their limit;
  flag_target_edges the slices presence emptied within a few millimetres of a kept mask (fewer
                    where the masks taper towards that end: taper_depth): where the target's
                    run was cut is where a cut present slice would be; further on, while the
                    emptied masks still scored part of the way up to the kept ones;
  verdict           one line for the volume ("12 of 52 slices need a look").
volume.flag_slices runs them, so every caller (segment, evaluate, batch, the Slicer effect)
sees the same flags. The limits were chosen against per-slice Dice offline, and
Testing/Benchmarks/calibrate_flags.py judges them on kept runs (figures in RESULTS.md). Nothing here reads the
reference, and no signal relies on an exact oracle's zero: scores count only relative to the
volume's own scored slices, as CLIP's would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .cascade import NO_CANDIDATE
from .hints import HINT_METHOD
from .imaging import dice, robust_spread

# The reasons a slice is flagged, as the report and the panel show them.
NO_CANDIDATE_FLAG = NO_CANDIDATE
EMPTY_MASK_FLAG = "empty mask"
EDGE_FLAG = "judged without the target near a mask: check where the target ends"
CUT_TAIL_FLAG = "judged without the target, but scored like a poor part of it: check where the target ends"


@dataclass(frozen=True)
class QualityRules:
    """The limit of each signal past which a slice needs a look, and how far from it a slice is
    fully trusted (the confidence's scale). Fitted on LiteMedSAM runs over the template's brain,
    deep grey and ventricles with both oracles, and on the references themselves as right masks;
    judged again on 27 runs of seven structures in three heads, where no one limit's change made
    more runs meet issue 18's flag target, and on 28 rebuilt runs, where the tapered edge depth made
    13 meet it, not 11 (calibrate_flags.py; RESULTS.md). Nothing is tuned to one structure, and the
    score's limit is relative, so it does not rest on an exact oracle's zeros."""

    max_fragments: float = float("inf")
    """Connected pieces of the mask holding at least `fragment_share` of its area each. Off: right
    masks of deep grey and the ventricles have three to six pieces, so the count flagged good slices
    more than poor ones; it is still measured and reported."""
    fragment_share: float = 0.02
    min_solidity: float = 0.5
    """Area over the area of its convex hull (the largest piece's): a ragged shape reads low."""
    min_agreement: float = 0.0
    """Dice of the retrieved part (or its union) with its refined mask (full-cascade slices). Off
    (0) since parts are united: the refit on runs with united parts found it adds no poor slice
    the other signals miss; still measured and reported."""
    min_neighbour_dice: float = 0.6
    """The better Dice with the neighbouring slices' masks (slices with a mask on a side)."""
    max_area_change: float = 0.75
    """|log2| of the area over the median area of up to two masked slices on each side (0.75: 1.7x)."""
    min_predicted_iou: float = 0.55
    """The segmenter's own predicted IoU (the lowest of the slice's parts). United parts' larger
    boxes read 0.6-0.7 where the mask is right, so 0.7 flagged good slices."""
    min_score_z: float = -1.0
    """The score in robust standard deviations from the median of the volume's scored slices."""
    min_scored_slices: int = 5
    """Fewer scored slices than this give no score signal (nothing to compare with)."""
    score_floor: float = 0.5
    """The smallest spread a score's z is measured in (a very uniform volume flags nothing)."""
    flag_edges: bool = True
    """Flag the slices presence emptied next to a kept mask (flag_target_edges)."""
    edge_depth_mm: float = 6.0
    """...up to this many millimetres past each end of the kept run, where the slice thickness is
    known (at least one slice; one slice where it is not). Presence errs at a compact target's ends
    by more slices on thin slices: at 1 mm one flagged slice per end found 2 of 12 cut thalamus
    slices, 6 mm found 11 of 12 (RESULTS.md, issue 18, thick slices)."""

    edge_taper: bool = True
    """Flag fewer slices past an end that tapers (taper_depth): as many as the end's area, shrinking at
    the rate of the kept masks before it, takes to vanish (at least one, at most the edge depth). A run
    cut where the target tapers to nothing needs one slice checked, not 6 mm. A deeper reach where the
    masks do not shrink (12 mm) flagged more good slices than poor ones (RESULTS.md, issue 18, 2026-12-04)."""
    edge_taper_span: int = 4
    """The kept masks at each end whose areas give its rate of shrinking (at least three of them)."""

    def edge_slices(self, thickness_mm: Optional[float]) -> int:
        """How many slices past each end of the kept run the edge flags reach."""
        if not thickness_mm or thickness_mm <= 0:
            return 1
        return max(1, int(round(self.edge_depth_mm / thickness_mm)))
    tail_height: float = 0.05
    """Past the edge depth, an emptied slice is still flagged while it and every emptied slice between it
    and the kept run scored (presence's score) at least this fraction of the way from presence's floor up
    to the kept masks' median: a stretch of target segmented poorly that presence cut, not the target's
    end, where slices without the target score at the floor. 0.1 stopped one cerebellum's walk at a
    slice 0.098 of the way up (RESULTS.md, issue 18, tail flags). Where twice the emptied slices'
    robust spread of heights is more (a noisy scorer, kept masks scoring little above the floor), that
    is the limit instead: once the spread, a noisy lesion at 6 mm flagged an empty slice."""
    inherit: bool = False
    """Flag a propagated slice whose chain's anchor (the full cascade its box came from) is flagged.
    Off: it found more poor slices but flagged 63% of the good ones (a key slice flagged for its
    predicted IoU leads a chain of good slices as often as a poor one)."""

    def limits(self) -> Dict[str, Tuple[float, float, str]]:
        """signal -> (limit, scale, direction): 'above' flags values over the limit, 'below' under it."""
        return {
            "fragments": (self.max_fragments, 2.0, "above"),
            "solidity": (self.min_solidity, 0.2, "below"),
            "agreement": (self.min_agreement, 0.3, "below"),
            "neighbour_dice": (self.min_neighbour_dice, 0.3, "below"),
            "area_change": (self.max_area_change, 1.0, "above"),
            "predicted_iou": (self.min_predicted_iou, 0.2, "below"),
            "score_z": (self.min_score_z, 2.0, "below"),
        }


REASONS = {
    "fragments": "fragmented ({value:.0f} pieces)",
    "solidity": "ragged shape (solidity {value:.2f})",
    "agreement": "refined mask differs from the retrieved part (Dice {value:.2f})",
    "neighbour_dice": "unlike its neighbours (Dice {value:.2f})",
    "area_change": "area jump ({ratio:.1f}x its neighbours)",
    "predicted_iou": "low predicted IoU ({value:.2f})",
    "score_z": "low score for this volume",
}


@dataclass
class SliceQuality:
    """One slice's verdict: the confidence (0-1, under 0.5 when flagged) and the flags' reasons."""

    confidence: Optional[float]
    flags: List[str]


# -- signals on one mask ---------------------------------------------------------------------


def _pieces(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The mask's 8-connected pieces as labels, on the mask's bounding box (fast on large slices),
    and each piece's size."""
    rows, cols = np.nonzero(np.any(mask, axis=1))[0], np.nonzero(np.any(mask, axis=0))[0]
    if rows.size == 0:
        return np.zeros((0, 0), dtype=np.int32), np.zeros(0, dtype=np.int64)
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    labels, _ = ndimage.label(crop, structure=np.ones((3, 3), dtype=bool))
    return labels, np.bincount(labels.ravel())[1:]


def fragment_count(mask: np.ndarray, share: float = 0.02) -> int:
    """Connected pieces (8-connected) holding at least `share` of the mask's area each."""
    return shape_signals(mask, share)[0]


def solidity(mask: np.ndarray) -> float:
    """The largest piece's area over the area of its convex hull (pixel corners): 1 for a convex shape."""
    return shape_signals(mask)[1]


def shape_signals(mask: np.ndarray, share: float = 0.02) -> Tuple[int, float]:
    """(fragment_count, solidity) from one labelling of the mask."""
    labels, sizes = _pieces(np.asarray(mask, dtype=bool))
    if sizes.size == 0:
        return 0, 0.0
    fragments = int(np.sum(sizes >= share * sizes.sum()))
    piece = labels == (np.argmax(sizes) + 1)
    edge = piece & ~ndimage.binary_erosion(piece)
    rows, cols = np.nonzero(edge)
    corners = np.concatenate([np.stack([rows + dr, cols + dc], axis=1) for dr in (0, 1) for dc in (0, 1)])
    try:
        hull_area = ConvexHull(corners).volume  # in 2D the "volume" is the area
    except QhullError:  # all on one line: a one-pixel-wide bar is as convex as a shape gets
        return fragments, 1.0
    return fragments, float(min(1.0, sizes.max() / hull_area))


def neighbour_dice(masks: Sequence[np.ndarray], position: int, areas: Sequence[int]) -> Optional[float]:
    """The better Dice of the mask at `position` with the masks of the slices just before and after
    (those with a mask); None where neither has one."""
    values = [dice(masks[position], masks[k]) for k in (position - 1, position + 1)
              if 0 <= k < len(masks) and areas[k] > 0]
    return max(values) if values else None


def area_change(areas: Sequence[int], position: int) -> Optional[float]:
    """|log2| of the slice's area over the median of up to two masked slices on each side
    (at least three of them), so one odd neighbour does not make the slice look odd too."""
    around = [a for a in list(areas[max(0, position - 2) : position]) + list(areas[position + 1 : position + 3]) if a]
    if len(around) < 3 or areas[position] == 0:
        return None
    return float(abs(np.log2(areas[position] / float(np.median(around)))))


def score_z(records: Sequence, rules: QualityRules) -> Dict[int, float]:
    """Record position -> how many robust standard deviations its score lies from the median of the
    volume's scored, masked slices (relative, as CLIP's 100 x cosine needs; never an absolute value)."""
    scored = [(k, min(r.clip_scores)) for k, r in enumerate(records) if r.area > 0 and r.clip_scores]
    if len(scored) < rules.min_scored_slices:
        return {}
    values = np.array([v for _, v in scored])
    median = float(np.median(values))
    spread = max(rules.score_floor, robust_spread(values))
    return {k: (v - median) / spread for k, v in scored}


# -- a volume's records --------------------------------------------------------------------


def measure_signals(records: Sequence, masks: Optional[Sequence[np.ndarray]], rules: QualityRules) -> None:
    """Write each masked slice's signals into `record.quality` (masks in the records' order; without
    masks the mask signals kept from an earlier measurement stay, the others are measured again)."""
    areas = [r.area for r in records]
    scores = score_z(records, rules)
    for position, record in enumerate(records):
        kept = dict(record.quality or {})
        record.quality = {}
        if record.area == 0 or record.skipped or record.absent:
            continue
        signals: Dict[str, Optional[float]] = {}
        if masks is not None:
            mask = np.asarray(masks[position], dtype=bool)
            signals["fragments"], signals["solidity"] = shape_signals(mask, rules.fragment_share)
            signals["neighbour_dice"] = neighbour_dice(masks, position, areas)
        else:
            signals.update({k: kept.get(k) for k in ("fragments", "solidity", "neighbour_dice")})
        signals["agreement"] = record.candidate_agreement
        signals["area_change"] = area_change(areas, position)
        signals["predicted_iou"] = min(record.predicted_ious) if record.predicted_ious else None
        signals["score_z"] = scores.get(position)
        record.quality = {k: round(float(v), 3) for k, v in signals.items() if v is not None}


def judge_slice(record, rules: QualityRules) -> SliceQuality:
    """The slice's confidence and flags from its signals (measure_signals) and its reason.

    The confidence is the lowest of the signals' margins, each 0.5 at its limit, 1 a scale or more
    on the good side and 0 a scale or more past it; a slice is flagged where it is under 0.5.
    Skipped slices and slices judged absent carry no mask: neither confidence nor flags.
    """
    if record.skipped or record.absent:
        return SliceQuality(None, [])
    if record.area == 0:
        reason = NO_CANDIDATE_FLAG if record.reason == NO_CANDIDATE_FLAG else EMPTY_MASK_FLAG
        return SliceQuality(0.0, [reason])
    confidence, flags = 1.0, []
    for name, (limit, scale, direction) in rules.limits().items():
        value = record.quality.get(name)
        if value is None:
            continue
        past = (value - limit) if direction == "above" else (limit - value)
        margin = float(np.clip(0.5 - 0.5 * past / scale, 0.0, 1.0))
        confidence = min(confidence, margin)
        if past > 0:
            flags.append(REASONS[name].format(value=value, ratio=2.0 ** value))
    return SliceQuality(round(confidence, 3), flags)


def flag_records(records: Sequence, masks: Optional[Sequence[np.ndarray]] = None,
                 rules: Optional[QualityRules] = None, thickness_mm: Optional[float] = None,
                 presence_floor: Optional[float] = None) -> None:
    """Measure, judge and write `quality`, `confidence` and `flags` into each record (slice order);
    `thickness_mm`: the distance between the slices, where it is known (the edge flags' depth);
    `presence_floor`: what presence's scores read where the target is not, where presence ran."""
    rules = rules or QualityRules()
    measure_signals(records, masks, rules)
    for record in records:
        judged = judge_slice(record, rules)
        record.confidence, record.flags = judged.confidence, judged.flags
    if rules.inherit:
        inherit_from_anchors(records)
    if rules.flag_edges:
        heights = cut_heights(records, presence_floor)
        # A height counts only well above the emptied slices' own scatter: under noise the floor is a blur.
        least = max(rules.tail_height, 2.0 * robust_spread(np.array(list(heights.values()))))
        taper_span = rules.edge_taper_span if rules.edge_taper else None
        flag_target_edges(records, rules.edge_slices(thickness_mm), heights, least, taper_span)


def _is_kept(record) -> bool:
    return record.area > 0 and not record.absent


def _walks_from_kept(records: Sequence) -> List[Tuple[int, int, List[int]]]:
    """From each end of the kept masks (its position, and the step outward), the positions of the slices
    presence emptied in a row outward (a slice the user said has no target, a kept or a skipped slice
    ends the walk)."""
    walks = []
    for position, record in enumerate(records):
        if not _is_kept(record):
            continue
        for step in (-1, 1):
            walk, k = [], position + step
            while 0 <= k < len(records) and records[k].absent and records[k].method != HINT_METHOD:
                walk.append(k)
                k += step
            if walk:
                walks.append((position, step, walk))
    return walks


def taper_depth(records: Sequence, end: int, step: int, most: int, span: int = 4) -> int:
    """How many slices past the kept mask at `end` (the walk going `step`) the edge flags reach: the
    slices its area takes to vanish at the rate the last `span` kept masks shrink towards it (a least
    squares line), from 1 to `most`; `most` where they do not shrink or fewer than three are kept.

    A target that tapers (a lesion's pole, the top of a head) ends where its masks shrink to nothing,
    and presence cuts it there or a slice off; a run that ends at full size was cut inside the target,
    and the present slices past it are as many as presence could miss."""
    areas, k = [], end
    while 0 <= k < len(records) and _is_kept(records[k]) and len(areas) < span:
        areas.append(float(records[k].area))
        k -= step
    if len(areas) < 3:
        return most
    shrink = float(np.polyfit(np.arange(len(areas)), areas, 1)[0])  # growth per slice inward
    if shrink <= 0:
        return most
    return int(np.clip(np.ceil(areas[0] / shrink), 1, most))


def cut_heights(records: Sequence, floor: Optional[float]) -> Dict[int, float]:
    """Position -> each emptied slice's presence score as a fraction of the way from `floor` up to the
    kept masks' median (0 where it has none); empty without a floor, or where the kept masks do not
    score above it."""
    def score(record) -> Optional[float]:
        value = record.presence_score
        return value if value is not None and np.isfinite(value) else None

    kept = [score(r) for r in records if _is_kept(r) and score(r) is not None]
    if floor is None or not kept or float(np.median(kept)) <= floor:
        return {}
    top = float(np.median(kept)) - floor
    return {k: (score(r) - floor) / top if score(r) is not None else 0.0 for k, r in enumerate(records) if r.absent}


def flag_target_edges(records: Sequence, depth: int = 1, heights: Optional[Dict[int, float]] = None,
                      min_height: float = float("inf"), taper_span: Optional[int] = None) -> None:
    """Flag the slices presence emptied (not the user's "no target") at most `depth` slices past a kept
    mask (fewer past an end that tapers, with `taper_span`: taper_depth), and past those while their
    scores stay high (`heights`, cut_heights: each at least `min_height`, from the kept mask on).

    Presence cuts the target's run where the scores drop, and a present end slice scores low as
    often as an absent one (its mask is small or poor): the slices just past the cut are where a
    person should look. A longer stretch of poor masks of the target scores part of the way up,
    where slices without it score at the floor. They have no mask, so no confidence (the ranking
    reads it as 0).
    """
    heights = heights or {}
    for end, outward, walk in _walks_from_kept(records):
        reach = taper_depth(records, end, outward, depth, taper_span) if taper_span else depth
        high = np.array([heights.get(k, 0.0) for k in walk]) >= min_height
        for step, position in enumerate(walk):
            if step < reach:
                records[position].flags = [EDGE_FLAG]
            elif high[: step + 1].all():
                records[position].flags = [CUT_TAIL_FLAG]
            else:
                break


def inherit_from_anchors(records: Sequence) -> None:
    """Flag the propagated slices whose anchor (a full cascade) was flagged by its own signals; their
    confidence is at most the anchor's."""
    flagged = {r.index: r.confidence for r in records if r.flags and r.method == "cascade"}
    for record in records:
        if record.method == "propagated" and record.area > 0 and not record.absent and record.anchor in flagged:
            record.flags = record.flags + [f"propagated from flagged slice {record.anchor}"]
            record.confidence = min(record.confidence, flagged[record.anchor] or 0.0)


def verdict(records: Sequence) -> str:
    """One line for the volume: how many of its segmented slices need a look, and how many were judged
    to be without the target (presence removed their mask: a user should know they are empty on purpose)."""
    looked = [r for r in records if not r.skipped and (not r.absent or r.flags)]
    flagged = sum(1 for r in looked if r.flags)
    absent = sum(1 for r in records if r.absent)
    if not looked:
        line = "no slice was segmented"
    elif flagged == 0:
        line = "no slice needs a look"
    else:
        line = f"{flagged} of {len(looked)} {'slice needs' if flagged == 1 else 'slices need'} a look"
    return line + (f"; {absent} judged without the target" if absent else "")


def candidate_agreement(result) -> Optional[float]:
    """Dice of each retrieved part (the candidate, or the union it grew into) with its refined mask,
    the lowest: where SAM's box-prompted mask is not the part CLIP retrieved, the box held
    something else (a cascade.SliceResult kept with its candidates)."""
    if not result.retrieved_masks or not result.parts:
        return None
    return round(min(dice(prompt, part) for prompt, part in zip(result.retrieved_masks, result.parts)), 3)

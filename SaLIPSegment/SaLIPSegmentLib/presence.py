"""Presence: whether the prompt's target is on each painted slice, decided after the run.

SaLIP is a 2D method: every image it saw held the organ, and every slice of a volume gets a
mask. Here each painted slice's final mask is scored once more (`presence_signal`, one scorer
call per slice), which gives a dense signal even where propagation scored nothing, and
`decide_presence` keeps the target's one run of slices, but only where the scores fall into
two groups far apart against their own spread: a volume whose every slice holds the target
(the brain), poorly segmented ones included, loses nothing.

Label-free and scale-free: the rule uses only scores relative to the same volume's (never a
fixed value, never a zero: CLIP scores 100 x cosine, around 20 to 35 for any crop), the
slices' order and the chains' anchors. With a scorer that reads text (CLIP), the signal is
the margin of the target's sentences over negative ones (background, the other presets), so
a crop that merely looks like a scan does not read as the target.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .imaging import mask_to_box, robust_spread
from .models.base import Candidate, Scorer
from .settings import PresenceSettings

LOW_SCORE_ABSENT = "scores far below the volume's confident slices"
OUTSIDE_RUN = "outside the target's run of slices"

# What a crop should beat to read as the target, besides the other presets' organs: the
# empty and featureless regions a mask lands on where the target is not.
BACKGROUND_SENTENCES = (
    "a black background with nothing in it",
    "an empty dark region outside the body on a scan",
    "plain grey noise without any organ",
)


def negative_ensembles(sentences: Sequence[str]) -> List[Tuple[str, ...]]:
    """Sentence sets a crop of the target should score below: background, and every preset but the target's.

    A preset sharing a sentence with the prompt is the target itself (or its alias) and is left out.
    """
    from .prompts import load_presets

    wanted = set(sentences)
    others = [p.sentences for p in load_presets().values() if not wanted & set(p.sentences)]
    return [BACKGROUND_SENTENCES] + others


def presence_signal(scorer: Scorer, image_rgb: np.ndarray, mask: np.ndarray, sentences: Sequence[str],
                    negatives: Sequence[Sequence[str]] = (), reference: Optional[np.ndarray] = None) -> float:
    """The final mask's score for the prompt, less its best score for a negative sentence set.

    The negatives count only for a scorer that reads text (the oracles score by overlap with a
    reference and give every sentence set the same score). An empty mask has no signal (NaN).
    """
    if not mask.any():
        return float("nan")
    candidate = Candidate(mask=mask, box=mask_to_box(mask), predicted_iou=1.0, stability=1.0)
    sets = [tuple(sentences)] + ([tuple(n) for n in negatives] if scorer.reads_sentences else [])
    scores = scorer.score_sets(image_rgb, [candidate], sets, reference=reference)[:, 0]
    return float(scores[0] - (scores[1:].max() if len(scores) > 1 else 0.0))


# -- the rule -------------------------------------------------------------------------------


def _running_median(values: np.ndarray, window: int) -> np.ndarray:
    """Each value as the median of `window` values around it (fewer at the ends)."""
    half = max(0, window // 2)
    return np.array([np.median(values[max(0, k - half) : k + half + 1]) for k in range(values.size)])


def split_level(values: np.ndarray) -> float:
    """The level that best splits the values into a low and a high group (Otsu's between-class variance).

    Returns the mean of the two values either side of the best cut; values all equal have no split (NaN).
    """
    ordered = np.sort(values)
    if ordered[0] == ordered[-1]:
        return float("nan")
    best, level = -1.0, float("nan")
    for cut in range(1, ordered.size):
        if ordered[cut] == ordered[cut - 1]:
            continue
        low, high = ordered[:cut], ordered[cut:]
        between = low.size * high.size * (high.mean() - low.mean()) ** 2
        if between > best:
            best, level = between, float((ordered[cut - 1] + ordered[cut]) / 2)
    return level


def best_run(values: np.ndarray, level: float) -> Tuple[int, int]:
    """(first, last) positions of the contiguous run with the most score above `level` (Kadane's walk)."""
    best, best_run_, total, start = -np.inf, (0, -1), 0.0, 0
    for k, gain in enumerate(values - level):
        if total <= 0:
            total, start = 0.0, k
        total += gain
        if total > best:
            best, best_run_ = total, (start, k)
    return best_run_


def separation(values: np.ndarray, first: int, last: int) -> float:
    """How far the run's scores sit above the others', in units of the groups' pooled spread.

    Two groups (present, absent) far apart against their own spread read large; one group with a
    tail of poorer slices (a target on every slice, some segmented badly) reads small.
    """
    inside = values[first : last + 1]
    outside = np.concatenate([values[:first], values[last + 1 :]])
    if not inside.size or not outside.size:
        return 0.0
    gap = float(np.median(inside) - np.median(outside))
    variances = inside.size * robust_spread(inside) ** 2 + outside.size * robust_spread(outside) ** 2
    pooled = np.sqrt(variances / values.size)
    if pooled == 0:
        return np.inf if gap > 0 else 0.0
    return gap / pooled


def _signals(records: Sequence) -> Tuple[List[int], np.ndarray]:
    """Painted slices with a signal, in slice order, and their signals (the presence score, else the
    retrieval score)."""
    indices, values = [], []
    for record in records:
        if record.area <= 0:
            continue
        value = record.presence_score
        if value is None or not np.isfinite(value):
            value = min(record.clip_scores) if record.clip_scores else None
        if value is not None:
            indices.append(record.index)
            values.append(value)
    return indices, np.asarray(values, dtype=np.float64)


def candidate_floor(records: Sequence) -> Optional[float]:
    """What the scorer gives what is not the target, on this volume: the median over the full cascades of
    each one's median candidate score (most proposals are something else); None without a cascade."""
    medians = [r.candidates_median_score for r in records if r.candidates_median_score is not None]
    return float(np.median(medians)) if medians else None


def target_run(values: np.ndarray, rules: PresenceSettings, floor: Optional[float] = None,
               keep: Sequence[int] = ()) -> Optional[Tuple[int, int, float]]:
    """(first, last, level) of the target's run among the values, or None where the scores show one group.

    The run is found and tested on the running median (one slice's noise does not decide): the
    groups must be far apart against their spread and, with a known floor, the slices outside
    must sit near it (absent), not part of the way up to the run (a target segmented poorly
    there). The run reaches every position in `keep` (a user's boxes) before it is tested: a
    boxed slice is the target however low it scores, so it is no evidence of a poor target
    outside the run. The run's ends are then trimmed while their own score is below the level,
    never past a kept position.
    """
    if values.size < rules.min_scored_slices:
        return None
    smooth = _running_median(values, rules.smooth_slices)
    level = split_level(smooth)
    if not np.isfinite(level):
        return None
    first, last = best_run(smooth, level)
    first, last = min([first, *keep]), max([last, *keep])
    if separation(smooth, first, last) < rules.min_separation:
        return None
    if floor is not None and _height_outside(smooth, first, last, floor) > rules.max_height_outside:
        return None
    kept = set(keep)
    while first < last and values[first] < level and first not in kept:
        first += 1
    while last > first and values[last] < level and last not in kept:
        last -= 1
    return first, last, level


def _height_outside(values: np.ndarray, first: int, last: int, floor: float) -> float:
    """The slices outside the run: their median's height above the floor, as a fraction of the run's."""
    outside = np.concatenate([values[:first], values[last + 1 :]])
    inside = float(np.median(values[first : last + 1])) - floor
    if inside <= 0:
        return np.inf
    return (float(np.median(outside)) - floor) / inside


def clear_absent(records: Dict[int, object], mask_slices: np.ndarray, verdicts: Dict[int, str]) -> List[int]:
    """Remove the mask of each slice judged absent (`verdicts`, from decide_presence) and say why in its
    record (`records`: slice index -> record; `mask_slices`: the masks along the slicing axis, written in
    place). The slices cleared."""
    for index, why in verdicts.items():
        record = records[index]
        mask_slices[index] = False
        record.area, record.absent, record.reason = 0, why, "target absent"
    return list(verdicts)


def decide_presence(records: Sequence, rules: PresenceSettings, floor: Optional[float] = None,
                    keep: Sequence[int] = ()) -> Dict[int, str]:
    """Slice index -> why the target is judged absent there, for painted slices only.

    Records are in slice order; `floor` is the scorer's level for what is not the target, in the
    signal's units (candidate_floor for a plain score; 0 for a margin over negatives). Every
    painted slice between the run's first and last is kept (a low score there is a poor part of
    the one target, not its absence); the run reaches out to every slice in `keep` (a user's box:
    the target is there, and on every slice between it and the run); a painted slice without any
    score (a propagated slice before presence scored it) takes its chain anchor's verdict.
    """
    indices, values = _signals(records)
    wanted = set(keep)
    found = target_run(values, rules, floor, keep=[k for k, index in enumerate(indices) if index in wanted])
    if found is None:
        return {}
    first, last, level = found
    absent = {index: LOW_SCORE_ABSENT if value < level else OUTSIDE_RUN
              for k, (index, value) in enumerate(zip(indices, values)) if not first <= k <= last}
    scored = set(indices)
    for record in records:
        if record.area > 0 and record.index not in scored and record.anchor in absent:
            absent[record.index] = absent[record.anchor]
    return absent

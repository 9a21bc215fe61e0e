"""Masks in the target's shape: the optional steps between retrieval and a slice's answer.

The paper refines once, with the box of the retrieved part, and keeps SAM's mask as it is.
Where the retrieved part is a fragment (white matter instead of the brain), its box is too
small and so is the mask. Each step here is named and set in ShapeSettings (settings.py):

  unite_parts     add other candidates to the retrieved one while the same scorer ranks the
                  union higher (cascade only: propagation has no candidates);
  context         the refine step on the slice padded with a border of background (box-only
                  models judge a box against its surroundings); costs one extra encoding;
  refine_rounds   prompt again with the box of the refined mask until the box stops changing;
  fill_holes      fill holes inside a closed outline, per part.

Numpy in, numpy out; no Slicer, no files. Nothing here sees a reference except through the
scorer the user chose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .imaging import Box, mask_to_box
from .models.base import Candidate, RefinedMask, Scorer, Segmenter
from .settings import ShapeSettings

__all__ = ["ShapeSettings", "Union", "fill_closed_holes", "iterate_refine", "refine_in_shape",
           "refine_with_context", "unite_parts"]


@dataclass
class Union:
    """A retrieved candidate grown by the candidates that the scorer ranked higher together with it."""

    mask: np.ndarray
    score: float
    members: List[int]
    """Indices into the candidates, the retrieved one first."""
    scorer_calls: int = 0
    scored_crops: int = 0


def _as_candidate(mask: np.ndarray) -> Candidate:
    return Candidate(mask=mask, box=mask_to_box(mask), predicted_iou=1.0, stability=1.0)


def unite_parts(image_rgb: np.ndarray, candidates: Sequence[Candidate], scores: np.ndarray, chosen: int,
                scorer: Scorer, sentences: Sequence[str], settings: ShapeSettings,
                reference: Optional[np.ndarray] = None, exclude: Sequence[int] = ()) -> Union:
    """Greedily add candidates to `chosen` while the union scores higher than what it has.

    Each round scores the union with every remaining candidate of the best `union_pool` in one
    scorer call (CLIP sees a crop of each union) and keeps the best union if it beats the current
    score by more than `union_min_gain`; at most `union_max_added` are added. Candidates inside
    the union already add nothing, and candidates apart from it (`near_union`) belong to something
    else: both are skipped.
    """
    order = [int(i) for i in np.argsort(-np.asarray(scores), kind="stable") if i != chosen and i not in exclude]
    pool = order[: settings.union_pool]
    union = Union(mask=candidates[chosen].mask.copy(), score=float(scores[chosen]), members=[chosen])
    for _ in range(settings.union_max_added):
        near = near_union(union.mask, settings.union_max_gap)
        trials = [(i, union.mask | candidates[i].mask) for i in pool if i not in union.members]
        trials = [(i, m) for i, m in trials if m.sum() > union.mask.sum() and near(candidates[i].mask)]
        if not trials:
            break
        found = np.asarray(scorer.score(image_rgb, [_as_candidate(m) for _, m in trials], sentences,
                                        reference=reference), dtype=np.float64)
        union.scorer_calls += 1
        union.scored_crops += len(trials)
        best = int(np.argmax(found))
        if found[best] <= union.score + settings.union_min_gain:
            break
        union.members.append(trials[best][0])
        union.mask, union.score = trials[best][1], float(found[best])
    return union


def near_union(union: np.ndarray, max_gap: Optional[float]) -> Callable[[np.ndarray], bool]:
    """Whether a part lies within `max_gap` x the union's equivalent diameter of it (parts of one
    target touch or nearly touch; a part across the slice is something else)."""
    if max_gap is None:
        return lambda part: True
    limit = max_gap * 2.0 * np.sqrt(union.sum() / np.pi)
    distance = ndimage.distance_transform_edt(~union)
    return lambda part: bool(part.any() and distance[part].min() <= limit)


def fill_closed_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background enclosed by the mask (not connected to the image's border), per 2D mask.

    An opening in the outline (a C shape, a hole reaching the border) is not a hole: it stays.
    """
    return ndimage.binary_fill_holes(mask) if mask.any() else mask.copy()


def iterate_refine(refine: Callable[[Sequence[Box]], List[RefinedMask]], first: List[RefinedMask],
                   rounds: int, tolerance: int) -> Tuple[List[RefinedMask], int]:
    """Prompt each part again with the box of its refined mask, up to `rounds` more times.

    A part stops when its box moves by at most `tolerance` pixels on every side, or when its
    mask comes back empty (the last non-empty one is kept). Returns the parts and the decoder
    calls spent.
    """
    parts = list(first)
    calls = 0
    active = [i for i, p in enumerate(parts) if p.mask.any()]
    for _ in range(rounds):
        boxes = {i: mask_to_box(parts[i].mask) for i in active}
        active = [i for i in active if _moved(boxes[i], parts[i].box, tolerance)]
        if not active:
            break
        again = refine([boxes[i] for i in active])
        calls += 1
        still = []
        for i, part in zip(active, again):
            if part.mask.any():
                parts[i] = part
                still.append(i)
        active = still
    return parts, calls


def _moved(new: Box, old: Box, tolerance: int) -> bool:
    return max(abs(int(a) - int(b)) for a, b in zip(new, old)) > tolerance


def context_border(shape: Tuple[int, int], fraction: float) -> int:
    """Pixels of background added on each side for `context_padding` (a fraction of the longest side)."""
    return int(round(max(0.0, fraction) * max(shape)))


def refine_with_context(segmenter: Segmenter, image_rgb: np.ndarray, border: int) -> Tuple[Callable, Callable]:
    """A refine function that works on the image padded by `border` pixels of zeros, and a restore.

    The padded image is encoded once (its own embedding); boxes are shifted into it and masks
    cropped back, so callers see the slice's own pixels. `restore()` makes the slice's own
    embedding current again (taken back where the segmenter hands it, else encoded again).
    """
    saved = segmenter.embedding
    padded = np.pad(image_rgb, ((border, border), (border, border), (0, 0)))
    segmenter.set_image(padded)
    height, width = image_rgb.shape[:2]

    def refine(boxes: Sequence[Box]) -> List[RefinedMask]:
        shifted = [tuple(int(v) + border for v in box) for box in boxes]
        found = segmenter.refine(shifted)
        return [RefinedMask(mask=r.mask[border: border + height, border: border + width].copy(), box=tuple(box),
                            predicted_iou=r.predicted_iou) for r, box in zip(found, boxes)]

    def restore() -> None:
        if saved is not None:
            segmenter.use_embedding(saved)
        else:
            segmenter.set_image(image_rgb)

    return refine, restore


@dataclass
class Shaped:
    """What the shape steps made of a slice's boxes."""

    parts: List[RefinedMask]
    seconds: Dict[str, float] = field(default_factory=dict)
    decoder_calls: int = 1


def refine_in_shape(segmenter: Segmenter, image_rgb: np.ndarray, boxes: Sequence[Box],
                    settings: Optional[ShapeSettings] = None) -> Shaped:
    """The refine step with the shape steps that follow any box: context, refine_rounds, fill_holes.

    Shared by the full cascade (the retrieved parts' boxes) and propagation (the neighbour's
    boxes). The segmenter's current embedding is the slice's own before and after; the padded
    image's encoding (context) is counted as "encode", the decoder passes as "refine".
    """
    settings = settings or ShapeSettings()
    if not boxes:
        return Shaped(parts=[], decoder_calls=0)
    started = time.perf_counter()
    border = context_border(image_rgb.shape[:2], settings.context_padding)
    refine, restore = (refine_with_context(segmenter, image_rgb, border) if border
                       else (segmenter.refine, lambda: None))
    encoded = time.perf_counter()
    try:
        parts = refine(list(boxes))
        parts, calls = iterate_refine(refine, parts, settings.refine_rounds, settings.box_tolerance)
    finally:
        decoded = time.perf_counter()
        restore()
    restored = time.perf_counter()
    if settings.fill_holes:
        parts = [RefinedMask(mask=fill_closed_holes(p.mask), box=p.box, predicted_iou=p.predicted_iou) for p in parts]
    seconds = {"refine": (decoded - encoded) + (time.perf_counter() - restored)}
    if border:
        seconds["encode"] = (encoded - started) + (restored - decoded)
    return Shaped(parts=parts, seconds=seconds, decoder_calls=1 + calls)

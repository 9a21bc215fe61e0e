"""Masks in the target's shape: the optional steps between retrieval and a slice's answer.

The paper refines once, with the box of the retrieved part, and keeps SAM's mask as it is.
Where the retrieved part is a fragment (white matter instead of the brain), its box is too
small and so is the mask. Each step here is named and set in ShapeSettings (settings.py):

  unite_parts     add other candidates to the retrieved one while the same scorer ranks the
                  union higher (cascade only: propagation has no candidates);
  zoom            the refine step on a window around small boxes, which the model enlarges to
                  its input (a box a few tokens wide outlines poorly); one extra encoding; for
                  a user's box (corrections.py), not for retrieved or propagated ones;
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
           "refine_on_view", "refine_with_context", "refine_zoomed", "unite_parts", "zoom_window"]


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


def zoom_window(shape: Tuple[int, int], boxes: Sequence[Box], factor: float, min_side: int) -> Optional[Box]:
    """The square part of the image (x0, y0, x1, y1, ends excluded) that shows the boxes' union
    `factor` times as wide as it is (at least `min_side` pixels), moved inside the image; None
    where it would not enlarge them at least twice (the model then sees the slice as it is)."""
    if factor <= 0 or not boxes:
        return None
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    side = int(max(min_side, np.ceil(factor * max(x1 - x0 + 1, y1 - y0 + 1))))
    if 2 * side > max(shape):
        return None
    left = int(np.clip(round((x0 + x1 + 1) / 2 - side / 2), 0, max(0, shape[1] - side)))
    top = int(np.clip(round((y0 + y1 + 1) / 2 - side / 2), 0, max(0, shape[0] - side)))
    return left, top, min(shape[1], left + side), min(shape[0], top + side)


def refine_on_view(segmenter: Segmenter, image_rgb: np.ndarray, view: np.ndarray,
                   offset: Tuple[int, int]) -> Tuple[Callable, Callable]:
    """A refine function that works on `view`, an image whose pixel (x, y) is the slice's pixel
    (x + offset[0], y + offset[1]), and a restore.

    The view is encoded once (its own embedding); boxes are moved into it and masks back, so
    callers see the slice's own pixels (zeros where the view does not reach). `restore()` makes
    the slice's own embedding current again (taken back where the segmenter hands it, else
    encoded again).
    """
    saved = segmenter.embedding
    segmenter.set_image(np.ascontiguousarray(view))
    shape = image_rgb.shape[:2]
    dx, dy = offset

    def refine(boxes: Sequence[Box]) -> List[RefinedMask]:
        moved = [(int(x0) - dx, int(y0) - dy, int(x1) - dx, int(y1) - dy) for x0, y0, x1, y1 in boxes]
        found = segmenter.refine(moved)
        return [RefinedMask(mask=_paste(r.mask, offset, shape), box=tuple(box), predicted_iou=r.predicted_iou)
                for r, box in zip(found, boxes)]

    def restore() -> None:
        if saved is not None:
            segmenter.use_embedding(saved)
        else:
            segmenter.set_image(image_rgb)

    return refine, restore


def _paste(mask: np.ndarray, offset: Tuple[int, int], shape: Tuple[int, int]) -> np.ndarray:
    """A view's mask in the slice's pixels: the part of the view inside the slice."""
    dx, dy = offset
    full = np.zeros(shape, dtype=bool)
    top, bottom = max(0, dy), min(shape[0], dy + mask.shape[0])
    left, right = max(0, dx), min(shape[1], dx + mask.shape[1])
    if bottom > top and right > left:
        full[top:bottom, left:right] = mask[top - dy : bottom - dy, left - dx : right - dx]
    return full


def refine_with_context(segmenter: Segmenter, image_rgb: np.ndarray, border: int) -> Tuple[Callable, Callable]:
    """refine_on_view on the slice padded by `border` pixels of zeros on each side."""
    padded = np.pad(image_rgb, ((border, border), (border, border), (0, 0)))
    return refine_on_view(segmenter, image_rgb, padded, (-border, -border))


def refine_zoomed(segmenter: Segmenter, image_rgb: np.ndarray, window: Box) -> Tuple[Callable, Callable]:
    """refine_on_view on the window of the slice (zoom_window), which the model enlarges to its input."""
    x0, y0, x1, y1 = window
    return refine_on_view(segmenter, image_rgb, image_rgb[y0:y1, x0:x1], (x0, y0))


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
    refine, restore, viewed = _refiner(segmenter, image_rgb, boxes, settings)
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
    if viewed:
        seconds["encode"] = (encoded - started) + (restored - decoded)
    return Shaped(parts=parts, seconds=seconds, decoder_calls=1 + calls)


def _refiner(segmenter: Segmenter, image_rgb: np.ndarray, boxes: Sequence[Box],
             settings: ShapeSettings) -> Tuple[Callable, Callable, bool]:
    """The refine step the settings ask for on these boxes, its restore, and whether it encodes a view:
    zoomed in on small boxes, else on the padded slice (context_padding), else on the slice itself."""
    window = zoom_window(image_rgb.shape[:2], boxes, settings.zoom_factor, settings.zoom_min_side)
    if window is not None:
        return (*refine_zoomed(segmenter, image_rgb, window), True)
    border = context_border(image_rgb.shape[:2], settings.context_padding)
    if border:
        return (*refine_with_context(segmenter, image_rgb, border), True)
    return segmenter.refine, lambda: None, False

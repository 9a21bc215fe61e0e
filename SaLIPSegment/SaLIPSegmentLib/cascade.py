"""The SaLIP cascade on one 2D slice: propose, retrieve, refine.

Numpy in, numpy out; no Slicer, no files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .imaging import Box, dice, gray_to_rgb, mask_to_box
from .models.base import Candidate, ProposalSettings, RefinedMask, Scorer, Segmenter
from .settings import ShapeSettings
from .shape import refine_in_shape, unite_parts

NO_CANDIDATE = "no candidate"


@dataclass
class SliceResult:
    """The cascade's answer for one slice."""

    mask: np.ndarray
    parts: List[np.ndarray] = field(default_factory=list)
    """The refined mask of each retrieved candidate; `mask` is their union."""
    boxes: List[Box] = field(default_factory=list)
    """The retrieved candidates' boxes, which prompted the refine step."""
    clip_scores: List[float] = field(default_factory=list)
    """Each retrieved candidate's retrieval score (100 x cosine for CLIP)."""
    predicted_ious: List[float] = field(default_factory=list)
    """SAM's predicted IoU of each refined mask."""
    candidate_count: int = 0
    candidates_median_score: Optional[float] = None
    """The median score of all the slice's candidates: what the scorer gives what mostly is not the
    target (presence's floor)."""
    reason: Optional[str] = None
    """Why the mask is empty, when it is."""
    seconds: Dict[str, float] = field(default_factory=dict)
    """Time per stage: encode, propose, score, refine."""
    candidates: List[Candidate] = field(default_factory=list)
    """Every proposal, kept only when asked (evaluation measures each stage with them)."""
    retrieved: List[int] = field(default_factory=list)
    """Indices into `candidates` of the retrieved ones, best first (with candidates kept)."""
    retrieved_masks: List[np.ndarray] = field(default_factory=list)
    """What prompted each refine, with candidates kept: the retrieved candidate's mask, or the
    union it grew into (unite_parts)."""


def empty_result(shape, reason: str, candidate_count: int = 0, seconds=None) -> SliceResult:
    return SliceResult(mask=np.zeros(shape, dtype=bool), candidate_count=candidate_count,
                       reason=reason, seconds=dict(seconds or {}))


def segment_slice(
    image: np.ndarray,
    segmenter: Segmenter,
    scorer: Scorer,
    sentences: Sequence[str],
    top_k: int = 1,
    proposal: Optional[ProposalSettings] = None,
    reference: Optional[np.ndarray] = None,
    reencode_for_refine: bool = False,
    already_embedded: bool = False,
    keep_candidates: bool = False,
    shape: Optional[ShapeSettings] = None,
    prior: Optional[np.ndarray] = None,
    prior_weight: float = 0.0,
) -> SliceResult:
    """Segment the prompt's target on one slice.

    `image` is H x W uint8 (already windowed) or H x W x 3 uint8. The slice is
    embedded once and that embedding serves both proposal and refinement, unless
    `reencode_for_refine` asks for the original implementation's second encoding
    (kept only to benchmark against). `already_embedded` says the segmenter holds
    this image's embedding already (a propagation step that fell back to the full
    cascade). `shape` names the steps between retrieval and the mask (shape.py; all
    off: the paper's single refine). `prior` (the neighbouring slice's mask) and
    `prior_weight` rank the candidates that continue it higher (retrieve). A slice where
    no candidate survives returns an empty mask and a reason.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    shape = shape or ShapeSettings()
    rgb = gray_to_rgb(image) if image.ndim == 2 else image
    seconds: Dict[str, float] = {}
    candidates = propose_candidates(rgb, segmenter, proposal or ProposalSettings(), already_embedded, seconds)
    if not candidates:
        return empty_result(rgb.shape[:2], NO_CANDIDATE, seconds=seconds)

    started = time.perf_counter()
    scores = np.asarray(scorer.score(rgb, candidates, sentences, reference=reference), dtype=np.float64)
    best = retrieve(candidates, scores, top_k, prior, prior_weight)
    boxes, retrieval, masks = retrieved_boxes(rgb, candidates, scores, best, scorer, sentences, shape, reference)
    seconds["score"] = time.perf_counter() - started

    if reencode_for_refine:
        started = time.perf_counter()
        segmenter.set_image(rgb)
        seconds["encode"] += time.perf_counter() - started
    shaped = refine_in_shape(segmenter, rgb, boxes, shape)
    for stage, value in shaped.seconds.items():
        seconds[stage] = seconds.get(stage, 0.0) + value
    result = _slice_result(rgb.shape[:2], shaped.parts, boxes, retrieval, candidates, best, keep_candidates, seconds)
    result.candidates_median_score = float(np.median(scores))  # all candidates', not the retrieved ones'
    result.retrieved_masks = masks if keep_candidates else []
    return result


def retrieve(candidates: List[Candidate], scores: np.ndarray, top_k: int, prior: Optional[np.ndarray] = None,
             prior_weight: float = 0.0) -> List[int]:
    """The indices of the top_k candidates, best first: by score, plus prior_weight x each candidate's Dice
    with `prior` (the neighbouring slice's mask, where a chain fell back to the cascade) when given."""
    ranking = scores
    if prior is not None and prior_weight > 0 and prior.any():
        ranking = scores + prior_weight * np.asarray([dice(c.mask, prior) for c in candidates])
    return [int(i) for i in np.argsort(-ranking, kind="stable")[:top_k]]


def propose_candidates(rgb: np.ndarray, segmenter: Segmenter, proposal: ProposalSettings, already_embedded: bool,
                       seconds: Dict[str, float]) -> List[Candidate]:
    """Encode the slice (unless it is already) and propose its candidates, timing both."""
    started = time.perf_counter()
    if not already_embedded:
        segmenter.set_image(rgb)
    seconds["encode"] = time.perf_counter() - started
    started = time.perf_counter()
    candidates = segmenter.propose(proposal)
    seconds["propose"] = time.perf_counter() - started
    return candidates


def retrieved_boxes(rgb, candidates: List[Candidate], scores: np.ndarray, best: List[int], scorer: Scorer,
                    sentences: Sequence[str], shape: ShapeSettings,
                    reference) -> Tuple[List[Box], List[float], List[np.ndarray]]:
    """The boxes that prompt the refine step, their retrieval scores and masks: the retrieved
    candidates' own, or, with unite_parts, those of each retrieved candidate grown into a
    better-scored union."""
    if not shape.unite_parts:
        return ([candidates[i].box for i in best], [float(scores[i]) for i in best],
                [candidates[i].mask for i in best])
    boxes, found, masks = [], [], []
    for i in best:
        union = unite_parts(rgb, candidates, scores, i, scorer, sentences, shape, reference=reference,
                            exclude=[j for j in best if j != i])
        boxes.append(mask_to_box(union.mask))
        found.append(union.score)
        masks.append(union.mask)
    return boxes, found, masks


def _slice_result(size, refined: List[RefinedMask], boxes: List[Box], scores: List[float],
                  candidates: List[Candidate], best: List[int], keep_candidates: bool,
                  seconds: Dict[str, float]) -> SliceResult:
    mask = np.zeros(size, dtype=bool)
    for part in refined:
        mask |= part.mask
    return SliceResult(
        mask=mask,
        parts=[part.mask for part in refined],
        boxes=boxes,
        clip_scores=scores,
        predicted_ious=[part.predicted_iou for part in refined],
        candidate_count=len(candidates),
        reason=None if mask.any() else "refined mask is empty",
        seconds=seconds,
        candidates=candidates if keep_candidates else [],
        retrieved=best if keep_candidates else [],
    )

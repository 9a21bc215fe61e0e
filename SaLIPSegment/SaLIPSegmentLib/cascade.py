"""The SaLIP cascade on one 2D slice: propose, retrieve, refine.

Numpy in, numpy out; no Slicer, no files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .imaging import Box, gray_to_rgb
from .models.base import Candidate, ProposalSettings, Scorer, Segmenter

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
) -> SliceResult:
    """Segment the prompt's target on one slice.

    `image` is H x W uint8 (already windowed) or H x W x 3 uint8. The slice is
    embedded once and that embedding serves both proposal and refinement, unless
    `reencode_for_refine` asks for the original implementation's second encoding
    (kept only to benchmark against). `already_embedded` says the segmenter holds
    this image's embedding already (a propagation step that fell back to the full
    cascade). A slice where no candidate survives returns an empty mask and a reason.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    proposal = proposal or ProposalSettings()
    rgb = gray_to_rgb(image) if image.ndim == 2 else image
    seconds: Dict[str, float] = {}

    started = time.perf_counter()
    if not already_embedded:
        segmenter.set_image(rgb)
    seconds["encode"] = time.perf_counter() - started

    started = time.perf_counter()
    candidates = segmenter.propose(proposal)
    seconds["propose"] = time.perf_counter() - started
    if not candidates:
        return empty_result(rgb.shape[:2], NO_CANDIDATE, seconds=seconds)
    kept = candidates if keep_candidates else []

    started = time.perf_counter()
    scores = np.asarray(scorer.score(rgb, candidates, sentences, reference=reference), dtype=np.float64)
    seconds["score"] = time.perf_counter() - started
    best = np.argsort(-scores, kind="stable")[:top_k]

    started = time.perf_counter()
    if reencode_for_refine:
        segmenter.set_image(rgb)
    refined = segmenter.refine([candidates[i].box for i in best])
    seconds["refine"] = time.perf_counter() - started

    mask = np.zeros(rgb.shape[:2], dtype=bool)
    for part in refined:
        mask |= part.mask
    return SliceResult(
        mask=mask,
        parts=[part.mask for part in refined],
        boxes=[candidates[i].box for i in best],
        clip_scores=[float(scores[i]) for i in best],
        predicted_ious=[part.predicted_iou for part in refined],
        candidate_count=len(candidates),
        candidates_median_score=float(np.median(scores)),
        reason=None if mask.any() else "refined mask is empty",
        seconds=seconds,
        candidates=kept,
        retrieved=[int(i) for i in best] if keep_candidates else [],
    )

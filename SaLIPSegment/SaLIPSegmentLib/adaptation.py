"""Label-free test-time adaptation: pick proposal settings per volume without any reference.

The paper searched the mask generator's settings against ground-truth masks of test
images. Here a small grid of settings is tried on a few sampled slice pairs (k, k+1) and
scored only by what the models say about their own answers:
  - SAM's predicted IoU of the refined masks and the retrieved candidates' stability;
  - agreement (Dice) between the answers on neighbouring slices, which move little;
  - the retrieval score, when the scorer needs no reference (CLIP, not the oracle).
Each sampled slice is embedded once and serves every grid point. Numpy only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cascade import segment_slice
from .imaging import dice, window_to_uint8
from .models.base import ProposalSettings, Scorer, Segmenter
from .settings import VolumeSettings
from .volume import as_volume, choose_window

# Offsets from the model's own defaults: looser filters let more (and larger) parts through.
GRID_OFFSETS: Tuple[Dict[str, float], ...] = (
    {},
    {"pred_iou_thresh": -0.1},
    {"stability_score_thresh": -0.15},
    {"pred_iou_thresh": -0.1, "stability_score_thresh": -0.15},
)
SAMPLED_PAIRS = 2


@dataclass
class GridPoint:
    settings: Dict[str, float]
    predicted_iou: float
    stability: float
    agreement: float
    retrieval: Optional[float]
    signal: float


def settings_grid(base: ProposalSettings) -> List[ProposalSettings]:
    grid = []
    for offsets in GRID_OFFSETS:
        values = {k: getattr(base, k) + v for k, v in offsets.items()}
        grid.append(dataclasses.replace(base, **values))
    return grid


def sample_pairs(volume_slices: np.ndarray, window, pairs: int = SAMPLED_PAIRS) -> List[int]:
    """First slices of `pairs` neighbouring pairs spread over the middle half of the tissue."""
    tissue = [k for k in range(volume_slices.shape[0] - 1)
              if np.ptp(window_to_uint8(volume_slices[k], window)) > 0
              and np.ptp(window_to_uint8(volume_slices[k + 1], window)) > 0]
    if not tissue:
        return []
    middle = tissue[len(tissue) // 4 : max(len(tissue) // 4 + 1, 3 * len(tissue) // 4)]
    picks = np.linspace(0, len(middle) - 1, min(pairs, len(middle))).round().astype(int)
    return sorted({middle[i] for i in picks})


def adapt_settings(
    volume: np.ndarray,
    segmenter: Segmenter,
    scorer: Scorer,
    sentences: Sequence[str],
    settings: VolumeSettings,
    *,
    reference: Optional[np.ndarray] = None,
) -> Tuple[ProposalSettings, List[GridPoint]]:
    """The grid point around `settings.proposal` with the best label-free signal, and the whole table.

    Pairs are sampled along `settings.axis` over the whole volume (the slice range is not
    used), windowed by `settings.window`, with `settings.top_k` candidates retrieved.
    `reference` is passed to the scorer only (the oracle retrieves with it); it never
    enters the signal.
    """
    base, top_k, axis = settings.proposal, settings.top_k, settings.axis
    volume = as_volume(volume)
    window = choose_window(volume, settings.window)
    slices = np.moveaxis(volume, axis % 3, 0)
    ref_slices = None if reference is None else np.moveaxis(as_volume(reference).astype(bool), axis % 3, 0)
    grid = settings_grid(base)
    starts = sample_pairs(slices, window)
    if not starts:
        return base, []
    # results[g][(k)] = SliceResult for grid point g on slice k
    results: List[Dict[int, object]] = [dict() for _ in grid]
    for k in sorted({s + d for s in starts for d in (0, 1)}):
        image = window_to_uint8(slices[k], window)
        segmenter.set_image(np.repeat(image[:, :, None], 3, axis=2))
        for g, point in enumerate(grid):
            results[g][k] = segment_slice(
                image, segmenter, scorer, sentences, top_k=top_k, proposal=point, already_embedded=True,
                keep_candidates=True, reference=None if ref_slices is None else ref_slices[k],
            )
    table = []
    for g, point in enumerate(grid):
        per_slice = list(results[g].values())
        ious = [np.mean(r.predicted_ious) for r in per_slice if r.predicted_ious]
        stabilities = [np.mean([r.candidates[i].stability for i in r.retrieved]) for r in per_slice if r.retrieved]
        agreement = float(np.mean([dice(results[g][s].mask, results[g][s + 1].mask) for s in starts]))
        retrieval = None
        if not scorer.needs_reference:
            scores = [np.mean(r.clip_scores) for r in per_slice if r.clip_scores]
            retrieval = float(np.mean(scores)) / 100.0 if scores else 0.0
        iou = float(np.mean(ious)) if ious else 0.0
        stability = float(np.mean(stabilities)) if stabilities else 0.0
        signal = iou + stability + agreement + (retrieval or 0.0)
        changed = {k: round(float(getattr(point, k)), 4) for k in ("pred_iou_thresh", "stability_score_thresh")}
        table.append(GridPoint(changed, iou, stability, agreement, retrieval, signal))
    best = int(np.argmax([row.signal for row in table]))
    return grid[best], table

"""Label-free adaptation: a grid of proposal settings judged by the models' own signals."""

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.adaptation import GRID_OFFSETS, adapt_settings, sample_pairs, settings_grid
from SaLIPSegmentLib.models import ProposalSettings, create_scorer, create_segmenter
from SaLIPSegmentLib.settings import VolumeSettings

from conftest import TINY_SAM_PROPOSALS, disk_image


def _volume():
    volume = np.stack([disk_image(radius=5 + i) for i in range(8)]).astype(np.float32)
    volume[0] = 0  # air
    return volume


def test_the_grid_moves_thresholds_from_the_models_defaults():
    base = ProposalSettings(pred_iou_thresh=0.6, stability_score_thresh=0.4)
    grid = settings_grid(base)
    assert len(grid) == len(GRID_OFFSETS) and grid[0] == base
    assert grid[3].pred_iou_thresh == pytest.approx(0.5) and grid[3].stability_score_thresh == pytest.approx(0.25)


def test_sampled_pairs_sit_in_the_tissue_away_from_the_ends():
    starts = sample_pairs(_volume(), (0, 255), pairs=2)
    assert len(starts) == 2 and all(1 <= s < 7 for s in starts)


def test_adaptation_picks_the_best_label_free_signal(tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    segmenter = create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)
    scorer = create_scorer(tiny_clip_option)
    base = ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    chosen, table = adapt_settings(_volume(), segmenter, scorer, ["a round organ"], VolumeSettings(proposal=base))
    assert len(table) == len(GRID_OFFSETS)
    assert all(row.retrieval is not None and np.isfinite(row.signal) for row in table)
    best = max(range(len(table)), key=lambda i: table[i].signal)
    assert chosen == settings_grid(base)[best]
    for row in table:
        assert row.signal == pytest.approx(row.predicted_iou + row.stability + row.agreement + row.retrieval)

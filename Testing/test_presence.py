"""Presence: slices where the target is judged absent lose their mask, label-free, and say why."""

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.models import NoisyOracleScorer, ProposalSettings, Scorer, create_segmenter
from SaLIPSegmentLib.settings import PresenceSettings, VolumeSettings
from SaLIPSegmentLib.volume import LOW_SCORE_ABSENT, OUTSIDE_RUN, SliceRecord, decide_presence, segment_volume

from conftest import TINY_SAM_PROPOSALS, disk_image

ON = PresenceSettings(enabled=True)


def _records(scores, method="cascade"):
    """One painted record per score (None: a propagated slice without a score of its own)."""
    return [SliceRecord(index=k, reason=None, method=method if s is not None else "propagated",
                        clip_scores=[] if s is None else [s], area=10, anchor=k) for k, s in enumerate(scores)]


def test_a_clip_like_drop_below_the_confident_slices_reads_as_absent():
    # CLIP-like: the target's slices near 28, the others near 22 (never 0).
    scores = [22.1, 21.5, 23.0, 27.9, 28.4, 27.2, 28.8, 27.5, 22.4, 21.9]
    assert decide_presence(_records(scores), ON) == {0: LOW_SCORE_ABSENT, 1: LOW_SCORE_ABSENT, 2: LOW_SCORE_ABSENT,
                                                     8: LOW_SCORE_ABSENT, 9: LOW_SCORE_ABSENT}


def test_the_target_is_one_run_of_slices_and_a_short_gap_does_not_split_it():
    scores = [28.1, 27.8, 28.3, 22.0, 22.3, 21.8, 22.5, 27.6, 28.1, 28.3, 21.7, 27.9, 28.2, 27.7, 22.0]
    verdicts = decide_presence(_records(scores), ON)
    # A shorter stretch of high scores away from the target's run: another structure matched.
    assert verdicts == {0: OUTSIDE_RUN, 1: OUTSIDE_RUN, 2: OUTSIDE_RUN, 3: LOW_SCORE_ABSENT, 4: LOW_SCORE_ABSENT,
                        5: LOW_SCORE_ABSENT, 6: LOW_SCORE_ABSENT, 14: LOW_SCORE_ABSENT}
    # Slice 10 scores low but lies inside the run: a poor part of the target, kept.


def test_an_unscored_propagated_slice_takes_its_chain_anchors_verdict():
    records = _records([80.0, None, None, 75.0, 78.0, 2.0, None, None])
    records[1].anchor = records[2].anchor = 0
    records[6].anchor = records[7].anchor = 5  # chained from an absent key slice: absent too
    verdicts = decide_presence(records, PresenceSettings(enabled=True, smooth_slices=1, min_scored_slices=3))
    assert verdicts == {5: LOW_SCORE_ABSENT, 6: LOW_SCORE_ABSENT, 7: LOW_SCORE_ABSENT}


def test_without_enough_scored_slices_nothing_is_removed():
    assert decide_presence(_records([30.0, 20.0]), ON) == {}
    assert decide_presence(_records([80.0, 50.0, 2.0, 3.0, 75.0, 1.0, 0.0, 77.0, 2.0]), ON) == {}  # nine: too few
    assert decide_presence(_records([28.0, 28.2, 27.9, 28.1]), ON) == {}  # present everywhere: no drop


class BrightnessScorer(Scorer):
    """A label-free stand-in for CLIP: slices with the bright disk score 29, the dim ones 22."""

    name = "brightness"

    def score(self, image_rgb, candidates, sentences, reference=None):
        return np.full(len(candidates), 29.0 if image_rgb.max() > 150 else 22.0)


@pytest.fixture(scope="module")
def segmenter(tiny_sam, tiny_sam_checkpoint):
    return create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)


TARGET = range(4, 10)


def _volume():
    """Fourteen slices with tissue; the target (the bright disk) on slices 4 to 9 only."""
    return np.stack([disk_image(radius=10, value=200 if k in TARGET else 120) for k in range(14)]).astype(np.float32)


@pytest.mark.parametrize("mode", ["every-slice", "propagate"])
def test_the_runner_removes_the_mask_where_the_target_is_judged_absent(segmenter, mode):
    volume = _volume()
    settings = VolumeSettings(proposal=ProposalSettings.from_dict(TINY_SAM_PROPOSALS), mode=mode,
                              propagation=VolumeSettings().propagation)
    before = segment_volume(volume, segmenter, BrightnessScorer(), ["x"], settings)
    after = segment_volume(volume, segmenter, BrightnessScorer(), ["x"],
                           VolumeSettings(**{**settings.__dict__, "presence": ON}))
    painted = [s.index for s in before.slices if s.area]
    assert set(painted) - set(TARGET), "the run without presence paints where the target is not"
    for record in after.slices:
        if record.index not in TARGET and record.index in painted:
            assert record.absent and not after.mask[record.index].any() and not record.flags
        else:
            assert record.absent is None
            assert np.array_equal(after.mask[record.index], before.mask[record.index])
    assert after.summary()["slices_judged_absent"] == sum(1 for s in after.slices if s.absent) > 0


def test_presence_with_the_noisy_oracle_never_needs_its_zeros(segmenter):
    volume = _volume()
    reference = np.zeros(volume.shape, bool)
    reference[4:10] = volume[4:10] > 150
    result = segment_volume(volume, segmenter, NoisyOracleScorer(), ["x"],
                            VolumeSettings(proposal=ProposalSettings.from_dict(TINY_SAM_PROPOSALS),
                                           mode="every-slice", presence=ON), reference=reference)
    assert all(min(s.clip_scores) > 15 for s in result.slices if s.clip_scores)  # CLIP-like: no zeros
    assert all(s.absent is None or not result.mask[s.index].any() for s in result.slices)


def test_the_command_line_switches_presence_for_segment_and_evaluate():
    from SaLIPSegmentLib.cli import build_parser
    from SaLIPSegmentLib.pipeline import apply_profile, evaluation_settings, settings_from_args

    parser = build_parser()
    common = ["-p", "brain", "--profile", "fast", "--clip", "oracle-noisy"]
    for flag, expected in (([], PresenceSettings.enabled), (["--presence"], True), (["--no-presence"], False)):
        segment = settings_from_args(parser.parse_args(["segment", "in.nrrd", "-o", "o.seg.nrrd"] + common + flag))
        assert segment.volume_settings(0, None).presence.enabled is expected
        evaluate = parser.parse_args(["evaluate", "in.nrrd", "ref.nrrd"] + common + flag)
        apply_profile(evaluate)
        assert evaluation_settings(evaluate, 1).presence.enabled is expected


def test_presence_off_keeps_the_settings_fingerprint_of_before_it_existed():
    from dataclasses import replace

    from SaLIPSegmentLib.cli import build_parser
    from SaLIPSegmentLib.pipeline import settings_from_args

    args = build_parser().parse_args(["segment", "in.nrrd", "-o", "o.seg.nrrd", "-p", "brain", "--profile", "fast"])
    settings = settings_from_args(args)
    off, on = replace(settings, presence=False), replace(settings, presence=True)
    assert off.fingerprint() != on.fingerprint()
    import hashlib
    import json

    values = off.describe()
    for key in ("device", "precision", "model_dir", "presence"):
        values.pop(key)
    assert off.fingerprint() == hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

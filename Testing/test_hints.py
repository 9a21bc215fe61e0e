"""Hints: the schema, and corrections that re-run only what a hint changes (tiny real SAM, the oracle)."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_volume import CountingSegmenter

from SaLIPSegmentLib import volume as volume_module
from SaLIPSegmentLib.corrections import (
    ABSENT_BY_HINT,
    BEYOND_ABSENT_HINT,
    CorrectionSession,
    rank_slices_to_fix,
    reference_hint,
)
from SaLIPSegmentLib.errors import InputError
from SaLIPSegmentLib.hints import Hint, HintGeometry, parse_hints
from SaLIPSegmentLib.imaging import dice, intersect_boxes, mask_to_box, resize_mask, union_box
from SaLIPSegmentLib.io import RAS_TO_LPS
from SaLIPSegmentLib.models import NoisyOracleScorer, OracleScorer, ProposalSettings, create_segmenter
from SaLIPSegmentLib.models.base import RefinedMask
from SaLIPSegmentLib.settings import CleanupSettings, PresenceSettings, PropagationSettings, VolumeSettings
from SaLIPSegmentLib.shape import zoom_window
from SaLIPSegmentLib.volume import SliceRecord, _Found, grow_box, key_positions

from conftest import TINY_SAM_PROPOSALS, disk_image

PROPOSALS = ProposalSettings.from_dict(TINY_SAM_PROPOSALS)
GEOMETRY = HintGeometry(axis=0, slice_range=(2, 10), slice_shape=(40, 60), takes_points=False,
                        segmenter_name="litemedsam")


class Counting(CountingSegmenter):
    """test_volume's counting segmenter, also counting proposals and passing points on (SAM's clicks)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.proposals, self.name, self.takes_points = 0, inner.name, inner.takes_points
        self.regions = []  # where each call proposed (ProposalSettings.region)

    def propose(self, settings):
        self.proposals += 1
        self.regions.append(settings.region)
        return super().propose(settings)

    def refine_points(self, points, labels):
        return self.inner.refine_points(points, labels)


@pytest.fixture(scope="module")
def segmenter(tiny_sam, tiny_sam_checkpoint):
    return Counting(create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint))


# -- the schema ---------------------------------------------------------------------------------


def test_pixel_hints_parse_and_a_later_hint_on_a_slice_replaces_an_earlier_one():
    hints = parse_hints({"hints": [{"slice": 4, "box": [1, 2, 30, 20]}, {"slice": 3, "absent": True},
                                   {"slice": 4, "box": [-5, 0, 80, 10]}]}, GEOMETRY)
    assert hints == [Hint(3, "absent"), Hint(4, "box", box=(0, 0, 59, 10))]  # sorted, overshoot clipped
    assert parse_hints([h.to_dict() for h in hints], GEOMETRY) == hints  # to_dict round-trips


@pytest.mark.parametrize("item, words", [
    ({"slice": 10, "box": [0, 0, 5, 5]}, "outside the run's slices 2:10"),
    ({"slice": 1, "absent": True}, "outside the run's slices"),
    ({"slice": 3, "box": [70, 0, 80, 5]}, "outside the slice"),
    ({"slice": 3, "box": [9, 0, 5, 5]}, "x1 < x0"),
    ({"slice": 3, "box": [0, 0, 5]}, "list of 4 numbers"),
    ({"slice": 3.5, "box": [0, 0, 5, 5]}, "whole number"),
    ({"slice": 3, "points": [[5, 5]]}, "takes boxes only"),
    ({"slice": 3, "box": [0, 0, 5, 5], "absent": True}, "exactly one of"),
    ({"slice": 3, "absent": False}, "must be true"),
    ({"slice": 3, "boxx": [0, 0, 5, 5]}, "unknown keys boxx"),
    ({"ras_box": [[0, 0, 0], [1, 1, 1]]}, "need the input's geometry"),
])
def test_bad_hints_are_refused_with_the_reason(item, words):
    with pytest.raises(InputError, match="Hint 1: .*" + words):
        parse_hints([item], GEOMETRY)


def test_points_need_a_model_that_takes_them_and_a_positive_click():
    takes = HintGeometry(axis=0, slice_range=(0, 5), slice_shape=(40, 60), takes_points=True)
    [hint] = parse_hints([{"slice": 2, "points": [[5, 6], [20, 10]], "labels": [1, 0]}], takes)
    assert hint.kind == "points" and hint.points == ((5.0, 6.0), (20.0, 10.0)) and hint.labels == (1, 0)
    with pytest.raises(InputError, match="at least one label 1"):
        parse_hints([{"slice": 2, "points": [[5, 6]], "labels": [0]}], takes)
    with pytest.raises(InputError, match="outside the slice"):
        parse_hints([{"slice": 2, "points": [[60, 6]]}], takes)


def test_ras_hints_go_through_the_inputs_geometry():
    # numpy (k, j, i); voxel (i, j, k) sits at LPS origin + direction @ (spacing * ijk).
    ijk_to_lps = np.array([[0.5, 0, 0, 10.0], [0, 2.0, 0, -4.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1]])
    ijk_to_ras = RAS_TO_LPS @ ijk_to_lps
    geometry = HintGeometry(axis=0, slice_range=(0, 6), slice_shape=(40, 60), ijk_to_ras=ijk_to_ras)

    def ras(i, j, k):
        return (ijk_to_ras @ [i, j, k, 1])[:3].tolist()

    [hint] = parse_hints([{"ras_box": [ras(30, 12, 4), ras(8, 3, 4)]}], geometry)
    assert hint == Hint(4, "box", box=(8, 3, 30, 12))
    with pytest.raises(InputError, match="different slices"):
        parse_hints([{"ras_box": [ras(30, 12, 4), ras(8, 3, 5)]}], geometry)
    with pytest.raises(InputError, match="differs from the slice"):
        parse_hints([{"slice": 3, "ras_box": [ras(30, 12, 4), ras(8, 3, 4)]}], geometry)
    across_j = HintGeometry(axis=1, slice_range=(0, 40), slice_shape=(6, 60), ijk_to_ras=ijk_to_ras)
    [hint] = parse_hints([{"ras_box": [ras(30, 12, 1), ras(8, 12, 4)]}], across_j)
    assert hint == Hint(12, "box", box=(8, 1, 30, 4))  # x along i, y along k


# -- corrections -------------------------------------------------------------------------------


def _volume(slices=20):
    return np.stack([disk_image(radius=7 + (i % 7)) for i in range(slices)]).astype(np.float32)


def _session(segmenter, volume, reference, interval=4, mode="propagate", presence=False):
    """A session on the tiny SAM, whose poor masks presence would cut: these tests are about hints, so
    presence is off unless asked for."""
    settings = VolumeSettings(proposal=PROPOSALS, mode=mode, propagation=PropagationSettings(key_interval=interval),
                              presence=PresenceSettings(enabled=presence))
    return CorrectionSession(volume, segmenter, OracleScorer(), ["disk"], settings, reference=reference)


def test_a_hint_redoes_only_the_slices_up_to_the_next_key_slices_and_encodes_nothing_again(segmenter):
    volume = _volume()
    reference = volume > 100
    session = _session(segmenter, volume, reference)
    segmenter.encodings = 0
    before = session.run()
    assert segmenter.encodings == 20 == len(session.embeddings)
    keys = [session.tissue[k] for k in key_positions(20, 4)]
    assert keys == [0, 4, 8, 11, 15, 19]
    old_mask, old_records = before.mask.copy(), {r.index: r.to_dict() for r in before.slices}

    segmenter.encodings = segmenter.proposals = 0
    box = (20, 14, 45, 44)
    after, correction = session.correct([Hint(6, "box", box=box)])
    assert segmenter.encodings == 0 and correction.encodings == 0  # every slice's embedding was kept
    assert correction.hinted == [6] and correction.changed == [5, 6, 7]
    untouched = [k for k in range(20) if k not in (5, 6, 7)]
    np.testing.assert_array_equal(after.mask[untouched], old_mask[untouched])
    # The QA's outputs (flags, signals, confidence) are judged again over the whole volume: the
    # neighbours' masks changed. Everything the slices' own segmentation wrote is as it was.
    qa_outputs = {"flags": [], "quality": {}, "confidence": None}
    assert all(after.slices[k].to_dict() | qa_outputs == old_records[k] | qa_outputs for k in untouched)
    hinted = after.slices[6]
    assert hinted.method == "hint" and hinted.anchor == 6 and not hinted.flags
    session.segmenter.use_embedding(session.embeddings[6])
    grown = segmenter.inner.refine([grow_box(box, 0.1, volume.shape[1:])])[0].mask
    np.testing.assert_array_equal(after.mask[6], grown & _inside(box, volume.shape[1:]))
    assert {after.slices[k].method for k in (5, 7)} <= {"propagated", "cascade"}


def test_a_corrections_progress_counts_the_slices_it_redoes_and_never_steps_back(segmenter):
    volume = _volume()
    reference = volume > 100
    session = _session(segmenter, volume, reference)
    session.run()
    _spoil(session, 8)  # as in the carry's test: the fix carries past key slice 8, beyond its plan
    _spoil(session, 9)
    _spoil(session, 10, keep=reference[10])
    reports = []
    session.progress = lambda done, total: reports.append((done, total))
    _, correction = session.correct([Hint(6, "box", box=(20, 14, 45, 44)), Hint(16, "absent")])
    assert {8, 9} <= set(correction.changed) and reports[0][1] < reports[-1][1], "the count grew past its plan"
    done = [d for d, _ in reports]
    assert done == sorted(done) and all(d <= t for d, t in reports), reports
    assert reports[0] == (2, reports[0][1]), "the hints' two slices are done when the plan is told"
    redone = [k for k in correction.changed if k <= 16]  # past 16 the "no target" hint cleared: no model ran
    assert reports[-1] == (len(redone), len(redone)) and len(redone) > 2
    assert reports[-1][1] < session.total


@pytest.mark.parametrize("failure", ["cancel", "model error"])
def test_a_correction_stopped_half_way_leaves_the_run_as_it_was_and_can_be_made_again(segmenter, failure):
    from SaLIPSegmentLib.errors import Cancelled

    volume = _volume()
    session = _session(segmenter, volume, volume > 100)
    session.run()
    session.correct([Hint(16, "absent")])  # a fix in force before the one that fails
    shown = session.result(0)
    mask, records, hints = shown.mask.copy(), [r.to_dict() for r in shown.slices], dict(session.hints)
    attempts = []
    real_attempt = session.attempt

    def attempt(index, source, upcoming=()):
        attempts.append(index)
        if failure == "model error" and len(attempts) == 2:
            raise RuntimeError("the decoder failed")
        return real_attempt(index, source, upcoming)

    session.attempt = attempt
    session.should_cancel = lambda: failure == "cancel" and len(attempts) >= 2
    with pytest.raises(Cancelled if failure == "cancel" else RuntimeError):
        session.correct([Hint(6, "box", box=(20, 14, 45, 44))])
    assert len(attempts) >= 2, "it stopped inside the refill, after slices were redone"
    after = session.result(0)
    np.testing.assert_array_equal(after.mask, mask)
    assert [r.to_dict() for r in after.slices] == records and session.hints == hints

    session.should_cancel = None
    del session.attempt
    again, correction = session.correct([Hint(6, "box", box=(20, 14, 45, 44))])
    assert correction.hinted == [6] and again.slices[6].method == "hint" and not again.mask[16:].any()


def test_a_slice_the_full_cascade_segmented_between_key_slices_bounds_a_hint_like_a_key_slice(segmenter):
    volume = _volume()
    session = _session(segmenter, volume, volume > 100)
    session.run()
    assert 14 not in session.key_slices and session.records[14].method != "cascade"
    session._cascade_on(14)  # as where both chains were refused, or a contested slice split the stretch
    cascaded = session.records[14].to_dict()
    after, correction = session.correct([Hint(12, "box", box=(20, 14, 45, 44))])
    assert correction.changed == [12, 13], "the hint's stretch ends at the cascaded slice, as at key slice 11"
    assert after.slices[14].to_dict() | {"flags": [], "quality": {}, "confidence": None} == \
        cascaded | {"flags": [], "quality": {}, "confidence": None}


def _spoil(session, index, keep=None):
    """Give slice `index` a poor mask (one pixel of its reference), or `keep`, as its own result."""
    reference = session.ref_slices[index]
    mask = keep if keep is not None else reference & (np.cumsum(reference.ravel()) == 1).reshape(reference.shape)
    session.mask_slices[index] = mask
    session.found[index] = _Found([mask], [0.0], [-1.0], index)  # no chain from it is refused for its IoU


def test_a_fix_carries_past_the_boundary_while_it_scores_above_what_each_slice_had(segmenter):
    volume = _volume()
    reference = volume > 100
    session = _session(segmenter, volume, reference)
    session.run()
    assert session.records[8].method == "cascade"  # key slice 8 bounds the hint's stretch 7
    _spoil(session, 8)
    _spoil(session, 9)
    _spoil(session, 10, keep=reference[10])  # nothing the chain gives scores above the reference itself
    before = session.mask.copy()
    after, correction = session.correct([Hint(6, "box", box=(20, 14, 45, 44))])
    assert correction.changed == [5, 6, 7, 8, 9]
    assert [after.slices[k].method for k in (8, 9)] == ["propagated", "propagated"]
    np.testing.assert_array_equal(after.mask[10:], before[10:])


def test_a_redone_slice_keeps_its_mask_where_the_scorer_ranks_it_above_the_fixs_chain(segmenter):
    volume = _volume()
    reference = volume > 100
    session = _session(segmenter, volume, reference)
    session.run()
    own = reference[5]
    _spoil(session, 5, keep=own)  # nothing a chain gives scores above the reference itself
    _spoil(session, 7)  # one pixel: the chain does better
    fix = Hint(6, "box", box=(20, 14, 45, 44))
    after, correction = session.correct([fix])
    assert correction.changed == [5, 6, 7]
    np.testing.assert_array_equal(after.mask[5], own)
    assert after.mask[7].sum() > 1 and after.slices[7].method == "propagated"
    session.restore_state(session.automatic_state)  # without the kept mask, the chain's own result there
    _spoil(session, 7)
    chained, _ = session.correct([fix])
    assert not np.array_equal(chained.mask[5], own), "the test needs a chain that differs from it"
    np.testing.assert_array_equal(chained.mask[7], after.mask[7])


def test_with_a_clip_like_scorer_a_redone_slice_is_ranked_by_the_scores_it_was_made_with(segmenter, monkeypatch):
    volume = _volume()
    reference = volume > 100
    settings = VolumeSettings(proposal=PROPOSALS, propagation=PropagationSettings(key_interval=4),
                              presence=PresenceSettings(enabled=False))
    session = CorrectionSession(volume, segmenter, NoisyOracleScorer(), ["disk"], settings, reference=reference)
    session.run()
    assert session.records[5].method == "propagated"
    session.records[5].clip_scores = [99.0]  # above all the noisy oracle gives (22 + 8 x Dice + noise)
    own = session.mask[5].copy()
    calls, during = [], []  # every scorer call; those keep_better made, per call of it
    score, keep_better = session.scorer.score, session.keep_better
    monkeypatch.setattr(session.scorer, "score", lambda *a, **k: calls.append(1) or score(*a, **k))

    def counted_keep_better(before):
        start = len(calls)
        keep_better(before)
        during.append(len(calls) - start)

    monkeypatch.setattr(session, "keep_better", counted_keep_better)
    after, correction = session.correct([Hint(6, "box", box=(20, 14, 45, 44))])
    assert 5 in correction.changed and calls
    np.testing.assert_array_equal(after.mask[5], own)
    assert during and not any(during), "CLIP is not run again to rank what a correction redid"


@pytest.mark.parametrize("fill", [True, False])
def test_a_corrections_masks_are_compared_as_the_clean_up_will_show_them(segmenter, fill):
    volume = _volume()
    reference = volume > 100
    session = _session(segmenter, volume, reference)
    session.settings = replace(session.settings, cleanup=CleanupSettings(fill_holes=fill))
    disk = reference[5]
    yy, xx = np.nonzero(disk)
    y, x = np.mgrid[: disk.shape[0], : disk.shape[1]]
    ring = disk & ((y - yy.mean()) ** 2 + (x - xx.mean()) ** 2 > 25)  # the disk with a hole
    assert ring.sum() < disk.sum()
    pixels = session._image(5)
    score = session._whole_score(5, pixels, [ring])
    assert score == pytest.approx(100.0 if fill else 100.0 * dice(ring, disk))


def test_the_carry_stops_where_the_model_refuses_the_chain(segmenter):
    volume = _volume()
    session = _session(segmenter, volume, volume > 100)
    session.run()
    _spoil(session, 8)  # a slice the chain would improve, were its result not refused
    before, record = session.mask.copy(), session.records[8].to_dict()
    refuse_all = PropagationSettings(key_interval=4, max_iou_drop=-10.0)  # no predicted IoU is 10 above its anchor's
    session.settings = replace(session.settings, propagation=refuse_all)
    after, correction = session.correct([Hint(6, "box", box=(20, 14, 45, 44))])
    assert correction.changed == [5, 6, 7]
    np.testing.assert_array_equal(after.mask[8:], before[8:])
    assert after.slices[8].to_dict() | {"flags": [], "quality": {}, "confidence": None} == \
        record | {"flags": [], "quality": {}, "confidence": None}


@pytest.mark.parametrize("cascade_finds", ["a poorer mask", "nothing"])
def test_a_fixs_refused_step_is_kept_over_a_poorer_cascade_but_not_where_the_cascade_finds_nothing(segmenter,
                                                                                                  cascade_finds):
    volume = _volume()
    reference = volume > 100
    session = _session(segmenter, volume, reference)
    session.run()
    session.found.pop(4)  # key slice 4 without the target: the walks into 5 and 7 start from the fix on 6
    _spoil(session, 5)
    _spoil(session, 7)
    refuse_all = PropagationSettings(key_interval=4, max_iou_drop=-10.0)  # every chain step is refused
    session.settings = replace(session.settings, propagation=refuse_all)
    real_cascade, cascaded = session.cascade, []

    def cascade(index, pixels, **kwargs):
        cascaded.append(index)
        if cascade_finds == "nothing":
            return False
        found = real_cascade(index, pixels, **kwargs)
        if found:
            _spoil(session, index)  # its candidate is one pixel of the target
        return found

    real_attempt, refused = session.attempt, {}

    def attempt(index, source, upcoming=()):
        result = real_attempt(index, source, upcoming)
        refused[index] = np.logical_or.reduce(result.parts)
        return result

    session.cascade, session.attempt = cascade, attempt
    after, correction = session.correct([Hint(6, "box", box=(20, 14, 45, 44))])
    assert {5, 7} <= set(cascaded) and correction.changed == [5, 6, 7]
    for k in (5, 7):
        if cascade_finds == "nothing":
            assert not after.mask[k].any(), "the walk ends where the cascade finds nothing"
        else:
            assert after.slices[k].method == "propagated"
            np.testing.assert_array_equal(after.mask[k], resize_mask(refused[k], reference[k].shape))
            assert dice(after.mask[k], reference[k]) > 2 / (1 + reference[k].sum())  # the cascade's one pixel


class Overreaching(Counting):
    """The tiny SAM, except that its mask for a box fills the box grown by a fifth on each side, with a
    confident predicted IoU: a model whose masks reach past the target, as LiteMedSAM's do on a head
    with skull, so that a chain's boxes grow slice by slice."""

    def __init__(self, inner, shape):
        super().__init__(inner)
        self.shape = shape

    def refine(self, boxes):
        refined = []
        for box in boxes:
            x0, y0, x1, y1 = grow_box(box, 0.2, self.shape)
            mask = np.zeros(self.shape, dtype=bool)
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
            refined.append(RefinedMask(mask=mask, box=(x0, y0, x1, y1), predicted_iou=0.9))
        return refined


@pytest.mark.parametrize("margin", [0.1, None])
def test_a_fixs_chains_prompt_inside_the_boxes_of_the_stretchs_two_ends(tiny_sam, tiny_sam_checkpoint, margin,
                                                                         monkeypatch):
    volume = _volume()
    shape, reference = volume.shape[1:], volume > 100
    model = Overreaching(create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint), shape)
    session = _session(model, volume, reference, interval=8)
    session.run()
    assert [session.tissue[k] for k in key_positions(20, 8)] == [0, 6, 13, 19]
    for index in (6, 13):  # the ends of the fix's two stretches: the reference's own masks
        _spoil(session, index, keep=reference[index])
    session.settings = replace(session.settings, propagation=PropagationSettings(
        key_interval=8, hint_zoom_factor=0, correction_envelope_margin=margin))
    prompted, attempt, refine = {}, session.attempt, volume_module.refine_in_shape

    def attempted(index, source, upcoming=()):
        prompted["slice"] = index
        return attempt(index, source, upcoming)

    def recording(segmenter, image, boxes, settings):
        prompted.setdefault(prompted["slice"], []).extend(boxes)
        return refine(segmenter, image, boxes, settings)

    monkeypatch.setattr(session, "attempt", attempted)
    monkeypatch.setattr(volume_module, "refine_in_shape", recording)
    _, correction = session.correct([Hint(9, "box", box=mask_to_box(reference[9]))])
    assert {7, 8, 9, 10, 11, 12} <= set(correction.changed)
    hinted = mask_to_box(session.mask_slices[9])

    def envelope(end):
        return grow_box(union_box([mask_to_box(reference[end]), hinted]), 0.1, shape)

    stretches = {7: envelope(6), 8: envelope(6), 10: envelope(13), 11: envelope(13), 12: envelope(13)}
    assert set(stretches) <= set(prompted)
    outside = [k for k, bound in stretches.items() if any(intersect_boxes(b, bound) != b for b in prompted[k])]
    if margin is None:
        assert outside, "without the envelope the overreaching chains' boxes walk past both ends"
    else:
        assert not outside


@pytest.mark.parametrize("margin", [0.25, None])
def test_a_corrections_cascade_proposes_around_the_fix_and_the_automatic_pass_everywhere(segmenter, margin):
    volume = _volume()
    session = _session(segmenter, volume, volume > 100)
    segmenter.regions.clear()
    session.run()
    assert segmenter.regions and set(segmenter.regions) == {None}, "the automatic pass: whole slices"
    refuse_all = PropagationSettings(key_interval=4, max_iou_drop=-10.0, correction_region_margin=margin)
    session.settings = replace(session.settings, propagation=refuse_all)
    segmenter.regions.clear()
    after, correction = session.correct([Hint(6, "box", box=(20, 14, 45, 44))])
    assert correction.changed == [5, 6, 7] and [after.slices[k].method for k in (5, 7)] == ["cascade"] * 2
    if margin is None:
        assert segmenter.regions == [None, None]
        assert all(after.slices[k].candidates_median_score is not None for k in (5, 7))
        return
    # Slice 5's walk comes from key slice 4 (the stretch 4-6 walks forwards first), whose result the user
    # did not confirm: it proposes everywhere. Slice 7's comes from the box: around its mask, grown.
    assert segmenter.regions == [None, grow_box(mask_to_box(after.mask[6]), margin, volume.shape[1:])]
    assert segmenter.regions[1] != (0, 0, 63, 63), "the hint's region is part of the slice"
    # A region's candidates are mostly the target: their median is no floor for presence.
    assert after.slices[7].candidates_median_score is None and after.slices[5].candidates_median_score is not None
    assert after.mask[5].any() and after.mask[7].any()


def test_a_contested_slice_proposes_around_the_fixs_chain_whichever_chain_was_refused(segmenter):
    volume = _volume()
    session = _session(segmenter, volume, volume > 100)
    session.run()
    session.correct([Hint(6, "box", box=(20, 14, 45, 44))])
    from_box, from_key, from_other_key = (session.attempt(7, session.found[k]) for k in (6, 4, 8))

    def around(attempt):
        return grow_box(mask_to_box(np.logical_or.reduce(attempt.parts)), 0.25, volume.shape[1:])

    # (refused chain, the chain that reached the slice) -> where the cascade proposes
    for refused, reached, expected in ((from_box, from_key, around(from_box)), (from_key, from_box, around(from_box)),
                                       (from_key, from_other_key, None), (from_key, None, None)):
        session.kept[7] = session.embeddings[7]  # as where two chains met on the slice
        segmenter.regions.clear()
        session.split_contested((7, refused), reached)
        assert segmenter.regions == [expected]
        # What the slice hands on descends from the box when the cascade around the box's chain is kept.
        cascade_kept = session.records[7].method == "cascade"
        assert session.found[7].hint == ((6 if expected is not None else None) if cascade_kept else refused.found.hint)
    session.kept.clear()


def test_a_walk_from_the_fix_proposes_around_its_last_slice_after_each_cascade(segmenter):
    volume = _volume()
    session = _session(segmenter, volume, volume > 100, interval=8)
    session.run()
    assert session.key_slices == {0, 6, 13, 19}
    refuse_all = PropagationSettings(key_interval=8, max_iou_drop=-10.0)
    session.settings = replace(session.settings, propagation=refuse_all)
    segmenter.regions.clear()
    after, correction = session.correct([Hint(7, "box", box=(20, 14, 45, 44))])
    # Every step of the walk from the box to key slice 13 is refused, so each runs the cascade; its
    # anchor is then that cascade's slice, but the walk still descends from the box.
    assert correction.changed == list(range(7, 13))
    assert [after.slices[k].method for k in range(8, 13)] == ["cascade"] * 5
    assert all(session.found[k].hint == 7 for k in range(8, 13))
    assert segmenter.regions == [grow_box(mask_to_box(after.mask[k - 1]), 0.25, volume.shape[1:]) for k in range(8, 13)]
    # Once the box is taken back, nothing descends from a hint in force: the whole slice again.
    del session.hints[7]
    assert session.fallback_region(session.found[10]) is None


def _inside(box, shape):
    x0, y0, x1, y1 = box
    inside = np.zeros(shape, dtype=bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    return inside


@pytest.mark.parametrize("margin", [0.1, 0.3, 0.0])
def test_a_box_prompts_the_model_grown_and_its_mask_stays_inside_the_box(segmenter, margin, monkeypatch):
    volume = _volume()
    session = _session(segmenter, volume, volume > 100)
    session.settings = replace(session.settings, propagation=PropagationSettings(hint_box_margin=margin))
    session.find_tissue()
    prompts = []
    refine = segmenter.refine
    monkeypatch.setattr(segmenter, "refine", lambda boxes: prompts.append(list(boxes)) or refine(boxes))
    box = (22, 12, 30, 20)  # the disk's upper left quarter: the model's mask reaches past it
    mask = session.hint_mask(Hint(6, "box", box=box))
    prompt = grow_box(box, margin, volume.shape[1:]) if margin else box
    assert prompts == [[prompt]]
    unclipped = refine([prompt])[0].mask
    assert (unclipped & ~_inside(box, volume.shape[1:])).any(), "the clip is tested on a mask that spills"
    np.testing.assert_array_equal(mask, unclipped & _inside(box, volume.shape[1:]))
    assert mask.any()


@pytest.mark.parametrize("zoom", [4.0, 0.0])
def test_a_small_box_is_refined_zoomed_in_on_its_window(segmenter, zoom, monkeypatch):
    """A box a few of the model's tokens wide is refined on a window around it, which the model
    enlarges to its input; the slice's own embedding stays the session's."""
    volume = np.stack([disk_image(size=200, center=(90, 110), radius=6 + i) for i in range(6)]).astype(np.float32)
    session = _session(segmenter, volume, volume > 100)
    session.settings = replace(session.settings, propagation=replace(session.settings.propagation,
                                                                     hint_zoom_factor=zoom))
    session.run()
    images, prompts = [], []
    set_image, refine = segmenter.set_image, segmenter.refine
    monkeypatch.setattr(segmenter, "set_image", lambda image: images.append(image.shape) or set_image(image))
    monkeypatch.setattr(segmenter, "refine", lambda boxes: prompts.append(list(boxes)) or refine(boxes))
    box = (102, 82, 118, 98)
    after, correction = session.correct([Hint(2, "box", box=box)])
    prompt = grow_box(box, 0.1, volume.shape[1:])
    window = zoom_window(volume.shape[1:], [prompt], zoom, session.settings.shape.zoom_min_side)
    assert not session.settings.shape.zoom_factor  # the automatic pass's boxes are not zoomed
    if zoom:
        x0, y0, x1, y1 = window
        assert images[0] == (y1 - y0, x1 - x0, 3) == (96, 96, 3)  # the window alone, encoded once
        assert prompts[0] == [tuple(v - (x0, y0)[k % 2] for k, v in enumerate(prompt))]
        assert after.slices[2].seconds["encode"] > 0 and correction.encodings == 1
    else:
        assert window is None and prompts[0] == [prompt] and correction.encodings == 0
    assert session.embeddings[2].original_size == (200, 200)  # the slice's own kept, not the window's
    assert after.mask[2].any() and not (after.mask[2] & ~_inside(box, volume.shape[1:])).any()


def test_a_fix_that_gives_no_mask_is_told_and_paints_nothing(segmenter, monkeypatch):
    volume = _volume(8)
    session = _session(segmenter, volume, volume > 100)
    session.run()
    refine = segmenter.refine
    nothing = lambda boxes: [replace(r, mask=np.zeros_like(r.mask)) for r in refine(boxes)]  # noqa: E731
    monkeypatch.setattr(segmenter, "refine", nothing)
    after, _ = session.correct([Hint(3, "box", box=(20, 14, 45, 44)), Hint(5, "absent")])
    assert not after.mask[3].any() and after.slices[3].reason == "refined mask is empty"
    assert after.warnings == ["Slice 3: the model found nothing from its fix (box); draw a larger box, "
                              "or paint the slice by hand."]  # "no target" is what the user asked for: no warning
    assert after.summary()["warnings"] == after.warnings and after.notices == []  # notices: memory recoveries
    monkeypatch.setattr(segmenter, "refine", refine)
    after, _ = session.correct([Hint(3, "box", box=(19, 13, 46, 45))])  # drawn again
    assert after.mask[3].any() and after.warnings == []


def test_no_target_clears_the_slice_and_the_far_side_and_a_later_box_brings_a_slice_back(segmenter):
    volume = _volume(12)
    reference = volume > 100
    session = _session(segmenter, volume, reference, interval=8)  # keys 0, 6, 11
    session.run()
    old = session.mask.copy()
    assert old[9:].any()
    after, correction = session.correct([Hint(9, "absent")])
    # The chain from key slice 6 re-runs up to 9; the target is one object, and most of the mask lies
    # below 9, so the slices above it (key slice 11 too) have no target either.
    assert correction.changed == [7, 8, 9, 10, 11]
    record = after.slices[9]
    assert record.absent == ABSENT_BY_HINT and record.area == 0 and not after.mask[9:].any()
    assert after.slices[11].reason == BEYOND_ABSENT_HINT and not after.slices[11].flags
    np.testing.assert_array_equal(after.mask[:7], old[:7])
    # The user disagrees on slice 10 after all: a box there; 9 and 11 are boundaries, only 10 changes.
    after, correction = session.correct([Hint(9, "absent"), Hint(10, "box", box=(20, 14, 45, 44))])
    assert correction.hinted == [10] and correction.changed == [10]
    assert after.mask[10].any() and not after.mask[11].any() and not after.mask[9].any()
    # With a box below it, a "no target" clears upwards; with one above it, downwards.
    assert session.side_without_target(11) == 1 and session.side_without_target(3) == -1


def test_a_hint_outside_the_key_slices_walks_outwards_until_the_target_ends(segmenter):
    volume = _volume(10)
    volume[7:] = 20.0  # slices 7..9 have no disk: the target ends at 6, but they are tissue (not uniform)
    volume[7:, :5, :5] = 90.0
    reference = volume > 100
    settings = VolumeSettings(proposal=PROPOSALS, slice_range=(0, 10),
                              propagation=PropagationSettings(key_interval=4))
    session = CorrectionSession(volume, segmenter, OracleScorer(), ["disk"], settings, reference=reference)
    session.run()
    after, correction = session.correct([Hint(9, "absent"), Hint(8, "absent")])
    assert correction.changed == [7, 8, 9]  # 6 is a key slice (positions 0, 3, 6, 9)
    assert not after.mask[8:].any()


def test_every_slice_mode_changes_the_hinted_slice_and_only_the_neighbours_it_improves(segmenter):
    volume = _volume(6)
    reference = volume > 100
    session = _session(segmenter, volume, reference, mode="every-slice")
    session.run()
    for index in (1, 4):
        _spoil(session, index, keep=reference[index])
    _spoil(session, 3)
    before = session.mask.copy()
    after, correction = session.correct([Hint(2, "box", box=(20, 14, 45, 44))])
    assert correction.changed == [2, 3], "every slice is a boundary; the fix carries only onto slice 3"
    np.testing.assert_array_equal(np.delete(after.mask, [2, 3], 0), np.delete(before, [2, 3], 0))


def test_points_are_refused_for_a_box_only_model_and_used_by_sam(segmenter, tiny_sam):
    volume = _volume(5)
    session = _session(segmenter, volume, volume > 100)
    session.run()
    assert segmenter.takes_points  # the tiny model is a real SAM
    after, _ = session.correct([Hint(2, "points", points=((36.0, 30.0),), labels=(1,))])
    session.segmenter.use_embedding(session.embeddings[2])
    np.testing.assert_array_equal(after.mask[2], segmenter.inner.refine_points([(36.0, 30.0)], [1]).mask)
    segmenter.takes_points = False
    try:
        with pytest.raises(InputError, match="takes boxes only"):
            session.correct([Hint(3, "points", points=((36.0, 30.0),), labels=(1,))])
    finally:
        segmenter.takes_points = True


def test_a_state_saved_before_corrections_comes_back(segmenter):
    volume = _volume(8)
    session = _session(segmenter, volume, volume > 100)
    session.run()
    saved, mask = session.save_state(), session.mask.copy()
    session.correct([Hint(5, "absent")])
    assert not np.array_equal(session.mask, mask)
    session.restore_state(saved)
    np.testing.assert_array_equal(session.mask, mask)
    assert session.hints == {} and session.records[5].method != "hint"


def test_the_ranking_puts_flagged_and_low_scored_slices_first_and_never_hinted_ones():
    records = [SliceRecord(0, None, clip_scores=[30.0], area=5),
               SliceRecord(1, None, clip_scores=[10.0], area=5),
               SliceRecord(2, None, clip_scores=[25.0], area=5, flags=["area jump", "low score"]),
               SliceRecord(3, None, clip_scores=[26.0], area=5, flags=["low score"]),
               SliceRecord(4, None, method="hint", clip_scores=[1.0], area=5),
               SliceRecord(5, "no tissue", method="skipped")]
    assert rank_slices_to_fix(records) == [2, 3, 1, 0]
    # With the QA's confidence, the least confident flagged slice leads, whatever its score.
    records[2].confidence, records[3].confidence = 0.4, 0.1
    records[0].confidence, records[1].confidence = 0.6, 0.9
    assert rank_slices_to_fix(records) == [3, 2, 0, 1]


def test_the_ranking_offers_first_the_flagged_slice_with_the_most_pixels_likely_wrong():
    # A brain's small end slice, least confident, against large poor slices in the middle.
    records = [SliceRecord(0, None, area=800, confidence=0.03, flags=["low score"]),
               SliceRecord(20, None, area=9000, confidence=0.43, flags=["ragged shape"]),
               SliceRecord(21, None, area=9000, confidence=0.60),
               SliceRecord(22, None, area=4300, confidence=0.47, flags=["area jump"]),
               # judged absent next to the run's end: as large as the nearest mask (slice 20's)
               SliceRecord(19, "target absent", area=0, absent="low", flags=["edge"])]
    assert rank_slices_to_fix(records) == [19, 20, 22, 0, 21]
    records[4].index = 1  # now nearest to slice 0's small mask
    assert rank_slices_to_fix(records) == [20, 22, 1, 0, 21]


def test_the_ranking_offers_the_cut_slice_next_to_the_kept_run_before_those_deeper_in():
    """Slices presence emptied past a mask of 1500 pixels: the one next to it first, whatever the retrieval
    scores of the full cascades deeper in (a box there carries outward; one deeper in leaves an island)."""
    records = [SliceRecord(50, None, area=1500, confidence=0.7),
               SliceRecord(51, "target absent", area=0, absent="low", flags=["edge"]),
               SliceRecord(55, "target absent", area=0, absent="low", flags=["edge"]),
               SliceRecord(62, "target absent", method="cascade", clip_scores=[3.0], area=0, absent="low",
                           flags=["tail"]),
               SliceRecord(40, None, area=3000, confidence=0.45, flags=["ragged shape"])]
    assert rank_slices_to_fix(records) == [40, 51, 55, 62, 50]


def test_the_simulated_user_gives_the_references_box_or_no_target():
    reference = np.zeros((10, 12), bool)
    assert reference_hint(reference, 3) == Hint(3, "absent")
    reference[2:5, 4:9] = True
    assert reference_hint(reference, 3) == Hint(3, "box", box=(4, 2, 8, 4))


def test_hints_file_round_trips_through_json(tmp_path):
    from SaLIPSegmentLib.hints import hints_to_json, load_hints

    path = tmp_path / "h.json"
    hints = [Hint(3, "absent"), Hint(5, "box", box=(1, 2, 3, 4))]
    path.write_text(json.dumps(hints_to_json(hints)))
    assert load_hints(path, GEOMETRY) == hints
    path.write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        load_hints(path, GEOMETRY)


# -- the command line ----------------------------------------------------------------------------


def test_segment_with_a_hints_file_applies_them_and_marks_them_in_the_report(tmp_path, capsys, tiny_sam,
                                                                              tiny_sam_checkpoint):
    import SimpleITK as sitk

    from SaLIPSegmentLib.cli import main
    from SaLIPSegmentLib.io import read_image

    volume = _volume(8).astype(np.int16)
    t1, ref = tmp_path / "t1.nrrd", tmp_path / "ref.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(t1))
    sitk.WriteImage(sitk.GetImageFromArray((volume > 100).astype(np.uint8)), str(ref))
    hints = tmp_path / "hints.json"
    hints.write_text(json.dumps({"hints": [{"slice": 3, "box": [20, 14, 45, 44]}, {"slice": 6, "absent": True}]}))
    base = ["segment", str(t1), "-p", "disk", "--free-text", "--sam", tiny_sam, "--sam-checkpoint",
            str(tiny_sam_checkpoint), "--clip", "oracle", "--reference", str(ref), "--device", "cpu", "--axis", "0",
            "--key-interval", "4", "-q", "--points-per-side", str(TINY_SAM_PROPOSALS["points_per_side"])]
    output, report = tmp_path / "out.nii.gz", tmp_path / "report.json"
    assert main(base + ["-o", str(output), "--report", str(report), "--hints", str(hints)]) == 0
    written = json.loads(report.read_text())
    assert written["hints"] == [{"slice": 3, "box": [20, 14, 45, 44]}, {"slice": 6, "absent": True}]
    assert [row["index"] for row in written["slices"] if row["method"] == "hint"] == [3, 6]
    assert written["summary"]["slices_hinted"] == 2
    mask = read_image(output).array > 0
    assert mask[3].any() and not mask[6].any()

    # Without -q: a bar for the automatic pass, then one for the slices the hints redo, then the hints' line.
    assert main([a for a in base if a != "-q"] + ["-o", str(output), "--overwrite", "--hints", str(hints)]) == 0
    err = capsys.readouterr().err
    counts = re.findall(r"applying hints: +\d+%\|[^|]*\| (\d+)/(\d+)", err)
    assert counts and counts[-1][0] == counts[-1][1] and 2 <= int(counts[-1][1]) < 8, err
    assert re.search(r"segmenting: +100%\|[^|]*\| 8/8", err) and "\nHints: 2 slices (3, 6)" in err, err

    hints.write_text(json.dumps([{"slice": 8, "box": [0, 0, 5, 5]}]))
    bad = tmp_path / "bad.nii.gz"
    assert main(base + ["-o", str(bad), "--hints", str(hints)]) == 3
    assert "Hint 1: slice 8 is outside the run's slices 0:8" in capsys.readouterr().err
    assert not bad.exists()
    assert main(base + ["-o", str(bad), "--hints", str(tmp_path / "none.json")]) == 3
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_simulates_corrections_and_keeps_honest_books(tmp_path, capsys, tiny_sam, tiny_sam_checkpoint):
    import SimpleITK as sitk

    from SaLIPSegmentLib.cli import main

    volume = _volume(12).astype(np.int16)
    volume[9:] = 20
    volume[9:, :6, :6] = 90  # tissue without the target: slices the run may paint wrongly
    t1, ref = tmp_path / "t1.nrrd", tmp_path / "ref.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(t1))
    sitk.WriteImage(sitk.GetImageFromArray((volume > 100).astype(np.uint8)), str(ref))
    out = tmp_path / "figures.json"
    assert main(["evaluate", str(t1), str(ref), "-p", "disk", "--free-text", "--sam", tiny_sam, "--sam-checkpoint",
                 str(tiny_sam_checkpoint), "--clip", "oracle", "--device", "cpu", "--axis", "0", "-q",
                 "--points-per-side", str(TINY_SAM_PROPOSALS["points_per_side"]), "--no-stages", "--modes", "none",
                 "--simulate-corrections", "3", "--json", str(out)]) == 0
    assert "Simulated corrections" in capsys.readouterr().out
    found = json.loads(out.read_text())["corrections"]
    assert set(found["curves"]) == {"qa", "worst-dice"} and found["slice_range"] == [0, 12]
    assert len(found["box_bound_per_slice"]) == 12 and 0 < found["box_bound_dice_volume"] <= 1
    truth = volume > 100
    for steps in found["curves"].values():
        assert steps[0]["step"] == 0 and steps[0]["slice"] is None
        assert [s["step"] for s in steps] == list(range(len(steps))) and 1 < len(steps) <= 4
        fixed = [s["slice"] for s in steps[1:]]
        assert len(set(fixed)) == len(fixed)  # a hinted slice is never offered again
        for before, after in zip(steps, steps[1:]):
            assert after["slice"] in after["changed"] and after["encodings"] == 0 and after["seconds"] > 0
            assert after["hint"] == reference_hint(truth[after["slice"]], after["slice"]).to_dict()
            kept = [k for k in range(12) if k not in after["changed"]]
            assert [after["dice_per_slice"][k] for k in kept] == [before["dice_per_slice"][k] for k in kept]
            if "absent" in after["hint"]:
                assert after["dice_per_slice"][after["slice"]] == 1.0
    worst = found["curves"]["worst-dice"]
    first = worst[1]["slice"]
    assert worst[0]["dice_per_slice"][first] == min(worst[0]["dice_per_slice"])


def test_qa_draws_the_correction_curves(tmp_path):
    from SaLIPSegmentLib.cli import main

    steps = [{"step": k, "dice_volume": 0.4 + 0.1 * k, "seconds": 1.0 + k, "slice": None if k == 0 else k}
             for k in range(4)]
    figures = tmp_path / "f.json"
    figures.write_text(json.dumps({"corrections": {"curves": {"qa": steps, "worst-dice": steps},
                                                   "box_bound_dice_volume": 0.8}}))
    picture = tmp_path / "curve.png"
    assert main(["qa", str(figures), "-o", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000

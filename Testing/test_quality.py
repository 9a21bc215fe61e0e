"""Per-slice QA: each label-free signal on constructed masks, their combination into flags and a
confidence, the per-volume verdict, and that slices without a mask of the run's own never get flags."""

import numpy as np
import pytest

from SaLIPSegmentLib.hints import rank_slices_to_fix
from SaLIPSegmentLib.quality import (
    CUT_TAIL_FLAG,
    EDGE_FLAG,
    QualityRules,
    area_change,
    candidate_agreement,
    flag_records,
    fragment_count,
    neighbour_dice,
    score_z,
    solidity,
    taper_depth,
    verdict,
)
from SaLIPSegmentLib.volume import BEYOND_ORGAN, LOW_SCORE_ABSENT, NO_TISSUE, SliceRecord, flag_slices


def disk(shape=(64, 64), centre=(32, 32), radius=12):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def scattered(shape=(64, 64), pieces=6, side=4):
    """`pieces` small squares spread over the slice: fragments of white matter, say."""
    mask = np.zeros(shape, dtype=bool)
    for k in range(pieces):
        r, c = 6 + 10 * (k % 5), 6 + 24 * (k // 5)
        mask[r : r + side, c : c + side] = True
    return mask


# -- signals on constructed masks -------------------------------------------------------------------


def test_fragments_count_pieces_that_hold_a_share_of_the_area():
    assert fragment_count(disk()) == 1
    assert fragment_count(scattered(pieces=6)) == 6
    specks = disk().copy()
    specks[0, 0] = specks[0, 63] = True  # two one-pixel specks: under 2% of the area each
    assert fragment_count(specks, share=0.02) == 1
    assert fragment_count(np.zeros((8, 8), bool)) == 0


def test_solidity_is_high_for_a_convex_shape_and_low_for_a_ragged_one():
    assert solidity(disk()) > 0.9
    square = np.zeros((40, 40), bool)
    square[5:30, 5:30] = True
    assert solidity(square) == pytest.approx(1.0)
    ring = disk(radius=15) & ~disk(radius=12)
    ring[30:34, :] = False  # opened, so that it stays one piece with its hole's area outside it
    assert solidity(ring) < 0.4
    comb = np.zeros((40, 40), bool)
    comb[5:8, 5:35] = True
    for c in range(5, 35, 6):
        comb[5:35, c : c + 2] = True
    assert solidity(comb) < 0.5
    bar = np.zeros((10, 10), bool)
    bar[4, 2:8] = True  # one pixel thick: its corners still span an area
    assert solidity(bar) == pytest.approx(1.0)


def test_neighbour_dice_takes_the_better_side_and_ignores_unmasked_neighbours():
    masks = [disk(radius=12), disk(radius=12), disk(centre=(20, 20), radius=5), np.zeros((64, 64), bool)]
    areas = [int(m.sum()) for m in masks]
    assert neighbour_dice(masks, 0, areas) == pytest.approx(1.0)
    assert neighbour_dice(masks, 1, areas) == pytest.approx(1.0)  # the better of 1.0 and the small disk's
    assert neighbour_dice(masks, 2, areas) < 0.3  # slice 3 has no mask: only slice 1 counts
    assert neighbour_dice(masks[2:3], 0, areas[2:3]) is None


def test_area_change_is_measured_against_the_median_of_the_neighbours():
    assert area_change([100, 100, 400, 100, 100], 2) == pytest.approx(2.0)
    assert area_change([100, 100, 100, 100, 100], 2) == pytest.approx(0.0)
    assert area_change([100, 900, 100, 100, 100], 2) == pytest.approx(0.0)  # one odd neighbour does not count
    assert area_change([0, 0, 100, 100, 0], 2) is None  # fewer than three masked neighbours


def test_score_z_is_relative_to_the_volume_and_needs_enough_scored_slices():
    rules = QualityRules()
    records = [SliceRecord(index=k, reason=None, area=50, clip_scores=[s])
               for k, s in enumerate([30.0, 30.5, 29.5, 31.0, 30.2, 20.0])]
    z = score_z(records, rules)
    assert z[5] < -5 and all(abs(z[k]) < 2 for k in range(5))
    shifted = [SliceRecord(index=r.index, reason=None, area=50, clip_scores=[r.clip_scores[0] - 10]) for r in records]
    assert score_z(shifted, rules) == pytest.approx(z)  # the same shape ten points lower reads the same
    assert score_z(records[:3], rules) == {}


def test_candidate_agreement_compares_the_retrieved_part_with_its_refined_mask():
    from SaLIPSegmentLib.cascade import SliceResult
    from SaLIPSegmentLib.models.base import Candidate

    part = disk(radius=10)
    candidates = [Candidate(mask=disk(centre=(10, 10), radius=4), box=(6, 6, 14, 14), predicted_iou=0.9, stability=1),
                  Candidate(mask=part, box=(22, 22, 42, 42), predicted_iou=0.9, stability=1)]
    same = SliceResult(mask=part, parts=[part], candidates=candidates, retrieved=[1], retrieved_masks=[part])
    assert candidate_agreement(same) == pytest.approx(1.0)
    grown = SliceResult(mask=disk(radius=25), parts=[disk(radius=25)], candidates=candidates, retrieved=[1],
                        retrieved_masks=[part])
    assert candidate_agreement(grown) < 0.4
    assert candidate_agreement(SliceResult(mask=part, parts=[part])) is None  # candidates not kept


# -- the combination --------------------------------------------------------------------------------


def run_of(masks, **fields):
    """Records (one per mask, in order) as a full cascade would write them, and the masks."""
    records = [SliceRecord(index=k, reason=None, area=int(m.sum()), clip_scores=[30.0 + 0.1 * (k % 3)],
                           predicted_ious=[0.9], candidate_agreement=0.9, anchor=k) for k, m in enumerate(masks)]
    for index, values in fields.items():
        for name, value in values.items():
            setattr(records[int(index[1:])], name, value)
    return records


def clean_masks(count=9):
    return [disk(radius=10 + (k % 3)) for k in range(count)]


def test_a_clean_run_is_not_flagged_and_is_confident():
    masks = clean_masks()
    records = run_of(masks)
    flag_slices(records, masks)
    assert [r.flags for r in records] == [[]] * len(masks)
    assert all(r.confidence >= 0.5 for r in records)
    assert verdict(records) == "no slice needs a look"


def test_a_fragmented_a_jumping_and_a_disagreeing_slice_are_flagged_with_their_reasons():
    masks = clean_masks()
    masks[2] = scattered(pieces=6)
    masks[5] = disk(radius=26)  # several times its neighbours' area, and unlike them
    records = run_of(masks, s7={"candidate_agreement": 0.1})
    flag_slices(records, masks)  # the agreement signal is off by default (QualityRules.min_agreement)
    assert {r.index for r in records if r.flags} == {2, 5} and records[7].quality["agreement"] == 0.1
    flag_slices(records, masks, QualityRules(min_agreement=0.7))
    flagged = {r.index: r.flags for r in records if r.flags}
    assert set(flagged) == {2, 5, 7}
    assert any(reason.startswith("unlike its neighbours") for reason in flagged[2])
    assert any(reason.startswith("area jump") for reason in flagged[5])
    assert any(reason.startswith("unlike its neighbours") for reason in flagged[5])
    assert flagged[7] == ["refined mask differs from the retrieved part (Dice 0.10)"]
    assert all(r.confidence < 0.5 for r in records if r.flags)
    assert all(r.confidence >= 0.5 for r in records if not r.flags)
    assert verdict(records) == "3 of 9 slices need a look"


def test_a_low_score_for_the_volume_is_flagged_whatever_the_scale():
    masks = clean_masks()
    records = run_of(masks, s4={"clip_scores": [21.0]})
    flag_slices(records, masks)
    assert {r.index: r.flags for r in records if r.flags} == {4: ["low score for this volume"]}


def test_skipped_and_absent_slices_are_never_flagged_and_carry_no_confidence():
    masks = clean_masks()
    masks[1] = masks[4] = masks[6] = masks[8] = np.zeros((64, 64), bool)
    masks[7] = scattered(pieces=6)  # fragments that presence judged absent: their flags would be noise
    records = run_of(masks, s1={"method": "skipped", "reason": NO_TISSUE},
                     s4={"method": "skipped", "reason": BEYOND_ORGAN},
                     s6={"absent": LOW_SCORE_ABSENT, "reason": "target absent"},
                     s7={"absent": LOW_SCORE_ABSENT, "reason": "target absent", "clip_scores": [5.0]},
                     s8={"absent": LOW_SCORE_ABSENT, "reason": "target absent"})
    records[7].area = 0  # judge_presence cleared its mask
    masks[7] = np.zeros((64, 64), bool)
    flag_slices(records, masks, QualityRules(flag_edges=False))
    for k in (1, 4, 6, 7, 8):
        assert records[k].flags == [] and records[k].confidence is None and records[k].quality == {}
    assert verdict(records) == "no slice needs a look; 3 judged without the target"


def test_the_slice_just_past_where_presence_cut_the_target_is_flagged_and_no_further():
    """A present end slice scores as low as an absent one: where the run was cut is where to look."""
    masks = clean_masks()
    for k in (0, 1, 6, 7, 8):
        masks[k] = np.zeros((64, 64), bool)
    absent = {"absent": LOW_SCORE_ABSENT, "reason": "target absent", "area": 0}
    records = run_of(masks, s0=absent, s1=absent, s6=absent, s7=absent,
                     s8={"absent": "no target (hint)", "reason": "target absent", "area": 0, "method": "hint"})
    flag_slices(records, masks)
    assert {r.index for r in records if r.flags} == {1, 6}
    assert records[1].flags == [EDGE_FLAG] and records[1].confidence is None
    assert verdict(records) == "2 of 6 slices need a look; 5 judged without the target"
    assert set(rank_slices_to_fix(records)[:2]) == {1, 6}  # no mask, flagged: fixed first
    flag_slices(records, masks, thickness_mm=3.0)  # 6 mm deep: two slices of 3 mm past each end
    assert {r.index for r in records if r.flags} == {0, 1, 6, 7}  # the hinted slice 8 still not
    assert [QualityRules().edge_slices(mm) for mm in (None, 0.5, 1.0, 3.0, 6.5, 20.0)] == [1, 12, 6, 2, 1, 1]
    # A slice the user said has no target is not second-guessed, even next to a mask.
    records = run_of(masks, s6={"absent": "no target (hint)", "reason": "target absent", "area": 0,
                                "method": "hint"})
    flag_slices(records, masks)
    assert not records[6].flags


def tapering_run(radii, before=13, after=9):
    """Masks and records: `before` slices judged without the target, disks of `radii`, then `after` more."""
    masks = [np.zeros((64, 64), bool)] * before + [disk(radius=r) for r in radii] + [np.zeros((64, 64), bool)] * after
    absent = {"absent": LOW_SCORE_ABSENT, "reason": "target absent", "area": 0}
    empty = [k for k in range(len(masks)) if not masks[k].any()]
    return masks, run_of(masks, **{f"s{k}": absent for k in empty})


def test_the_taper_depth_is_how_many_slices_the_end_area_takes_to_vanish_at_its_rate_of_shrinking():
    _, records = tapering_run([12, 12, 12, 12, 12, 9, 6, 3])  # kept 13-20, shrinking towards 20
    assert taper_depth(records, end=20, step=1, most=12) == 1
    assert taper_depth(records, end=13, step=-1, most=12) == 12  # ends at full size: cut in the body
    _, records = tapering_run([12, 12, 12, 11, 10, 9])  # a slow shrink: more slices before it vanishes
    slow = taper_depth(records, end=18, step=1, most=30)
    assert 3 < slow < 30 and taper_depth(records, end=18, step=1, most=3) == 3
    _, records = tapering_run([12, 3])  # two kept masks tell no rate
    assert taper_depth(records, end=14, step=1, most=5) == 5


def test_edge_flags_reach_one_slice_past_a_tapering_end_and_the_edge_depth_past_an_abrupt_one():
    masks, records = tapering_run([12, 12, 12, 12, 12, 9, 6, 3])

    def edges():  # the shrinking masks themselves are flagged for their area jump
        return {r.index for r in records if r.flags == [EDGE_FLAG]}

    flag_slices(records, masks, rules=QualityRules(edge_taper=False), thickness_mm=1.0)  # 6 mm past each end
    assert edges() == {*range(7, 13), *range(21, 27)}
    flag_slices(records, masks, thickness_mm=1.0)
    assert edges() == {*range(7, 13), 21} and not records[22].flags
    flag_slices(records, masks, thickness_mm=3.0)  # 6 mm: 2 slices
    assert edges() == {11, 12, 21}


def test_past_the_edge_a_cut_stretch_that_scored_part_of_the_way_up_is_flagged_until_the_floor():
    """Presence's scores (floor 20, kept masks 6-9 about 60): the cut slices 10-13 after the kept run
    scored 40, 36, 30, 33 (a poor part of the target), then the floor's level; those before it and
    after the stretch sit at the floor."""
    masks = clean_masks(20)
    scores = [20, 21, 19, 20, 20, 21, 60, 61, 59, 60, 40, 36, 30, 33, 21, 20, 20, 19, 20, 38]
    absent = {f"s{k}": {"absent": LOW_SCORE_ABSENT, "reason": "target absent", "area": 0}
              for k in (*range(6), *range(10, 20))}
    records = run_of(masks, **absent)
    for record, score in zip(records, scores):
        record.presence_score = float(score)
        record.candidates_median_score = 20.0
    flag_slices(records, masks)  # no floor: one slice past each end, as before
    assert {r.index for r in records if r.flags} == {5, 10}
    flag_slices(records, masks, presence_floor=20.0)
    assert {r.index: r.flags[0] for r in records if r.flags} == {
        5: EDGE_FLAG, 10: EDGE_FLAG, 11: CUT_TAIL_FLAG, 12: CUT_TAIL_FLAG, 13: CUT_TAIL_FLAG}
    # Slice 19 scores high but lies past slices at the floor: another object, not the target's tail.
    flag_slices(records, masks, QualityRules(tail_height=0.5), presence_floor=20.0)
    assert {r.index for r in records if r.flags} == {5, 10}  # 36 is 0.4 of the way up: the walk stops at 11
    flag_slices(records, masks, presence_floor=70.0)  # kept masks under the floor: no height to measure
    assert {r.index for r in records if r.flags} == {5, 10}
    # A noisy scorer, kept masks little above its floor (22 -> 25): the slices without the target scatter
    # from 20.5 to 24.5, and 24.5, 24.0 past the run are that scatter, not a stretch of target.
    scores = [21.5, 20.5, 22.0, 23.1, 20.9, 22.6, 25.0, 25.5, 24.5, 25.0,
              24.5, 24.0, 23.8, 21.0, 23.9, 20.5, 22.2, 21.4, 22.9, 20.8]
    for record, score in zip(records, scores):
        record.presence_score = float(score)
    flag_slices(records, masks, presence_floor=22.0)
    assert {r.index for r in records if r.flags} == {5, 10}


def test_empty_masks_and_missing_candidates_are_flagged_with_no_confidence_left():
    masks = clean_masks(4)
    masks[1] = masks[2] = np.zeros((64, 64), bool)
    records = run_of(masks, s1={"reason": "no candidate"}, s2={"reason": "refined mask is empty"})
    flag_slices(records, masks)
    assert [records[1].flags, records[2].flags] == [["no candidate"], ["empty mask"]]
    assert records[1].confidence == 0.0
    assert verdict(records) == "2 of 4 slices need a look"


def test_flags_without_masks_reuse_the_mask_signals_measured_before():
    masks = clean_masks()
    masks[3] = scattered(pieces=6)
    records = run_of(masks)
    flag_records(records, masks)
    before = [list(r.flags) for r in records]
    flag_records(records)  # as a caller that re-flags a run's records without its mask
    assert [r.flags for r in records] == before and before[3]


def test_the_limits_can_be_changed_in_one_place():
    masks = clean_masks()
    masks[2] = scattered(pieces=3)
    records = run_of(masks)
    flag_records(records, masks, QualityRules(max_fragments=np.inf, min_solidity=0.0, min_neighbour_dice=0.0,
                                              max_area_change=np.inf))
    assert not records[2].flags and records[2].quality["fragments"] == 3  # measured and reported all the same
    flag_records(records, masks, QualityRules(max_fragments=2))
    assert any(f.startswith("fragmented (3 pieces)") for f in records[2].flags)


def test_verdict_says_when_nothing_was_segmented():
    assert verdict([SliceRecord(index=0, reason=NO_TISSUE, method="skipped")]) == "no slice was segmented"
    one = [SliceRecord(index=0, reason="no candidate", area=0, flags=["no candidate"])]
    assert verdict(one) == "1 of 1 slice needs a look"


def test_a_chain_from_a_flagged_key_slice_is_flagged_and_one_from_a_clean_key_slice_is_not():
    masks = clean_masks(8)
    records = run_of(masks, s0={"candidate_agreement": 0.1})  # key slice 0 refined onto something else
    for k in (1, 2, 3):
        records[k].method, records[k].anchor, records[k].candidate_agreement = "propagated", 0, None
    for k in (5, 6):
        records[k].method, records[k].anchor, records[k].candidate_agreement = "propagated", 4, None
    flag_slices(records, masks, QualityRules(inherit=True, min_agreement=0.7))
    assert {r.index for r in records if r.flags} == {0, 1, 2, 3}
    assert records[2].flags == ["propagated from flagged slice 0"]
    assert records[2].confidence <= records[0].confidence < 0.5
    flag_records(records, masks, QualityRules(min_agreement=0.7))  # inherit is off by default
    assert {r.index for r in records if r.flags} == {0}


# -- the runner and the evaluation see the same flags ------------------------------------------------


def test_a_run_flags_its_slices_from_the_masks_it_wrote_and_evaluate_counts_those_flags(tiny_sam,
                                                                                        tiny_sam_checkpoint):
    import copy

    import torch

    from SaLIPSegmentLib.evaluation import measure_run
    from SaLIPSegmentLib.models import OracleScorer, ProposalSettings, create_segmenter
    from SaLIPSegmentLib.settings import VolumeSettings
    from SaLIPSegmentLib.volume import segment_volume

    from conftest import TINY_SAM_PROPOSALS, disk_image

    segmenter = create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)
    volume = np.stack([disk_image(radius=6 + k % 3) for k in range(4)]).astype(np.float32)
    reference = volume > volume.mean()
    result = segment_volume(volume, segmenter, OracleScorer(), ["x"], reference=reference,
                            settings=VolumeSettings(proposal=ProposalSettings.from_dict(TINY_SAM_PROPOSALS),
                                                    mode="every-slice"))
    masked = [r for r in result.slices if r.area]
    assert masked and all({"solidity", "fragments"} <= set(r.quality) for r in masked)
    assert all(r.candidate_agreement is not None for r in masked)  # every slice ran the full cascade
    again = copy.deepcopy(result.slices)
    flag_slices(again, result.mask)
    assert [(r.flags, r.confidence) for r in again] == [(r.flags, r.confidence) for r in result.slices]
    assert result.summary()["verdict"] == verdict(result.slices)
    figures = measure_run(result, reference, (1.0, 1.0, 1.0))
    assert [o.flags for o in figures.slices] == [r.flags for r in result.slices]
    assert figures.flagged_slices == result.summary()["slices_flagged"]

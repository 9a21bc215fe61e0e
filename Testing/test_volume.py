"""The cascade on a slice and the runner over volumes, with real small models."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.cascade import NO_CANDIDATE, retrieve, segment_slice
from SaLIPSegmentLib.errors import Cancelled, InputError, ModelError
from SaLIPSegmentLib.imaging import dice, gray_to_rgb, mask_to_box, robust_window, window_to_uint8
from SaLIPSegmentLib.models import OracleScorer, ProposalSettings, create_segmenter
from SaLIPSegmentLib.models.base import Candidate, Segmenter
from SaLIPSegmentLib.models.device import MemoryFallback
from SaLIPSegmentLib.settings import PresenceSettings, ShapeSettings, VolumeSettings
from SaLIPSegmentLib.volume import (
    BEYOND_ORGAN,
    NO_TISSUE,
    PropagationSettings,
    SliceRecord,
    VolumeRunner,
    _Attempt,
    _Found,
    acquisition_axis,
    grow_box,
    key_positions,
    parse_slice_range,
    segment_volume,
)

from conftest import TINY_SAM_PROPOSALS, disk_image

PROPOSALS = ProposalSettings.from_dict(TINY_SAM_PROPOSALS)
PAPER = ShapeSettings(unite_parts=False)  # the paper's cascade: the retrieved candidate's box, refined once


class ThreeRolesOnly(Segmenter):
    """A segmenter with nothing but the abstract methods: no embeddings to hand back, one image per call."""

    def __init__(self, inner):
        self.inner, self.encodings = inner, 0

    def set_image(self, image):
        self.encodings += 1
        self.inner.set_image(image)

    def propose(self, settings):
        return self.inner.propose(settings)

    def refine(self, boxes):
        return self.inner.refine(boxes)


class CountingSegmenter(ThreeRolesOnly):
    """Wraps a real segmenter and counts image encodings (one slice per encoder call, no job size)."""

    @property
    def embedding(self):  # what the runner keeps so that two chains share a slice's encoding
        return self.inner.embedding

    def use_embedding(self, embedding):
        self.inner.use_embedding(embedding)


@pytest.fixture(scope="module")
def segmenter(tiny_sam, tiny_sam_checkpoint):
    return CountingSegmenter(create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint))


def test_retrieval_keeps_the_best_scored_candidate_and_refines_its_box(segmenter):
    image = disk_image()
    reference = image > 100
    result = segment_slice(image, segmenter, OracleScorer(), ["disk"], proposal=PROPOSALS, reference=reference,
                           shape=PAPER)
    segmenter.inner.set_image(np.repeat(image[:, :, None], 3, 2))
    candidates = segmenter.inner.propose(PROPOSALS)
    best = max(candidates, key=lambda c: dice(c.mask, reference))
    assert result.candidate_count == len(candidates)
    assert result.boxes == [best.box]
    assert result.clip_scores == [pytest.approx(100 * dice(best.mask, reference))]
    expected = segmenter.inner.refine([best.box])[0]
    np.testing.assert_array_equal(result.mask, expected.mask)
    assert result.predicted_ious == [pytest.approx(expected.predicted_iou)]
    assert set(result.seconds) == {"encode", "propose", "score", "refine"}


def test_top_k_refines_k_boxes_and_unions_them(segmenter):
    image = disk_image()
    keep_all = ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "box_nms_thresh": 1.0})
    result = segment_slice(image, segmenter, OracleScorer(), ["disk"], top_k=2, proposal=keep_all,
                           reference=image > 100, shape=PAPER)
    assert len(result.boxes) == 2 and result.clip_scores[0] >= result.clip_scores[1]
    parts = segmenter.inner.refine(result.boxes)
    np.testing.assert_array_equal(result.mask, parts[0].mask | parts[1].mask)


def test_each_slice_is_embedded_once_unless_asked_otherwise(segmenter):
    image = disk_image()
    segmenter.encodings = 0
    segment_slice(image, segmenter, OracleScorer(), ["x"], proposal=PROPOSALS, reference=image > 100)
    assert segmenter.encodings == 1
    segment_slice(image, segmenter, OracleScorer(), ["x"], proposal=PROPOSALS, reference=image > 100,
                  reencode_for_refine=True)
    assert segmenter.encodings == 3


def _square(y0, x0, side=10, size=40):
    mask = np.zeros((size, size), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return Candidate(mask=mask, box=mask_to_box(mask), predicted_iou=0.9, stability=0.9)


def test_retrieval_prefers_the_candidate_that_continues_the_neighbour_by_the_weight_in_points():
    elsewhere, continuing, overlapping = _square(0, 0), _square(20, 20), _square(25, 25)
    candidates, scores = [elsewhere, continuing, overlapping], np.array([30.0, 27.0, 28.5])
    neighbour = continuing.mask
    assert retrieve(candidates, scores, 1) == [0]  # no neighbour: score alone
    assert retrieve(candidates, scores, 1, neighbour, 0.0) == [0]
    assert retrieve(candidates, scores, 1, np.zeros_like(neighbour), 4.0) == [0]  # an empty neighbour says nothing
    # 4 points x Dice: the continuing square gains 4 (27 -> 31), the overlapping one 4 x 0.25 (28.5 -> 29.5).
    assert retrieve(candidates, scores, 3, neighbour, 4.0) == [1, 0, 2]
    assert retrieve(candidates, scores, 1, neighbour, 2.0) == [0]  # 29 and 29: still short of 30


def test_a_slice_without_candidates_is_empty_with_a_reason(segmenter):
    strict = ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "pred_iou_thresh": 1e9})
    result = segment_slice(disk_image(), segmenter, OracleScorer(), ["x"], proposal=strict,
                           reference=disk_image() > 100)
    assert not result.mask.any() and result.reason == NO_CANDIDATE and result.boxes == []


def _volume(slices=5):
    volume = np.stack([disk_image(radius=8 + i) for i in range(slices)]).astype(np.float32)
    volume[0] = 0.0  # an empty slice: air or padding
    return volume


def test_volume_runner_walks_the_range_reports_progress_and_skips_empty_slices(segmenter):
    volume = _volume()
    seen = []
    segmenter.encodings = 0
    result = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                            VolumeSettings(proposal=PROPOSALS, mode="every-slice"), reference=volume > 100,
                            progress=lambda d, t: seen.append((d, t)))
    assert result.mask.shape == volume.shape and result.mask.dtype == bool
    assert seen == [(i, 5) for i in range(6)]
    assert [s.index for s in result.slices] == [0, 1, 2, 3, 4]
    assert result.slices[0].reason == NO_TISSUE and not result.mask[0].any()
    assert segmenter.encodings == 4  # the empty slice never reached the model
    assert all(s.area == int(result.mask[s.index].sum()) for s in result.slices)


def test_volume_runner_slices_along_the_requested_axis_and_range(segmenter):
    volume = np.moveaxis(_volume(), 0, 2)  # slices along the last axis
    result = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                            VolumeSettings(axis=2, slice_range=(1, 3), proposal=PROPOSALS, mode="every-slice"),
                            reference=volume > 100)
    assert [s.index for s in result.slices] == [1, 2]
    assert not result.mask[:, :, [0, 3, 4]].any()
    assert result.mask[:, :, 1:3].any()


def test_a_2d_image_is_a_one_slice_volume(segmenter):
    image = disk_image().astype(np.int16)
    result = segment_volume(image, segmenter, OracleScorer(), ["x"], VolumeSettings(axis=2, proposal=PROPOSALS),
                            reference=image > 100)
    assert result.mask.shape == image.shape and len(result.slices) == 1


class SizeRecordingSegmenter(CountingSegmenter):
    def set_image(self, image):
        self.sizes.append(image.shape[:2])
        super().set_image(image)


def test_a_very_large_slice_is_segmented_small_and_enlarged_back(segmenter):
    small = disk_image(size=64).astype(np.float32)
    large = np.kron(small, np.ones((8, 8), np.float32))  # 512 px: each pixel an 8 x 8 block
    recording = SizeRecordingSegmenter(segmenter.inner)
    recording.sizes = []
    expected = segment_volume(small, recording, OracleScorer(), ["x"], VolumeSettings(proposal=PROPOSALS),
                              reference=small > 100)
    result = segment_volume(large, recording, OracleScorer(), ["x"],
                            VolumeSettings(proposal=PROPOSALS, max_slice_side=64), reference=large > 100)
    assert recording.sizes == [(64, 64), (64, 64)]  # the models never saw the 512 px slice
    assert result.mask.shape == large.shape and result.working_shape == (64, 64)
    assert expected.mask.any() and np.array_equal(result.mask, np.kron(expected.mask, np.ones((8, 8), bool)))
    assert result.slices[0].area == int(result.mask.sum()) == 64 * int(expected.mask.sum())
    assert result.summary()["working_shape"] == [64, 64]


def _stack(slices=9):
    return np.stack([disk_image(radius=6 + i % 5) for i in range(slices)]).astype(np.float32)


def test_key_slices_are_both_ends_and_at_most_the_interval_apart():
    assert key_positions(0, 16) == [] and key_positions(1, 16) == [0] and key_positions(2, 16) == [0, 1]
    assert key_positions(5, 1) == [0, 1, 2, 3, 4]
    assert key_positions(40, 16) == [0, 13, 26, 39]
    for count in range(2, 300):
        keys = key_positions(count, 16)
        assert keys[0] == 0 and keys[-1] == count - 1
        assert max(np.diff(keys)) <= 16 and len(keys) == -(-(count - 1) // 16) + 1


def test_the_effects_time_estimate_counts_the_key_slices_the_runner_places():
    from SaLIPSegmentLib import effect_options

    full, encode = effect_options.CPU_SECONDS_PER_SLICE["vit_b"]
    for count in (1, 2, 16, 17, 40, 150):
        keys = len(key_positions(count, PropagationSettings().key_interval))
        assert effect_options.estimate_cpu_seconds("vit_b", count) == pytest.approx(
            full * keys + encode * (count - keys))


def test_propagation_prompts_non_key_slices_with_the_neighbours_grown_box(segmenter):
    volume = _stack()
    accept_all = PropagationSettings(key_interval=4, max_iou_drop=1e9, min_area_ratio=0.0, box_margin=0.1)
    segmenter.encodings = 0
    # Presence off: it would judge the tiny model's poor masks, and this test is about their boxes.
    result = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                            VolumeSettings(proposal=PROPOSALS, window=(0, 255), propagation=accept_all,
                                           presence=PresenceSettings(enabled=False)),
                            reference=volume > 100)
    methods = [s.method for s in result.slices]
    assert methods == ["cascade" if i % 4 == 0 else "propagated" for i in range(9)]
    # One encoding per slice, key or not, though two chains try each slice between key slices.
    assert segmenter.encodings == 9
    # Slice 1 came from key slice 0: its mask is the refine of slice 0's box, grown (the chain
    # from key slice 4 gives the same mask with this tiny model, and a tie keeps the first).
    segmenter.inner.set_image(gray_to_rgb(volume[1].astype(np.uint8)))
    box = grow_box(mask_to_box(result.mask[0]), 0.1, volume.shape[1:])
    np.testing.assert_array_equal(result.mask[1], segmenter.inner.refine([box])[0].mask)
    assert result.summary()["slices_propagated"] == 6
    # The oracle does not re-score propagated slices, and a score is never copied from the source.
    assert all(s.clip_scores == [] for s in result.slices if s.method == "propagated")
    assert all("encode" in s.seconds for s in result.slices)


def _chain(segmenter, images, mask, slices):
    """The masks a chain of grown boxes gives, starting from `mask`, over `slices` in order."""
    masks = {}
    for k in slices:
        segmenter.set_image(gray_to_rgb(images[k]))
        mask = segmenter.refine([grow_box(mask_to_box(mask), 0.1, images.shape[1:])])[0].mask
        masks[k] = mask
    return masks


def test_between_two_key_slices_each_slice_keeps_the_better_of_the_two_chains(mni152):
    # LiteMedSAM's real weights on real MNI152 slices: a chain from each key slice, and the
    # scorer (here the oracle) decides slice by slice which one to keep.
    volume, truth = mni152
    volume, truth = volume[58:65], truth[58:65]
    window = robust_window(volume)
    images = np.stack([window_to_uint8(k, window) for k in volume])
    lite = CountingSegmenter(create_segmenter("litemedsam", torch.device("cpu"), download=False))
    accept_all = PropagationSettings(key_interval=6, max_iou_drop=1e9, min_area_ratio=0.0, box_margin=0.1)
    few_boxes = ProposalSettings(box_scales=(0.5, 1.0), pred_iou_thresh=0.5, stability_score_thresh=0.3)
    result = segment_volume(volume, lite, OracleScorer(), ["x"],
                            VolumeSettings(proposal=few_boxes, window=window, propagation=accept_all, shape=PAPER),
                            reference=truth)  # the paper's cascade: a key slice whose part is poor, as the test needs
    assert [s.method for s in result.slices] == ["cascade"] + ["propagated"] * 5 + ["cascade"]
    assert lite.encodings == 7  # each slice encoded once: the second chain re-uses the first one's
    forward = _chain(lite.inner, images, result.mask[0], [1, 2, 3, 4, 5])
    backward = _chain(lite.inner, images, result.mask[6], [5, 4, 3, 2, 1])
    chose_backward = 0
    for k in range(1, 6):
        better = backward[k] if dice(backward[k], truth[k]) > dice(forward[k], truth[k]) else forward[k]
        np.testing.assert_array_equal(result.mask[k], better)
        chose_backward += better is backward[k]
    assert chose_backward  # the choice mattered: not always the forward chain


def test_a_failed_propagation_falls_back_to_the_cascade_on_the_same_embedding(segmenter):
    volume = _stack(6)
    refuse_all = PropagationSettings(key_interval=3, max_iou_drop=-1e9)
    segmenter.encodings = 0
    result = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                            VolumeSettings(proposal=PROPOSALS, propagation=refuse_all), reference=volume > 100)
    assert [s.method for s in result.slices] == ["cascade"] * 6
    assert segmenter.encodings == 6
    # The report says why: key slices 0, 3 and 5 ran it anyway, the others were refused on predicted IoU.
    assert [s.fallback for s in result.slices] == [None if k in (0, 3, 5) else "predicted IoU" for k in range(6)]
    every = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                           VolumeSettings(proposal=PROPOSALS, mode="every-slice"), reference=volume > 100)
    np.testing.assert_array_equal(result.mask, every.mask)


def test_a_refused_chains_cascade_is_handed_the_neighbours_mask_and_a_key_slice_none(segmenter, monkeypatch):
    import SaLIPSegmentLib.volume as volume_module

    handed = {}

    def recording(pixels, *args, prior=None, prior_weight=0.0, **kwargs):
        result = segment_slice(pixels, *args, prior=prior, prior_weight=prior_weight, **kwargs)
        handed[len(handed)] = (None if prior is None else prior.copy(), prior_weight, result.mask.copy())
        return result

    monkeypatch.setattr(volume_module, "segment_slice", recording)
    volume = _stack(5)
    refuse_all = PropagationSettings(key_interval=4, max_iou_drop=-1e9, neighbour_weight=3.0)
    result = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                            VolumeSettings(proposal=PROPOSALS, propagation=refuse_all), reference=volume > 100)
    assert [s.fallback for s in result.slices] == [None, "predicted IoU", "predicted IoU", "predicted IoU", None]
    # Calls in order: key slices 0 and 4, then the walk 1, 2, 3, each after the slice before it.
    assert handed[0][0] is None and handed[1][0] is None
    for call, before in ((2, 0), (3, 2), (4, 3)):
        prior, weight, _ = handed[call]
        np.testing.assert_array_equal(prior, handed[before][2])
        assert weight == 3.0


def test_propagation_stops_where_the_cascade_finds_nothing(segmenter):
    volume = _stack(7)
    nothing = ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "pred_iou_thresh": 1e9})
    segmenter.encodings = 0
    result = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                            VolumeSettings(proposal=nothing, propagation=PropagationSettings(key_interval=3)),
                            reference=volume > 100)
    assert segmenter.encodings == 3  # key slices 0, 3, 6 only
    assert [s.reason for s in result.slices if s.method == "skipped"] == [BEYOND_ORGAN] * 4
    assert not result.mask.any()


def test_an_unknown_mode_is_refused(segmenter):
    with pytest.raises(InputError, match="mode"):
        segment_volume(_stack(2), segmenter, OracleScorer(), ["x"], VolumeSettings(mode="fast"),
                       reference=_stack(2) > 1)


def test_cancel_between_slices_hands_back_nothing(segmenter):
    calls = []

    def cancel_at_third():
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(Cancelled, match="3 of 5"):  # the empty slice, then two processed
        segment_volume(_volume(), segmenter, OracleScorer(), ["x"],
                       VolumeSettings(proposal=PROPOSALS, mode="every-slice"), reference=_volume() > 100,
                       should_cancel=cancel_at_third)


def test_nan_and_inf_voxels_are_treated_as_background(segmenter):
    volume = _volume(3)
    volume[1, :5, :5] = np.nan
    volume[2, -3:, -3:] = np.inf
    result = segment_volume(volume, segmenter, OracleScorer(), ["x"], VolumeSettings(proposal=PROPOSALS),
                            reference=np.nan_to_num(volume) > 100)
    assert result.mask.shape == volume.shape


@pytest.mark.parametrize("volume, message", [
    (np.zeros((2, 3, 4, 5)), "4 dimensions"),
    (np.zeros((0, 4, 4)), "empty"),
    (np.full((3, 8, 8), 42.0), "no contrast"),
    (np.full((3, 8, 8), np.nan), "no contrast"),
    (np.zeros((2, 4, 4), dtype=complex), "not supported"),
])
def test_unusable_volumes_are_refused_with_a_clear_message(segmenter, volume, message):
    with pytest.raises(InputError, match=message):
        segment_volume(volume, segmenter, OracleScorer(), ["x"], reference=np.zeros(volume.shape, bool)
                       if volume.dtype != complex else None)


def test_out_of_range_slices_and_axes_are_refused(segmenter):
    with pytest.raises(InputError, match="outside"):
        segment_volume(_volume(), segmenter, OracleScorer(), ["x"], VolumeSettings(slice_range=(3, 9)),
                       reference=_volume() > 1)
    with pytest.raises(InputError, match="Axis"):
        segment_volume(_volume(), segmenter, OracleScorer(), ["x"], VolumeSettings(axis=3), reference=_volume() > 1)
    with pytest.raises(InputError, match="reference"):
        segment_volume(_volume(), segmenter, OracleScorer(), ["x"])


def test_acquisition_axis_and_slice_range_parsing():
    assert acquisition_axis((3.0, 0.8, 0.8)) == 0
    assert acquisition_axis((0.9, 0.9, 5.0)) == 2
    assert acquisition_axis((1.0, 1.0, 1.0)) == 0
    assert acquisition_axis((1.0, 2.5, 2.5), shape=(1, 300, 200)) == 0  # a 2D image at 2.5 mm
    assert parse_slice_range(None, 10) == (0, 10)
    assert parse_slice_range("2:5", 10) == (2, 5)
    assert parse_slice_range("-3:", 10) == (7, 10)
    assert parse_slice_range("4", 10) == (4, 5)
    for bad in ("5:2", "0:11", "a:b"):
        with pytest.raises(InputError):
            parse_slice_range(bad, 10)


def test_flags_mark_no_candidate_empty_low_score_and_area_jumps_but_not_skipped_slices():
    from SaLIPSegmentLib.volume import flag_slices

    def row(index, area, score=30.0, reason=None, method="cascade"):
        return SliceRecord(index=index, reason=reason, method=method, area=area,
                           clip_scores=[score] if area else [])

    records = [
        row(0, 0, reason=NO_TISSUE, method="skipped"),
        row(1, 100, 30.0), row(2, 105, 30.5), row(3, 400, 29.5),  # 3: four times its neighbours
        row(4, 110, 31.0), row(5, 100, 12.0),  # 5: far below the others' scores
        row(6, 0, reason=NO_CANDIDATE), row(7, 0), row(8, 95, 30.2),
        row(9, 0, reason=BEYOND_ORGAN, method="skipped"),
    ]
    flag_slices(records)
    assert {r.index: r.flags for r in records if r.flags} == {
        3: ["area jump (3.9x its neighbours)"], 5: ["low score for this volume"], 6: ["no candidate"],
        7: ["empty mask"]}


def test_a_volume_result_carries_flags_into_its_summary(segmenter):
    strict = ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "pred_iou_thresh": 1e9})
    result = segment_volume(_stack(3), segmenter, OracleScorer(), ["x"],
                            VolumeSettings(proposal=strict, mode="every-slice"), reference=_stack(3) > 100)
    assert [s.flags for s in result.slices] == [["no candidate"]] * 3
    assert result.summary()["slices_flagged"] == 3
    assert result.summary()["verdict"] == "3 of 3 slices need a look"


# -- a GPU that runs out of memory ----------------------------------------------------------------


class GpuThatRunsOut(CountingSegmenter):
    """Stands in for a small GPU (there is none on build machines): the real tiny SAM underneath, and
    torch's own OutOfMemoryError whenever a proposal batch holds more than `fits` prompts "on the GPU"."""

    def __init__(self, inner, fits: int, also_on_cpu: bool = False):
        super().__init__(inner)
        self.fits, self.also_on_cpu, self.device, self.moves = fits, also_on_cpu, torch.device("cuda"), []

    def propose(self, settings):
        if (self.device.type == "cuda" or self.also_on_cpu) and settings.points_per_batch > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.propose(settings)

    def to_device(self, device):
        self.moves.append(device.type)
        self.device = device


def test_out_of_gpu_memory_halves_the_batch_and_redoes_the_slice(segmenter):
    volume = _volume()
    expected = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                              VolumeSettings(mode="every-slice", proposal=replace(PROPOSALS, points_per_batch=8)),
                              reference=volume > 100)
    small_gpu = GpuThatRunsOut(segmenter.inner, fits=8)
    result = segment_volume(volume, small_gpu, OracleScorer(), ["x"],
                            VolumeSettings(mode="every-slice", proposal=PROPOSALS), reference=volume > 100)
    assert result.notices == ["Out of GPU memory: retried with 8 prompts and crops per batch."]
    assert small_gpu.moves == [] and np.array_equal(result.mask, expected.mask) and result.mask.any()
    assert result.summary()["notices"] == result.notices


def test_out_of_gpu_memory_at_the_smallest_batch_goes_on_on_the_cpu(segmenter):
    volume = _volume()
    expected = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                              VolumeSettings(mode="every-slice", proposal=replace(PROPOSALS, points_per_batch=4)),
                              reference=volume > 100)
    no_room = GpuThatRunsOut(segmenter.inner, fits=0)
    scorer = OracleScorer()
    result = segment_volume(volume, no_room, scorer, ["x"], VolumeSettings(mode="every-slice", proposal=PROPOSALS),
                            reference=volume > 100)
    assert [n.split(":")[0] for n in result.notices] == ["Out of GPU memory"] * 2 + [
        "Out of GPU memory even at 4 prompts per batch"]
    assert no_room.moves == ["cpu"] and scorer.device.type == "cpu" and scorer.max_batch == 4
    assert np.array_equal(result.mask, expected.mask)


def test_out_of_memory_on_the_cpu_too_is_a_clear_model_error(segmenter):
    hopeless = GpuThatRunsOut(segmenter.inner, fits=0, also_on_cpu=True)
    volume = _volume()
    with pytest.raises(ModelError, match="Out of memory on the CPU too"):
        segment_volume(volume, hopeless, OracleScorer(), ["x"], VolumeSettings(proposal=PROPOSALS),
                       reference=volume > 100)
    assert hopeless.moves == ["cpu"]


# -- several slices per encoder call (what a GPU does) ------------------------------------------


def _recording_batches(segmenter):
    """Record the batch size of every image-encoder call of a real segmenter (torch or ONNX Runtime)."""
    sizes, encode = [], segmenter._run_encoder
    segmenter._run_encoder = lambda pixels: sizes.append(len(pixels)) or encode(pixels)
    return sizes


@pytest.mark.parametrize("mode", ["propagate", "every-slice"])
def test_encoding_several_slices_per_call_gives_the_same_masks_with_fewer_calls(tiny_sam, tiny_sam_checkpoint, mode):
    volume = _stack(12)
    accept_all = PropagationSettings(key_interval=5, max_iou_drop=1e9, min_area_ratio=0.0)
    one_by_one = create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)
    batched = create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)
    assert one_by_one.encode_batch == 1  # the CPU default: batching measured slower there
    batched.encode_batch = 4
    single_sizes, batch_sizes = _recording_batches(one_by_one), _recording_batches(batched)
    runs = [segment_volume(volume, model, OracleScorer(), ["x"],
                           VolumeSettings(proposal=PROPOSALS, window=(0, 255), mode=mode, propagation=accept_all),
                           reference=volume > 100) for model in (one_by_one, batched)]
    assert runs[0].mask.any()
    assert np.array_equal(runs[0].mask, runs[1].mask)
    assert [s.method for s in runs[0].slices] == [s.method for s in runs[1].slices]
    assert set(single_sizes) == {1} and len(single_sizes) == 12
    # Every slice is encoded once either way: nothing is encoded past a slice already done.
    assert sum(batch_sizes) == 12 and max(batch_sizes) == 4
    assert len(batch_sizes) < len(single_sizes)


class GpuWithRoomForTwoSlices(Segmenter):
    """The real tiny SAM, and torch's OutOfMemoryError when asked to encode more than two slices at once."""

    def __init__(self, inner):
        self.inner, self.device, self.encode_batch = inner, torch.device("cuda"), 8

    def embed_images(self, images):
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return self.inner.embed_images(images)

    def set_image(self, image):
        self.inner.set_image(image)

    def propose(self, settings):
        return self.inner.propose(settings)

    def refine(self, boxes):
        return self.inner.refine(boxes)

    def use_embedding(self, embedding):
        self.inner.use_embedding(embedding)

    @property
    def embedding(self):
        return self.inner.embedding

    def expect_encodings(self, count):
        self.inner.expect_encodings(count)

    @property
    def encoder_runtime(self):
        return self.inner.encoder_runtime

    @property
    def decoder_runtime(self):
        return self.inner.decoder_runtime


def test_out_of_gpu_memory_while_encoding_halves_the_slices_per_call_first(tiny_sam, tiny_sam_checkpoint):
    volume = _stack(9)
    reference = create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)
    expected = segment_volume(volume, reference, OracleScorer(), ["x"],
                              VolumeSettings(proposal=PROPOSALS, window=(0, 255)), reference=volume > 100)
    small = GpuWithRoomForTwoSlices(create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint))
    result = segment_volume(volume, small, OracleScorer(), ["x"], VolumeSettings(proposal=PROPOSALS, window=(0, 255)),
                            reference=volume > 100)
    assert result.notices == ["Out of GPU memory: retried encoding 4 slices per call.",
                              "Out of GPU memory: retried encoding 2 slices per call."]
    assert small.encode_batch == 2 and np.array_equal(result.mask, expected.mask)


def test_the_key_interval_default_is_the_same_everywhere():
    """The command line and the effect's time estimate mirror the runner's default without importing torch."""
    from SaLIPSegmentLib import effect_options
    from SaLIPSegmentLib.cli import build_parser
    from SaLIPSegmentLib.pipeline import SegmentSettings

    default = PropagationSettings().key_interval
    assert effect_options.KEY_SLICE_INTERVAL == default
    assert SegmentSettings.__dataclass_fields__["key_interval"].default == default
    assert build_parser().parse_args(["segment", "x.nrrd", "-p", "brain", "-o", "y"]).key_interval == default
    distance = PropagationSettings().key_distance_mm
    assert SegmentSettings.__dataclass_fields__["key_distance_mm"].default == distance
    assert build_parser().parse_args(["segment", "x.nrrd", "-p", "brain", "-o", "y"]).key_distance == distance


def test_thick_slices_get_key_slices_at_most_the_key_distance_apart():
    rules = PropagationSettings(key_interval=16, key_distance_mm=24.0)
    assert [rules.interval_for(mm) for mm in (0.5, 1.0, 1.5, 2.0, 3.0, 6.5, 30.0)] == [16, 16, 16, 12, 8, 3, 1]
    assert rules.interval_for(None) == 16 and rules.interval_for(0.0) == 16  # thickness unknown: slices only
    assert PropagationSettings(key_interval=16, key_distance_mm=None).interval_for(6.5) == 16
    assert PropagationSettings(key_interval=2, key_distance_mm=24.0).interval_for(3.0) == 2  # never fewer keys
    settings = VolumeSettings(propagation=rules).for_thickness(3.0)
    assert settings.propagation.key_interval == 8 and settings.for_thickness(3.0) == settings
    assert settings.slice_thickness_mm == 3.0  # the edge flags' depth in slices follows it (quality.py)


# -- the runner's steps, one at a time ----------------------------------------------------------


def test_key_slices_are_placed_over_the_slices_with_tissue_not_over_the_range(segmenter):
    volume = _stack(9)
    volume[:2] = 0.0  # air before the organ: no key slice is spent there
    accept_all = PropagationSettings(key_interval=3, max_iou_drop=1e9, min_area_ratio=0.0)
    runner = VolumeRunner(volume, segmenter, OracleScorer(), ["x"],
                          VolumeSettings(proposal=PROPOSALS, window=(0, 255), propagation=accept_all),
                          reference=volume > 100)
    result = runner.run()
    assert runner.tissue == list(range(2, 9))
    keys = [runner.tissue[k] for k in key_positions(len(runner.tissue), 3)]
    assert keys == [2, 5, 8]  # over the whole range they would be 0, 3, 5 and 8
    assert [s.index for s in result.slices if s.method == "cascade"] == keys
    assert [s.reason for s in result.slices[:2]] == [NO_TISSUE] * 2


def test_a_chain_stops_at_its_first_refusal_and_keeps_the_embeddings_it_made(segmenter):
    volume = _stack(6)
    for rules, accepted in ((PropagationSettings(max_iou_drop=-1e9), []),
                            (PropagationSettings(max_iou_drop=1e9, min_area_ratio=0.0), [1, 2, 3])):
        runner = VolumeRunner(volume, segmenter, OracleScorer(), ["x"],
                              VolumeSettings(proposal=PROPOSALS, window=(0, 255), propagation=rules),
                              reference=volume > 100)
        runner.find_tissue()
        assert runner.cascade(0, runner._image(0))  # the key slice the chain starts from
        chain, refusal = runner.chain(1, 3, 1)
        assert sorted(chain) == accepted
        assert (refusal[0] if refusal else None) == (None if accepted else 1)  # the refused slice and its attempt
        assert sorted(runner.kept) == (accepted or [1])  # a refused slice's encoding serves the other chain
        assert all(k not in runner.records for k in (1, 2, 3))  # a chain writes nothing itself


class OneWrongChain(VolumeRunner):
    """Real encodings and refine calls, but what a chain hands on is set: a chain from slice 0 (a key
    slice whose cascade took another object) carries a corner square; chains from anywhere else carry
    the target, and the one from the last key slice is refused on slice 4 (as if its mask shrank)."""

    cascaded = ()

    def cascade(self, index, *args, **kwargs):
        self.cascaded += (index,)
        return super().cascade(index, *args, **kwargs)

    def attempt(self, index, source, upcoming=()):
        result = super().attempt(index, source, upcoming)
        wrong = np.zeros(self.shape, bool)
        wrong[:6, :6] = True
        parts = [wrong] if source.anchor == 0 else [self._reference(index)]
        refused = "area" if source.anchor == self.tissue[-1] and index == 4 else None
        found = _Found(parts, [], [0.9], source.anchor)
        return _Attempt(result.pixels, parts, [0.9], [], refused, result.seconds, found)


def test_where_one_chain_is_refused_but_ranks_above_the_other_the_slice_gets_the_cascade_and_splits(segmenter):
    volume = _stack(7)
    reference = volume > 100
    rules = PropagationSettings(key_interval=6)  # key slices 0 and 6
    runner = OneWrongChain(volume, segmenter, OracleScorer(), ["x"],
                           VolumeSettings(proposal=PROPOSALS, window=(0, 255), propagation=rules,
                                          presence=PresenceSettings(enabled=False)), reference=reference)
    result = runner.run()
    assert runner.cascaded == (0, 6, 4)  # the key slices, then the contested one
    # The refused result ranks above the cascade's there (the tiny model's mask is not the target): it
    # is kept, and the slices below take the chain from it, not the wrong one from slice 0.
    assert [s.method for s in result.slices] == ["cascade"] + ["propagated"] * 5 + ["cascade"]
    for k in (1, 2, 3, 4, 5):
        np.testing.assert_array_equal(result.mask[k], reference[k])

    def tried(parts):  # one chain's result on slice 2, as the oracle will rank it
        return _Attempt(runner._image(2), parts, [0.9], [], None, {}, _Found(parts, [], [0.9], 0))

    corner = np.zeros(runner.shape, bool)
    corner[:6, :6] = True
    target, other = tried([runner._reference(2)]), tried([corner])
    assert runner.contested((2, target), {2: other}) == (2, target)
    assert runner.contested((2, other), {2: target}) is None  # the refused result ranks lower: the other chain stays
    assert runner.contested((2, target), {}) is None and runner.contested(None, {2: other}) is None


def test_a_propagated_result_is_judged_on_area_then_predicted_iou_and_never_scored_by_the_oracle(segmenter):
    volume = _stack(3)
    runner = VolumeRunner(volume, segmenter, OracleScorer(), ["x"], VolumeSettings(proposal=PROPOSALS),
                          reference=volume > 100)
    source = _Found(parts=[np.ones((8, 8), bool)], anchor_scores=[90.0], anchor_ious=[0.9])
    small, large = np.zeros((8, 8), bool), np.ones((8, 8), bool)
    small[:2, :2] = True  # 4 of the source's 64 pixels: under the minimum area ratio (0.2)
    pixels = np.zeros((8, 8), np.uint8)
    assert runner.judge(pixels, [small], [0.95], source, {}) == ("area", [])
    assert runner.judge(pixels, [large], [0.7], source, {}) == ("predicted IoU", [])
    seconds = {}
    assert runner.judge(pixels, [large], [0.85], source, seconds) == (None, [])
    assert seconds == {}  # the oracle would judge with the reference: nothing was scored


def test_the_interfaces_defaults_are_enough_for_a_propagated_run(segmenter):
    volume = _stack(9)
    accept_all = PropagationSettings(key_interval=4, max_iou_drop=1e9, min_area_ratio=0.0)
    settings = VolumeSettings(proposal=PROPOSALS, window=(0, 255), propagation=accept_all)
    plain = ThreeRolesOnly(segmenter.inner)
    result = segment_volume(volume, plain, OracleScorer(), ["x"], settings, reference=volume > 100)
    expected = segment_volume(volume, segmenter, OracleScorer(), ["x"], settings, reference=volume > 100)
    assert np.array_equal(result.mask, expected.mask) and result.mask.any()
    # Without an embedding to keep, the second chain between key slices encodes its slices again.
    assert plain.encodings == 9 + 6
    assert (result.encoder_runtime, result.decoder_runtime) == ("torch", "torch")


def test_the_memory_fallback_gives_up_slices_then_batches_then_the_gpu_and_tells_the_models():
    class Model(Segmenter):
        set_image = propose = refine = None

        def __init__(self):
            self.device, self.encode_batch = torch.device("cuda"), 8

    model, scorer = Model(), OracleScorer()
    fallback = MemoryFallback(model, scorer, ProposalSettings(points_per_batch=16))
    out_of_memory = torch.OutOfMemoryError("CUDA out of memory")
    steps = []
    while fallback.recover(out_of_memory):
        steps.append((fallback.encode_batch, fallback.proposal.points_per_batch, model.device.type))
    assert steps == [(4, 16, "cuda"), (2, 16, "cuda"), (1, 16, "cuda"), (1, 8, "cuda"), (1, 4, "cuda"),
                     (1, 4, "cpu")]
    assert model.encode_batch == 1 and scorer.max_batch == 4 and scorer.device.type == "cpu"
    assert not fallback.recover(ValueError("not a memory error"))

"""The shape steps (shape.py): each does what its name says, on synthetic masks and the tiny models."""

from typing import List

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.cascade import segment_slice
from SaLIPSegmentLib.imaging import gray_to_rgb, mask_to_box
from SaLIPSegmentLib.models import OracleScorer, ProposalSettings, create_segmenter
from SaLIPSegmentLib.models.base import Candidate, RefinedMask, Scorer, Segmenter
from SaLIPSegmentLib.settings import PropagationSettings, ShapeSettings, VolumeSettings
from SaLIPSegmentLib.shape import (
    context_border,
    fill_closed_holes,
    iterate_refine,
    refine_in_shape,
    refine_with_context,
    refine_zoomed,
    unite_parts,
    zoom_window,
)
from SaLIPSegmentLib.volume import segment_volume

from conftest import TINY_SAM_PROPOSALS, disk_image

SIZE = 48


def box_mask(box, shape=(SIZE, SIZE)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def ring(box, shape=(SIZE, SIZE), wall=3) -> np.ndarray:
    """A closed square outline inside `box`: a hole in the middle."""
    x0, y0, x1, y1 = box
    inner = box_mask((x0 + wall, y0 + wall, x1 - wall, y1 - wall), shape)
    return box_mask(box, shape) & ~inner


def candidate(mask) -> Candidate:
    return Candidate(mask=mask, box=mask_to_box(mask), predicted_iou=0.9, stability=0.95)


class GrowingRefiner:
    """A refine step whose mask is the box grown by `step` pixels, clipped to a target square."""

    def __init__(self, target=(10, 10, 37, 37), step=4):
        self.target, self.step, self.calls = target, step, 0

    def __call__(self, boxes) -> List[RefinedMask]:
        self.calls += 1
        found = []
        for x0, y0, x1, y1 in boxes:
            grown = (max(self.target[0], x0 - self.step), max(self.target[1], y0 - self.step),
                     min(self.target[2], x1 + self.step), min(self.target[3], y1 + self.step))
            found.append(RefinedMask(mask=box_mask(grown), box=(x0, y0, x1, y1), predicted_iou=0.9))
        return found


# -- refine_rounds ---------------------------------------------------------------------------

def test_iterating_grows_a_fragment_to_the_whole_and_stops_when_the_box_holds():
    refine = GrowingRefiner(step=4)
    first = refine([(20, 20, 24, 24)])
    parts, calls = iterate_refine(refine, first, rounds=10, tolerance=0)
    assert mask_to_box(parts[0].mask) == (10, 10, 37, 37)  # the whole target, not the fragment
    # Masks 16..28 -> 12..32 -> 10..36 -> 10..37 -> 10..37: the fifth mask's box is the box that prompted it.
    assert calls == 4 and refine.calls == 5
    assert iterate_refine(refine, first, rounds=10, tolerance=1)[1] == 3  # 10..36 to 10..37 is within 1 pixel


def test_iterating_stops_at_the_cap_when_the_box_keeps_moving():
    refine = GrowingRefiner(target=(0, 0, SIZE - 1, SIZE - 1), step=2)
    parts, calls = iterate_refine(refine, refine([(22, 22, 24, 24)]), rounds=2, tolerance=0)
    assert calls == 2 and mask_to_box(parts[0].mask) == (16, 16, 30, 30)


def test_no_rounds_or_a_box_within_tolerance_costs_no_decoder_call():
    refine = GrowingRefiner(step=1)
    first = refine([(20, 20, 24, 24)])
    assert iterate_refine(refine, first, rounds=0, tolerance=0)[1] == 0
    assert iterate_refine(refine, first, rounds=5, tolerance=1)[1] == 0  # the box moved by 1 pixel
    assert refine.calls == 1


def test_an_empty_answer_keeps_the_last_mask():
    first = [RefinedMask(mask=box_mask((5, 5, 9, 9)), box=(0, 0, 20, 20), predicted_iou=0.8)]
    parts, calls = iterate_refine(lambda boxes: [RefinedMask(np.zeros((SIZE, SIZE), bool), b, 0.1) for b in boxes],
                                  first, rounds=3, tolerance=0)
    assert calls == 1 and parts[0] is first[0]


# -- unite_parts -----------------------------------------------------------------------------

LEFT, RIGHT, FAR = box_mask((8, 10, 22, 30)), box_mask((23, 10, 36, 30)), box_mask((40, 40, 46, 46))


class CountingOracle(OracleScorer):
    def __init__(self):
        self.calls = 0

    def score(self, image_rgb, candidates, sentences, reference=None):
        self.calls += 1
        return super().score(image_rgb, candidates, sentences, reference)


def test_a_union_is_kept_only_when_the_same_scorer_ranks_it_higher():
    candidates = [candidate(LEFT), candidate(FAR), candidate(RIGHT)]
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    scorer = CountingOracle()
    reference = LEFT | RIGHT
    scores = scorer.score(image, candidates, ["x"], reference)
    union = unite_parts(image, candidates, scores, 0, scorer, ["x"], ShapeSettings(unite_parts=True),
                        reference=reference)
    assert union.members == [0, 2]  # the right half joins; the far blob would lower the score
    np.testing.assert_array_equal(union.mask, LEFT | RIGHT)
    assert union.score == pytest.approx(100.0)
    assert union.scorer_calls == 2 == scorer.calls - 1  # a second round found nothing better: stop
    alone = unite_parts(image, candidates, scorer.score(image, candidates, ["x"], LEFT), 0, scorer, ["x"],
                        ShapeSettings(unite_parts=True), reference=LEFT)
    assert alone.members == [0] and alone.scorer_calls == 1
    np.testing.assert_array_equal(alone.mask, LEFT)


def test_a_union_respects_the_cap_and_the_parts_other_retrievals_took():
    strips = [candidate(box_mask((4 * i, 0, 4 * i + 3, 20))) for i in range(6)]
    reference = np.logical_or.reduce([c.mask for c in strips])
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    scorer = OracleScorer()
    scores = scorer.score(image, strips, ["x"], reference)
    settings = ShapeSettings(unite_parts=True, union_max_added=2)
    union = unite_parts(image, strips, scores, 0, scorer, ["x"], settings, reference=reference, exclude=[1])
    assert len(union.members) == 3 and 1 not in union.members


class UnionLover(Scorer):
    """Scores each crop by its area: every union scores higher, as a noisy score's best of several may."""

    def score(self, image_rgb, candidates, sentences, reference=None):
        return np.asarray([c.area for c in candidates], dtype=float)


def test_a_part_apart_from_the_union_never_joins_it_however_it_scores():
    small = box_mask((2, 2, 9, 9))  # 8 x 8: equivalent diameter 9 px, so a gap of at most 4.5 px at 0.5
    touching, near, apart = box_mask((10, 2, 17, 9)), box_mask((2, 13, 9, 20)), box_mask((30, 30, 40, 40))
    candidates = [candidate(small), candidate(apart), candidate(near), candidate(touching)]
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    scorer = UnionLover()
    scores = scorer.score(image, candidates, ["x"])
    union = unite_parts(image, candidates, scores, 0, scorer, ["x"], ShapeSettings(union_max_gap=0.5))
    assert sorted(union.members) == [0, 2, 3]  # the touching and the near part (3 px away), not the one apart
    everything = unite_parts(image, candidates, scores, 0, scorer, ["x"], ShapeSettings(union_max_gap=10.0))
    assert sorted(everything.members) == [0, 1, 2, 3]


class UnionDisliker(Scorer):
    """Scores each crop by how little of the image it covers: any union scores lower."""

    def score(self, image_rgb, candidates, sentences, reference=None):
        return np.asarray([-c.area for c in candidates], dtype=float)


def test_the_cascade_refines_the_union_box_only_where_the_scorer_prefers_the_union(segmenter):
    image = disk_image()
    plain = segment_slice(image, segmenter, UnionDisliker(), ["x"], proposal=PROPOSALS,
                          shape=ShapeSettings(unite_parts=False))
    united = segment_slice(image, segmenter, UnionDisliker(), ["x"], proposal=PROPOSALS,
                           shape=ShapeSettings(unite_parts=True))
    assert united.boxes == plain.boxes
    np.testing.assert_array_equal(united.mask, plain.mask)
    with_oracle = segment_slice(image, segmenter, OracleScorer(), ["x"], proposal=PROPOSALS, reference=image > 100,
                                shape=ShapeSettings(unite_parts=True), keep_candidates=True)
    alone = segment_slice(image, segmenter, OracleScorer(), ["x"], proposal=PROPOSALS, reference=image > 100,
                          shape=ShapeSettings(unite_parts=False), keep_candidates=True)
    assert with_oracle.clip_scores[0] >= alone.clip_scores[0]
    # What prompted the refine is kept for the QA's agreement signal: the union, or the candidate itself.
    np.testing.assert_array_equal(alone.retrieved_masks[0], alone.candidates[alone.retrieved[0]].mask)
    united_box = with_oracle.boxes[0]
    ys, xs = np.nonzero(with_oracle.retrieved_masks[0])
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == tuple(united_box)
    scores = OracleScorer().score(gray_to_rgb(image), with_oracle.candidates, ["x"], reference=image > 100)
    assert with_oracle.candidates_median_score == pytest.approx(float(np.median(scores)))


# -- fill_holes ------------------------------------------------------------------------------

def test_holes_are_filled_only_inside_a_closed_outline():
    closed = ring((10, 10, 30, 30))
    np.testing.assert_array_equal(fill_closed_holes(closed), box_mask((10, 10, 30, 30)))
    opened = closed.copy()
    opened[18:22, 27:31] = False  # a gap in the right wall: a C, not a hole
    np.testing.assert_array_equal(fill_closed_holes(opened), opened)
    at_border = ring((0, 10, 20, 30))
    at_border[14:26, 0:3] = False  # the hole reaches the image's edge
    np.testing.assert_array_equal(fill_closed_holes(at_border), at_border)
    assert not fill_closed_holes(np.zeros((SIZE, SIZE), bool)).any()


# -- context padding -------------------------------------------------------------------------

class BoxPainter(Segmenter):
    """Refines a box into exactly its pixels on the current image; remembers the images it was given."""

    def __init__(self):
        self.images, self.boxes, self._embedding = [], [], None

    def set_image(self, image):
        self.images.append(image.shape)
        self._embedding = ("embedding", image.shape)

    @property
    def embedding(self):
        return self._embedding

    def use_embedding(self, embedding):
        self._embedding = embedding

    def propose(self, settings):
        return []

    def refine(self, boxes):
        self.boxes.append(list(boxes))
        return [RefinedMask(mask=box_mask(b, self._embedding[1][:2]), box=b, predicted_iou=0.9) for b in boxes]


def test_padding_maps_boxes_and_masks_back_to_the_slices_pixels():
    painter = BoxPainter()
    image = np.zeros((40, SIZE, 3), np.uint8)
    painter.set_image(image)
    own = painter.embedding
    border = context_border(image.shape[:2], 0.25)
    assert border == 12
    refine, restore = refine_with_context(painter, image, border)
    assert painter.images[-1] == (40 + 24, SIZE + 24, 3)
    found = refine([(3, 5, 20, 30)])
    assert painter.boxes[-1] == [(15, 17, 32, 42)]  # shifted into the padded frame
    np.testing.assert_array_equal(found[0].mask, box_mask((3, 5, 20, 30), (40, SIZE)))
    restore()
    assert painter.embedding is own


def test_a_zoom_window_shows_small_boxes_enlarged_and_stays_inside_the_slice():
    shape = (200, 240)
    assert zoom_window(shape, [(100, 100, 109, 109)], 4, 16) == (85, 85, 125, 125)  # 4 x the box, centred
    assert zoom_window(shape, [(100, 100, 101, 101)], 4, 16) == (93, 93, 109, 109)  # at least min_side
    assert zoom_window(shape, [(0, 190, 9, 199)], 4, 16) == (0, 160, 40, 200)  # moved inside at a corner
    assert zoom_window(shape, [(10, 10, 19, 19), (40, 30, 49, 39)], 2, 16) == (0, 0, 80, 80)  # the union
    assert zoom_window(shape, [(100, 100, 130, 130)], 4, 16) is None  # 124 px: less than twice enlarged
    assert zoom_window(shape, [(100, 100, 109, 109)], 0, 16) is None  # off


def test_zooming_maps_boxes_into_the_window_and_masks_back_to_the_slices_pixels():
    painter = BoxPainter()
    image = np.zeros((60, 80, 3), np.uint8)
    painter.set_image(image)
    own = painter.embedding
    refine, restore = refine_zoomed(painter, image, (20, 10, 52, 42))
    assert painter.images[-1] == (32, 32, 3)  # the window alone is encoded
    found = refine([(30, 15, 40, 25)])
    assert painter.boxes[-1] == [(10, 5, 20, 15)]  # moved into the window's frame
    assert found[0].box == (30, 15, 40, 25)
    np.testing.assert_array_equal(found[0].mask, box_mask((30, 15, 40, 25), (60, 80)))
    restore()
    assert painter.embedding is own


def test_refine_in_shape_restores_the_slices_embedding_and_fills_after_the_rounds(segmenter):
    image = gray_to_rgb(disk_image())
    segmenter.set_image(image)
    own = segmenter.embedding
    shaped = refine_in_shape(segmenter, image, [(10, 10, 40, 40)],
                             ShapeSettings(context_padding=0.5, refine_rounds=2, fill_holes=True))
    assert segmenter.embedding is own
    assert shaped.parts[0].mask.shape == image.shape[:2]
    assert set(shaped.seconds) == {"encode", "refine"} and 1 <= shaped.decoder_calls <= 3
    np.testing.assert_array_equal(shaped.parts[0].mask, fill_closed_holes(shaped.parts[0].mask))


# -- through the volume runner: cascade and propagated slices alike -----------------------------

class RingSegmenter(Segmenter):
    """Proposes one ring and refines any box into the ring it contains (a mask with a closed hole)."""

    def set_image(self, image):
        self.shape = image.shape[:2]

    def propose(self, settings):
        return [candidate(ring((10, 10, 30, 30), self.shape))]

    def refine(self, boxes):
        return [RefinedMask(mask=ring(tuple(int(v) for v in b), self.shape), box=b, predicted_iou=0.9) for b in boxes]


class Constant(Scorer):
    scores_like_clip = True

    def score(self, image_rgb, candidates, sentences, reference=None):
        return np.full(len(candidates), 25.0)


@pytest.mark.parametrize("mode", ["propagate", "every-slice"])
def test_propagated_and_cascade_slices_take_the_same_shape_steps(mode):
    volume = np.zeros((6, SIZE, SIZE), np.float32)
    volume[:, 5:40, 5:40] = 100.0
    filled = ShapeSettings(fill_holes=True)
    result = segment_volume(volume, RingSegmenter(), Constant(), ["x"], VolumeSettings(mode=mode, shape=filled))
    methods = {r.method for r in result.slices}
    assert methods == ({"cascade", "propagated"} if mode == "propagate" else {"cascade"})
    for index in range(6):
        assert result.mask[index].any()
        np.testing.assert_array_equal(result.mask[index], fill_closed_holes(result.mask[index]))
    raw = segment_volume(volume, RingSegmenter(), Constant(), ["x"], VolumeSettings(mode=mode))
    assert all(not np.array_equal(raw.mask[i], fill_closed_holes(raw.mask[i])) for i in range(6))


PROPOSALS = ProposalSettings.from_dict(TINY_SAM_PROPOSALS)


@pytest.fixture(scope="module")
def segmenter(tiny_sam, tiny_sam_checkpoint):
    return create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)


# -- one path from the command line, batch and the Slicer worker --------------------------------

def test_the_command_line_and_the_worker_build_the_same_shape_settings():
    from SaLIPSegmentLib.cli import build_parser
    from SaLIPSegmentLib.errors import InputError
    from SaLIPSegmentLib.pipeline import (
        SHAPE_STEPS_OFF,
        ZOOM_FIELDS,
        apply_profile,
        evaluation_settings,
        settings_from_args,
    )
    from SaLIPSegmentLib.worker import settings_from_request

    args = build_parser().parse_args(["segment", "in.nii", "-o", "out.seg.nrrd", "-p", "brain", "--profile", "fast",
                                      "--clip", "oracle", "--refine-rounds", "3", "--unite-parts",
                                      "--fill-part-holes", "--context-padding", "0.3", "--union-max-gap", "0.5"])
    from_cli = settings_from_args(args)
    expected = ShapeSettings(unite_parts=True, refine_rounds=3, fill_holes=True, context_padding=0.3,
                             union_max_gap=0.5)
    assert from_cli.shape == expected and from_cli.volume_settings(0, None).shape == expected
    request = {"prompt": "brain", "sam": "litemedsam", "clip": "oracle"}
    from_worker = settings_from_request({**request, "shape": {"unite_parts": True, "refine_rounds": 3,
                                                              "fill_holes": True, "context_padding": 0.3,
                                                              "union_max_gap": 0.5}})
    assert from_worker.shape == expected
    plain = settings_from_request(request)
    assert plain.shape == ShapeSettings() and plain.shape.unite_parts  # the measured default (RESULTS.md)
    assert plain.fingerprint() == settings_from_request({**request, "shape": {}}).fingerprint()
    assert from_worker.fingerprint() != plain.fingerprint()
    # Every step off is how masks were made before the steps existed: those batch folders stay done.
    import hashlib
    import json
    from dataclasses import replace

    off = replace(plain, shape=SHAPE_STEPS_OFF, presence=False)
    before = off.describe()
    for key in ("device", "precision", "model_dir", "presence", "shape"):
        before.pop(key)
    assert off.fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    # Zoom off (the default) is how masks were made before it existed: those folders stay done too.
    now = plain.describe()
    for key in ("device", "precision", "model_dir"):
        now.pop(key)
    for name in ZOOM_FIELDS:
        now["shape"].pop(name)
    assert plain.fingerprint() == hashlib.sha256(json.dumps(now, sort_keys=True).encode()).hexdigest()
    assert replace(plain, shape=ShapeSettings(zoom_factor=2.5)).fingerprint() != plain.fingerprint()
    with pytest.raises(InputError, match="Unknown shape settings: roundz"):
        settings_from_request({**request, "shape": {"roundz": 1}})
    negative = build_parser().parse_args(["segment", "in.nii", "-o", "o.seg.nrrd", "-p", "brain", "--profile", "fast",
                                          "--refine-rounds", "-1"])
    with pytest.raises(InputError, match="must not be negative"):
        settings_from_args(negative)
    evaluate = build_parser().parse_args(["evaluate", "in.nii", "ref.nii", "-p", "brain", "--profile", "fast",
                                          "--refine-rounds", "2"])
    apply_profile(evaluate)
    assert evaluation_settings(evaluate, 1).shape == ShapeSettings(refine_rounds=2)


# -- zoom, with LiteMedSAM's real weights on the real template --------------------------------

def _benchmark_module(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "Benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_litemedsam_outlines_a_small_lesion_from_its_box_better_zoomed_in(mni152):
    """The evaluation volumes' textured lesion, on its four smallest slices (boxes 15 to 21 pixels on
    a 233-pixel slice), boxed as a user would: LiteMedSAM sees such a box a few tokens wide, and
    outlines it poorly unless the window around it is enlarged to its input."""
    from SaLIPSegmentLib.imaging import dice, robust_window, window_to_uint8
    from SaLIPSegmentLib.volume import grow_box

    t1, brain = mni152
    first = 58
    lesioned, lesion = _benchmark_module("make_eval_volumes").lesion(t1[first:92], brain[first:92], first_slice=first)
    smallest = [int(k) for k in np.flatnonzero(lesion.sum(axis=(1, 2)) > 100)[[0, 1, -2, -1]]]
    segmenter = create_segmenter("litemedsam", torch.device("cpu"), download=False)
    window = robust_window(t1)
    users_box = ShapeSettings(zoom_factor=PropagationSettings().hint_zoom_factor)  # as a correction's box is refined
    plain, zoomed = [], []
    for k in smallest:
        image = gray_to_rgb(window_to_uint8(lesioned[k], window))
        segmenter.set_image(image)
        box = grow_box(mask_to_box(lesion[k]), 0.1, image.shape[:2])
        for settings, found in ((ShapeSettings(zoom_factor=0), plain), (users_box, zoomed)):
            shaped = refine_in_shape(segmenter, image, [box], settings)
            found.append(dice(shaped.parts[0].mask, lesion[k]))
            assert ("encode" in shaped.seconds) == (settings.zoom_factor > 0)  # the window's own encoding
    assert min(z - p for z, p in zip(zoomed, plain)) > 0.05
    assert np.mean(zoomed) > np.mean(plain) + 0.2 and min(zoomed) > 0.6

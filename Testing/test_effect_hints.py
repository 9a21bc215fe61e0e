"""The effect's hint list and its geometry, without Qt (and a real MRML ROI through slicer-core)."""

import inspect

import numpy as np
import pytest
from test_slicer_bridge import OBLIQUE, _roi, oblique, ras_of, scene  # noqa: F401 (fixtures)

from SaLIPSegmentLib import effect_hints as eh
from SaLIPSegmentLib import slicer_bridge as bridge
from SaLIPSegmentLib.errors import InputError
from SaLIPSegmentLib.hints import HintGeometry, parse_hints


def test_a_box_from_world_points_is_their_in_plane_extent_on_the_slice():
    shape = (9, 14, 11)  # k, j, i
    corners_ijk = [(2.0, 3.0, 2.6), (8.0, 10.0, 3.4), (2.0, 10.0, 3.0), (8.0, 3.0, 3.0)]  # (i, j, k), ~slice 3
    world = np.array([ras_of(OBLIQUE, p) for p in corners_ijk])
    assert eh.slice_box_from_world(world, OBLIQUE, shape, 0, 3) == [2, 3, 8, 10]  # x along i, y along j
    # Across j (axis 1): x along i, y along k.
    assert eh.slice_box_from_world(world, OBLIQUE, shape, 1, 5) == [2, 3, 8, 3]
    # Reaching past the slice's edge: clipped; wholly outside: refused.
    far = np.array([ras_of(OBLIQUE, p) for p in [(-4.0, -2.0, 3.0), (5.0, 20.0, 3.0)]])
    assert eh.slice_box_from_world(far, OBLIQUE, shape, 0, 3) == [0, 0, 5, 13]
    outside = np.array([ras_of(OBLIQUE, p) for p in [(30.0, 1.0, 3.0), (40.0, 5.0, 3.0)]])
    with pytest.raises(InputError, match="outside the slice"):
        eh.slice_box_from_world(outside, OBLIQUE, shape, 0, 3)


def test_the_effects_box_is_the_engines_box_for_the_same_millimetres():
    """The effect sends pixels; a hints file may say RAS: both land on the same voxels."""
    shape = (9, 14, 11)
    world = np.array([ras_of(OBLIQUE, p) for p in [(2.0, 3.0, 4.0), (8.0, 10.0, 4.0)]])
    box = eh.slice_box_from_world(world, OBLIQUE, shape, 0, 4)
    geometry = HintGeometry(axis=0, slice_range=(0, 9), slice_shape=(14, 11), ijk_to_ras=OBLIQUE)
    [hint] = parse_hints([{"ras_box": world.tolist()}], geometry)
    assert hint.slice == 4 and list(hint.box) == box


def test_a_markups_roi_becomes_a_box_on_the_viewed_slice(scene, oblique):  # noqa: F811
    node, _ = oblique
    directions = OBLIQUE[:3, :3] / np.linalg.norm(OBLIQUE[:3, :3], axis=0)
    # 4.8 mm x 4.4 mm in plane (6 x 4 voxels of 0.8 x 1.1 mm) around voxel (5, 7), 6.6 mm thick.
    roi = _roi(scene, ras_of(OBLIQUE, (5, 7, 3)), (4.8, 4.4, 6.6), directions)
    assert bridge.hint_box_from_roi(node, roi, 0, 3) == [2, 5, 8, 9]


def test_points_from_world_are_the_ones_on_the_slice_in_its_pixels():
    shape = (9, 14, 11)  # k, j, i
    world = np.array([ras_of(OBLIQUE, p) for p in [(2.0, 3.0, 4.2), (8.0, 10.0, 3.7), (5.0, 5.0, 6.0)]])
    points, labels = eh.slice_points_from_world(world, [1, 0, 1], OBLIQUE, shape, 0, 4)
    np.testing.assert_allclose(points, [[2.0, 3.0], [8.0, 10.0]], atol=1e-6)  # x along i, y along j
    assert labels == [1, 0]
    with pytest.raises(InputError, match="No point lies on slice 5"):
        eh.slice_points_from_world(world, [1, 0, 1], OBLIQUE, shape, 0, 5)
    with pytest.raises(InputError, match="at least one label 1"):  # only points off the target on slice 4
        eh.slice_points_from_world(world, [0, 0, 1], OBLIQUE, shape, 0, 4)
    off_edge = np.array([ras_of(OBLIQUE, (20.0, 3.0, 4.0))])
    with pytest.raises(InputError, match="outside the slice"):
        eh.slice_points_from_world(off_edge, [1], OBLIQUE, shape, 0, 4)


def test_markups_point_lists_become_points_on_the_viewed_slice(scene, oblique):  # noqa: F811
    node, _ = oblique
    on, off = (scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name) for name in ("on", "off"))
    on.AddControlPoint(*ras_of(OBLIQUE, (5, 7, 3)))
    on.AddControlPoint(*ras_of(OBLIQUE, (5, 7, 6)))  # another slice: left out
    off.AddControlPoint(*ras_of(OBLIQUE, (1, 2, 3)))
    points, labels = bridge.hint_points_from_markups(node, on, off, 0, 3)
    np.testing.assert_allclose(points, [[5.0, 7.0], [1.0, 2.0]], atol=1e-3)
    assert labels == [1, 0]
    points, labels = bridge.hint_points_from_markups(node, on, None, 0, 6)
    np.testing.assert_allclose(points, [[5.0, 7.0]], atol=1e-3)
    assert labels == [1]


def test_points_need_a_segmenter_that_takes_them():
    box_only = eh.HintList(axis=0, slice_range=(0, 9), shape_kji=(9, 14, 11), segmenter_name="litemedsam")
    with pytest.raises(InputError, match="litemedsam takes boxes only"):
        box_only.set_points(3, [[2.0, 3.0]], [1])
    assert not box_only.hints
    sam = eh.HintList(axis=0, slice_range=(0, 9), shape_kji=(9, 14, 11), takes_points=True)
    sam.set_points(3, [[2.0, 3.0], [6.0, 1.0]], [1, 0])
    assert sam.request()["hints"] == [{"slice": 3, "points": [[2.0, 3.0], [6.0, 1.0]], "labels": [1, 0]}]
    assert sam.labels() == [(3, "Slice 3: 2 points (1 off the target) (new)")]


def test_the_hint_list_says_what_update_sends_and_what_is_new():
    hints = eh.HintList(axis=0, slice_range=(2, 10), shape_kji=(12, 14, 11))
    assert not hints.pending and hints.request() == {"type": "correct", "hints": []}
    hints.set_box(5, (1, 2, 6, 8))
    hints.set_absent(3)
    assert hints.pending
    assert hints.request()["hints"] == [{"slice": 3, "absent": True}, {"slice": 5, "box": [1, 2, 6, 8]}]
    assert hints.labels() == [(3, "Slice 3: no target (new)"), (5, "Slice 5: box 6 x 7 px (new)")]
    hints.mark_applied()
    assert not hints.pending and hints.labels()[0] == (3, "Slice 3: no target")
    hints.set_absent(5)  # replaces the box
    assert hints.pending and hints.request()["hints"][1] == {"slice": 5, "absent": True}
    hints.remove(5)
    hints.remove(7)  # nothing there: nothing happens
    assert hints.pending and [h["slice"] for h in hints.request()["hints"]] == [3]
    with pytest.raises(InputError, match="outside the previewed slices 2:10"):
        hints.set_absent(10)


def test_next_slice_to_fix_follows_the_qa_ranking_and_skips_hinted_slices():
    report = {"slices": [
        {"index": 2, "method": "cascade", "flags": [], "clip_scores": [30.0], "absent": None},
        {"index": 3, "method": "propagated", "flags": ["area jump"], "clip_scores": [28.0], "absent": None},
        {"index": 4, "method": "hint", "flags": [], "clip_scores": [], "absent": None},
        {"index": 5, "method": "cascade", "flags": ["low score", "area jump"], "clip_scores": [20.0],
         "absent": None},
        {"index": 6, "method": "skipped", "flags": [], "clip_scores": [], "absent": None},
    ]}
    assert eh.next_slice_to_fix(report) == 5
    hints = eh.HintList(axis=0, slice_range=(2, 7), shape_kji=(7, 10, 10))
    hints.set_absent(5)
    assert eh.next_slice_to_fix(report, hints) == 3
    hints.set_absent(3)
    hints.set_absent(2)
    assert eh.next_slice_to_fix(report, hints) is None


def test_effect_hints_import_without_torch():
    top_level = [line for line in inspect.getsource(eh).splitlines() if line.startswith(("import ", "from "))]
    assert not any("torch" in line or ".models" in line or ".volume" in line or ".corrections" in line
                   for line in top_level), top_level
    import SaLIPSegmentLib.hints as hints_module
    source = inspect.getsource(hints_module)
    assert "import torch" not in source and ".models" not in source and ".volume" not in source

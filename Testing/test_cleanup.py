"""3D clean-up: largest components, holes per slice, flagged slices from their neighbours; and the
one path every caller takes from a run to the mask the user gets."""

import numpy as np
import pytest

from SaLIPSegmentLib.cleanup import (
    clean_up,
    cleaned_run_mask,
    fill_from_neighbours,
    fill_holes_per_slice,
    keep_largest_components,
)
from SaLIPSegmentLib.settings import CleanupSettings, VolumeSettings
from SaLIPSegmentLib.volume import SliceRecord, VolumeResult


def ring_with_speck() -> np.ndarray:
    """Three axial slices of a square with a hole in its middle slice, and a speck apart from it."""
    mask = np.zeros((3, 9, 9), bool)
    mask[:, 1:6, 1:6] = True
    mask[1, 2:5, 2:5] = False  # 9 voxels enclosed in slice 1
    mask[2, 8, 8] = True
    return mask


def test_keep_largest_components_keeps_the_k_biggest_in_3d():
    mask = np.zeros((4, 10, 10), bool)
    mask[0:3, 0:4, 0:4] = True  # 48 voxels
    mask[1:3, 6:9, 6:9] = True  # 18 voxels
    mask[3, 9, 0] = True  # a speck
    one = keep_largest_components(mask, 1)
    assert one.sum() == 48 and not one[1, 7, 7]
    two = keep_largest_components(mask, 2)
    assert two.sum() == 66 and not two[3, 9, 0]
    assert keep_largest_components(np.zeros_like(mask)).sum() == 0


def test_fill_holes_per_slice_along_the_axis():
    mask = np.zeros((3, 7, 7), bool)
    mask[1, 1:6, 1:6] = True
    mask[1, 3, 3] = False  # a hole inside slice 1 (axis 0)
    assert fill_holes_per_slice(mask, axis=0)[1, 3, 3]
    # Along axis 2 the same voxel is not enclosed within its slice: it stays empty.
    assert not fill_holes_per_slice(mask, axis=2)[1, 3, 3]


def test_fill_from_neighbours_replaces_only_slices_with_two_segmented_neighbours():
    mask = np.zeros((5, 6, 6), bool)
    mask[0, 1:5, 1:5] = True
    mask[1, 0, 0] = True  # the flagged slice: a stray voxel
    mask[2, 2:5, 2:5] = True
    mask[4, 0:2, 0:2] = True
    fixed = fill_from_neighbours(mask, [1, 4], axis=0)
    np.testing.assert_array_equal(fixed[1], mask[0] & mask[2])
    np.testing.assert_array_equal(fixed[4], mask[4])  # no neighbour beyond the last slice
    np.testing.assert_array_equal(fixed[[0, 2, 3]], mask[[0, 2, 3]])


def test_clean_up_by_default_fills_enclosed_holes_and_nothing_else():
    mask = ring_with_speck()
    cleaned = clean_up(mask, CleanupSettings(), axis=0)
    assert cleaned[1, 2:5, 2:5].all() and cleaned.sum() == mask.sum() + 9
    assert cleaned[2, 8, 8]  # a part apart from the rest stays: removing parts is not a default
    assert not mask[1, 3, 3]  # the caller's mask is not changed
    np.testing.assert_array_equal(clean_up(mask, CleanupSettings(fill_holes=False), axis=0), mask)


def test_clean_up_with_every_step_on_keeps_what_each_step_leaves():
    mask = ring_with_speck()
    mask[0] = False
    mask[0, 0, 0] = True  # flagged slice 0 has no segmented neighbour before it: it stays
    every_step = CleanupSettings(fill_flagged=True, fill_holes=True, keep_largest=True)
    cleaned = clean_up(mask, every_step, axis=0, flagged=[0, 1])
    # Flagged slice 1 became what slices 0 and 2 agree on: nothing, so it has no hole left to fill;
    # then only the largest component stays: slice 2's square, not its speck nor slice 0's.
    assert not cleaned[1].any() and cleaned[2, 1:6, 1:6].all()
    assert cleaned.sum() == 25


def test_cleaned_run_mask_applies_the_runs_settings_with_its_flagged_slices():
    mask = ring_with_speck()
    records = [SliceRecord(index=k, reason=None, flags=["area jump"] if k == 1 else []) for k in range(3)]
    result = VolumeResult(mask=mask, slices=records, axis=0, slice_range=(0, 3), window=(0, 1), seconds=1.0)
    assert cleaned_run_mask(result, VolumeSettings())[1, 3, 3]  # the default fills the hole
    neighbours = VolumeSettings(cleanup=CleanupSettings(fill_flagged=True, fill_holes=False))
    np.testing.assert_array_equal(cleaned_run_mask(result, neighbours)[1], mask[0] & mask[2])


def test_the_command_line_and_the_worker_fill_holes_by_default_and_both_can_turn_it_off():
    from SaLIPSegmentLib.cli import build_parser
    from SaLIPSegmentLib.pipeline import settings_from_args
    from SaLIPSegmentLib.worker import settings_from_request

    common = ["segment", "in.nii", "-o", "out.seg.nrrd", "-p", "brain", "--profile", "fast"]
    for extra, expected in (([], True), (["--no-fill-holes"], False), (["--fill-holes"], True)):
        settings = settings_from_args(build_parser().parse_args(common + extra))
        assert settings.volume_settings(0, None).cleanup.fill_holes is expected
    request = {"prompt": "brain", "sam": "litemedsam", "clip": "oracle"}
    assert settings_from_request(request).volume_settings(0, None).cleanup == CleanupSettings()
    assert not settings_from_request({**request, "fill_holes": False}).fill_holes


def test_evaluation_measures_the_mask_the_user_gets():
    from SaLIPSegmentLib.evaluation import measure_run

    mask = ring_with_speck()
    mask[2, 8, 8] = False
    reference = fill_holes_per_slice(mask, 0)
    result = VolumeResult(mask=mask, slices=[SliceRecord(index=k, reason=None) for k in range(3)], axis=0,
                          slice_range=(0, 3), window=(0, 1), seconds=1.0)
    assert measure_run(result, reference, (1, 1, 1)).dice_volume == 1.0
    kept_holes = VolumeSettings(cleanup=CleanupSettings(fill_holes=False))
    assert measure_run(result, reference, (1, 1, 1), kept_holes).dice_volume == pytest.approx(2 * 66 / (66 + 75))

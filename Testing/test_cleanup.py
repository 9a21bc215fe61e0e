"""3D clean-up: largest components, holes per slice, flagged slices from their neighbours."""

import numpy as np

from SaLIPSegmentLib.cleanup import fill_from_neighbours, fill_holes_per_slice, keep_largest_components


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

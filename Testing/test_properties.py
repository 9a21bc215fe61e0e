"""Property-based tests: random shapes, spacings, directions and slice ranges.

Whatever the input, the mask has the input's shape, lands on the input's geometry, and the
only errors are the documented ones.
"""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from SaLIPSegmentLib.errors import InputError
from SaLIPSegmentLib.io import read_image, write_segmentation
from SaLIPSegmentLib.models import OracleScorer, ProposalSettings, create_segmenter
from SaLIPSegmentLib.settings import VolumeSettings
from SaLIPSegmentLib.volume import segment_volume

from conftest import TINY_SAM_PROPOSALS
from slicer_mrml import read_segments_on_reference

PROPOSALS = ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "points_per_side": 2})
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def segmenter(tiny_sam, tiny_sam_checkpoint):
    return create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)


shapes = st.tuples(st.integers(1, 5), st.integers(1, 24), st.integers(1, 24))


@SETTINGS
@given(shape=shapes, axis=st.integers(-3, 2), seed=st.integers(0, 2**16),
       start=st.integers(-6, 6), length=st.integers(-2, 6), mode=st.sampled_from(["propagate", "every-slice"]))
def test_the_runner_keeps_the_shape_or_raises_a_documented_error(segmenter, shape, axis, seed, start, length, mode):
    volume = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    try:
        result = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                                VolumeSettings(axis=axis, proposal=PROPOSALS, slice_range=(start, start + length),
                                               mode=mode), reference=volume > 0)
    except InputError:
        return  # documented: bad range, no contrast
    assert result.mask.shape == volume.shape and result.mask.dtype == bool
    first, stop = result.slice_range
    outside = np.delete(np.moveaxis(result.mask, result.axis, 0), np.s_[first:stop], axis=0)
    assert not outside.any()


def _rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(st.integers(1, 4), st.integers(2, 9), st.integers(2, 9)),
       spacing=st.tuples(*[st.floats(0.2, 5.0)] * 3), origin=st.tuples(*[st.floats(-200, 200)] * 3),
       angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3), left_handed=st.booleans(), seed=st.integers(0, 2**16))
def test_any_geometry_lands_voxel_exactly_in_slicer(tmp_path_factory, shape, spacing, origin, angles, left_handed,
                                                     seed):
    # A folder per example: Slicer's archetype reader would take v0.nrrd, v1.nrrd, ... for a series.
    folder = tmp_path_factory.mktemp("geometry")
    volume_path = folder / "volume.nrrd"
    image = sitk.GetImageFromArray(np.zeros(shape, np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    direction = _rotation(angles) @ np.diag([1, 1, -1 if left_handed else 1])
    image.SetDirection(direction.flatten().tolist())
    sitk.WriteImage(image, str(volume_path))
    mask = np.random.default_rng(seed).random(shape) > 0.6
    write_segmentation(folder / "mask.seg.nrrd", mask, read_image(volume_path), "Part", (1, 0, 0))
    masks, _ = read_segments_on_reference(folder / "mask.seg.nrrd", volume_path)
    np.testing.assert_array_equal(masks["Part"], mask)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(st.integers(1, 5), st.integers(2, 12), st.integers(2, 12)),
       spacing=st.tuples(*[st.floats(0.2, 5.0)] * 3), origin=st.tuples(*[st.floats(-200, 200)] * 3),
       angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3), left_handed=st.booleans(), axis=st.integers(0, 2),
       index=st.integers(-2, 13), half_width=st.integers(-1, 4), seed=st.integers(0, 2**16))
def test_the_mrml_bridge_keeps_any_geometry_and_slice_range(segmenter, shape, spacing, origin, angles, left_handed,
                                                            axis, index, half_width, seed):
    """Volume node -> numpy -> runner on a range around a slice -> segment, read back by Slicer's own export."""
    from SaLIPSegmentLib import slicer_bridge as bridge

    from slicer_mrml import add_volume, new_scene, segment_array_on_reference

    scene = new_scene()
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(angles) @ np.diag([1, 1, -1 if left_handed else 1]) @ np.diag(spacing)
    matrix[:3, 3] = origin
    volume = np.random.default_rng(seed).normal(100, 50, size=shape).astype(np.float32)
    node = add_volume(scene, volume, matrix)
    array, geometry = bridge.volume_to_numpy(node)
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(geometry.ijk_to_world, matrix, atol=1e-9)
    try:
        slice_range = bridge.range_around(index, half_width, array.shape[axis])
        result = segment_volume(array, segmenter, OracleScorer(), ["x"],
                                VolumeSettings(axis=axis, slice_range=slice_range, proposal=PROPOSALS,
                                               mode="every-slice"), reference=array > 100)
    except InputError:
        assert not 0 <= index < array.shape[axis] or half_width < 0 or volume.min() == volume.max()
        return
    assert result.mask.shape == volume.shape
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    segment = bridge.write_mask_to_segment(segmentation, node, result.mask, "part", (1.0, 0.0, 0.0))
    np.testing.assert_array_equal(segment_array_on_reference(segmentation, segment, node), result.mask)

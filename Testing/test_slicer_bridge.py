"""The MRML bridge on Slicer's real MRML, Segmentations and Segment Editor logic (slicer-core).

Volumes are oblique, anisotropic and off-origin, one of them a sagittal acquisition, so a
mask that lands one voxel off, or on the wrong axis, shows. Masks written into segments are
read back with Slicer's own export onto the source volume's grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from SaLIPSegmentLib import slicer_bridge as bridge
from SaLIPSegmentLib.errors import InputError
from SaLIPSegmentLib.settings import VolumeSettings

from slicer_mrml import add_volume, new_scene, segment_array_on_reference, segment_ids

RED, GREEN = (1.0, 0.0, 0.0), (0.0, 0.8, 0.2)


# -- helpers ------------------------------------------------------------------------------


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """A rotation matrix from angles in degrees about R, A and S."""
    x, y, z = np.radians([rx, ry, rz])
    rot_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    rot_y = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rot_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def geometry_matrix(directions: np.ndarray, spacing_ijk, origin) -> np.ndarray:
    """IJK-to-RAS from direction columns (i, j, k), spacing (i, j, k) and origin."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions, dtype=float) @ np.diag(spacing_ijk)
    matrix[:3, 3] = origin
    return matrix


OBLIQUE = geometry_matrix(rotation(12, -7, 25), (0.8, 1.1, 3.0), (-40.5, 17.25, 102.0))
# Sagittal acquisition: in-plane i along A, j along -S, slices (k, 4 mm) along R.
SAGITTAL = geometry_matrix(rotation(0, 0, 4) @ np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]]),
                           (0.9, 0.9, 4.0), (-30.0, -60.0, 80.0))


def ras_of(matrix: np.ndarray, ijk) -> np.ndarray:
    return matrix[:3, :3] @ np.asarray(ijk, dtype=float) + matrix[:3, 3]


def set_slice_plane(slice_node, normal, origin) -> None:
    """Point a real slice node's SliceToRAS at a plane (any in-plane axes)."""
    normal = np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    helper = np.array([0.0, 0.0, 1.0]) if abs(normal[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x_axis = np.cross(helper, normal)
    x_axis /= np.linalg.norm(x_axis)
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = x_axis, np.cross(normal, x_axis), normal, origin
    slice_node.GetSliceToRAS().DeepCopy(bridge._numpy_to_matrix(matrix))
    slice_node.UpdateMatrices()


def blob(shape, center, radii) -> np.ndarray:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    distance = sum(((axis - c) / r) ** 2 for axis, c, r in zip((k, j, i), center, radii))
    return distance <= 1


def snapshot(segmentation_node, reference) -> dict:
    """Everything a user sees of a segmentation: per segment ID, its name, colour and voxels."""
    segmentation = segmentation_node.GetSegmentation()
    return {
        sid: (segmentation.GetSegment(sid).GetName(), tuple(np.round(segmentation.GetSegment(sid).GetColor(), 6)),
              segment_array_on_reference(segmentation_node, sid, reference))
        for sid in segment_ids(segmentation_node)
    }


def assert_same(before: dict, after: dict) -> None:
    assert list(before) == list(after)
    for sid in before:
        assert before[sid][:2] == after[sid][:2]
        np.testing.assert_array_equal(before[sid][2], after[sid][2])


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def oblique(scene):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 2000, size=(9, 14, 11)).astype(np.int16)
    return add_volume(scene, array, OBLIQUE, "oblique"), array


@pytest.fixture
def sagittal(scene):
    array = np.arange(8 * 12 * 10, dtype=np.float32).reshape(8, 12, 10)
    return add_volume(scene, array, SAGITTAL, "sagittal"), array


def undo_targets(scene, segmentation_node, volume_node):
    return {
        "editor logic": bridge.new_editor_logic(scene, segmentation_node, volume_node),
        "segmentation history": _history(segmentation_node),
    }


def _history(segmentation_node):
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentation_node.GetSegmentation())
    history.SetMaximumNumberOfStates(5)
    return history


def undo(target) -> None:
    if isinstance(target, slicer.vtkSegmentationHistory):
        assert target.RestorePreviousState()
    else:
        assert target.CanUndo()
        target.Undo()


def redo(target) -> None:
    if isinstance(target, slicer.vtkSegmentationHistory):
        assert target.RestoreNextState()
    else:
        assert target.CanRedo()
        target.Redo()


# -- volumes ------------------------------------------------------------------------------


def test_oblique_volume_to_numpy_keeps_voxels_and_geometry(oblique):
    node, array = oblique
    voxels, geometry = bridge.volume_to_numpy(node)
    np.testing.assert_array_equal(voxels, array)
    np.testing.assert_array_equal(voxels, slicer.util.arrayFromVolume(node))
    assert geometry.shape == (9, 14, 11)
    np.testing.assert_allclose(geometry.ijk_to_ras, OBLIQUE, atol=1e-9)
    np.testing.assert_allclose(geometry.ijk_to_world, OBLIQUE, atol=1e-9)
    np.testing.assert_allclose(geometry.spacing, (3.0, 1.1, 0.8))
    voxels[0, 0, 0] += 1  # a copy: the node is not changed
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == array[0, 0, 0]
    assert bridge.default_slice_axis(node) == 0


def test_sagittal_acquisition_geometry_and_default_axis(scene, sagittal):
    node, array = sagittal
    voxels, geometry = bridge.volume_to_numpy(node)
    np.testing.assert_array_equal(voxels, array)
    np.testing.assert_allclose(geometry.spacing, (4.0, 0.9, 0.9))
    assert bridge.default_slice_axis(node) == 0  # across R, the 4 mm axis
    # The same voxels stored with the 4 mm axis as i: the acquisition axis is then numpy axis 2.
    stored_along_i = add_volume(scene, np.ascontiguousarray(array.transpose(2, 1, 0)),
                                geometry_matrix(np.eye(3), (4.0, 0.9, 0.9), (0, 0, 0)))
    assert bridge.default_slice_axis(stored_along_i) == 2


def test_vector_volumes_and_missing_voxels_are_refused(scene):
    rgb = add_volume(scene, np.zeros((2, 3, 4, 3), np.uint8), np.eye(4), "rgb", components=3)
    with pytest.raises(InputError, match="3 components"):
        bridge.volume_to_numpy(rgb)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        bridge.volume_to_numpy(empty)


def test_display_window_is_what_the_view_shows(oblique):
    node, _ = oblique
    assert bridge.display_window(node) is None  # headless: no display node yet
    display = node.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    node.SetAndObserveDisplayNodeID(display.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevel(400.0, 40.0)
    assert bridge.display_window(node) == pytest.approx((-160.0, 240.0))


# -- slice views and ROIs ---------------------------------------------------------------------


def test_slice_view_axis_and_index_on_an_oblique_volume(scene, oblique):
    node, _ = oblique
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    k_direction = OBLIQUE[:3, 2]
    for k in (0, 4, 8):
        # Through the centre of slice k, off the volume's centre in-plane: still slice k.
        origin = ras_of(OBLIQUE, (2.0, 11.0, k + 0.4))
        set_slice_plane(view, k_direction, origin)
        assert bridge.slice_axis_for_view(node, view) == 0
        assert bridge.slice_index_at(node, view, 0) == k
    j_direction = OBLIQUE[:3, 1]
    set_slice_plane(view, -j_direction, ras_of(OBLIQUE, (5.0, 6.0, 2.0)))  # normal flipped: same axis
    assert bridge.slice_axis_for_view(node, view) == 1
    assert bridge.slice_index_at(node, view, 1) == 6
    with pytest.raises(InputError, match="does not cross"):
        bridge.slice_index_at(node, view, 0)  # this view is parallel to the k axis
    set_slice_plane(view, k_direction, ras_of(OBLIQUE, (5.0, 6.0, 9.6)))
    with pytest.raises(InputError, match="outside"):
        bridge.slice_index_at(node, view, 0)


def test_sagittal_view_preset_on_a_sagittal_acquisition(scene, sagittal):
    node, _ = sagittal
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Yellow")
    view.SetOrientation("Sagittal")
    centre_of_slice_5 = ras_of(SAGITTAL, (4.5, 5.5, 5))
    view.JumpSliceByOffsetting(*centre_of_slice_5)
    assert bridge.slice_axis_for_view(node, view) == 0
    assert bridge.slice_index_at(node, view, 0) == 5
    view.SetOrientation("Axial")
    assert bridge.slice_axis_for_view(node, view) == 1  # j runs along -S


def test_range_around_clips_to_the_volume():
    assert bridge.range_around(5, 2, 10) == (3, 8)
    assert bridge.range_around(0, 2, 10) == (0, 3)
    assert bridge.range_around(9, 3, 10) == (6, 10)
    assert bridge.range_around(4, 0, 10) == (4, 5)
    with pytest.raises(InputError):
        bridge.range_around(10, 1, 10)
    with pytest.raises(InputError):
        bridge.range_around(3, -1, 10)


def _roi(scene, center, size, orientation=None):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = np.eye(3) if orientation is None else orientation
    object_to_node[:3, 3] = center
    roi.GetObjectToNodeMatrix().DeepCopy(bridge._numpy_to_matrix(object_to_node))
    roi.SetSize(*size)
    return roi


def test_slice_range_from_a_markups_roi(scene, oblique):
    node, _ = oblique
    directions = OBLIQUE[:3, :3] / np.linalg.norm(OBLIQUE[:3, :3], axis=0)
    # Aligned with the volume, centred on slice 3, 2.2 slices (3 mm each) thick: slices 2, 3, 4.
    roi = _roi(scene, ras_of(OBLIQUE, (5, 7, 3)), (4.0, 4.0, 6.6), directions)
    assert bridge.slice_range_from_roi(node, roi, 0) == (2, 5)
    assert bridge.slice_range_from_roi(node, roi, 2) == (3, 8)  # 4 mm / 0.8 mm around i = 5
    # Sticking out of the volume: clipped.
    roi = _roi(scene, ras_of(OBLIQUE, (5, 7, 8)), (4.0, 4.0, 24.0), directions)
    assert bridge.slice_range_from_roi(node, roi, 0) == (4, 9)
    # Thinner than a slice, between two slice centres: the nearest slice.
    roi = _roi(scene, ras_of(OBLIQUE, (5, 7, 6.3)), (4.0, 4.0, 0.5), directions)
    assert bridge.slice_range_from_roi(node, roi, 0) == (6, 7)
    roi = _roi(scene, ras_of(OBLIQUE, (5, 7, 20)), (4.0, 4.0, 6.0), directions)
    with pytest.raises(InputError, match="outside"):
        bridge.slice_range_from_roi(node, roi, 0)


def test_slice_range_from_an_axis_aligned_roi_on_a_sagittal_volume(scene, sagittal):
    node, _ = sagittal
    # An ordinary RAS-aligned ROI: the sagittal slices k = 2..4 lie at R = -22, -18, -14 (plus the tilt).
    roi = _roi(scene, ras_of(SAGITTAL, (4.5, 5.5, 3)), (9.0, 20.0, 20.0))
    assert bridge.slice_range_from_roi(node, roi, 0) == (2, 5)


# -- writing segments ---------------------------------------------------------------------------


@pytest.mark.parametrize("volume_fixture", ["oblique", "sagittal"])
def test_mask_lands_voxel_exactly_on_the_source_grid(request, scene, volume_fixture):
    node, array = request.getfixturevalue(volume_fixture)
    mask = blob(array.shape, (3, 5, 4), (2.5, 3.5, 3))
    mask[0, 0, 0] = True  # a corner voxel: off-by-one in any direction would lose it
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segment_id = bridge.write_mask_to_segment(segmentation, node, mask, "liver", RED)
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "liver"
    assert tuple(segment.GetColor()) == pytest.approx(RED)
    np.testing.assert_array_equal(segment_array_on_reference(segmentation, segment_id, node), mask)


def test_mask_follows_a_transformed_source_volume(scene, oblique):
    node, array = oblique
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved = np.eye(4)
    moved[:3, :3], moved[:3, 3] = rotation(0, 0, 30), (10.0, -5.0, 2.5)
    transform.SetMatrixTransformToParent(bridge._numpy_to_matrix(moved))
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(bridge.volume_geometry(node).ijk_to_world, moved @ OBLIQUE, atol=1e-9)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    mask = blob(array.shape, (4, 7, 5), (2, 4, 3))
    segment_id = bridge.write_mask_to_segment(segmentation, node, mask, "kidney", GREEN)
    # The segmentation is not transformed, so its labelmap carries the moved geometry.
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation, segment_id, labelmap, False)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(bridge._matrix_to_numpy(matrix), moved @ OBLIQUE, atol=1e-6)
    assert int((vtk_to_numpy(labelmap.GetPointData().GetScalars()) != 0).sum()) == int(mask.sum())


def test_wrong_mask_shape_is_refused(scene, oblique):
    node, array = oblique
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match="shape"):
        bridge.write_mask_to_segment(segmentation, node, np.zeros(array.shape[::-1], bool), "x", RED)


@pytest.mark.parametrize("kind", ["editor logic", "segmentation history"])
def test_one_undo_restores_exactly_and_redo_reapplies(scene, oblique, kind):
    node, array = oblique
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    first = blob(array.shape, (4, 7, 5), (3, 4, 4))
    lungs = bridge.write_mask_to_segment(segmentation, node, first, "lungs", RED)
    target = undo_targets(scene, segmentation, node)[kind]

    # A new segment: undo removes it, redo brings it back.
    before_new = snapshot(segmentation, node)
    heart_mask = blob(array.shape, (5, 6, 6), (2, 3, 3))
    heart = bridge.write_mask_to_segment(segmentation, node, heart_mask, "heart", GREEN, undo=target)
    after_new = snapshot(segmentation, node)
    assert list(after_new) == [lungs, heart]
    np.testing.assert_array_equal(after_new[heart][2], heart_mask)
    undo(target)
    assert_same(before_new, snapshot(segmentation, node))
    redo(target)
    assert_same(after_new, snapshot(segmentation, node))

    # Replacing an existing segment: undo restores the old content, redo the new one.
    replaced = blob(array.shape, (2, 4, 3), (1.5, 2, 2))
    assert bridge.write_mask_to_segment(segmentation, node, replaced, "ignored", GREEN,
                                        segment_id=lungs, undo=target) == lungs
    after_replace = snapshot(segmentation, node)
    undo(target)
    assert_same(after_new, snapshot(segmentation, node))
    redo(target)
    assert_same(after_replace, snapshot(segmentation, node))


def test_rerun_replaces_only_its_segment(scene, oblique):
    node, array = oblique
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    liver_mask = blob(array.shape, (4, 7, 5), (3, 5, 4))
    liver = bridge.write_mask_to_segment(segmentation, node, liver_mask, "liver", RED)
    first = blob(array.shape, (4, 5, 5), (2, 3, 3))
    spleen = bridge.write_mask_to_segment(segmentation, node, first, "spleen", GREEN)
    second = blob(array.shape, (5, 9, 6), (2, 3, 3))  # overlaps the liver, but not the first spleen mask
    assert (second & liver_mask).any() and not (second & first).all()

    again = bridge.write_mask_to_segment(segmentation, node, second, "spleen v2", (0, 0, 1), segment_id=spleen)
    assert again == spleen
    state = snapshot(segmentation, node)
    assert list(state) == [liver, spleen]
    assert state[spleen][:2] == ("spleen", GREEN)  # name and colour are the user's, kept
    np.testing.assert_array_equal(state[spleen][2], second)  # replaced, not merged with `first`
    np.testing.assert_array_equal(state[liver][2], liver_mask)  # overlap: the liver is untouched

    # A segment ID that is not there any more: a new segment is made under that ID.
    segmentation.GetSegmentation().RemoveSegment(spleen)
    assert bridge.write_mask_to_segment(segmentation, node, first, "spleen", GREEN, segment_id=spleen) == spleen
    np.testing.assert_array_equal(segment_array_on_reference(segmentation, spleen, node), first)


def test_overwrite_other_segments_erases_them_under_the_mask_only(scene, oblique):
    node, array = oblique
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    liver_mask = blob(array.shape, (4, 7, 5), (3, 5, 4))
    liver = bridge.write_mask_to_segment(segmentation, node, liver_mask, "liver", RED)
    # A second, overlapping segment: Slicer stores it on a second labelmap layer.
    bone_mask = blob(array.shape, (4, 9, 5), (3, 3, 3))
    bone = bridge.write_mask_to_segment(segmentation, node, bone_mask, "bone", (1, 1, 1))
    tumour_mask = blob(array.shape, (4, 8, 5), (2, 2, 2))
    tumour = bridge.write_mask_to_segment(segmentation, node, tumour_mask, "tumour", GREEN,
                                          overwrite_other_segments=True)
    layers = segmentation.GetSegmentation()
    # Both ways of overwriting are exercised: within the written segment's layer and across layers.
    assert layers.GetLayerIndex(tumour) == layers.GetLayerIndex(liver) != layers.GetLayerIndex(bone)
    state = snapshot(segmentation, node)
    np.testing.assert_array_equal(state[tumour][2], tumour_mask)
    np.testing.assert_array_equal(state[liver][2], liver_mask & ~tumour_mask)
    np.testing.assert_array_equal(state[bone][2], bone_mask & ~tumour_mask)


def test_closed_surface_segmentations_are_refused(scene, oblique):
    node, array = oblique
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    bridge.write_mask_to_segment(segmentation, node, blob(array.shape, (4, 7, 5), (3, 4, 4)), "a", RED)
    closed_surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    assert segmentation.GetSegmentation().CreateRepresentation(closed_surface)
    segmentation.GetSegmentation().SetSourceRepresentationName(closed_surface)
    with pytest.raises(InputError, match="binary labelmap"):
        bridge.write_mask_to_segment(segmentation, node, np.zeros(array.shape, bool), "b", RED)


# -- preview --------------------------------------------------------------------------------------


def test_preview_apply_writes_one_undo_step_and_removes_the_preview(scene, sagittal):
    node, array = sagittal
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
    liver_mask = blob(array.shape, (4, 6, 5), (3, 4, 4))
    liver = bridge.write_mask_to_segment(target, node, liver_mask, "liver", RED)
    mask = blob(array.shape, (3, 5, 4), (2, 3, 3))

    preview = bridge.create_preview(scene, node, mask, "brain", GREEN)
    assert preview.GetAttribute(bridge.PREVIEW_ATTRIBUTE) == "1"
    assert preview.GetDisplayNode().GetOpacity() == pytest.approx(0.5)
    (preview_id,) = segment_ids(preview)
    np.testing.assert_array_equal(segment_array_on_reference(preview, preview_id, node), mask)
    assert list(snapshot(target, node)) == [liver]  # the target is not touched by a preview

    history = bridge.new_editor_logic(scene, target, node)
    before = snapshot(target, node)
    preview_node_id = preview.GetID()
    brain = bridge.apply_preview(preview, target, node, undo=history)
    assert scene.GetNodeByID(preview_node_id) is None
    state = snapshot(target, node)
    assert state[brain][:2] == ("brain", GREEN)
    np.testing.assert_array_equal(state[brain][2], mask)
    np.testing.assert_array_equal(state[liver][2], liver_mask)
    history.Undo()
    assert_same(before, snapshot(target, node))
    history.Redo()
    assert_same(state, snapshot(target, node))
    with pytest.raises(InputError, match="not a SaLIP preview"):
        bridge.apply_preview(target, target, node)


def test_preview_apply_into_an_existing_segment_and_discard(scene, oblique):
    node, array = oblique
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
    old = blob(array.shape, (4, 7, 5), (3, 5, 4))
    segment = bridge.write_mask_to_segment(target, node, old, "liver", RED)
    new = blob(array.shape, (3, 6, 4), (2, 3, 3))

    preview = bridge.create_preview(scene, node, new, "liver", GREEN)
    before = snapshot(target, node)
    bridge.discard_preview(preview)
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1
    assert_same(before, snapshot(target, node))

    preview = bridge.create_preview(scene, node, new, "liver", GREEN)
    assert bridge.apply_preview(preview, target, node, segment_id=segment) == segment
    state = snapshot(target, node)
    assert list(state) == [segment] and state[segment][:2] == ("liver", RED)
    np.testing.assert_array_equal(state[segment][2], new)


# -- cancelling the effect's run, at any slice --------------------------------------------------


def test_cancel_at_any_slice_leaves_the_scene_and_the_segments_as_they_were(scene, tiny_sam, tiny_sam_checkpoint):
    """The effect's path: volume from MRML, segment_volume in a BackgroundJob, preview_from_job at the end."""
    from SaLIPSegmentLib.jobs import BackgroundJob
    from SaLIPSegmentLib.models import OracleScorer, ProposalSettings, create_segmenter
    from SaLIPSegmentLib.volume import segment_volume

    from conftest import TINY_SAM_PROPOSALS, disk_image

    volume = np.stack([disk_image(size=32, center=(15, 16), radius=5 + i) for i in range(6)]).astype(np.int16)
    node = add_volume(scene, volume, OBLIQUE, "mri")
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "radiologist's work")
    tumour = bridge.write_mask_to_segment(target, node, blob(volume.shape, (2, 15, 16), (1, 3, 3)), "tumour", RED)
    array, _ = bridge.volume_to_numpy(node)
    segmenter = create_segmenter(tiny_sam, checkpoint=tiny_sam_checkpoint)
    proposal = ProposalSettings.from_dict(TINY_SAM_PROPOSALS)
    before_segments = snapshot(target, node)

    def node_ids():  # snapshot() itself adds a colour table per call; those are the test's own
        return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())
                if not scene.GetNthNode(n).IsA("vtkMRMLColorTableNode")]

    before_nodes = node_ids()

    def run(cancel_at):
        def work(progress, should_cancel):
            def report(done, total):
                progress(done, total)
                if done == cancel_at:
                    job.cancel()  # the user clicks Cancel while slice `done` + 1 is running

            return segment_volume(array, segmenter, OracleScorer(), ["x"],
                                  VolumeSettings(axis=0, proposal=proposal, mode="every-slice"), reference=array > 100,
                                  progress=report, should_cancel=should_cancel)

        job = BackgroundJob(work)  # bound before the thread starts: the callback cancels through it
        job.start()
        assert job.wait(120)
        return job, bridge.preview_from_job(job, scene, node, "brain", GREEN)

    for cancel_at in range(len(volume) + 1):  # before the first slice ... after the last
        job, (preview, error) = run(cancel_at)
        assert job.cancelled and preview is None and error is job.error, cancel_at
        assert node_ids() == before_nodes
        assert_same(before_segments, snapshot(target, node))

    # Not cancelled, the same path does produce a preview (and still leaves the target alone).
    job, (preview, error) = run(cancel_at=None)
    assert error is None and preview is not None and preview.GetAttribute(bridge.PREVIEW_ATTRIBUTE) == "1"
    assert len(node_ids()) > len(before_nodes)
    assert list(snapshot(target, node)) == [tumour]
    assert_same(before_segments, snapshot(target, node))

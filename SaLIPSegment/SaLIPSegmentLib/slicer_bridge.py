"""MRML <-> numpy: volumes in, masks out as segments, with one undo step per write. No Qt.

This module is the only place that knows both Slicer's MRML and the engine's numpy
conventions. It imports ``slicer`` and ``vtk`` but never ``qt``, ``ctk`` or ``slicer.app``,
so it runs inside the Slicer application (5.10 and later), from Slicer's Python console, and
headless with the ``slicer-core`` wheel in tests.

Conventions:

* Arrays are in numpy ``(k, j, i)`` order, as ``slicer.util.arrayFromVolume`` returns them;
  a numpy *axis* ``a`` is the IJK index ``2 - a``.
* Integer IJK coordinates are voxel centres.
* "World" means RAS after the node's parent transforms (linear ones only; a non-linear
  parent transform is an error, as it is for the Segment Editor's slice-based tools).

The effect's Apply writes through the Segment Editor's own ``ModifySegmentByLabelmap``
(:func:`write_mask_masked`), so the editor's masking (editable area, intensity range, modify
other segments) applies as for every built-in effect. :func:`write_mask_to_segment` and the
preview write with ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment`` directly,
unmasked: for the console and for preview nodes. The undo state is saved once per write by
whatever owns the undo history (see :func:`save_state_for_undo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from .errors import InputError
from .volume import acquisition_axis

Color = Sequence[float]
PREVIEW_ATTRIBUTE = "SaLIP.Preview"
PREVIEW_OPACITY = 0.5

# What records the undo state before a write: the Segment Editor's logic (slicer-core, recent
# Slicer), a vtkSegmentationHistory, or a callable such as a scripted effect's saveStateForUndo.
UndoTarget = Union[Callable[[], Any], Any, None]


# -- small matrix helpers -------------------------------------------------------------------


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _transform_between(source_parent, target_parent, what: str) -> np.ndarray:
    """4x4 from one node frame to another (None = world); only linear transforms are usable."""
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source_parent, target_parent, matrix):
        raise InputError(f"The {what} is under a non-linear transform; harden or remove the transform first.")
    return _matrix_to_numpy(matrix)


def _node_to_world(node, what: str) -> np.ndarray:
    return _transform_between(node.GetParentTransformNode(), None, what)


# -- volumes --------------------------------------------------------------------------------


@dataclass
class VolumeGeometry:
    """Where a volume's voxels are, in the engine's ``(k, j, i)`` order.

    ``ijk_to_ras`` is the node's own IJK-to-RAS matrix (without parent transforms);
    ``ijk_to_world`` adds the linear parent transforms, if any.
    """

    shape: Tuple[int, int, int]
    ijk_to_ras: np.ndarray
    spacing: Tuple[float, float, float]
    ijk_to_world: np.ndarray

    @property
    def world_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_world)


def volume_geometry(volume_node) -> VolumeGeometry:
    """Shape, IJK-to-RAS, spacing (numpy order) and IJK-to-world of a scalar volume node."""
    image = _scalar_image(volume_node)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _matrix_to_numpy(matrix)
    spacing = tuple(float(s) for s in reversed(volume_node.GetSpacing()))
    shape = tuple(int(d) for d in reversed(image.GetDimensions()))
    world = _node_to_world(volume_node, f"volume {volume_node.GetName()!r}") @ ijk_to_ras
    return VolumeGeometry(shape=shape, ijk_to_ras=ijk_to_ras, spacing=spacing, ijk_to_world=world)


def _scalar_image(volume_node):
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("Select a scalar volume (a vtkMRMLScalarVolumeNode) as the source volume.")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"Volume {volume_node.GetName()!r} has no voxels loaded.")
    components = image.GetNumberOfScalarComponents()
    if components != 1 or volume_node.IsA("vtkMRMLVectorVolumeNode") or volume_node.IsA("vtkMRMLTensorVolumeNode"):
        raise InputError(
            f"Volume {volume_node.GetName()!r} is a {volume_node.GetClassName()} with {components} components per "
            "voxel; SaLIP needs a scalar volume. Convert it first (e.g. with the Vector to Scalar Volume module)."
        )
    return image


def volume_to_numpy(volume_node) -> Tuple[np.ndarray, VolumeGeometry]:
    """A copy of a scalar volume's voxels in ``(k, j, i)`` order, and its geometry."""
    geometry = volume_geometry(volume_node)
    scalars = vtk_to_numpy(volume_node.GetImageData().GetPointData().GetScalars())
    return np.array(scalars).reshape(geometry.shape), geometry


def default_slice_axis(volume_node) -> int:
    """The numpy axis slices were acquired across (largest spacing; a 1-voxel axis wins)."""
    geometry = volume_geometry(volume_node)
    return acquisition_axis(geometry.spacing, geometry.shape)


def display_window(volume_node) -> Optional[Tuple[float, float]]:
    """The intensity window the user sees, (low, high), or None without a usable display node."""
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        return None
    window, level = float(display.GetWindow()), float(display.GetLevel())
    if not (np.isfinite(window) and np.isfinite(level)) or window <= 0:
        return None
    return level - window / 2.0, level + window / 2.0


# -- slice views and ROIs -------------------------------------------------------------------


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise InputError(f"Slice axis must be 0, 1 or 2 (numpy order k, j, i), got {axis!r}.")
    return int(axis)


def slice_axis_for_view(volume_node, slice_node) -> int:
    """The numpy axis of the volume most aligned with a slice view's normal."""
    geometry = volume_geometry(volume_node)
    normal = _matrix_to_numpy(slice_node.GetSliceToRAS())[:3, 2]
    directions = geometry.ijk_to_world[:3, :3] / np.linalg.norm(geometry.ijk_to_world[:3, :3], axis=0)
    ijk_index = int(np.argmax(np.abs(directions.T @ normal)))
    return 2 - ijk_index


def slice_index_at(volume_node, slice_node, axis: int) -> int:
    """The index along ``axis`` of the volume slice the view shows at the volume's centre.

    The view plane (through SliceToRAS's origin, normal = its third column) is intersected
    with the line through the volume's centre along ``axis``; for a view parallel to the
    volume's slices this is simply the slice under the view.
    """
    axis = _check_axis(axis)
    geometry = volume_geometry(volume_node)
    slice_to_ras = _matrix_to_numpy(slice_node.GetSliceToRAS())
    normal, origin = slice_to_ras[:3, 2], slice_to_ras[:3, 3]
    ijk = 2 - axis
    center = (np.array(geometry.shape[::-1], dtype=float) - 1) / 2
    linear, offset = geometry.ijk_to_world[:3, :3], geometry.ijk_to_world[:3, 3]
    step = normal @ linear[:, ijk]
    if abs(step) < 1e-6 * np.linalg.norm(linear[:, ijk]):
        raise InputError(f"The slice view {slice_node.GetName()!r} is parallel to axis {axis}: it does not cross it.")
    t = normal @ (origin - offset - linear @ center) / step
    index = int(np.floor(center[ijk] + t + 0.5))
    count = geometry.shape[axis]
    if not 0 <= index < count:
        raise InputError(
            f"The slice view {slice_node.GetName()!r} is outside volume {volume_node.GetName()!r} "
            f"(slice {index}, valid 0 to {count - 1})."
        )
    return index


def range_around(index: int, half_width: int, count: int) -> Tuple[int, int]:
    """(start, stop) of ``index`` +/- ``half_width`` slices, clipped to ``count`` slices."""
    if not 0 <= index < count:
        raise InputError(f"Slice {index} is outside this volume's {count} slices.")
    if half_width < 0:
        raise InputError(f"The number of slices around the current one must be >= 0, got {half_width}.")
    return max(0, index - half_width), min(count, index + half_width + 1)


def _roi_corners_world(roi_node) -> np.ndarray:
    """The 8 corners (8 x 3, world RAS) of a markups ROI, or of any node's RAS bounding box."""
    if roi_node.IsA("vtkMRMLMarkupsROINode"):
        size = np.array(roi_node.GetSize(), dtype=float)
        if not np.all(np.isfinite(size)) or np.any(size < 0):
            raise InputError(f"ROI {roi_node.GetName()!r} has no valid size.")
        object_to_world = _matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
        corners = signs * size / 2
        return (object_to_world[:3, :3] @ corners.T).T + object_to_world[:3, 3]
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    if bounds[0] > bounds[1] or bounds[2] > bounds[3] or bounds[4] > bounds[5]:
        raise InputError(f"Node {roi_node.GetName()!r} has no extent to use as a region.")
    return np.array([[x, y, z] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]], dtype=float)


def hint_box_from_roi(volume_node, roi_node, axis: int, index: int):
    """[x0, y0, x1, y1] (pixels of slice `index` along numpy `axis`): an ROI's extent as a hint's box."""
    from .effect_hints import slice_box_from_world

    geometry = volume_geometry(volume_node)
    return slice_box_from_world(_roi_corners_world(roi_node), geometry.ijk_to_world, geometry.shape, axis, index)


def _control_points_world(points_node) -> np.ndarray:
    """The placed control points (n x 3, world RAS) of a markups node; those still being placed are left out."""
    placed = []
    for n in range(points_node.GetNumberOfControlPoints()):
        if points_node.GetNthControlPointPositionStatus(n) == points_node.PositionDefined:
            position = [0.0, 0.0, 0.0]
            points_node.GetNthControlPointPositionWorld(n, position)
            placed.append(position)
    return np.array(placed, dtype=float).reshape(-1, 3)


def hint_points_from_markups(volume_node, on_node, off_node, axis: int, index: int):
    """([[x, y], ...], labels): the points of two markups point lists (on the target: label 1, off it: 0;
    either may be None) that lie on slice `index` along numpy `axis`, in pixels of that slice."""
    from .effect_hints import slice_points_from_world

    on = _control_points_world(on_node) if on_node is not None else np.zeros((0, 3))
    off = _control_points_world(off_node) if off_node is not None else np.zeros((0, 3))
    geometry = volume_geometry(volume_node)
    return slice_points_from_world(np.vstack([on, off]), [1] * len(on) + [0] * len(off), geometry.ijk_to_world,
                                   geometry.shape, axis, index)


def slice_range_from_roi(volume_node, roi_node, axis: int) -> Tuple[int, int]:
    """(start, stop) of the slices along ``axis`` whose centres lie inside the ROI.

    The ROI's corners (a rotated ROI's true corners) are mapped to the volume's IJK space; an
    ROI thinner than one slice that still lies inside the volume gives its nearest slice.
    """
    axis = _check_axis(axis)
    geometry = volume_geometry(volume_node)
    corners = _roi_corners_world(roi_node)
    ijk = (geometry.world_to_ijk[:3, :3] @ corners.T).T + geometry.world_to_ijk[:3, 3]
    low, high = float(ijk[:, 2 - axis].min()), float(ijk[:, 2 - axis].max())
    count = geometry.shape[axis]
    eps = 1e-6
    start, stop = max(0, int(np.ceil(low - eps))), min(count, int(np.floor(high + eps)) + 1)
    if start >= stop:
        if high < -0.5 or low > count - 0.5:
            raise InputError(
                f"ROI {roi_node.GetName()!r} lies outside volume {volume_node.GetName()!r} along axis {axis} "
                f"(slices {low:.1f} to {high:.1f}, volume 0 to {count - 1})."
            )
        nearest = int(np.clip(np.floor((low + high) / 2 + 0.5), 0, count - 1))
        start, stop = nearest, nearest + 1
    return start, stop


# -- writing segments -----------------------------------------------------------------------


def save_state_for_undo(undo: UndoTarget) -> None:
    """Record the undo state with whatever owns the history.

    Accepts a ``vtkSlicerSegmentEditorLogic`` (``SaveStateForUndo``), a
    ``vtkSegmentationHistory`` (``SaveState``), a callable (e.g. a scripted effect's
    ``scriptedEffect.saveStateForUndo``, so the Segment Editor's Undo button works), or None.
    """
    if undo is None:
        return
    if hasattr(undo, "SaveStateForUndo"):
        undo.SaveStateForUndo()
    elif hasattr(undo, "SaveState"):
        undo.SaveState()
    elif callable(undo):
        undo()
    else:
        raise TypeError(f"Cannot save an undo state with {type(undo).__name__}.")


def new_editor_logic(scene, segmentation_node, source_volume_node, max_undo_states: int = 10):
    """A ``vtkSlicerSegmentEditorLogic`` with its own editor node and undo history.

    For the Python console and tests. Inside the Segment Editor use the editor's own history
    (``scriptedEffect.saveStateForUndo``) instead, or its Undo button will not see the change.
    Older Slicer versions have no ``vtkSlicerSegmentEditorLogic``: use a ``vtkSegmentationHistory``.
    """
    if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
        raise RuntimeError("This Slicer has no vtkSlicerSegmentEditorLogic; use slicer.vtkSegmentationHistory.")
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    logic.SetSourceVolumeNode(source_volume_node)
    logic.SetMaximumNumberOfUndoStates(max_undo_states)
    return logic


def mask_to_labelmap(mask_kji: np.ndarray, source_volume_node, segmentation_node=None):
    """A binary ``vtkOrientedImageData`` of the mask on the source volume's voxel grid.

    The geometry is the volume's IJK-to-RAS, carried into the segmentation node's frame when
    either node is under a (linear) transform.
    """
    geometry = volume_geometry(source_volume_node)
    mask = np.asarray(mask_kji)
    if mask.shape != geometry.shape:
        raise InputError(
            f"The mask's shape {mask.shape} is not the volume's {geometry.shape} (numpy order k, j, i)."
        )
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(geometry.shape[2], geometry.shape[1], geometry.shape[0])
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(geometry.shape)
    voxels[...] = mask != 0
    labelmap.Modified()
    ijk_to_target = geometry.ijk_to_ras
    if segmentation_node is not None:
        volume_to_segmentation = _transform_between(
            source_volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(),
            "source volume or segmentation")
        ijk_to_target = volume_to_segmentation @ ijk_to_target
    labelmap.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_target))
    return labelmap


def _prepare_segmentation(segmentation_node, source_volume_node) -> None:
    segmentation = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != labelmap_name:
        if segmentation.GetNumberOfSegments() > 0:
            raise InputError(
                f"Segmentation {segmentation_node.GetName()!r} is stored as "
                f"{segmentation.GetSourceRepresentationName()!r}; make binary labelmap its source representation first."
            )
        segmentation.SetSourceRepresentationName(labelmap_name)
    reference = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if not segmentation.GetConversionParameter(reference):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(source_volume_node)


def _write_labelmap(segmentation_node, labelmap, segment_name: str, color: Color, segment_id: Optional[str],
                    overwrite_other_segments: bool, undo: UndoTarget) -> str:
    segmentation = segmentation_node.GetSegmentation()
    save_state_for_undo(undo)
    if not segment_id or segmentation.GetSegment(segment_id) is None:
        segment_id = segmentation.AddEmptySegment(segment_id or "", segment_name, [float(c) for c in color[:3]])
        if not segment_id:
            raise RuntimeError(f"Slicer could not add segment {segment_name!r}.")
    others = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    others = [other for other in others if other != segment_id]
    overwrite = others if overwrite_other_segments else []
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    extent = labelmap.GetExtent()
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE,
                                            extent, False, overwrite):
        raise RuntimeError(f"Slicer could not write segment {segment_id!r}.")
    if overwrite_other_segments:
        # SetBinaryLabelmapToSegment overwrites only segments sharing the written one's layer;
        # segments on other layers are erased under the mask the way the Segment Editor does it.
        labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        layer = segmentation.GetSegment(segment_id).GetRepresentation(labelmap_name)
        keep = _inverted(labelmap)
        for other in others:
            if segmentation.GetSegment(other).GetRepresentation(labelmap_name) is not layer:
                logic.SetBinaryLabelmapToSegment(keep, segmentation_node, other, logic.MODE_MERGE_MIN,
                                                 extent, False, [other])
    return segment_id


def _inverted(labelmap):
    """255 where the labelmap is empty, 0 under it: merging with MIN erases under the mask."""
    inverted = slicer.vtkOrientedImageData()
    inverted.DeepCopy(labelmap)
    voxels = vtk_to_numpy(inverted.GetPointData().GetScalars())
    voxels[...] = np.where(voxels != 0, 0, 255)
    inverted.Modified()
    return inverted


def write_mask_to_segment(
    segmentation_node,
    source_volume_node,
    mask_kji: np.ndarray,
    segment_name: str,
    color: Color,
    *,
    segment_id: Optional[str] = None,
    overwrite_other_segments: bool = False,
    undo: UndoTarget = None,
) -> str:
    """Write a ``(k, j, i)`` mask on the source volume's grid into a segment, as one undo step.

    Creates the segment (``segment_name``, ``color`` as RGB in 0..1) when ``segment_id`` is None
    or not in the segmentation, else replaces that segment's content (name and colour kept).
    Other segments are untouched unless ``overwrite_other_segments``, which erases them under
    the mask. ``undo`` saves the state first (see :func:`save_state_for_undo`), so one Undo
    restores the segmentation as it was. A segmentation without reference geometry gets the
    source volume's, so the mask lands voxel for voxel. Returns the segment ID.
    """
    _prepare_segmentation(segmentation_node, source_volume_node)
    labelmap = mask_to_labelmap(mask_kji, source_volume_node, segmentation_node)
    return _write_labelmap(segmentation_node, labelmap, segment_name, color, segment_id,
                           overwrite_other_segments, undo)


# -- preview --------------------------------------------------------------------------------


def create_preview(scene, source_volume_node, mask_kji: np.ndarray, name: str, color: Color):
    """A separate, semi-transparent segmentation node holding the mask for review.

    The node is marked with the ``SaLIP.Preview`` attribute and is not saved with the scene.
    Headless (no display node can be made), it is simply not displayed.
    """
    preview = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{name} (SaLIP preview)"))
    preview.SetAttribute(PREVIEW_ATTRIBUTE, "1")
    preview.SetSaveWithScene(False)
    preview.CreateDefaultDisplayNodes()
    display = preview.GetDisplayNode()
    if display is not None:
        display.SetOpacity(PREVIEW_OPACITY)
    try:
        write_mask_to_segment(preview, source_volume_node, mask_kji, name, color)
    except Exception:
        discard_preview(preview)
        raise
    return preview


def _preview_segment(preview_node):
    segmentation = preview_node.GetSegmentation() if preview_node is not None else None
    if segmentation is None or preview_node.GetAttribute(PREVIEW_ATTRIBUTE) != "1" \
            or segmentation.GetNumberOfSegments() != 1:
        raise InputError("This is not a SaLIP preview (or it was already applied or discarded).")
    return segmentation.GetNthSegmentID(0), segmentation.GetNthSegment(0)


def preview_to_labelmap(preview_node):
    """The preview's mask as a binary ``vtkOrientedImageData`` (0/1) in the preview's frame."""
    segment_id, segment = _preview_segment(preview_node)
    stored = segment.GetRepresentation(
        slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
    labelmap = slicer.vtkOrientedImageData()
    labelmap.DeepCopy(stored)
    voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars())
    voxels[...] = voxels == segment.GetLabelValue()
    labelmap.Modified()
    return labelmap


def apply_preview(
    preview_node,
    segmentation_node,
    source_volume_node,
    *,
    segment_id: Optional[str] = None,
    overwrite_other_segments: bool = False,
    undo: UndoTarget = None,
) -> str:
    """Write the preview into the target segmentation as one undo step, then remove the preview.

    The segment gets the preview's name and colour when it is created; see
    :func:`write_mask_to_segment` for ``segment_id``, ``overwrite_other_segments`` and ``undo``.
    """
    _, segment = _preview_segment(preview_node)
    name, color = segment.GetName(), tuple(segment.GetColor())
    labelmap = preview_to_labelmap(preview_node)
    preview_to_target = _transform_between(
        preview_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), "preview or segmentation")
    if not np.allclose(preview_to_target, np.eye(4)):
        image_to_world = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(image_to_world)
        labelmap.SetImageToWorldMatrix(_numpy_to_matrix(preview_to_target @ _matrix_to_numpy(image_to_world)))
    _prepare_segmentation(segmentation_node, source_volume_node)
    written = _write_labelmap(segmentation_node, labelmap, name, color, segment_id, overwrite_other_segments, undo)
    discard_preview(preview_node)
    return written


def discard_preview(preview_node) -> None:
    """Remove a preview node (and its display and storage nodes); the target is not touched."""
    scene = preview_node.GetScene() if preview_node is not None else None
    if scene is None:
        return
    for n in range(preview_node.GetNumberOfDisplayNodes()):
        display = preview_node.GetNthDisplayNode(n)
        if display is not None:
            scene.RemoveNode(display)
    storage = preview_node.GetStorageNode()
    if storage is not None:
        scene.RemoveNode(storage)
    scene.RemoveNode(preview_node)


# -- writing as the Segment Editor's own effects do (masking honoured) ---------------------------
#
# Built-in effects end in vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap (Slicer 5.10:
# qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap calls it), which applies the editor
# node's editable area (everywhere, inside or outside one, all or the visible segments), its
# editable intensity range and its "modify other segments" mode (allow overlap, overwrite
# visible, overwrite all). SaLIP's Apply goes through the same call.

Modify = Callable[[Any, str, Any], None]
"""modify(segmentation_node, segment_id, labelmap): set the segment to the labelmap, masked."""


def editor_logic_modifier(editor_logic) -> Modify:
    """`modify` for a ``vtkSlicerSegmentEditorLogic`` (the console, tests): Set mode, masking on."""

    def modify(segmentation_node, segment_id: str, labelmap) -> None:
        editor_logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap,
                                             editor_logic.ModificationModeSet, False, False)

    return modify


def labelmap_on_reference(mask_kji: np.ndarray, source_volume_node, segmentation_node, reference=None):
    """The mask as a labelmap on the segmentation's reference geometry (nearest neighbour), where
    the editor's masks live; on the source volume's grid when there is no reference image."""
    labelmap = mask_to_labelmap(mask_kji, source_volume_node, segmentation_node)
    if reference is None or reference.GetPointData() is None:
        return labelmap
    if slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, reference):
        return labelmap
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False):
        raise RuntimeError("Slicer could not resample the mask onto the segmentation's geometry.")
    return resampled


def write_mask_masked(
    segmentation_node,
    source_volume_node,
    mask_kji: np.ndarray,
    segment_name: str,
    color: Color,
    *,
    modify: Modify,
    reference=None,
    segment_id: Optional[str] = None,
    undo: UndoTarget = None,
) -> str:
    """Write a ``(k, j, i)`` mask into a segment through the Segment Editor's masking, as one undo step.

    A new segment (``segment_name``, ``color``) unless ``segment_id`` names an existing one; the
    undo state is saved before the segment is created, so one Undo removes it again. Voxels the
    editor's masking protects (outside the editable area or intensity range; segments the
    overwrite mode keeps) are left as they were. Returns the segment ID.
    """
    _prepare_segmentation(segmentation_node, source_volume_node)
    labelmap = labelmap_on_reference(mask_kji, source_volume_node, segmentation_node, reference)
    segmentation = segmentation_node.GetSegmentation()
    save_state_for_undo(undo)
    if not segment_id or segmentation.GetSegment(segment_id) is None:
        segment_id = segmentation.AddEmptySegment("", segment_name, [float(c) for c in color[:3]])
        if not segment_id:
            raise RuntimeError(f"Slicer could not add segment {segment_name!r}.")
    modify(segmentation_node, segment_id, labelmap)
    return segment_id


def load_result_mask(mask_path: str, source_volume_node, expected_shape: Sequence[int]) -> np.ndarray:
    """The worker's mask file, checked against the volume it was computed from.

    A volume whose voxel grid changed while the worker ran gives a clear error, never a mask
    placed on the wrong voxels.
    """
    mask = np.load(mask_path, allow_pickle=False)
    shape = volume_geometry(source_volume_node).shape
    if tuple(mask.shape) != tuple(int(s) for s in expected_shape) or tuple(mask.shape) != tuple(shape):
        raise InputError(
            f"The volume changed while SaLIP ran (mask {tuple(mask.shape)}, volume now {tuple(shape)}): "
            "run Preview again.")
    return mask

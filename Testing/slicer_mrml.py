"""Test helpers that drive 3D Slicer's own MRML / Segmentations logic without Qt.

These helpers use the ``slicer-core`` wheel from PyPI (pin ``slicer-core==5.13.31053.0``,
which requires ``vtk==9.6.2`` exactly).  They let pytest tests read files the way 3D Slicer
itself reads them, so results produced by the engine can be checked against Slicer's
interpretation of the same files:

* :func:`new_scene` creates a ``vtkMRMLScene`` wired to an application logic and to the
  Segmentations module logic (without that logic, Slicer cannot create empty binary
  labelmap segments and no segmentation conversion rules are registered).
* :func:`load_volume` reads a NRRD / NIfTI image with ``vtkMRMLVolumeArchetypeStorageNode``.
* :func:`read_segments_on_reference` reads a ``.seg.nrrd`` with
  ``vtkMRMLSegmentationStorageNode`` and lets ``vtkSlicerSegmentationsModuleLogic`` resample
  every segment onto a reference volume's voxel grid.

Arrays are returned in numpy ``(k, j, i)`` order, which is the order of
``SimpleITK.GetArrayFromImage`` and of ``slicer.util.arrayFromVolume``.

``slicer`` is imported lazily: importing it costs about 2 s, paid only by the tests that use it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# Process-wide Slicer logic objects, created once and re-pointed at each new scene.
# vtkSlicerSegmentationsModuleLogic registers its four segmentation converter rules into the
# global vtkSegmentationConverterFactory every time it is given a scene; the duplicates are
# removed again by _dedupe_converter_rules().
_LOGIC: dict[str, Any] = {}


def _slicer():
    """Import and return the ``slicer`` package provided by slicer-core."""
    import slicer  # lazy: slow import, optional dependency

    return slicer


def _logic_objects() -> dict[str, Any]:
    """Create (once per process) the application, segmentations and volumes logic."""
    if not _LOGIC:
        slicer = _slicer()
        app_logic = slicer.vtkSlicerApplicationLogic()
        segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        volumes_logic = slicer.vtkSlicerVolumesLogic()
        # vtkSlicerVolumesLogic (e.g. CreateAndAddLabelVolume) looks up the "Colors" module logic.
        app_logic.SetModuleLogic("Colors", app_logic.GetColorLogic())
        app_logic.SetModuleLogic("Segmentations", segmentations_logic)
        app_logic.SetModuleLogic("Volumes", volumes_logic)
        _LOGIC.update(
            app=app_logic,
            segmentations=segmentations_logic,
            volumes=volumes_logic,
        )
    return _LOGIC


def _dedupe_converter_rules() -> None:
    """Unregister duplicate converter rules (same class) from the global converter factory."""
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    seen: set[str] = set()
    for rule in list(factory.GetConverterRules()):
        name = rule.GetClassName()
        if name in seen:
            factory.UnregisterConverterRule(rule)
        else:
            seen.add(name)


def segmentations_logic():
    """Return the process-wide ``vtkSlicerSegmentationsModuleLogic`` (attached to the last scene)."""
    return _logic_objects()["segmentations"]


def volumes_logic():
    """Return the process-wide ``vtkSlicerVolumesLogic`` (attached to the last scene)."""
    return _logic_objects()["volumes"]


def new_scene():
    """Return a fresh, correctly wired ``vtkMRMLScene``.

    Every call creates a new empty scene, attaches the (process-wide) application logic,
    its colour logic (default colour tables are added), the Segmentations logic and the
    Volumes logic to it, and stores it in ``slicer.mrmlScene`` so that ``slicer.util`` array
    helpers that consult the global scene work.  Calling it repeatedly in one process is
    safe; the logic objects (and ``slicer.mrmlScene``) follow the most recent scene.
    """
    slicer = _slicer()
    logic = _logic_objects()
    scene = slicer.vtkMRMLScene()
    logic["app"].SetMRMLScene(scene)
    # Default colour tables (e.g. "vtkMRMLColorTableNodeLabels"); without them every labelmap
    # display node created during segment export logs a "color table node can't be found"
    # warning to stderr.  Costs about 10 ms.
    color_logic = logic["app"].GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    for name in ("segmentations", "volumes"):
        logic[name].SetMRMLApplicationLogic(logic["app"])
        logic[name].SetMRMLScene(scene)
    _dedupe_converter_rules()
    slicer.mrmlScene = scene
    return scene


def _node_name(path: str | os.PathLike) -> str:
    """Return a node name derived from a file name without its (double) extension."""
    base = os.path.basename(os.fspath(path))
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


def load_volume(scene, path: str | os.PathLike, *, keep_file_voxel_order: bool = True):
    """Read an image file into a new ``vtkMRMLScalarVolumeNode`` with Slicer's volume reader.

    Uses ``vtkMRMLVolumeArchetypeStorageNode`` (ITK based, same reader Slicer's "Add data"
    uses for NRRD / NIfTI / MetaImage).  Slicer's default is to flip one voxel axis when the
    file's IJK axes are left-handed (``ForceRightHandedIJKCoordinateSystem``); that keeps the
    physical geometry but changes the voxel order.  With ``keep_file_voxel_order`` (default)
    the flip is disabled so the voxel array matches the file / SimpleITK voxel order.
    """
    path = os.fspath(path)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", _node_name(path))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    if keep_file_voxel_order:
        storage.ForceRightHandedIJKCoordinateSystemOff()
    volume.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(volume) or volume.GetImageData() is None:
        scene.RemoveNode(volume)
        scene.RemoveNode(storage)
        raise RuntimeError(f"Slicer could not read volume: {path}")
    return volume


def add_volume(scene, array: np.ndarray, matrix: np.ndarray, name="volume", components=1):
    """A scalar (or vector) volume node holding ``array`` ((k, j, i) or (k, j, i, c)) at ``matrix``."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if components > 1 else "vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    flat = np.ascontiguousarray(array).reshape(-1, components) if components > 1 else np.ravel(array)
    scalars = numpy_to_vtk(flat, deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    ijk_to_ras = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            ijk_to_ras.SetElement(row, column, float(matrix[row][column]))
    node.SetIJKToRASMatrix(ijk_to_ras)
    return node


def ijk_to_ras(volume_node) -> np.ndarray:
    """Return the 4x4 IJK-to-RAS matrix of a volume (or labelmap) node as numpy."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_array(volume_node) -> np.ndarray:
    """Return a copy of a scalar volume node's voxels as numpy in ``(k, j, i)`` order."""
    from vtk.util.numpy_support import vtk_to_numpy

    image = volume_node.GetImageData()
    shape = tuple(reversed(image.GetDimensions()))
    scalars = vtk_to_numpy(image.GetPointData().GetScalars())
    return np.array(scalars).reshape(shape)


def load_segmentation(scene, path: str | os.PathLike):
    """Read a ``.seg.nrrd`` into a new ``vtkMRMLSegmentationNode`` with Slicer's storage node."""
    path = os.fspath(path)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", _node_name(path))
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    segmentation.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(segmentation):
        scene.RemoveNode(segmentation)
        scene.RemoveNode(storage)
        raise RuntimeError(f"Slicer could not read segmentation: {path}")
    return segmentation


def segment_ids(segmentation_node) -> list[str]:
    """Return the segment IDs of a segmentation node in display order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def segment_array_on_reference(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """Return one segment as a bool array on ``reference_volume``'s grid, ``(k, j, i)`` order.

    Slicer's ``ExportSegmentsToLabelmapNode`` does the resampling (exact pad / crop when the
    grids are aligned, nearest-neighbour otherwise).  Segments are exported one at a time so
    overlapping segments (several labelmap layers) do not hide each other.
    """
    slicer = _slicer()
    import vtk

    scene = segmentation_node.GetScene()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__segment_export__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_volume
        )
        if not ok or labelmap.GetImageData() is None:
            raise RuntimeError(f"Export of segment {segment_id!r} failed")
        if not np.allclose(ijk_to_ras(labelmap), ijk_to_ras(reference_volume)):
            raise RuntimeError("Exported labelmap geometry differs from the reference volume")
        mask = volume_array(labelmap) != 0
    finally:
        display = labelmap.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(labelmap)
    expected = tuple(reversed(reference_volume.GetImageData().GetDimensions()))
    if mask.shape != expected:
        raise RuntimeError(f"Exported segment shape {mask.shape} != reference shape {expected}")
    return mask


def read_segments_on_reference(
    path: str | os.PathLike,
    reference_path: str | os.PathLike,
    *,
    scene=None,
    with_colors: bool = False,
):
    """Read a ``.seg.nrrd`` with Slicer and resample each segment onto a reference image.

    :param path: segmentation file (``.seg.nrrd``) read by ``vtkMRMLSegmentationStorageNode``.
    :param reference_path: image whose voxel grid defines the output (read by :func:`load_volume`).
    :param scene: scene to use; a fresh one from :func:`new_scene` when omitted.
    :param with_colors: also return a dict segment name -> (r, g, b) floats in 0..1.
    :return: ``(masks, ijk_to_ras)`` where ``masks`` maps segment NAME -> bool array shaped
      like the reference in ``(k, j, i)`` order and ``ijk_to_ras`` is the reference's 4x4
      IJK-to-RAS matrix; ``(masks, ijk_to_ras, colors)`` when ``with_colors`` is true.
    """
    if scene is None:
        scene = new_scene()
    reference = load_volume(scene, reference_path)
    segmentation_node = load_segmentation(scene, path)
    segmentation = segmentation_node.GetSegmentation()
    masks: dict[str, np.ndarray] = {}
    colors: dict[str, tuple[float, float, float]] = {}
    for segment_id in segment_ids(segmentation_node):
        segment = segmentation.GetSegment(segment_id)
        name = segment.GetName()
        if name in masks:
            raise ValueError(f"Duplicate segment name {name!r} in {os.fspath(path)}")
        masks[name] = segment_array_on_reference(segmentation_node, segment_id, reference)
        colors[name] = tuple(float(c) for c in segment.GetColor())
    matrix = ijk_to_ras(reference)
    if with_colors:
        return masks, matrix, colors
    return masks, matrix


def segment_colors(path: str | os.PathLike, *, scene=None) -> dict[str, tuple[float, float, float]]:
    """Return segment NAME -> (r, g, b) colour (0..1) of a ``.seg.nrrd`` as read by Slicer."""
    if scene is None:
        scene = new_scene()
    segmentation_node = load_segmentation(scene, path)
    segmentation = segmentation_node.GetSegmentation()
    colors: dict[str, tuple[float, float, float]] = {}
    for segment_id in segment_ids(segmentation_node):
        segment = segmentation.GetSegment(segment_id)
        colors[segment.GetName()] = tuple(float(c) for c in segment.GetColor())
    return colors

"""Apply honours the Segment Editor's masking, on Slicer's real Segment Editor logic (slicer-core).

The effect writes through `modifySegmentByLabelmap`, which in Slicer 5.10 ends in
`vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap`; here the bridge calls that same logic
with a real `vtkMRMLSegmentEditorNode` set to each editable area, the intensity range and each
"modify other segments" mode. Every expectation is computed from the masks, independently of
Slicer, and voxels the masking protects must come out exactly as they were.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from test_slicer_bridge import OBLIQUE, assert_same, blob, snapshot

from SaLIPSegmentLib import slicer_bridge as bridge

from slicer_mrml import add_volume, new_scene

SHAPE = (8, 16, 14)
RED, GREEN, BLUE, GREY = (1.0, 0.0, 0.0), (0.0, 0.8, 0.2), (0.1, 0.2, 0.9), (0.5, 0.5, 0.5)
Segmentation = slicer.vtkMRMLSegmentationNode
EditorNode = slicer.vtkMRMLSegmentEditorNode


@pytest.fixture
def setup():
    """A volume whose intensity rises along i, a segmentation with two segments (one hidden) and the
    SaLIP result, which overlaps both; the editor logic that Apply writes through."""
    scene = new_scene()
    k, j, i = np.indices(SHAPE)
    volume = (i * 10).astype(np.int16)
    node = add_volume(scene, volume, OBLIQUE, "ct")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "work")
    segmentation.CreateDefaultDisplayNodes()
    liver_mask = blob(SHAPE, (4, 6, 5), (3, 4, 4))
    spleen_mask = blob(SHAPE, (4, 10, 9), (3, 4, 4))
    liver = bridge.write_mask_to_segment(segmentation, node, liver_mask, "liver", RED)
    spleen = bridge.write_mask_to_segment(segmentation, node, spleen_mask, "spleen", BLUE)
    segmentation.GetDisplayNode().SetSegmentVisibility(spleen, False)
    result = blob(SHAPE, (4, 8, 7), (3, 5, 5))
    logic = bridge.new_editor_logic(scene, segmentation, node)
    logic.GetSegmentEditorNode().SetOverwriteMode(EditorNode.OverwriteNone)
    return dict(scene=scene, node=node, segmentation=segmentation, logic=logic, result=result,
                liver=liver, spleen=spleen, masks={"liver": liver_mask, "spleen": spleen_mask}, volume=volume)


def apply(setup, segment_id=None):
    logic = setup["logic"]
    logic.UpdateReferenceGeometryImage()
    return bridge.write_mask_masked(
        setup["segmentation"], setup["node"], setup["result"], "tumour", GREEN,
        modify=bridge.editor_logic_modifier(logic), reference=logic.GetReferenceGeometryImage(),
        segment_id=segment_id, undo=logic)


def voxels(setup, segment_id):
    return snapshot(setup["segmentation"], setup["node"])[segment_id][2].astype(bool)


@pytest.mark.parametrize("mode, editable", [
    ("EditAllowedEverywhere", lambda m: np.ones(SHAPE, bool)),
    ("EditAllowedInsideAllSegments", lambda m: m["liver"] | m["spleen"]),
    ("EditAllowedInsideVisibleSegments", lambda m: m["liver"]),
    ("EditAllowedOutsideAllSegments", lambda m: ~(m["liver"] | m["spleen"])),
    ("EditAllowedOutsideVisibleSegments", lambda m: ~m["liver"]),
    ("EditAllowedInsideSingleSegment", lambda m: m["spleen"]),
])
def test_the_editable_area_limits_the_new_segment(setup, mode, editable):
    editor = setup["logic"].GetSegmentEditorNode()
    editor.SetMaskMode(getattr(Segmentation, mode))
    editor.SetMaskSegmentID(setup["spleen"])
    before = snapshot(setup["segmentation"], setup["node"])
    tumour = apply(setup)
    expected = setup["result"] & editable(setup["masks"])
    assert expected.any() and (setup["result"] & ~editable(setup["masks"])).any() or mode == "EditAllowedEverywhere"
    np.testing.assert_array_equal(voxels(setup, tumour), expected)
    after = snapshot(setup["segmentation"], setup["node"])
    assert_same({sid: before[sid] for sid in before}, {sid: after[sid] for sid in before})  # allow overlap: untouched
    setup["logic"].Undo()
    assert_same(before, snapshot(setup["segmentation"], setup["node"]))


def test_the_editable_intensity_range_limits_the_new_segment(setup):
    editor = setup["logic"].GetSegmentEditorNode()
    editor.SourceVolumeIntensityMaskOn()
    editor.SetSourceVolumeIntensityMaskRange(40, 90)
    tumour = apply(setup)
    inside = (setup["volume"] >= 40) & (setup["volume"] <= 90)
    np.testing.assert_array_equal(voxels(setup, tumour), setup["result"] & inside)
    assert (setup["result"] & ~inside).any()


@pytest.mark.parametrize("overwrite, erased", [
    ("OverwriteNone", ()),
    ("OverwriteVisibleSegments", ("liver",)),
    ("OverwriteAllSegments", ("liver", "spleen")),
])
def test_modify_other_segments_modes(setup, overwrite, erased):
    setup["logic"].GetSegmentEditorNode().SetOverwriteMode(getattr(EditorNode, overwrite))
    before = snapshot(setup["segmentation"], setup["node"])
    tumour = apply(setup)
    np.testing.assert_array_equal(voxels(setup, tumour), setup["result"])
    for name in ("liver", "spleen"):
        mask = setup["masks"][name]
        expected = mask & ~setup["result"] if name in erased else mask
        assert (mask & setup["result"]).any()  # the result overlaps both, so each mode shows
        np.testing.assert_array_equal(voxels(setup, setup[name]), expected, err_msg=f"{overwrite}: {name}")
    setup["logic"].Undo()  # one step: the new segment and every erased voxel come back together
    assert_same(before, snapshot(setup["segmentation"], setup["node"]))


def test_replacing_the_selected_segment_keeps_what_the_editable_area_protects(setup):
    editor = setup["logic"].GetSegmentEditorNode()
    editor.SetMaskMode(Segmentation.EditAllowedOutsideVisibleSegments)  # the liver itself is visible...
    spleen = setup["spleen"]
    assert apply(setup, segment_id=spleen) == spleen
    liver, spleen_mask = setup["masks"]["liver"], setup["masks"]["spleen"]
    # ...so inside the liver the spleen keeps its old voxels; elsewhere it becomes the result.
    expected = np.where(liver, spleen_mask, setup["result"])
    np.testing.assert_array_equal(voxels(setup, spleen), expected)
    np.testing.assert_array_equal(voxels(setup, setup["liver"]), liver)


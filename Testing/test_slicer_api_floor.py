"""Every Slicer API the effect and the module call exists in Slicer 5.10, the oldest version SaLIP supports.

The names below were read from Slicer's source at tag v5.10.0 (github.com/Slicer/Slicer) and
are kept here as data; the test reads the effect and the module as source (`ast`) and checks
every `scriptedEffect.<name>`, `slicer.util.<name>`, `slicer.app.<name>`, the Segment Editor
widget calls of the self-test and the PyTorch extension's call against them. A call added
later that 5.10 lacks fails here, not on a radiologist's machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EFFECT = ROOT / "SaLIPSegment" / "SegmentEditorSaLIPLib" / "SegmentEditorEffect.py"
MODULE = ROOT / "SaLIPSegment" / "SaLIPSegment.py"

# Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorAbstractEffect.h (v5.10.0):
# Q_PROPERTY names, Q_INVOKABLE methods and public slots (what PythonQt exposes).
ABSTRACT_EFFECT_5_10 = {
    # Q_PROPERTY
    "name", "title", "perSegment", "requireSegments", "showEffectCursorInSliceView",
    "showEffectCursorInThreeDView",
    # Q_INVOKABLE
    "helpText", "activate", "deactivate", "active", "modifySelectedSegmentByLabelmap", "modifySegmentByLabelmap",
    "applyImageMask", "createCursor", "cleanup", "parameterSetNode", "setParameterSetNode", "scene", "optionsFrame",
    "optionsLayout", "addActor2D", "removeActor2D", "addActor3D", "removeActor3D", "addOptionsWidget",
    "addLabeledOptionsWidget", "cursorOff", "cursorOn", "selectEffect", "parameter", "integerParameter",
    "doubleParameter", "nodeReference", "setParameter", "setParameterDefault", "setCommonParameter",
    "setCommonParameterDefault", "setNodeReference", "setCommonNodeReference", "parameterDefined",
    "commonParameterDefined", "confirmCurrentSegmentVisible", "modifierLabelmap", "defaultModifierLabelmap",
    "maskLabelmap", "selectedSegmentLabelmap", "referenceGeometryImage", "sourceVolumeImageData",
    "masterVolumeImageData", "saveStateForUndo", "renderWindow", "renderer", "viewNode", "rasToXy", "xyzToRas",
    "xyToRas", "xyzToIjk", "xyToIjk", "forceRender", "scheduleRender", "sliceSpacing",
    "segmentationDisplayableInView",
    # public slots
    "updateGUIFromMRML", "updateMRMLFromGUI",
}
# enum ModificationMode in the same header
MODIFICATION_MODES_5_10 = {"ModificationModeSet", "ModificationModeAdd", "ModificationModeRemove",
                           "ModificationModeRemoveAll"}
# Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.h (v5.10.0): Q_INVOKABLE
SCRIPTED_EFFECT_5_10 = {"pythonSource", "setPythonSource", "self"}

# Base/Python/slicer/util.py (v5.10.0): the module-level functions SaLIP may call.
SLICER_UTIL_5_10 = {
    "mainWindow", "selectModule", "getNode", "arrayFromVolume", "arrayFromSegmentBinaryLabelmap",
    "updateSegmentBinaryLabelmapFromArray", "delayDisplay", "infoDisplay", "warningDisplay", "errorDisplay",
    "confirmOkCancelDisplay", "confirmYesNoDisplay", "tryWithErrorDisplay", "pip_install", "pip_uninstall",
    "launchConsoleProcess", "logProcessOutput", "settingsValue", "toBool", "tempDirectory",
}
# Base/QTCore/qSlicerCoreApplication.h and Base/QTGUI/qSlicerApplication.h (v5.10.0)
SLICER_APP_5_10 = {"slicerHome", "cachePath", "temporaryPath", "majorVersion", "minorVersion", "layoutManager",
                   "processEvents", "connect"}
# Libs/MRML/Widgets/qMRMLLayoutManager.h: sliceViewNames, sliceWidget; qMRMLSliceWidget.h: mrmlSliceNode
LAYOUT_5_10 = {"sliceViewNames", "sliceWidget", "mrmlSliceNode"}
# Libs/MRML/Widgets/qMRMLNodeComboBox.h (v5.10.0): the Q_PROPERTY names, Q_INVOKABLE methods and public
# slots the effect's node selectors use (the slice range's ROI, the box ROI and the point lists of a fix);
# setToolTip is QWidget's.
NODE_COMBOBOX_5_10 = {
    "nodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "editEnabled", "renameEnabled", "showHidden",
    "selectNodeUponCreation", "baseName", "noneDisplay", "mrmlScene", "currentNode", "currentNodeId",
    "nodeCount", "setMRMLScene", "setCurrentNode", "setCurrentNodeID", "setCurrentNodeIndex",
    "connect", "setToolTip", "enabled", "visible",
}
# Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.h (v5.10.0), the self-test's calls
SEGMENT_EDITOR_WIDGET_5_10 = {
    "setMaximumNumberOfUndoStates", "setMRMLScene", "setMRMLSegmentEditorNode", "setSegmentationNode",
    "setSourceVolumeNode", "setActiveEffectByName", "activeEffect", "undo", "redo", "effectByName",
    "saveStateForUndo",
}
# PyTorchUtils/PyTorchUtils.py (github.com/fepegar/SlicerPyTorch):
# installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None, ...)
PYTORCH_UTILS = {"PyTorchUtilsLogic": set(), "installTorch": {"askConfirmation", "torchVersionRequirement"}}


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def attributes_of(module: ast.Module, owner: str) -> set:
    """Names `X` in every `<owner>.X` (owner written as in the source, e.g. "self.scriptedEffect")."""
    return {node.attr for node in ast.walk(module) if isinstance(node, ast.Attribute)
            and ast.unparse(node.value) == owner}


def test_every_scripted_effect_call_exists_in_slicer_5_10():
    used = attributes_of(tree(EFFECT), "self.scriptedEffect") | attributes_of(tree(EFFECT), "scriptedEffect")
    used |= attributes_of(tree(MODULE), "effect") - {"self"}  # the self-test's qSlicerSegmentEditorScriptedEffect
    assert used, "no scriptedEffect calls found: the test would prove nothing"
    missing = used - ABSTRACT_EFFECT_5_10 - SCRIPTED_EFFECT_5_10 - {"self"}
    assert not missing, f"not in Slicer 5.10's effect API: {sorted(missing)}"
    assert {"modifySegmentByLabelmap", "saveStateForUndo", "referenceGeometryImage", "nodeReference"} <= used


def test_modification_modes_exist_in_slicer_5_10():
    used = attributes_of(tree(EFFECT), "slicer.qSlicerSegmentEditorAbstractEffect")
    assert used and used <= MODIFICATION_MODES_5_10


def test_slicer_util_and_app_calls_exist_in_slicer_5_10():
    for path in (EFFECT, MODULE):
        module = tree(path)
        util = attributes_of(module, "slicer.util")
        app = attributes_of(module, "slicer.app")
        assert not util - SLICER_UTIL_5_10, f"{path.name}: {sorted(util - SLICER_UTIL_5_10)}"
        assert not app - SLICER_APP_5_10, f"{path.name}: {sorted(app - SLICER_APP_5_10)}"
    layout = attributes_of(tree(EFFECT), "layoutManager") | {
        node.attr for node in ast.walk(tree(EFFECT)) if isinstance(node, ast.Attribute)
        and ast.unparse(node.value).startswith("layoutManager.sliceWidget(")}
    assert layout and not layout - LAYOUT_5_10, sorted(layout - LAYOUT_5_10)


def test_segment_editor_widget_and_pytorch_calls_exist():
    module = tree(MODULE)
    widget = attributes_of(module, "segmentEditorWidget")
    assert widget and not widget - SEGMENT_EDITOR_WIDGET_5_10, sorted(widget - SEGMENT_EDITOR_WIDGET_5_10)
    calls = [node for node in ast.walk(module) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "installTorch"]
    assert calls, "the module installs torch through PyTorchUtils"
    for call in calls:
        assert "PyTorchUtilsLogic()" in ast.unparse(call.func.value)
        assert {keyword.arg for keyword in call.keywords} <= PYTORCH_UTILS["installTorch"]


def test_node_selector_calls_exist_in_slicer_5_10():
    effect = tree(EFFECT)
    for selector in ("self.roiSelector", "self.hintRoiSelector", "self.onPointsSelector", "self.offPointsSelector",
                     "selector"):
        used = attributes_of(effect, selector)
        assert used, f"{selector} is not used any more: update this test"
        assert used <= NODE_COMBOBOX_5_10, sorted(used - NODE_COMBOBOX_5_10)

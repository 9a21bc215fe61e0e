"""The effect's own code, driven as Slicer drives it: Preview, leave and come back, Apply, Undo, Cancel.

The effect file is loaded with the lines of Slicer 5.10's loader (see test_effect_loader.py).
Stand-ins replace only what exists in the Slicer application alone: `qt` widgets and timer,
`ctk`, `slicer.app`, the message boxes of `slicer.util`, and the C++ adaptor
`scriptedEffect`, whose editing calls go to Slicer's real `vtkSlicerSegmentEditorLogic`
(slicer-core), as `qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap` does in 5.10.
MRML is real and the engine runs in a real child process (tiny real architectures).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import slicer
from test_slicer_bridge import OBLIQUE, blob, snapshot
from test_worker import engine_worker

from SaLIPSegmentLib import jobs
from SaLIPSegmentLib import slicer_bridge as bridge

from conftest import disk_image
from slicer_mrml import add_volume, new_scene

EFFECT = Path(__file__).resolve().parents[1] / "SaLIPSegment" / "SegmentEditorSaLIPLib" / "SegmentEditorEffect.py"


class Widget:
    """Any Qt widget the effect reads or sets after its panel exists: plain attributes."""

    def __init__(self):
        self.text, self.enabled, self.visible, self.items = "", True, True, []
        self.minimum = self.maximum = self.value = 0
        self.formats = []

    def setFormat(self, text):
        self.format = text
        self.formats.append(text)

    def clear(self):
        self.items = []

    def addItem(self, item):
        self.items.append(item)


class QTimer:
    def __init__(self):
        self.active = False

    def setInterval(self, interval):
        pass

    def connect(self, signal, slot):
        pass

    def disconnect(self, signal, slot):
        pass

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class QListWidgetItem:
    def __init__(self, label):
        self.label, self.data = label, {}

    def setData(self, role, value):
        self.data[role] = value


class ScriptedEffect:
    """The adaptor's calls the effect makes, on a real segment editor node and logic."""

    def __init__(self, logic):
        self.logic, self.parameters, self.undo_states = logic, {}, 0

    def parameterSetNode(self):
        return self.logic.GetSegmentEditorNode()

    def setParameterDefault(self, name, value):
        self.parameters.setdefault(name, value)

    def setParameter(self, name, value):
        self.parameters[name] = value

    def parameter(self, name):
        return str(self.parameters.get(name, ""))

    def integerParameter(self, name):
        return int(self.parameters.get(name, 0))

    def doubleParameter(self, name):
        return float(self.parameters.get(name, 0.0))

    def nodeReference(self, name):
        return None

    def saveStateForUndo(self):
        self.undo_states += 1
        self.logic.SaveStateForUndo()

    def referenceGeometryImage(self):
        self.logic.UpdateReferenceGeometryImage()
        return self.logic.GetReferenceGeometryImage()

    def modifySegmentByLabelmap(self, segmentationNode, segmentId, labelmap, mode):
        self.logic.ModifySegmentByLabelmap(segmentationNode, segmentId, labelmap, mode, False, False)


class Settings:
    """SaLIPSegmentLogic's answers (models, device, folder), without QSettings."""

    def __init__(self, sam, clip, model_dir):
        self.values = (sam, clip, "cpu", model_dir)

    def segmenterName(self):
        return self.values[0]

    def scorerName(self):
        return self.values[1]

    def deviceName(self):
        return self.values[2]

    def modelDirectory(self):
        return self.values[3]

    def ensureDependencies(self, askConfirmation=True):
        return True


@pytest.fixture
def slicer_app(monkeypatch):
    """Stand-ins for the application-only parts; messages are recorded instead of shown."""
    messages = []
    qt = types.ModuleType("qt")
    qt.QTimer, qt.QListWidgetItem, qt.QIcon = QTimer, QListWidgetItem, lambda *args: None
    qt.Qt = types.SimpleNamespace(UserRole=32)
    base = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

    base.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    for name, module in {"qt": qt, "ctk": types.ModuleType("ctk"), "SegmentEditorEffects": base,
                         "slicer.i18n": i18n}.items():
        monkeypatch.setitem(sys.modules, name, module)

    @contextlib.contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as error:
            messages.append(("error", f"{message} {error}"))

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(slicerHome="", layoutManager=lambda: None),
                        raising=False)
    for name, kind in (("errorDisplay", "error"), ("warningDisplay", "warning")):
        monkeypatch.setattr(slicer.util, name, lambda text, *a, kind=kind, **k: messages.append((kind, text)),
                            raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: True, raising=False)
    monkeypatch.setattr(slicer.util, "selectModule", lambda name: messages.append(("module", name)), raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display, raising=False)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect",
                        types.SimpleNamespace(ModificationModeSet=slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet),
                        raising=False)
    return messages


def load_effect_class(monkeypatch):
    # Base/QTCore/qSlicerScriptedUtils.cxx (v5.10.0), loadSourceAsModule, with the folder's name.
    spec = importlib.util.spec_from_file_location("SegmentEditorSaLIPLib", str(EFFECT))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "SegmentEditorSaLIPLib", module)
    spec.loader.exec_module(module)
    return module.SegmentEditorEffect


@pytest.fixture
def editor(slicer_app, monkeypatch, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    scene = new_scene()
    volume = np.stack([disk_image(size=40, center=(18, 21), radius=6 + i) for i in range(6)]).astype(np.int16)
    node = add_volume(scene, volume, OBLIQUE, "mri")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "work")
    segmentation.CreateDefaultDisplayNodes()
    existing = bridge.write_mask_to_segment(segmentation, node, blob(volume.shape, (3, 18, 21), (3, 4, 4)),
                                            "cyst", (1, 0, 0))
    logic = bridge.new_editor_logic(scene, segmentation, node)
    engine = engine_worker()
    monkeypatch.setattr(jobs, "_ENGINE", engine)
    monkeypatch.setattr(jobs, "SESSIONS", jobs.SessionRegistry())
    effect = load_effect_class(monkeypatch)(ScriptedEffect(logic))
    effect.setMRMLDefaults()
    for name in ("progressBar", "statusLabel", "previewButton", "applyButton", "cancelButton", "flaggedListWidget",
                 "flaggedLabel", "modelsLabel"):
        setattr(effect, name, Widget())
    effect.logic = lambda: Settings(tiny_sam, tiny_clip_option, str(tiny_sam_checkpoint.parent))
    yield types.SimpleNamespace(scene=scene, node=node, segmentation=segmentation, logic=logic, effect=effect,
                                existing=existing, engine=engine, messages=slicer_app)
    engine.stop()


def drive(effect, until, deadline_s=240):
    """What the effect's QTimer does while Slicer's event loop runs."""
    deadline = time.monotonic() + deadline_s
    while not until():
        assert time.monotonic() < deadline, "the effect's run did not finish"
        assert effect.timer.active, "the effect stopped reading its run"
        effect.onPollJob()
        time.sleep(0.02)


def test_preview_survives_leaving_the_effect_and_apply_honours_the_editable_area(editor):
    effect, scene = editor.effect, editor.scene
    effect.onPreview()
    session = effect.session()
    assert session.running and effect.timer.active and not effect.previewButton.enabled, editor.messages
    job = session.job
    # The radiologist opens "Settings..." (the effect is deactivated), places an ROI, comes back.
    drive(effect, lambda: job.done >= 1)
    effect.deactivate()
    effect.interactionNodeModified(None)
    assert effect.session() is session and session.job is job and session.running and effect.timer.active
    effect.activate()
    drive(effect, lambda: not session.running)
    assert not effect.timer.active and job.state == jobs.DONE, editor.messages
    preview = effect.previewNode()
    assert preview is not None and preview.GetAttribute(bridge.PREVIEW_ATTRIBUTE) == "1"
    assert "slices have a mask" in effect.statusLabel.text and effect.applyButton.enabled
    mask = np.load(job.result["mask"])
    assert mask.any()

    # Leaving the effect after the run keeps the preview too.
    effect.deactivate()
    effect.activate()
    assert effect.previewNode() is preview

    # Apply: only outside the existing segment is editable; one undo step.
    editor_node = editor.logic.GetSegmentEditorNode()
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    before, after, new = apply_as_one_undo_step(editor)
    cyst = before[editor.existing][2].astype(bool)
    assert (mask.astype(bool) & cyst).any()
    np.testing.assert_array_equal(after[new][2].astype(bool), mask.astype(bool) & ~cyst)
    np.testing.assert_array_equal(after[editor.existing][2], before[editor.existing][2])
    assert after[new][0] == "Brain" and editor_node.GetSelectedSegmentID() == new
    assert effect.previewNode() is None and scene.GetNodeByID(preview.GetID()) is None
    assert effect.session().run is None
    editor.logic.Undo()
    assert list(snapshot(editor.segmentation, editor.node)) == list(before)


def apply_as_one_undo_step(editor):
    """Apply the preview: (the segments before, after, the new segment's id); Apply is one undo step."""
    before = snapshot(editor.segmentation, editor.node)
    undo_states = editor.effect.scriptedEffect.undo_states
    editor.effect.onApply()
    after = snapshot(editor.segmentation, editor.node)
    assert editor.effect.scriptedEffect.undo_states == undo_states + 1
    [new] = [sid for sid in after if sid not in before]
    return before, after, new


def test_cancel_kills_the_run_and_changes_nothing(editor):
    effect, scene = editor.effect, editor.scene
    before = snapshot(editor.segmentation, editor.node)
    node_ids = [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]
    effect.onPreview()
    session = effect.session()
    folder = session.run["folder"]
    drive(effect, lambda: session.job.done >= 1)
    assert session.running  # mid-run: slices are still to come
    process = editor.engine.process
    effect.onCancel()
    assert not process.alive and not session.running and effect.previewNode() is None
    assert effect.statusLabel.text.startswith("Cancelled") and not Path(folder).exists()
    assert [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())] == node_ids
    assert list(snapshot(editor.segmentation, editor.node)) == list(before)
    assert effect.previewButton.enabled and not effect.applyButton.enabled


def test_a_failing_run_is_a_message_and_leaves_no_preview(editor, tmp_path, tiny_sam):
    effect = editor.effect
    missing = tmp_path / "absent_clip.pt"
    effect.logic = lambda: Settings(tiny_sam, f"salip-test-tiny-clip:{missing}", str(tmp_path))
    effect.onPreview()
    drive(effect, lambda: not effect.session().running)
    assert effect.session().job is None and effect.previewNode() is None
    assert effect.statusLabel.text.startswith("Failed")
    assert ("module", "SaLIPSegment") in editor.messages  # it offers the SaLIP module to fetch weights


def test_fixing_slices_after_preview_updates_only_around_them_and_apply_stays_one_undo_step(editor, monkeypatch):
    from test_slicer_bridge import _roi, ras_of, set_slice_plane

    effect, scene = editor.effect, editor.scene
    for name in ("hintsCollapsibleButton", "boxHintButton", "pointsHintButton", "absentHintButton", "nextSliceButton",
                 "removeHintButton", "updateButton", "hintListWidget"):
        setattr(effect, name, Widget())
    effect.hintListWidget.currentItem = lambda: None
    # One real slice view (Red) across the volume's k axis, as Slicer's layout manager hands it out.
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    layout = types.SimpleNamespace(sliceViewNames=lambda: ["Red"],
                                   sliceWidget=lambda name: types.SimpleNamespace(mrmlSliceNode=lambda: red))
    monkeypatch.setattr(slicer.app, "layoutManager", lambda: layout)
    normal = OBLIQUE[:3, 2] / np.linalg.norm(OBLIQUE[:3, 2])

    def show_slice(k):
        set_slice_plane(red, normal, ras_of(OBLIQUE, (21, 18, k)))

    effect.onPreview()
    session = effect.session()
    drive(effect, lambda: not session.running)
    automatic = np.load(session.job.result["mask"]).astype(bool)
    first_preview = effect.previewNode()
    assert automatic[3].any() and session.hints is not None and not effect.updateButton.enabled, editor.messages

    show_slice(3)
    effect.onAbsentHint()
    show_slice(1)
    directions = OBLIQUE[:3, :3] / np.linalg.norm(OBLIQUE[:3, :3], axis=0)
    roi = _roi(scene, ras_of(OBLIQUE, (21, 18, 1)), (12 * 0.8, 12 * 1.1, 3.0), directions)
    effect.hintRoiSelector = types.SimpleNamespace(currentNode=lambda: roi)
    effect.onBoxHint()
    # Points (SAM takes them): two real point lists, on and off the target; a point on another slice is left out.
    assert effect.pointsHintButton.enabled
    show_slice(4)
    on_target, off_target = (scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name) for name in ("on", "off"))
    on_target.AddControlPoint(*ras_of(OBLIQUE, (21, 18, 4)))
    on_target.AddControlPoint(*ras_of(OBLIQUE, (21, 18, 2)))
    off_target.AddControlPoint(*ras_of(OBLIQUE, (4, 5, 4)))
    effect.onPointsSelector = types.SimpleNamespace(currentNode=lambda: on_target)
    effect.offPointsSelector = types.SimpleNamespace(currentNode=lambda: off_target)
    effect.onPointsHint()
    assert session.hints.hints == {1: {"slice": 1, "box": [15, 12, 27, 24]}, 3: {"slice": 3, "absent": True},
                                   4: {"slice": 4, "points": [[21.0, 18.0], [4.0, 5.0]], "labels": [1, 0]}}
    assert effect.updateButton.enabled and [item.label for item in effect.hintListWidget.items] == [
        "Slice 1: box 13 x 13 px (new)", "Slice 3: no target (new)",
        "Slice 4: 2 points (1 off the target) (new)"], editor.messages

    # Cancel during an Update stops only the Update: the preview, the fixes and the engine's kept run stay.
    effect.onUpdate()
    effect.onCancel()
    stopped = session.job
    drive(effect, lambda: not session.running)
    assert stopped.state == jobs.CANCELLED and not session.correcting, editor.messages
    assert effect.previewNode() is first_preview and session.hints.pending and effect.updateButton.enabled
    assert effect.statusLabel.text.startswith("Update stopped")
    assert not [m for m in editor.messages if m[0] == "error"], editor.messages

    shown = len(effect.progressBar.formats)
    effect.onUpdate()
    assert session.running and session.correcting
    drive(effect, lambda: not session.running)
    assert session.job.state == jobs.DONE, editor.messages
    correction = session.job.result["correction"]
    assert correction["encodings"] == 0 and correction["hinted"] == [1, 3, 4]
    # Update's bar counts the slices it redoes, never the volume's, and never steps back.
    words = effect.progressBar.formats[shown:]
    counted = [int(w.split()[2]) - 1 if w.startswith("Redoing slice ") else int(w.split()[0])
               for w in words if w != "Applying the fixes..."]
    assert words[-1].endswith(" slices redone") and counted == sorted(counted), words
    assert len(correction["hinted"]) <= int(words[-1].split()[0]) <= len(correction["changed"])
    corrected = np.load(session.job.result["mask"]).astype(bool)
    assert not corrected[3].any()
    kept = [k for k in range(6) if k not in correction["changed"]]
    np.testing.assert_array_equal(corrected[kept], automatic[kept])
    preview = effect.previewNode()
    assert preview is not first_preview and scene.GetNodeByID(first_preview.GetID()) is None
    assert not effect.updateButton.enabled and not session.hints.pending
    assert [item.label for item in effect.hintListWidget.items] == [
        "Slice 1: box 13 x 13 px", "Slice 3: no target", "Slice 4: 2 points (1 off the target)"]
    effect.onNextSliceToFix()  # jumps to the worst slice not fixed yet (or says there is none)
    assert not [m for m in editor.messages if m[0] == "error"], editor.messages

    before, after, new = apply_as_one_undo_step(editor)
    np.testing.assert_array_equal(after[new][2].astype(bool), corrected)
    editor.logic.Undo()
    assert list(snapshot(editor.segmentation, editor.node)) == list(before)

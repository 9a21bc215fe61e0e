"""The SaLIP Segment Editor effect: a text prompt in, a previewed segment out.

Thin by design: it gathers options, hands the volume to the engine's child process
(`jobs.EngineWorker`, whose JSON progress lines a QTimer reads without blocking), shows
the result as a preview and writes it through the Segment Editor's own masking. The run
and the preview live in a `jobs.PreviewSession`, not in this object, so that leaving the
effect keeps them. Anything worth testing lives in `effect_options`, `jobs`,
`slicer_bridge` or the engine.
"""

import logging
import os

import ctk
import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect
from slicer.i18n import tr as _

from SaLIPSegmentLib import effect_options

__all__ = ["SegmentEditorEffect"]

POLL_INTERVAL_MS = 200
DEFAULT_SPIN_TEXT = "default"
# A spin box at its minimum shows DEFAULT_SPIN_TEXT and means "the model's own default".
UNSET_FRACTION = -0.01
UNSET_COUNT = -1


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Segments the organ named by a text prompt on every slice: SAM proposes, CLIP retrieves, SAM refines."""

    def __init__(self, scriptedEffect):
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        scriptedEffect.name = "SaLIP"  # no tr: modules and tests find effects by name
        scriptedEffect.title = _("SaLIP")
        scriptedEffect.perSegment = False  # it creates its own segment (or replaces the selected one)
        scriptedEffect.requireSegments = False

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPollJob)

    def cleanup(self):
        # Disconnect so the effect can be garbage collected (Slicer issue #7392).
        self.timer.stop()
        self.timer.disconnect("timeout()", self.onPollJob)

    def clone(self):
        # It should not be necessary to modify this method
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        if os.path.exists(iconPath):
            return qt.QIcon(iconPath)
        return qt.QIcon()

    def helpText(self):
        return "<html>" + _("""Segment an organ from a text prompt, with no clicks and no training.<br>
On every slice, SAM proposes parts, CLIP picks the part that matches the prompt, and SAM refines it.
<p><ul style="margin: 0">
<li><b>Prompt:</b> a preset ("brain", "lungs", ...) or any words.</li>
<li><b>Preview:</b> runs on the chosen slices in a separate process (Slicer stays responsive; the run and
its preview stay when you leave the effect); the result is shown as a separate preview segmentation.</li>
<li><b>Apply:</b> writes the preview into a new segment (or the selected one), within the editable area,
intensity range and "modify other segments" setting of the Masking section. Undo reverts it.</li>
<li><b>Fix slices</b> (after Preview): on the slice a view shows, take the box of a markups ROI or say
"no target on this slice"; <b>Update</b> re-runs the slices between that slice and the next key slice or
fixed slice, and beyond them those the fix improves. <b>Next slice to fix</b> shows the slice the checks
rank worst.</li>
<li><b>Cancel:</b> stops a running preview (nothing is changed), or discards the preview.</li>
</ul><p>Models, device and weights are chosen in the <b>SaLIP</b> module.""")

    def createCursor(self, widget):
        # The effect does not draw in the views: keep the usual cursor
        return slicer.util.mainWindow().cursor

    # -- options panel ---------------------------------------------------------------

    def setupOptionsFrame(self):
        from SaLIPSegmentLib.prompts import load_presets

        self.promptComboBox = qt.QComboBox()
        self.promptComboBox.editable = True
        for preset in load_presets().values():
            self.promptComboBox.addItem(preset.display_name, preset.name)
        self.promptComboBox.setToolTip(_("A preset, or any words describing what to segment."))
        self.scriptedEffect.addLabeledOptionsWidget(_("Prompt:"), self.promptComboBox)
        self.promptComboBox.connect("editTextChanged(QString)", self.updateMRMLFromGUI)

        # Slice range
        self.rangeAllButton = qt.QRadioButton(_("All slices"))
        self.rangeAroundButton = qt.QRadioButton(_("Current slice ±"))
        self.rangeRoiButton = qt.QRadioButton(_("ROI extent"))
        self.rangeButtonGroup = qt.QButtonGroup()
        for button in (self.rangeAllButton, self.rangeAroundButton, self.rangeRoiButton):
            self.rangeButtonGroup.addButton(button)
            button.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.halfWidthSpinBox = qt.QSpinBox()
        self.halfWidthSpinBox.minimum = 0
        self.halfWidthSpinBox.maximum = 1000
        self.halfWidthSpinBox.setToolTip(_("Slices on each side of the slice shown in the view."))
        self.halfWidthSpinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        self.roiSelector = slicer.qMRMLNodeComboBox()
        self.roiSelector.nodeTypes = ["vtkMRMLMarkupsROINode"]
        self.roiSelector.noneEnabled = True
        self.roiSelector.addEnabled = True
        self.roiSelector.removeEnabled = False
        self.roiSelector.setMRMLScene(slicer.mrmlScene)
        self.roiSelector.setToolTip(_("Only slices crossing this ROI are segmented."))
        self.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRoiChanged)
        rangeLayout = qt.QGridLayout()
        rangeLayout.addWidget(self.rangeAllButton, 0, 0)
        rangeLayout.addWidget(self.rangeAroundButton, 1, 0)
        rangeLayout.addWidget(self.halfWidthSpinBox, 1, 1)
        rangeLayout.addWidget(self.rangeRoiButton, 2, 0)
        rangeLayout.addWidget(self.roiSelector, 2, 1)
        self.scriptedEffect.addLabeledOptionsWidget(_("Slices:"), rangeLayout)

        self.axisComboBox = qt.QComboBox()
        self.axisComboBox.addItem(_("auto (acquisition axis)"), effect_options.AXIS_AUTO)
        for axis in ("0", "1", "2"):
            self.axisComboBox.addItem(_("numpy axis {axis} ({name})").format(axis=axis, name="kji"[int(axis)]), axis)
        self.axisComboBox.setToolTip(_("Axis to slice across; auto picks the axis with the largest spacing."))
        self.axisComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.scriptedEffect.addLabeledOptionsWidget(_("Slice axis:"), self.axisComboBox)

        self.topKSpinBox = qt.QSpinBox()
        self.topKSpinBox.minimum = 0
        self.topKSpinBox.maximum = 10
        self.topKSpinBox.specialValueText = _("from prompt")
        self.topKSpinBox.setToolTip(_("Parts kept per slice (two lungs: 2). 'from prompt' uses the preset's value."))
        self.topKSpinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        self.scriptedEffect.addLabeledOptionsWidget(_("Top-k:"), self.topKSpinBox)

        self.useDisplayWindowCheckBox = qt.QCheckBox(_("use the view's window/level"))
        self.useDisplayWindowCheckBox.setToolTip(
            _("Models see the image as displayed. Unchecked: a robust 0.5-99.5 percentile window."))
        self.useDisplayWindowCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.scriptedEffect.addLabeledOptionsWidget(_("Intensity:"), self.useDisplayWindowCheckBox)

        self.replaceSelectedCheckBox = qt.QCheckBox(_("Replace selected segment"))
        self.replaceSelectedCheckBox.setToolTip(
            _("Unchecked: the result goes into a new segment named after the prompt. Either way the "
              "Segment Editor's masking (editable area, intensity range, modify other segments) applies."))
        self.replaceSelectedCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.fillHolesCheckBox = qt.QCheckBox(_("Fill holes"))
        self.fillHolesCheckBox.setToolTip(
            _("Fill holes enclosed in each slice's mask: the models leave bright or dark patches inside an "
              "organ out. Uncheck for a target that is a ring round a lumen (a wall). Applies from the next Preview."))
        self.fillHolesCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        outputLayout = qt.QHBoxLayout()
        outputLayout.addWidget(self.replaceSelectedCheckBox)
        outputLayout.addWidget(self.fillHolesCheckBox)
        self.scriptedEffect.addOptionsWidget(outputLayout)

        self.setupAdvancedSection()

        self.modelsLabel = qt.QLabel()
        self.modelsLabel.wordWrap = True
        self.settingsButton = qt.QPushButton(_("Settings..."))
        self.settingsButton.setToolTip(_("Choose models, device and model folder in the SaLIP module."))
        self.settingsButton.connect("clicked()", self.onOpenSettings)
        modelsLayout = qt.QHBoxLayout()
        modelsLayout.addWidget(self.modelsLabel, 1)
        modelsLayout.addWidget(self.settingsButton)
        self.scriptedEffect.addLabeledOptionsWidget(_("Models:"), modelsLayout)

        self.previewButton = qt.QPushButton(_("Preview"))
        self.previewButton.objectName = self.__class__.__name__ + "Preview"
        self.previewButton.setToolTip(_("Run on the chosen slices and show the result as a preview."))
        self.previewButton.connect("clicked()", self.onPreview)
        self.applyButton = qt.QPushButton(_("Apply"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip(_("Write the preview into the segmentation (undoable)."))
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.cancelButton.objectName = self.__class__.__name__ + "Cancel"
        self.cancelButton.setToolTip(_("Stop the running preview (or only a running Update), or discard the preview."))
        self.cancelButton.connect("clicked()", self.onCancel)
        buttonsLayout = qt.QHBoxLayout()
        buttonsLayout.addWidget(self.previewButton)
        buttonsLayout.addWidget(self.applyButton)
        buttonsLayout.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(buttonsLayout)

        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.flaggedListWidget = qt.QListWidget()
        self.flaggedListWidget.setToolTip(_("Slices whose mask needs a look (no part matched, fragments, a shape "
                                            "unlike its neighbours...), with the engine's confidence. "
                                            "Click one to show it."))
        self.flaggedListWidget.connect("itemClicked(QListWidgetItem*)", self.onFlaggedSliceClicked)
        self.flaggedLabel = self.scriptedEffect.addLabeledOptionsWidget(_("Check:"), self.flaggedListWidget)
        self.flaggedListWidget.visible = False
        self.flaggedLabel.visible = False

        self.setupHintsSection()
        self.updateButtons()

    def setupHintsSection(self):
        """After Preview: hints on the viewed slice, Update, and the next slice to fix (effect_hints)."""
        self.hintsCollapsibleButton = ctk.ctkCollapsibleButton()
        self.hintsCollapsibleButton.text = _("Fix slices")
        hintsLayout = qt.QFormLayout(self.hintsCollapsibleButton)
        self.hintRoiSelector = slicer.qMRMLNodeComboBox()
        self.hintRoiSelector.nodeTypes = ["vtkMRMLMarkupsROINode"]
        self.hintRoiSelector.noneEnabled = True
        self.hintRoiSelector.addEnabled = True
        self.hintRoiSelector.removeEnabled = False
        self.hintRoiSelector.setMRMLScene(slicer.mrmlScene)
        self.hintRoiSelector.setToolTip(_("Draw an ROI around the target on the slice to fix."))
        hintsLayout.addRow(_("Box ROI:"), self.hintRoiSelector)
        self.onPointsSelector = self._pointListSelector(_("Points placed on the target (models that take points)."))
        self.offPointsSelector = self._pointListSelector(_("Points placed next to the target, on what is not it."))
        pointSelectors = qt.QHBoxLayout()
        pointSelectors.addWidget(self.onPointsSelector)
        pointSelectors.addWidget(qt.QLabel(_("off:")))
        pointSelectors.addWidget(self.offPointsSelector)
        hintsLayout.addRow(_("Points on:"), pointSelectors)
        self.boxHintButton = qt.QPushButton(_("Box from ROI on this slice"))
        self.boxHintButton.setToolTip(_("The ROI's extent becomes the box of the slice shown in the view."))
        self.boxHintButton.connect("clicked()", self.onBoxHint)
        self.absentHintButton = qt.QPushButton(_("No target on this slice"))
        self.absentHintButton.setToolTip(_("The slice shown gets no mask, and propagation stops there."))
        self.absentHintButton.connect("clicked()", self.onAbsentHint)
        self.pointsHintButton = qt.QPushButton(_("Points on this slice"))
        self.pointsHintButton.setToolTip(_("The points placed on the slice shown become its fix (SAM; LiteMedSAM "
                                           "takes boxes only)."))
        self.pointsHintButton.connect("clicked()", self.onPointsHint)
        hintButtons = qt.QHBoxLayout()
        hintButtons.addWidget(self.boxHintButton)
        hintButtons.addWidget(self.pointsHintButton)
        hintButtons.addWidget(self.absentHintButton)
        hintsLayout.addRow(hintButtons)
        self.hintListWidget = qt.QListWidget()
        self.hintListWidget.setToolTip(_("The fixes of this preview. Click one to show its slice."))
        self.hintListWidget.connect("itemClicked(QListWidgetItem*)", self.onFlaggedSliceClicked)
        hintsLayout.addRow(_("Fixes:"), self.hintListWidget)
        self.removeHintButton = qt.QPushButton(_("Remove fix"))
        self.removeHintButton.connect("clicked()", self.onRemoveHint)
        self.updateButton = qt.QPushButton(_("Update"))
        self.updateButton.setToolTip(_("Re-run around the fixed slices and refresh the preview."))
        self.updateButton.connect("clicked()", self.onUpdate)
        self.nextSliceButton = qt.QPushButton(_("Next slice to fix"))
        self.nextSliceButton.setToolTip(_("Show the slice the checks rank worst among those not fixed yet."))
        self.nextSliceButton.connect("clicked()", self.onNextSliceToFix)
        updateButtons = qt.QHBoxLayout()
        updateButtons.addWidget(self.removeHintButton)
        updateButtons.addWidget(self.updateButton)
        updateButtons.addWidget(self.nextSliceButton)
        hintsLayout.addRow(updateButtons)
        self.scriptedEffect.addOptionsWidget(self.hintsCollapsibleButton)

    def _pointListSelector(self, toolTip):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = ["vtkMRMLMarkupsFiducialNode"]
        selector.noneEnabled = True
        selector.addEnabled = True
        selector.removeEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setToolTip(toolTip)
        return selector

    def setupAdvancedSection(self):
        self.advancedCollapsibleButton = ctk.ctkCollapsibleButton()
        self.advancedCollapsibleButton.text = _("Advanced: proposal settings")
        self.advancedCollapsibleButton.collapsed = True
        advancedLayout = qt.QFormLayout(self.advancedCollapsibleButton)

        self.pointsPerSideSpinBox = self._optionalSpinBox(0, 128, _("Point grid side (SAM)."))
        advancedLayout.addRow(_("Points per side:"), self.pointsPerSideSpinBox)
        self.predIouSpinBox = self._optionalDoubleSpinBox(1.0, _("Drop parts whose predicted IoU is lower."))
        advancedLayout.addRow(_("Predicted IoU threshold:"), self.predIouSpinBox)
        self.stabilitySpinBox = self._optionalDoubleSpinBox(1.0, _("Drop parts that are not stable."))
        advancedLayout.addRow(_("Stability threshold:"), self.stabilitySpinBox)
        self.cropLayersSpinBox = self._optionalSpinBox(
            UNSET_COUNT, 3, _("Extra crop layers (the paper used 1; each costs encodings)."))
        advancedLayout.addRow(_("Crop layers:"), self.cropLayersSpinBox)
        self.maxAreaSpinBox = self._optionalDoubleSpinBox(
            1.0, _("Drop parts covering more than this fraction of the slice."))
        advancedLayout.addRow(_("Maximum area fraction:"), self.maxAreaSpinBox)
        self.minRegionSpinBox = self._optionalSpinBox(
            UNSET_COUNT, 100000, _("Remove islands and holes smaller than this (pixels)."))
        advancedLayout.addRow(_("Minimum region area:"), self.minRegionSpinBox)
        self.scriptedEffect.addOptionsWidget(self.advancedCollapsibleButton)

    def _optionalSpinBox(self, minimum, maximum, toolTip):
        spinBox = qt.QSpinBox()
        spinBox.minimum = minimum
        spinBox.maximum = maximum
        spinBox.specialValueText = DEFAULT_SPIN_TEXT  # shown at the minimum, which means "model default"
        spinBox.setToolTip(toolTip)
        spinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        return spinBox

    def _optionalDoubleSpinBox(self, maximum, toolTip):
        spinBox = qt.QDoubleSpinBox()
        spinBox.decimals = 2
        spinBox.minimum = UNSET_FRACTION
        spinBox.maximum = maximum
        spinBox.singleStep = 0.05
        spinBox.specialValueText = DEFAULT_SPIN_TEXT
        spinBox.setToolTip(toolTip)
        spinBox.connect("valueChanged(double)", self.updateMRMLFromGUI)
        return spinBox

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Prompt", "Brain")
        self.scriptedEffect.setParameterDefault("RangeMode", effect_options.RANGE_ALL)
        self.scriptedEffect.setParameterDefault("HalfWidth", 5)
        self.scriptedEffect.setParameterDefault("Axis", effect_options.AXIS_AUTO)
        self.scriptedEffect.setParameterDefault("TopK", 0)
        self.scriptedEffect.setParameterDefault("UseDisplayWindow", 1)
        self.scriptedEffect.setParameterDefault("ReplaceSelectedSegment", 0)
        self.scriptedEffect.setParameterDefault("FillHoles", 1 if effect_options.EffectOptions.fill_holes else 0)
        self.scriptedEffect.setParameterDefault("PointsPerSide", 0)
        self.scriptedEffect.setParameterDefault("PredIouThresh", UNSET_FRACTION)
        self.scriptedEffect.setParameterDefault("StabilityThresh", UNSET_FRACTION)
        self.scriptedEffect.setParameterDefault("CropLayers", UNSET_COUNT)
        self.scriptedEffect.setParameterDefault("MaxAreaFraction", UNSET_FRACTION)
        self.scriptedEffect.setParameterDefault("MinRegionArea", UNSET_COUNT)

    def _guiWidgets(self):
        return [self.promptComboBox, self.rangeAllButton, self.rangeAroundButton, self.rangeRoiButton,
                self.halfWidthSpinBox, self.roiSelector, self.axisComboBox, self.topKSpinBox,
                self.useDisplayWindowCheckBox, self.replaceSelectedCheckBox, self.fillHolesCheckBox,
                self.pointsPerSideSpinBox, self.predIouSpinBox, self.stabilitySpinBox, self.cropLayersSpinBox,
                self.maxAreaSpinBox, self.minRegionSpinBox]

    def updateGUIFromMRML(self):
        widgets = self._guiWidgets()
        wasBlocked = [widget.blockSignals(True) for widget in widgets]
        parameter = self.scriptedEffect.parameter
        if self.promptComboBox.currentText != parameter("Prompt"):
            self.promptComboBox.setEditText(parameter("Prompt"))
        rangeMode = parameter("RangeMode")
        self.rangeAllButton.checked = rangeMode == effect_options.RANGE_ALL
        self.rangeAroundButton.checked = rangeMode == effect_options.RANGE_AROUND
        self.rangeRoiButton.checked = rangeMode == effect_options.RANGE_ROI
        self.halfWidthSpinBox.value = self.scriptedEffect.integerParameter("HalfWidth")
        self.halfWidthSpinBox.enabled = rangeMode == effect_options.RANGE_AROUND
        self.roiSelector.setCurrentNode(self.scriptedEffect.nodeReference("ROI"))
        self.roiSelector.enabled = rangeMode == effect_options.RANGE_ROI
        axisIndex = self.axisComboBox.findData(parameter("Axis"))
        self.axisComboBox.currentIndex = axisIndex if axisIndex >= 0 else 0
        self.topKSpinBox.value = self.scriptedEffect.integerParameter("TopK")
        self.useDisplayWindowCheckBox.checked = self.scriptedEffect.integerParameter("UseDisplayWindow") != 0
        self.replaceSelectedCheckBox.checked = self.scriptedEffect.integerParameter("ReplaceSelectedSegment") != 0
        self.fillHolesCheckBox.checked = self.scriptedEffect.integerParameter("FillHoles") != 0
        self.pointsPerSideSpinBox.value = self.scriptedEffect.integerParameter("PointsPerSide")
        self.predIouSpinBox.value = self.scriptedEffect.doubleParameter("PredIouThresh")
        self.stabilitySpinBox.value = self.scriptedEffect.doubleParameter("StabilityThresh")
        self.cropLayersSpinBox.value = self.scriptedEffect.integerParameter("CropLayers")
        self.maxAreaSpinBox.value = self.scriptedEffect.doubleParameter("MaxAreaFraction")
        self.minRegionSpinBox.value = self.scriptedEffect.integerParameter("MinRegionArea")
        for widget, blocked in zip(widgets, wasBlocked):
            widget.blockSignals(blocked)
        self.updateModelsLabel()
        self.updateButtons()

    def updateMRMLFromGUI(self):
        setParameter = self.scriptedEffect.setParameter
        setParameter("Prompt", self.promptComboBox.currentText)
        if self.rangeAroundButton.checked:
            setParameter("RangeMode", effect_options.RANGE_AROUND)
        elif self.rangeRoiButton.checked:
            setParameter("RangeMode", effect_options.RANGE_ROI)
        else:
            setParameter("RangeMode", effect_options.RANGE_ALL)
        setParameter("HalfWidth", self.halfWidthSpinBox.value)
        setParameter("Axis", self.axisComboBox.currentData)
        setParameter("TopK", self.topKSpinBox.value)
        setParameter("UseDisplayWindow", 1 if self.useDisplayWindowCheckBox.checked else 0)
        setParameter("ReplaceSelectedSegment", 1 if self.replaceSelectedCheckBox.checked else 0)
        setParameter("FillHoles", 1 if self.fillHolesCheckBox.checked else 0)
        setParameter("PointsPerSide", self.pointsPerSideSpinBox.value)
        setParameter("PredIouThresh", self.predIouSpinBox.value)
        setParameter("StabilityThresh", self.stabilitySpinBox.value)
        setParameter("CropLayers", self.cropLayersSpinBox.value)
        setParameter("MaxAreaFraction", self.maxAreaSpinBox.value)
        setParameter("MinRegionArea", self.minRegionSpinBox.value)

    def onRoiChanged(self, node):
        self.scriptedEffect.setNodeReference("ROI", node)
        self.updateGUIFromMRML()  # node reference changes are not observed

    def activate(self):
        self.updateModelsLabel()
        session = self.session()
        if session.running:
            self.timer.start()  # a run started before the effect was left: keep showing it
        self.statusLabel.text = session.status
        self.updateButtons()

    def deactivate(self):
        # Nothing ends here: "Settings...", another module or another effect leave the run and its
        # preview alone. The timer keeps reading the child's progress (its pipe must not fill up)
        # and shows the preview when the run ends.
        self.updateButtons()

    def interactionNodeModified(self, interactionNode):
        # Slicer's default deselects the effect when markup placement starts; placing the ROI
        # that limits the slices must not end the effect (and nothing here draws in the views).
        pass

    # -- helpers -----------------------------------------------------------------------

    def logic(self):
        from SaLIPSegment import SaLIPSegmentLogic

        return SaLIPSegmentLogic()

    def sourceVolumeNode(self):
        return self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()

    def session(self):
        """This Segment Editor's job and preview; they outlive this effect object's activation."""
        from SaLIPSegmentLib import jobs

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        return jobs.SESSIONS.get(parameterSetNode.GetID() if parameterSetNode else "")

    def options(self):
        doubleParameter = self.scriptedEffect.doubleParameter
        unset = effect_options.optional_number
        integerParameter = self.scriptedEffect.integerParameter
        return effect_options.EffectOptions(
            prompt=self.scriptedEffect.parameter("Prompt"),
            range_mode=self.scriptedEffect.parameter("RangeMode"),
            half_width=integerParameter("HalfWidth"),
            axis=self.scriptedEffect.parameter("Axis") or effect_options.AXIS_AUTO,
            top_k=integerParameter("TopK"),
            proposal=effect_options.ProposalOverrides(
                points_per_side=unset(integerParameter("PointsPerSide"), 0),
                pred_iou_thresh=unset(doubleParameter("PredIouThresh"), UNSET_FRACTION),
                stability_score_thresh=unset(doubleParameter("StabilityThresh"), UNSET_FRACTION),
                crop_n_layers=unset(integerParameter("CropLayers"), UNSET_COUNT),
                max_area_fraction=unset(doubleParameter("MaxAreaFraction"), UNSET_FRACTION),
                min_region_area=unset(integerParameter("MinRegionArea"), UNSET_COUNT),
            ),
            replace_selected_segment=integerParameter("ReplaceSelectedSegment") != 0,
            fill_holes=integerParameter("FillHoles") != 0,
        )

    def sliceNodeForAxis(self, volumeNode, axis):
        """The slice view showing slices across `axis` (Red if none does)."""
        from SaLIPSegmentLib import slicer_bridge

        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return None
        for viewName in layoutManager.sliceViewNames():
            sliceNode = layoutManager.sliceWidget(viewName).mrmlSliceNode()
            if slicer_bridge.slice_axis_for_view(volumeNode, sliceNode) == axis:
                return sliceNode
        redWidget = layoutManager.sliceWidget("Red")
        return redWidget.mrmlSliceNode() if redWidget else None

    def sliceRange(self, volumeNode, shape, axis, options):
        """(start, stop), None for every slice, or False after telling the user what is missing."""
        from SaLIPSegmentLib import slicer_bridge

        if options.range_mode == effect_options.RANGE_AROUND:
            sliceNode = self.sliceNodeForAxis(volumeNode, axis)
            if sliceNode is None:
                slicer.util.errorDisplay(_("No slice view is open to tell the current slice."))
                return False
            index = slicer_bridge.slice_index_at(volumeNode, sliceNode, axis)
            return slicer_bridge.range_around(index, options.half_width, shape[axis])
        if options.range_mode == effect_options.RANGE_ROI:
            roiNode = self.scriptedEffect.nodeReference("ROI")
            if roiNode is None:
                slicer.util.errorDisplay(_("Select an ROI, or choose another slice range."))
                return False
            return slicer_bridge.slice_range_from_roi(volumeNode, roiNode, axis)
        return None

    def updateModelsLabel(self):
        if not hasattr(self, "modelsLabel"):
            return
        logic = self.logic()
        self.modelsLabel.text = f"{logic.segmenterName()} + {logic.scorerName()} ({logic.deviceName()})"

    def previewNode(self):
        nodeId = self.session().preview_node_id
        return slicer.mrmlScene.GetNodeByID(nodeId) if nodeId else None

    def updateButtons(self):
        if not hasattr(self, "previewButton"):
            return
        session = self.session()
        running = session.running
        hasPreview = self.previewNode() is not None
        self.previewButton.enabled = not running
        self.applyButton.enabled = not running and hasPreview
        self.cancelButton.enabled = running or hasPreview
        self.progressBar.visible = running
        if not running and not hasPreview:
            self.showFlaggedSlices([])
        if hasattr(self, "hintListWidget"):
            hints = session.hints
            self.hintsCollapsibleButton.visible = hasPreview or running
            for button in (self.boxHintButton, self.absentHintButton, self.nextSliceButton, self.removeHintButton):
                button.enabled = hasPreview and not running
            self.pointsHintButton.enabled = hasPreview and not running and hints is not None and hints.takes_points
            self.updateButton.enabled = hasPreview and not running and hints is not None and hints.pending
            self.hintListWidget.clear()
            for index, label in (hints.labels() if hints is not None else []):
                listItem = qt.QListWidgetItem(label)
                listItem.setData(qt.Qt.UserRole, index)
                self.hintListWidget.addItem(listItem)

    def showFlaggedSlices(self, flagged):
        self.flaggedListWidget.clear()
        for item in flagged:
            listItem = qt.QListWidgetItem(item.label)
            listItem.setData(qt.Qt.UserRole, item.index)
            self.flaggedListWidget.addItem(listItem)
        self.flaggedListWidget.visible = bool(flagged)
        self.flaggedLabel.visible = bool(flagged)

    def setStatus(self, text):
        self.session().status = text
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text

    def endSession(self):
        """Kill a running job and remove the preview: the scene is left as it was before Preview."""
        session = self.session()
        if session.running:
            engine().kill()  # Cancel ends the child: what it computed so far is dropped
        _job, previewNodeId = session.end()  # also removes the run's temporary files
        previewNode = slicer.mrmlScene.GetNodeByID(previewNodeId) if previewNodeId else None
        if previewNode is not None:
            from SaLIPSegmentLib import slicer_bridge

            slicer_bridge.discard_preview(previewNode)

    def onOpenSettings(self):
        slicer.util.selectModule("SaLIPSegment")

    # -- preview / apply / cancel -----------------------------------------------------

    def onPreview(self):
        if self.session().running:
            return
        with slicer.util.tryWithErrorDisplay(_("SaLIP could not start."), waitCursor=True):
            prepared = self.prepareRun()
            if prepared is None:
                return
            self.endSession()  # a new Preview replaces the last one
            self.startJob(*prepared)

    def prepareRun(self):
        """(request, run) for the engine's child process; None when the user must act first."""
        volumeNode = self.sourceVolumeNode()
        if volumeNode is None:
            slicer.util.errorDisplay(_("Select a source volume in the Segment Editor first."))
            return None
        logic = self.logic()
        if not logic.ensureDependencies(askConfirmation=True):
            return None

        from SaLIPSegmentLib import slicer_bridge
        from SaLIPSegmentLib.prompts import resolve_prompt
        from SaLIPSegmentLib.settings import PropagationSettings

        options = self.options()
        prompt = resolve_prompt(options.prompt)
        geometry = slicer_bridge.volume_geometry(volumeNode)
        axis = options.numpy_axis()
        if axis is None:
            axis = slicer_bridge.default_slice_axis(volumeNode)
        sliceRange = self.sliceRange(volumeNode, geometry.shape, axis, options)
        if sliceRange is False:
            return None
        useWindow = self.scriptedEffect.integerParameter("UseDisplayWindow") != 0
        window = slicer_bridge.display_window(volumeNode) if useWindow else None
        models = (logic.segmenterName(), logic.scorerName(), logic.deviceName(), logic.modelDirectory() or None)
        interval = PropagationSettings().interval_for(geometry.spacing[axis])  # as the engine will resolve it
        if not self.confirmModels(models, effect_options.slice_count(geometry.shape, axis, sliceRange), interval):
            return None
        # The whole IJK-to-world matrix, not only spacing: a left/right preset keeps the patient's side.
        # keep_session: the engine keeps the slices' encodings so that Update re-runs only what fixes change.
        request = {"type": "segment", "keep_session": True, "ijkToRas": geometry.ijk_to_world.tolist(),
                   "settings": effect_options.worker_settings(options, prompt.top_k, models, axis, sliceRange,
                                                              window)}
        run = {"volumeNodeId": volumeNode.GetID(), "shape": list(geometry.shape), "axis": axis,
               "ijkToWorld": geometry.ijk_to_world.tolist(), "promptName": prompt.display_name,
               "color": list(prompt.color), "replaceSelected": options.replace_selected_segment}
        return request, run

    def confirmModels(self, models, slices, interval):
        """Weights present, and a long CPU run confirmed; False after telling the user what to do."""
        segmenterName, scorerName, deviceName, modelDirectory = models
        missing = effect_options.weights_to_download([segmenterName, scorerName], modelDirectory)
        if missing:
            names = ", ".join(f"{name} ({spec.filename})" for name, spec in missing)
            if slicer.util.confirmOkCancelDisplay(
                    _("Model weights are missing: {names}.\n\nOpen the SaLIP module to download them "
                      "(or to choose a folder that holds them)?").format(names=names)):
                self.onOpenSettings()
            return False
        from SaLIPSegmentLib.models import resolve_device

        if effect_options.needs_cpu_confirmation(resolve_device(deviceName).type, segmenterName, slices, interval):
            estimate = effect_options.format_duration(
                effect_options.estimate_cpu_seconds(segmenterName, slices, interval=interval))
            return slicer.util.confirmOkCancelDisplay(
                _("No GPU is in use: {slices} slices with {model} will take roughly {estimate} on the CPU.\n\n"
                  "Fewer slices (current slice ± N, or an ROI) or the litemedsam model run faster. "
                  "Continue?").format(slices=slices, model=segmenterName, estimate=estimate))
        return True

    def startJob(self, request, run):
        """Hand the volume to the child through a temporary file and start reading its progress."""
        import tempfile

        import numpy as np

        from SaLIPSegmentLib import slicer_bridge

        folder = tempfile.mkdtemp(prefix="salip-preview-")
        array, _geometry = slicer_bridge.volume_to_numpy(slicer.mrmlScene.GetNodeByID(run["volumeNodeId"]))
        request["volume"] = os.path.join(folder, "volume.npy")
        np.save(request["volume"], array)
        run["folder"] = folder
        job = engine().submit(request, os.path.join(folder, "result"))
        self.session().begin(job, run)
        self.setStatus(_("Running SaLIP for '{prompt}'...").format(prompt=run["promptName"]))
        self.progressBar.minimum = 0
        self.progressBar.maximum = 0  # busy until the first slice reports
        self.timer.start()
        self.updateButtons()

    def onPollJob(self):
        session = self.session()
        job = session.job
        if job is None or job.finished:
            self.timer.stop()
            return
        engine().poll(job)  # non-blocking reads of the child's JSON lines
        if job.total > 0:
            self.progressBar.maximum = job.total
            self.progressBar.value = job.done
        self.progressBar.setFormat(effect_options.progress_text(job.done, job.total, session.correcting))
        if not job.finished:
            return
        self.timer.stop()
        with slicer.util.tryWithErrorDisplay(_("SaLIP could not show its result."), waitCursor=True):
            self.finishJob(session, job)
        self.updateButtons()

    def finishJob(self, session, job):
        import json

        from SaLIPSegmentLib import jobs, slicer_bridge

        correcting = session.correcting
        if job.state != jobs.DONE:
            session.correcting = False
            if correcting and job.error is not None and job.error.kind == "Cancelled":
                self.setStatus(_("Update stopped; the preview and the fixes are as they were."))
                return
            self.reportError(job.error)
            if not correcting:  # a failed Update keeps the preview it started from
                self.endSession()
            return
        run = session.run
        volumeNode = slicer.mrmlScene.GetNodeByID(run["volumeNodeId"])
        if volumeNode is None:
            raise ValueError(_("The source volume was removed while SaLIP ran."))
        mask = slicer_bridge.load_result_mask(job.result["mask"], volumeNode, run["shape"])
        oldPreview = self.previewNode()
        previewNode = slicer_bridge.create_preview(slicer.mrmlScene, volumeNode, mask, run["promptName"],
                                                   run["color"])
        if oldPreview is not None:
            slicer_bridge.discard_preview(oldPreview)
        session.preview_node_id = previewNode.GetID()
        run["mask"] = job.result["mask"]
        with open(job.result["report"], encoding="utf-8") as reportFile:
            report = json.load(reportFile)
        session.finish_correction(report, applied=correcting)
        summary = job.result.get("summary", {})
        self.setStatus(effect_options.result_text(summary, job.seconds))
        self.showFlaggedSlices(effect_options.flagged_from_report(report))
        notices = list(summary.get("notices") or []) + list(summary.get("warnings") or []) + job.notices
        if notices:
            slicer.util.warningDisplay("\n".join(notices), windowTitle=_("SaLIP"))

    def reportError(self, error):
        if error is None or error.kind == "Cancelled":
            self.setStatus(_("Cancelled; nothing was written."))
            return
        self.setStatus(_("Failed: see the message."))
        if error.kind == "OutOfMemory":
            slicer.util.errorDisplay(
                _("The GPU ran out of memory. Try fewer points per side, a smaller model (vit_b or litemedsam), "
                  "or the CPU (SaLIP module > Device), then Preview again."), detailedText=error.details)
        elif error.kind == "MissingWeightsError":
            if slicer.util.confirmOkCancelDisplay(
                    _("{message}\n\nOpen the SaLIP module to download the weights?").format(message=error.message)):
                self.onOpenSettings()
        elif error.kind in ("InputError", "SalipError"):
            slicer.util.errorDisplay(error.message)
        else:  # a crash of the child (its log attached), or an unexpected error in the engine
            logging.error("SaLIP: %s\n%s", error.message, error.details)
            slicer.util.errorDisplay(_("SaLIP failed: {error}").format(error=error.message),
                                     detailedText=error.details)

    def onApply(self):
        previewNode = self.previewNode()
        session = self.session()
        if previewNode is None or session.run is None:
            slicer.util.errorDisplay(_("Click Preview first."))
            return
        from SaLIPSegmentLib import slicer_bridge

        run = session.run
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        volumeNode = slicer.mrmlScene.GetNodeByID(run["volumeNodeId"])
        segmentId = parameterSetNode.GetSelectedSegmentID() if run["replaceSelected"] else None
        with slicer.util.tryWithErrorDisplay(_("Failed to write the SaLIP result."), waitCursor=True):
            mask = slicer_bridge.load_result_mask(run["mask"], volumeNode, run["shape"])
            # Through the editor's own modifySegmentByLabelmap: its masking applies as for every
            # built-in effect; one saveStateForUndo first, so one Undo reverts it all.
            newSegmentId = slicer_bridge.write_mask_masked(
                segmentationNode, volumeNode, mask, run["promptName"], run["color"], modify=self.modifySegment,
                reference=self.scriptedEffect.referenceGeometryImage(), segment_id=segmentId or None,
                undo=self.scriptedEffect.saveStateForUndo)
            parameterSetNode.SetSelectedSegmentID(newSegmentId)
            self.endSession()
            self.setStatus(_("Applied to segment '{name}'.").format(name=run["promptName"]))
        self.updateButtons()

    def modifySegment(self, segmentationNode, segmentId, labelmap):
        self.scriptedEffect.modifySegmentByLabelmap(
            segmentationNode, segmentId, labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

    # -- fixing slices after Preview ---------------------------------------------------

    def currentSliceIndex(self):
        """(run, index of the slice the view across the run's axis shows), or None after saying what is missing."""
        from SaLIPSegmentLib import slicer_bridge

        run = self.session().run
        volumeNode = slicer.mrmlScene.GetNodeByID(run["volumeNodeId"]) if run else None
        sliceNode = self.sliceNodeForAxis(volumeNode, run["axis"]) if volumeNode is not None else None
        if sliceNode is None:
            slicer.util.errorDisplay(_("Preview first, with a slice view open across the previewed slices."))
            return None
        return volumeNode, slicer_bridge.slice_index_at(volumeNode, sliceNode, run["axis"])

    def onBoxHint(self):
        from SaLIPSegmentLib import slicer_bridge

        roiNode = self.hintRoiSelector.currentNode()
        if roiNode is None:
            slicer.util.errorDisplay(_("Select or draw an ROI around the target first."))
            return
        self.setHintOnViewedSlice(_("The ROI cannot fix this slice."), lambda volumeNode, axis, index: (
            self.session().hints.set_box(index, slicer_bridge.hint_box_from_roi(volumeNode, roiNode, axis, index))))

    def onPointsHint(self):
        from SaLIPSegmentLib import slicer_bridge

        onNode, offNode = self.onPointsSelector.currentNode(), self.offPointsSelector.currentNode()
        if onNode is None:
            slicer.util.errorDisplay(_("Select or place a point list on the target first."))
            return
        self.setHintOnViewedSlice(_("The points cannot fix this slice."), lambda volumeNode, axis, index: (
            self.session().hints.set_points(
                index, *slicer_bridge.hint_points_from_markups(volumeNode, onNode, offNode, axis, index))))

    def onAbsentHint(self):
        self.setHintOnViewedSlice(_("This slice cannot be marked."),
                                  lambda volumeNode, axis, index: self.session().hints.set_absent(index))

    def setHintOnViewedSlice(self, failure, setHint):
        """setHint(volumeNode, axis, index) for the slice the view shows; an error is shown, never raised."""
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            found = self.currentSliceIndex()
            if found is not None:
                volumeNode, index = found
                setHint(volumeNode, self.session().run["axis"], index)
        self.updateButtons()

    def onRemoveHint(self):
        item = self.hintListWidget.currentItem()
        if item is not None and self.session().hints is not None:
            self.session().hints.remove(int(item.data(qt.Qt.UserRole)))
        self.updateButtons()

    def onUpdate(self):
        """Send the fixes to the engine, which corrects the kept preview (see jobs.PreviewSession)."""
        session = self.session()
        if session.running or session.hints is None or self.previewNode() is None:
            return
        with slicer.util.tryWithErrorDisplay(_("SaLIP could not update."), waitCursor=True):
            folder = os.path.join(session.run["folder"], f"correction{session.corrections + 1}")
            job = engine().submit(session.hints.request(), folder)
            session.begin_correction(job)
            self.setStatus(_("Updating around {count} fixed slices...").format(count=len(session.hints.hints)))
            self.progressBar.minimum = 0
            self.progressBar.maximum = 0
            self.timer.start()
        self.updateButtons()

    def onNextSliceToFix(self):
        from SaLIPSegmentLib import effect_hints

        session = self.session()
        index = effect_hints.next_slice_to_fix(session.report or {}, session.hints)
        if index is None:
            self.setStatus(_("No slice left that the checks rank as worth fixing."))
            return
        self.jumpToSlice(index)

    def onCancel(self):
        session = self.session()
        running = session.running
        if session.stop_correction():  # an Update: the engine stops it, the preview and fixes stay
            self.setStatus(_("Stopping the update; the preview stays as it was (Cancel again to end it)..."))
            return
        self.endSession()
        self.setStatus(_("Cancelled; nothing was written.") if running else _("Preview discarded."))
        self.timer.stop()
        self.updateButtons()

    def onFlaggedSliceClicked(self, item):
        self.jumpToSlice(int(item.data(qt.Qt.UserRole)))

    def jumpToSlice(self, index):
        run = self.session().run
        if run is None:
            return
        import numpy as np

        r, a, s = effect_options.slice_center_ras(np.array(run["ijkToWorld"]), run["shape"], run["axis"], index)
        sliceNode = self.sliceNodeForAxis(slicer.mrmlScene.GetNodeByID(run["volumeNodeId"]), run["axis"])
        if sliceNode is not None:
            sliceNode.JumpSliceByOffsetting(r, a, s)


def engine():
    """The persistent engine process of this Slicer, started on first use (Slicer's own PythonSlicer)."""
    from SaLIPSegmentLib import jobs

    engineParent = os.path.dirname(os.path.dirname(os.path.abspath(effect_options.__file__)))
    return jobs.shared_engine(
        lambda: jobs.worker_command(jobs.find_python_slicer(slicer_home=slicer.app.slicerHome)),
        lambda: jobs.worker_environment(dict(os.environ), engineParent))

"""The SaLIP Segment Editor effect: a text prompt in, a previewed segment out.

Thin by design: it gathers options, runs the engine on a worker thread
(`jobs.BackgroundJob`, polled by a QTimer) and hands masks to `slicer_bridge`.
Anything worth testing lives in `effect_options`, `slicer_bridge` or the engine.
"""

import logging
import os
import traceback

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

        self.job = None
        self.run = None
        self.previewNode = None
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
<li><b>Preview:</b> runs on the chosen slices; the result is shown as a separate preview segmentation.</li>
<li><b>Apply:</b> writes the preview into a new segment (or the selected one). Undo reverts it.</li>
<li><b>Cancel:</b> stops a running preview, or discards the preview.</li>
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
            _("Unchecked: the result goes into a new segment named after the prompt."))
        self.replaceSelectedCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.overwriteOthersCheckBox = qt.QCheckBox(_("Overwrite other segments"))
        self.overwriteOthersCheckBox.setToolTip(_("Remove the result's voxels from every other segment."))
        self.overwriteOthersCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        outputLayout = qt.QHBoxLayout()
        outputLayout.addWidget(self.replaceSelectedCheckBox)
        outputLayout.addWidget(self.overwriteOthersCheckBox)
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
        self.cancelButton.setToolTip(_("Stop the running preview, or discard the preview."))
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
        self.flaggedListWidget.setToolTip(_("Slices where no part matched the prompt. Click one to show it."))
        self.flaggedListWidget.connect("itemClicked(QListWidgetItem*)", self.onFlaggedSliceClicked)
        self.flaggedLabel = self.scriptedEffect.addLabeledOptionsWidget(_("Check:"), self.flaggedListWidget)
        self.flaggedListWidget.visible = False
        self.flaggedLabel.visible = False

        self.updateButtons()

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
        self.scriptedEffect.setParameterDefault("OverwriteOtherSegments", 0)
        self.scriptedEffect.setParameterDefault("PointsPerSide", 0)
        self.scriptedEffect.setParameterDefault("PredIouThresh", UNSET_FRACTION)
        self.scriptedEffect.setParameterDefault("StabilityThresh", UNSET_FRACTION)
        self.scriptedEffect.setParameterDefault("CropLayers", UNSET_COUNT)
        self.scriptedEffect.setParameterDefault("MaxAreaFraction", UNSET_FRACTION)
        self.scriptedEffect.setParameterDefault("MinRegionArea", UNSET_COUNT)

    def _guiWidgets(self):
        return [self.promptComboBox, self.rangeAllButton, self.rangeAroundButton, self.rangeRoiButton,
                self.halfWidthSpinBox, self.roiSelector, self.axisComboBox, self.topKSpinBox,
                self.useDisplayWindowCheckBox, self.replaceSelectedCheckBox, self.overwriteOthersCheckBox,
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
        self.overwriteOthersCheckBox.checked = self.scriptedEffect.integerParameter("OverwriteOtherSegments") != 0
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
        setParameter("OverwriteOtherSegments", 1 if self.overwriteOthersCheckBox.checked else 0)
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
        self.updateButtons()

    def deactivate(self):
        # Leaving the effect abandons the run and its preview: nothing is written.
        if self.job is not None and not self.job.finished:
            self.job.cancel()
        self.timer.stop()
        self.job = None
        self.discardPreview()
        self.updateButtons()

    # -- helpers -----------------------------------------------------------------------

    def logic(self):
        from SaLIPSegment import SaLIPSegmentLogic

        return SaLIPSegmentLogic()

    def sourceVolumeNode(self):
        return self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()

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
            overwrite_other_segments=integerParameter("OverwriteOtherSegments") != 0,
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

    def updateButtons(self):
        if not hasattr(self, "previewButton"):
            return
        running = self.job is not None and not self.job.finished
        self.previewButton.enabled = not running
        self.applyButton.enabled = not running and self.previewNode is not None
        self.cancelButton.enabled = running or self.previewNode is not None
        self.progressBar.visible = running

    def showFlaggedSlices(self, flagged):
        self.flaggedListWidget.clear()
        for item in flagged:
            listItem = qt.QListWidgetItem(item.label)
            listItem.setData(qt.Qt.UserRole, item.index)
            self.flaggedListWidget.addItem(listItem)
        self.flaggedListWidget.visible = bool(flagged)
        self.flaggedLabel.visible = bool(flagged)

    def discardPreview(self):
        if self.previewNode is not None:
            from SaLIPSegmentLib import slicer_bridge  # imports the engine (torch): only when there is a preview

            slicer_bridge.discard_preview(self.previewNode)
        self.previewNode = None
        if hasattr(self, "flaggedListWidget"):
            self.showFlaggedSlices([])

    def onOpenSettings(self):
        slicer.util.selectModule("SaLIPSegment")

    # -- preview / apply / cancel -----------------------------------------------------

    def onPreview(self):
        if self.job is not None and not self.job.finished:
            return
        with slicer.util.tryWithErrorDisplay(_("SaLIP could not start."), waitCursor=True):
            run = self.prepareRun()
            if run is None:
                return
            self.startJob(run)

    def prepareRun(self):
        """Everything the worker needs, gathered on the main thread; None when the user must act first."""
        volumeNode = self.sourceVolumeNode()
        if volumeNode is None:
            slicer.util.errorDisplay(_("Select a source volume in the Segment Editor first."))
            return None
        logic = self.logic()
        if not logic.ensureDependencies(askConfirmation=True):
            return None

        from SaLIPSegmentLib import slicer_bridge
        from SaLIPSegmentLib.models import get_segmenter_spec, resolve_device
        from SaLIPSegmentLib.models.base import ProposalSettings
        from SaLIPSegmentLib.prompts import resolve_prompt

        options = self.options()
        prompt = resolve_prompt(options.prompt)
        # A copy: the worker must not see the node change while it runs.
        array, geometry = slicer_bridge.volume_to_numpy(volumeNode)
        axis = options.numpy_axis()
        if axis is None:
            axis = slicer_bridge.default_slice_axis(volumeNode)
        sliceRange = self.sliceRange(volumeNode, array.shape, axis, options)
        if sliceRange is False:
            return None
        useWindow = self.scriptedEffect.integerParameter("UseDisplayWindow") != 0
        window = slicer_bridge.display_window(volumeNode) if useWindow else None

        segmenterName, scorerName = logic.segmenterName(), logic.scorerName()
        deviceName, modelDirectory = logic.deviceName(), logic.modelDirectory() or None
        missing = effect_options.weights_to_download([segmenterName, scorerName], modelDirectory)
        if missing:
            names = ", ".join(f"{name} ({spec.filename})" for name, spec in missing)
            if slicer.util.confirmOkCancelDisplay(
                    _("Model weights are missing: {names}.\n\nOpen the SaLIP module to download them "
                      "(or to choose a folder that holds them)?").format(names=names)):
                self.onOpenSettings()
            return None

        device = resolve_device(deviceName)
        slices = effect_options.slice_count(array.shape, axis, sliceRange)
        if effect_options.needs_cpu_confirmation(device.type, segmenterName, slices):
            estimate = effect_options.format_duration(effect_options.estimate_cpu_seconds(segmenterName, slices))
            if not slicer.util.confirmOkCancelDisplay(
                    _("No GPU is in use: {slices} slices with {model} will take roughly {estimate} on the CPU.\n\n"
                      "Fewer slices (current slice ± N, or an ROI) or the litemedsam model run faster. "
                      "Continue?").format(slices=slices, model=segmenterName, estimate=estimate)):
                return None

        spec = get_segmenter_spec(segmenterName)
        proposal = ProposalSettings.from_dict(
            effect_options.proposal_values(spec.proposal_defaults, options.proposal))
        kwargs = effect_options.segment_volume_kwargs(options, prompt.top_k, axis, sliceRange, window, proposal)
        return {
            "volumeNode": volumeNode, "array": array, "ijkToWorld": geometry.ijk_to_world, "axis": axis,
            "prompt": prompt, "kwargs": kwargs, "segmenter": segmenterName, "scorer": scorerName,
            "device": deviceName, "modelDirectory": modelDirectory, "options": options,
        }

    def startJob(self, run):
        from SaLIPSegmentLib.jobs import BackgroundJob
        from SaLIPSegmentLib.volume import segment_volume

        def work(progress, should_cancel):
            # Worker thread: no Qt, no MRML. Loading models happens here too (it takes seconds).
            segmenter, scorer, _device = effect_options.MODELS.get(
                run["segmenter"], run["scorer"], run["device"], run["modelDirectory"])
            return segment_volume(run["array"], segmenter, scorer, run["prompt"].sentences,
                                  progress=progress, should_cancel=should_cancel, **run["kwargs"])

        self.discardPreview()
        self.run = run
        self.statusLabel.text = _("Running SaLIP for '{prompt}'...").format(prompt=run["prompt"].display_name)
        self.progressBar.minimum = 0
        self.progressBar.maximum = 0  # busy until the first slice reports
        self.job = BackgroundJob(work, name="salip-preview").start()
        self.timer.start()
        self.updateButtons()

    def onPollJob(self):
        job = self.job
        if job is None:
            self.timer.stop()
            return
        done, total = job.progress
        if total > 0:
            self.progressBar.maximum = total
            self.progressBar.value = done
        self.progressBar.setFormat(effect_options.progress_text(done, total))
        if not job.finished:
            return
        self.timer.stop()
        self.job = None
        self.updateButtons()
        from SaLIPSegmentLib import slicer_bridge

        prompt = self.run["prompt"]
        previewNode, error = slicer_bridge.preview_from_job(
            job, slicer.mrmlScene, self.run["volumeNode"], prompt.display_name, prompt.color)
        if error is not None:
            self.reportError(error)
            return
        self.previewNode = previewNode
        self.showResult(job.result)

    def showResult(self, result):
        summary = result.summary()
        if result.notices:
            # The models may have moved to the CPU: the next Preview loads them afresh on the chosen device.
            effect_options.MODELS.clear()
            slicer.util.warningDisplay("\n".join(result.notices), windowTitle=_("SaLIP"))
        self.statusLabel.text = _("{withMask} of {inRange} slices have a mask ({seconds:.0f} s). "
                                  "Apply to keep it.").format(withMask=summary["slices_with_mask"],
                                                              inRange=summary["slices_in_range"],
                                                              seconds=summary["seconds"])
        self.showFlaggedSlices(effect_options.flagged_slices(result.slices))
        self.updateButtons()

    def reportError(self, error):
        from SaLIPSegmentLib.errors import Cancelled, MissingWeightsError, SalipError

        if isinstance(error, Cancelled):
            self.statusLabel.text = _("Cancelled; nothing was written.")
            return
        self.statusLabel.text = _("Failed: see the message.")
        if effect_options.is_out_of_memory(error):
            effect_options.MODELS.clear()
            slicer.util.errorDisplay(
                _("The GPU ran out of memory. Try fewer points per side, a smaller model (vit_b or litemedsam), "
                  "or the CPU (SaLIP module > Device), then Preview again."), detailedText=str(error))
        elif isinstance(error, MissingWeightsError):
            if slicer.util.confirmOkCancelDisplay(
                    _("{message}\n\nOpen the SaLIP module to download the weights?").format(message=str(error))):
                self.onOpenSettings()
        elif isinstance(error, SalipError):
            slicer.util.errorDisplay(str(error))
        else:
            details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            logging.error(details)
            slicer.util.errorDisplay(_("SaLIP failed: {error}").format(error=error), detailedText=details)

    def onApply(self):
        if self.previewNode is None:
            slicer.util.errorDisplay(_("Click Preview first."))
            return
        from SaLIPSegmentLib import slicer_bridge

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        options = self.run["options"]
        segmentId = parameterSetNode.GetSelectedSegmentID() if options.replace_selected_segment else None
        with slicer.util.tryWithErrorDisplay(_("Failed to write the SaLIP result."), waitCursor=True):
            # The bridge calls saveStateForUndo once, just before writing, so the editor's Undo reverts it.
            # It takes the segment's name and colour from the preview, then removes the preview.
            newSegmentId = slicer_bridge.apply_preview(
                self.previewNode, segmentationNode, self.run["volumeNode"], segment_id=segmentId or None,
                overwrite_other_segments=options.overwrite_other_segments, undo=self.scriptedEffect.saveStateForUndo)
            self.previewNode = None
            parameterSetNode.SetSelectedSegmentID(newSegmentId)
            self.statusLabel.text = _("Applied to segment '{name}'.").format(name=self.run["prompt"].display_name)
        self.discardPreview()
        self.updateButtons()

    def onCancel(self):
        if self.job is not None and not self.job.finished:
            self.job.cancel()
            self.statusLabel.text = _("Cancelling after the current slice...")
            return
        self.discardPreview()
        self.statusLabel.text = _("Preview discarded.")
        self.updateButtons()

    def onFlaggedSliceClicked(self, item):
        if self.run is None:
            return
        index = int(item.data(qt.Qt.UserRole))
        run = self.run
        r, a, s = effect_options.slice_center_ras(run["ijkToWorld"], run["array"].shape, run["axis"], index)
        sliceNode = self.sliceNodeForAxis(run["volumeNode"], run["axis"])
        if sliceNode is not None:
            sliceNode.JumpSliceByOffsetting(r, a, s)


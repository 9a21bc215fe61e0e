"""The Slicer extension's packaging, checked without Slicer: CMake lists, descriptions, icons, effect shape.

Slicer cannot run here, so these tests read the files as text (and Python as `ast`);
nothing imports qt or slicer.
"""

from __future__ import annotations

import ast
import json
import re
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SaLIPSegment"
MODULE_CMAKE = MODULE / "CMakeLists.txt"
EXTENSION_CMAKE = ROOT / "CMakeLists.txt"
EFFECT = MODULE / "SegmentEditorSaLIPLib" / "SegmentEditorEffect.py"
MODULE_SCRIPT = MODULE / "SaLIPSegment.py"
PACKAGED_SUFFIXES = {".py", ".png", ".json"}
NOT_PACKAGED_DIRS = {"__pycache__"}

EXTENSION_VARIABLES = (
    "EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
)
S4EXT_KEYS = (
    "scm", "scmurl", "depends", "build_subdirectory", "homepage", "contributors", "category",
    "iconurl", "status", "description", "screenshoturls", "enabled",
)
EFFECT_METHODS = (
    "__init__", "clone", "icon", "helpText", "setupOptionsFrame", "setMRMLDefaults",
    "updateGUIFromMRML", "updateMRMLFromGUI", "activate", "deactivate",
)


def strip_cmake_comment(line: str) -> str:
    """The line up to a `#` that is outside double quotes (URLs may hold `#anchor`)."""
    quoted = False
    for position, char in enumerate(line):
        if char == '"' and (position == 0 or line[position - 1] != "\\"):
            quoted = not quoted
        elif char == "#" and not quoted:
            return line[:position]
    return line


def cmake_without_comments(path: Path) -> str:
    return "\n".join(strip_cmake_comment(line) for line in path.read_text(encoding="utf-8").splitlines())


def cmake_set_values(text: str, variable: str) -> list:
    match = re.search(r"set\(\s*" + re.escape(variable) + r"\b(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def listed_module_files() -> set:
    text = cmake_without_comments(MODULE_CMAKE)
    module_name = cmake_set_values(text, "MODULE_NAME")[0]
    listed = cmake_set_values(text, "MODULE_PYTHON_SCRIPTS") + cmake_set_values(text, "MODULE_PYTHON_RESOURCES")
    return {entry.replace("${MODULE_NAME}", module_name) for entry in listed}


def packaged_files_on_disk() -> set:
    found = set()
    for path in MODULE.rglob("*"):
        relative = path.relative_to(MODULE)
        if not path.is_file() or path.suffix not in PACKAGED_SUFFIXES:
            continue
        if any(part in NOT_PACKAGED_DIRS or part.endswith(".egg-info") for part in relative.parts):
            continue
        found.add(relative.as_posix())
    return found


# -- module CMakeLists ----------------------------------------------------------------------


def test_module_cmake_lists_files_explicitly():
    text = cmake_without_comments(MODULE_CMAKE)
    assert "slicerMacroBuildScriptedModule" in text
    assert not re.search(r"file\s*\(\s*GLOB", text, re.I), "list files by name, not with a glob"
    assert all("*" not in entry for entry in listed_module_files())


def test_every_packaged_file_is_listed_in_the_module_cmake():
    unlisted = packaged_files_on_disk() - listed_module_files()
    assert not unlisted, f"add to SaLIPSegment/CMakeLists.txt: {sorted(unlisted)}"


def test_every_listed_file_exists():
    missing = sorted(entry for entry in listed_module_files() if not (MODULE / entry).is_file())
    assert not missing, f"listed in SaLIPSegment/CMakeLists.txt but missing: {missing}"


def test_module_cmake_registers_the_self_test():
    text = cmake_without_comments(MODULE_CMAKE)
    block = re.search(r"if\s*\(\s*BUILD_TESTING\s*\)(.*?)endif\s*\(", text, re.S)
    assert block, "no if(BUILD_TESTING) block"
    assert re.search(r"slicer_add_python_unittest\s*\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", block.group(1))


# -- extension CMakeLists and descriptions ----------------------------------------------------


def test_extension_cmake_has_metadata_and_depends_on_pytorch():
    text = cmake_without_comments(EXTENSION_CMAKE)
    assert re.search(r"project\(\s*SaLIP\s*\)", text)
    for variable in EXTENSION_VARIABLES:
        assert re.search(r"set\(\s*" + variable + r"\s+\"[^\"]+\"", text), f"{variable} is not set"
    assert cmake_set_values(text, "EXTENSION_CATEGORY") == ['"Segmentation"']
    assert "PyTorch" in cmake_set_values(text, "EXTENSION_DEPENDS")[0]
    for required in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SaLIPSegment)",
                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert required in text, f"missing: {required}"
    assert text.index("find_package(Slicer") < text.index("add_subdirectory(SaLIPSegment)") \
        < text.index("Slicer_EXTENSION_CPACK")


def read_s4ext(path: Path) -> dict:
    """The legacy format: first token is the key, the rest of the line (possibly empty) the value."""
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(" ")
        assert key not in entries, f"duplicate key {key}"
        entries[key] = value.strip()
    return entries


def test_s4ext_has_the_required_keys():
    entries = read_s4ext(ROOT / "SaLIP.s4ext")
    missing = [key for key in S4EXT_KEYS if key not in entries]
    assert not missing, f"SaLIP.s4ext lacks {missing}"
    assert entries["scm"] == "git"
    assert entries["depends"] == "PyTorch"
    assert entries["category"] == "Segmentation"
    assert entries["build_subdirectory"] == "."
    assert entries["enabled"] == "1"
    for key in ("scmurl", "homepage", "iconurl", "screenshoturls"):
        assert all(url.startswith("https://") for url in entries[key].split()), key


def test_catalog_json_follows_the_extensions_index_schema():
    entry = json.loads((ROOT / "SaLIP.json").read_text(encoding="utf-8"))
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.\d+\.json#", entry["$schema"])
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed, f"not in the schema: {set(entry) - allowed}"
    for key in ("category", "scm_url", "scm_revision", "build_dependencies", "build_subdirectory", "enabled", "tier"):
        assert key in entry, key
    assert entry["category"] == "Segmentation"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://")
    assert entry["enabled"] is True
    assert entry["tier"] in (1, 3, 5)


def test_descriptions_agree_with_the_cmake_metadata():
    text = cmake_without_comments(EXTENSION_CMAKE)
    s4ext = read_s4ext(ROOT / "SaLIP.s4ext")
    entry = json.loads((ROOT / "SaLIP.json").read_text(encoding="utf-8"))
    homepage = cmake_set_values(text, "EXTENSION_HOMEPAGE")[0].strip('"')
    assert s4ext["homepage"] == homepage
    assert s4ext["scmurl"] == entry["scm_url"]
    assert cmake_set_values(text, "EXTENSION_ICONURL")[0].strip('"') == s4ext["iconurl"]


REPOSITORY_RAW = "https://raw.githubusercontent.com/SaLIP-Slicer/SlicerSaLIP/main/"


def test_picture_urls_point_at_files_in_this_repository():
    """The Extensions Index downloads every icon and screenshot URL: each must name a committed PNG."""
    text = cmake_without_comments(EXTENSION_CMAKE)
    s4ext = read_s4ext(ROOT / "SaLIP.s4ext")
    urls = cmake_set_values(text, "EXTENSION_ICONURL") + cmake_set_values(text, "EXTENSION_SCREENSHOTURLS")
    urls = [url.strip('"') for url in urls] + s4ext["iconurl"].split() + s4ext["screenshoturls"].split()
    assert s4ext["screenshoturls"].split() == [url.strip('"') for url in
                                               cmake_set_values(text, "EXTENSION_SCREENSHOTURLS")]
    for url in urls:
        assert url.startswith(REPOSITORY_RAW), url
        path = ROOT / url[len(REPOSITORY_RAW):]
        assert path.is_file(), f"{url} names {path}, which is not in the repository"
        assert png_size(path)[0] >= 128


def test_descriptions_and_readme_state_the_minimum_slicer_version():
    text = cmake_without_comments(EXTENSION_CMAKE)
    description = re.search(r'set\(EXTENSION_DESCRIPTION "(.*)"\)\s*$', text, re.M)
    assert description and "Slicer 5.10 or later" in description.group(1)
    assert "Slicer 5.10 or later" in read_s4ext(ROOT / "SaLIP.s4ext")["description"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## In 3D Slicer"):]
    assert "Slicer 5.10 or later" in section[:section.index("\n## ", 5)]
    assert re.search(r"MINIMUM_SLICER = \(5, 10\)", MODULE_SCRIPT.read_text(encoding="utf-8"))


# -- icons ----------------------------------------------------------------------------------


def png_size(path: Path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("path, size", [
    (ROOT / "SaLIP.png", (128, 128)),
    (MODULE / "Resources" / "Icons" / "SaLIPSegment.png", (128, 128)),
    (MODULE / "SegmentEditorSaLIPLib" / "SegmentEditorEffect.png", (21, 21)),
])
def test_icons_have_slicer_sizes(path, size):
    assert png_size(path) == size


# -- the effect and the module, read as source -------------------------------------------------


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def find_class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


def method_names(cls: ast.ClassDef) -> set:
    return {node.name for node in cls.body if isinstance(node, ast.FunctionDef)}


def test_effect_follows_the_scripted_segment_editor_effect_template():
    cls = find_class(parse(EFFECT), "SegmentEditorEffect")
    assert [ast.unparse(base) for base in cls.bases] == ["AbstractScriptedSegmentEditorEffect"]
    missing = set(EFFECT_METHODS) - method_names(cls)
    assert not missing, f"SegmentEditorEffect lacks {sorted(missing)}"
    init = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    assert [arg.arg for arg in init.args.args] == ["self", "scriptedEffect"]
    names = [node for node in ast.walk(init) if isinstance(node, ast.Assign)
             and any(ast.unparse(target) == "scriptedEffect.name" for target in node.targets)]
    assert names and ast.literal_eval(names[0].value) == "SaLIP"


def test_effect_keeps_its_parameters_in_the_scripted_effect():
    source = EFFECT.read_text(encoding="utf-8")
    assert "self.scriptedEffect.setParameter" in source or "self.scriptedEffect.setParameter\n" in source
    assert "self.scriptedEffect.parameter" in source
    assert "saveStateForUndo" in source


def test_the_effect_runs_the_engine_in_a_child_process_not_a_thread():
    """Inside Slicer a Python thread crawls (PythonQt keeps the GIL): no threads, no engine calls in-process."""
    tree = parse(EFFECT)
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    forbidden = {"BackgroundJob", "threading", "Thread", "segment_volume", "segment_image", "load_models",
                 "MODELS", "SaLIPSegmentLib.volume", "SaLIPSegmentLib.pipeline"}
    assert not (names | imported) & forbidden, (names | imported) & forbidden
    engine = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "engine")
    source = ast.unparse(engine)
    assert "find_python_slicer" in source and "worker_command" in source and "shared_engine" in source
    assert "submit" in names and "poll" in names and "kill" in names


def test_the_settings_panel_downloads_in_a_child_process_not_a_thread():
    """The panel's weights download would crawl on a thread in Slicer just as the engine would."""
    tree = parse(MODULE_SCRIPT)
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not names & {"BackgroundJob", "threading", "Thread", "fetch", "resolve"}, names
    start = next(node for node in ast.walk(find_class(tree, "SaLIPSegmentLogic"))
                 if isinstance(node, ast.FunctionDef) and node.name == "startDownload")
    source = ast.unparse(start)
    assert "find_python_slicer" in source and "worker_command" in source and "WeightsDownload" in source
    widget = ast.unparse(find_class(tree, "SaLIPSegmentWidget"))
    assert "self.download.poll()" in widget and "self.download.cancel()" in widget


def test_the_effect_keeps_markup_placement_from_deselecting_it():
    cls = find_class(parse(EFFECT), "SegmentEditorEffect")
    method = next(node for node in cls.body if isinstance(node, ast.FunctionDef)
                  and node.name == "interactionNodeModified")
    assert [arg.arg for arg in method.args.args] == ["self", "interactionNode"]
    calls = [ast.unparse(node.func) for node in ast.walk(method) if isinstance(node, ast.Call)]
    assert not any("selectEffect" in call for call in calls)


def test_deactivate_ends_neither_the_run_nor_the_preview():
    cls = find_class(parse(EFFECT), "SegmentEditorEffect")
    method = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "deactivate")
    calls = {ast.unparse(node.func) for node in ast.walk(method) if isinstance(node, ast.Call)}
    assert not calls & {"self.endSession", "self.timer.stop", "self.onCancel", "engine().kill"}, calls


def test_module_registers_the_effect_once_startup_completed():
    tree = parse(MODULE_SCRIPT)
    module = find_class(tree, "SaLIPSegment")
    assert [ast.unparse(base) for base in module.bases] == ["ScriptedLoadableModule"]
    connects = [node for node in ast.walk(module) if isinstance(node, ast.Call)
                and ast.unparse(node.func) == "slicer.app.connect"]
    assert any(ast.literal_eval(call.args[0]) == "startupCompleted()"
               and ast.unparse(call.args[1]) == "self.registerEditorEffect" for call in connects)
    register = next(node for node in module.body if isinstance(node, ast.FunctionDef)
                    and node.name == "registerEditorEffect")
    source = ast.unparse(register)
    assert "qSlicerSegmentEditorScriptedEffect(None)" in source
    assert "setPythonSource" in source and "SegmentEditorEffect.py" in source
    assert ".register()" in source


def test_module_has_widget_logic_and_test_classes():
    tree = parse(MODULE_SCRIPT)
    bases = {"SaLIPSegmentWidget": "ScriptedLoadableModuleWidget", "SaLIPSegmentLogic": "ScriptedLoadableModuleLogic",
             "SaLIPSegmentTest": "ScriptedLoadableModuleTest"}
    for name, base in bases.items():
        assert base in [ast.unparse(b) for b in find_class(tree, name).bases]
    assert {"setUp", "runTest"} <= method_names(find_class(tree, "SaLIPSegmentTest"))

"""The SAM effect loads the way Slicer loads Segment Editor effects, and the module survives it.

Slicer imports an effect file as a module named after the file's parent folder and instantiates
the class named after the file (plus "Effect"):
``Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.cxx``
(``setPythonSource``: "Use parent directory name as module name", reuse ``sys.modules[<folder>]``
when it already has the class, else ``qSlicerScriptedUtils::loadSourceAsModule``). How that loads
differs by version (``Base/QTCore/qSlicerScriptedUtils.cxx``):

* 5.8: ``imp.load_source(<folder>, file)``: executes the file into ``sys.modules[<folder>]`` when
  that module exists (so an effect inside a package overwrites the package's namespace);
* 5.10 and later: ``spec_from_file_location(<folder>, file)``, ``module_from_spec``,
  ``sys.modules[<folder>] = module``, ``exec_module``: an effect inside a package replaces the
  package with a plain module, and every later ``import <package>.<submodule>`` fails.

Both loaders are reproduced here, each in a fresh interpreter (so that sys.modules starts as
Slicer's does when the effect is registered: the module file has imported its package). Qt, the
PythonQt effect adaptor and ``slicer.i18n`` do not exist outside Slicer; only those are stand-ins,
every other import of the effect file (slicer-core's ``slicer``, ``vtk``, our packages) is real.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "SAMSegment"
EFFECT_FILE = MODULE_DIR / "SegmentEditorSAMLib" / "SegmentEditorEffect.py"

LOADER_SCRIPT = r'''
import importlib, importlib.machinery, importlib.util, json, os, sys, types

effect_file, loader, module_dir = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, module_dir)
sys.path.append(os.path.dirname(module_dir))  # SAMSegmentLib, as SAMSegment.py arranges

# --- stand-ins for what only exists inside the Slicer application --------------------------------
qt = types.ModuleType("qt")
sys.modules["qt"] = qt
effects_pkg = types.ModuleType("SegmentEditorEffects")

class AbstractScriptedSegmentEditorEffect:  # SegmentEditorEffects/AbstractScriptedSegmentEditorEffect.py
    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

effects_pkg.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
sys.modules["SegmentEditorEffects"] = effects_pkg
import slicer  # slicer-core
i18n = types.ModuleType("slicer.i18n")
i18n.tr = i18n.translate = lambda *text: text[-1]
sys.modules["slicer.i18n"] = i18n
slicer.i18n = i18n

class ScriptedEffect:  # the C++ qSlicerSegmentEditorScriptedEffect's Python-visible properties
    name, perSegment, requireSegments = "", False, False

# --- SAMSegment.py at start-up: the module file imports the package before any effect loads -----
import SAMSegmentSlicer.logic  # noqa: F401

# --- qSlicerSegmentEditorScriptedEffect::setPythonSource --------------------------------------------
module_name = os.path.basename(os.path.dirname(effect_file))
class_name = os.path.splitext(os.path.basename(effect_file))[0]
if not class_name.endswith("Effect"):
    class_name += "Effect"

def load_source_58(name, path):
    """imp.load_source (Python 3.9's imp.py): exec into sys.modules[name] if present, else load."""
    loader_ = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader_)
    if name in sys.modules:
        module = sys.modules[name]
        spec.loader.exec_module(module)  # importlib._bootstrap._exec: same module object, re-executed
        return module
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

def load_source_510(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

report = {"module_name": module_name, "class_name": class_name}
existing = sys.modules.get(module_name)
cls = getattr(existing, class_name, None) if existing is not None else None
if cls is None:
    try:
        {"5.8": load_source_58, "5.10": load_source_510}[loader](module_name, effect_file)
        cls = getattr(sys.modules[module_name], class_name, None)
    except Exception as exc:  # Slicer: PythonQt::handleError, setPythonSource returns false
        report["load_error"] = f"{type(exc).__name__}: {exc}"
report["class_found"] = cls is not None
if cls is not None:
    scripted = ScriptedEffect()
    instance = cls(scripted)
    report.update(name=scripted.name, per_segment=scripted.perSegment, require_segments=scripted.requireSegments,
                  instance_class=type(instance).__name__)

# --- afterwards: the module's package must still import, including submodules not loaded yet -------
package = sys.modules.get("SAMSegmentSlicer")
report["package_is_package"] = hasattr(package, "__path__")
report["package_file"] = getattr(package, "__file__", None)
imported = {}
for sub in ("dependencies", "research_nodes", "selftest", "effect_interaction"):
    try:
        importlib.import_module("SAMSegmentSlicer." + sub)
        imported[sub] = "ok"
    except Exception as exc:
        imported[sub] = f"{type(exc).__name__}: {exc}"
report["submodules"] = imported
print("REPORT " + json.dumps(report))
'''


def run_loader(effect_file: Path, loader: str, module_dir: Path = MODULE_DIR) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(effect_file), loader, str(module_dir)],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("loader", ["5.8", "5.10"])
def test_effect_loads_under_its_folder_name_and_the_package_survives(loader):
    pytest.importorskip("slicer")
    report = run_loader(EFFECT_FILE, loader)
    assert report["module_name"] == "SegmentEditorSAMLib" and report["class_name"] == "SegmentEditorEffect"
    assert "load_error" not in report, report.get("load_error")
    assert report["class_found"] and report["instance_class"] == "SegmentEditorEffect"
    assert (report["name"], report["per_segment"], report["require_segments"]) == ("SAM", True, True)
    assert report["package_is_package"]
    assert Path(report["package_file"]).resolve() == (MODULE_DIR / "SAMSegmentSlicer" / "__init__.py").resolve()
    assert set(report["submodules"].values()) == {"ok"}, report["submodules"]


def test_reproduction_catches_an_effect_inside_the_package(tmp_path):
    """The layout before this fix (effect file inside SAMSegmentSlicer/): under the 5.10 loader the
    package is replaced and its not-yet-imported submodules no longer import, as in real Slicer."""
    pytest.importorskip("slicer")
    module_dir = tmp_path / "SAMSegment"
    shutil.copytree(MODULE_DIR / "SAMSegmentSlicer", module_dir / "SAMSegmentSlicer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    inside = module_dir / "SAMSegmentSlicer" / "SegmentEditorEffect.py"
    shutil.copy(EFFECT_FILE, inside)
    (tmp_path / "SAMSegmentLib").symlink_to(ROOT / "SAMSegmentLib", target_is_directory=True)
    report = run_loader(inside, "5.10", module_dir)
    assert report["module_name"] == "SAMSegmentSlicer"
    assert not report["package_is_package"]
    assert "not a package" in report["submodules"]["dependencies"]

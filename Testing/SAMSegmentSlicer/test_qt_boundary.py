"""Only the two Qt shells may import qt/ctk; everything they call is importable headless."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EFFECT = "SAMSegment/SegmentEditorSAMLib/SegmentEditorEffect.py"
QT_SHELLS = {"SAMSegment/SAMSegment.py", EFFECT}
GUI_MODULES = {"qt", "ctk", "slicer.ScriptedLoadableModule", "SegmentEditorEffects"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def qt_free_files() -> list[Path]:
    files = sorted((ROOT / "SAMSegment" / "SAMSegmentSlicer").glob("*.py"))
    return [f for f in files if f.relative_to(ROOT).as_posix() not in QT_SHELLS]


@pytest.mark.parametrize("path", qt_free_files(), ids=lambda p: p.name)
def test_helpers_do_not_import_gui_modules(path):
    assert not (imported_modules(path) & GUI_MODULES), f"{path.name} imports a GUI module"


@pytest.mark.parametrize("path", qt_free_files(), ids=lambda p: p.name)
def test_helpers_import_headless(path):
    importlib.import_module(f"SAMSegmentSlicer.{path.stem}")


def test_shells_are_thin_and_parse():
    for rel in QT_SHELLS:
        source = (ROOT / rel).read_text(encoding="utf-8")
        compile(source, rel, "exec")
    effect = (ROOT / EFFECT).read_text(encoding="utf-8")
    assert len(effect.splitlines()) < 250  # decisions belong in effect_interaction.py
    module = (ROOT / "SAMSegment/SAMSegment.py").read_text(encoding="utf-8")
    assert "class SAMSegmentTest(ScriptedLoadableModuleTest)" in module
    assert "@parameterNodeWrapper" in module


def _calls(source: str) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)]


def _attribute_assignments(source: str) -> dict[str, list[str]]:
    """``x.name = value`` assignments in ``source``: name -> the values' source text."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute):
                    found.setdefault(target.attr, []).append(ast.unparse(node.value))
    return found


def test_module_panel_follows_slicer_conventions():
    """Review findings 8, 11, 17-19 (slicer-api-review.md), checked on the module's source: the
    Qt widgets themselves only exist inside Slicer."""
    source = (ROOT / "SAMSegment/SAMSegment.py").read_text(encoding="utf-8")
    assigned = _attribute_assignments(source)
    # qSlicerSimpleMarkupsWidget enters place mode on every node change unless told not to
    assert assigned["enterPlaceModeOnNodeChange"] == ["False"]
    # one segmentation selector: the segment selector's own combo is hidden
    assert assigned["segmentationNodeSelectorVisible"] == ["False"]
    # every combo is connected to the parameter node by a connector, none synced by hand
    mapping = next(c for c in _calls(source) if ast.unparse(c.func).endswith("connectParametersToGui"))
    keys = {k.value for k in mapping.args[0].keys}
    assert {"model", "device", "direction", "inputVolume", "segmentation"} <= keys
    assert "setCurrentText" not in source
    # filled by hand: only the Server section's mode, an application setting that is never in the scene
    assert [ast.unparse(c.func) for c in _calls(source) if ast.unparse(c.func).endswith(".addItems")] == \
        ["ui.serverMode.addItems"]
    assert "parameterNode.server" not in source and "serverKey" not in str(keys)
    # tryWithErrorDisplay re-raises: used in one helper that turns the failure into False
    uses = [c for c in _calls(source) if ast.unparse(c.func) == "slicer.util.tryWithErrorDisplay"]
    assert len(uses) == 1
    # the module widget is never created as a side effect of a lookup
    assert "getModuleLogic" not in source and "getModuleGui" not in source


def test_effect_follows_slicer_conventions():
    """Review findings 12, 14, 20, 21: perSegment, actors through the effect, no module widget."""
    source = (ROOT / EFFECT).read_text(encoding="utf-8")
    assert _attribute_assignments(source)["perSegment"] == ["True"]
    called = {ast.unparse(c.func) for c in _calls(source)}
    assert {"self.scriptedEffect.addActor2D", "self.scriptedEffect.removeActor2D",
            "self.scriptedEffect.confirmCurrentSegmentVisible", "server_link.link_from_settings",
            "self.controller.core.use_link"} <= called
    # the model runs on the server: nothing of the engine's compute stack is imported here
    assert not {"torch", "onnxruntime", "SAMSegmentLib.session"} & {n.split()[1] for n in source.splitlines()
                                                                     if n.strip().startswith(("import ", "from "))
                                                                     and len(n.split()) > 1}
    assert "AddViewProp" not in source and "RemoveViewProp" not in source
    assert "getModuleLogic" not in source and "use_session" not in source
    for hook in ("sourceVolumeNodeChanged", "referenceGeometryChanged", "updateGUIFromMRML"):
        assert f"def {hook}(self)" in source

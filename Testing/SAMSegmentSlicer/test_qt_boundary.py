"""Only the two Qt shells may import qt/ctk; everything they call is importable headless."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QT_SHELLS = {"SAMSegment/SAMSegment.py", "SAMSegment/SAMSegmentSlicer/SegmentEditorSAMEffect.py"}
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
    effect = (ROOT / "SAMSegment/SAMSegmentSlicer/SegmentEditorSAMEffect.py").read_text(encoding="utf-8")
    assert len(effect.splitlines()) < 250  # decisions belong in effect_interaction.py
    module = (ROOT / "SAMSegment/SAMSegment.py").read_text(encoding="utf-8")
    assert "class SAMSegmentTest(ScriptedLoadableModuleTest)" in module
    assert "@parameterNodeWrapper" in module

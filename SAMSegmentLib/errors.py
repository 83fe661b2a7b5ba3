"""Errors the user can act on.

Every error carries a ``remedy`` so the CLI and the Slicer module can show the problem and
what to do about it in one message, without re-deriving advice at each call site.
"""

from __future__ import annotations


class SAMSegmentError(Exception):
    """Base class: ``str(err)`` is ``"<problem> -- <remedy>"``."""

    def __init__(self, problem: str, remedy: str = "") -> None:
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"{problem} -- {remedy}" if remedy else problem)


class CheckpointError(SAMSegmentError):
    """A weights file is missing, truncated, corrupt, unsafe or of the wrong architecture."""


class ModelNotFoundError(SAMSegmentError):
    """An unknown model id was requested."""


class RegistryError(SAMSegmentError):
    """A model registry (``models.json`` or a user ``--registry`` file) is unreadable or has a bad
    entry; ``entry`` and ``field`` name what to fix (empty when the whole file is at fault)."""

    def __init__(self, problem: str, remedy: str = "", entry: str = "", field: str = "") -> None:
        self.entry = entry
        self.field = field
        super().__init__(problem, remedy)


class VolumeError(SAMSegmentError):
    """The image is not a usable 3D scalar volume (2D, 4D, empty, NaN/inf, ...)."""


class PromptError(SAMSegmentError):
    """A point or box is outside the slice, degenerate, or otherwise unusable."""


class MemoryBudgetError(SAMSegmentError):
    """A cache budget is too small to hold what must be held, or the device ran out of memory."""


class ImageIOError(SAMSegmentError):
    """An image could not be read, or an output would overwrite something."""


class CancelledError(SAMSegmentError):
    """The user cancelled a long operation through its cancel token."""

    def __init__(self, problem: str = "Operation cancelled", remedy: str = "") -> None:
        super().__init__(problem, remedy)

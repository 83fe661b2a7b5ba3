"""Writing files so that a crash, a kill or a full disk never leaves a half-written file behind.

One mechanism for every writer (masks and images, embeddings on disk, the ONNX cache's signature
files, SAMAug markers): write to a temporary file in the target's folder (so the final rename is
atomic on the same filesystem), flush it to disk, then replace the target; on any failure the
temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The image formats read and written (SimpleITK); the first matching suffix names a file's type.
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_suffix(path: str | Path) -> str:
    """The image extension of ``path`` (".nii.gz" counts as one), else its last suffix."""
    name = Path(path).name.lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return Path(path).suffix


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", shareable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path``; when the ``with`` block succeeds it replaces ``path``.

    Args:
        path: the file to (re)place.
        suffix: the temporary file's suffix (writers that pick a format from it need the real one).
        shareable: give the result the usual permissions (umask) instead of mkstemp's 0600.

    Yields:
        The temporary path to write. Its content is fsynced before the rename; if the block raises,
        it is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    tmp = Path(name)
    try:
        if shareable:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_path``), with the usual permissions."""
    with atomic_path(path, shareable=True) as tmp:
        tmp.write_text(text, encoding="utf-8")

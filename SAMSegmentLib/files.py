"""Writing files so that a crash, a kill or a full disk never leaves a half-written file behind.

One mechanism for every writer (masks and images, PNG overlays, embeddings on disk, the ONNX
cache's signature files, SAMAug markers): write to a temporary file in the target's folder (so
the final rename is atomic on the same filesystem), flush it to disk, check it (the caller's
``verify``: a read-back of what was written), then replace the target; on any failure the
temporary file is removed and the target is untouched.

Some writers (SimpleITK's NIfTI, NRRD and MetaImage writers) do not report a full disk at all:
they leave a short or empty file and return. The check before the rename is what catches that.
Every OS error becomes a ``WriteError`` that names the OS's reason and what to do about it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import SAMSegmentError

# The image formats read and written (SimpleITK); the first matching suffix names a file's type.
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class WriteError(SAMSegmentError):
    """A file could not be written (read-only or full disk, no permission, a file in the way, or the
    written copy did not read back complete); the previous file, if any, is untouched."""


def image_suffix(path: str | Path) -> str:
    """The image extension of ``path`` (".nii.gz" counts as one), else its last suffix."""
    name = Path(path).name.lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return Path(path).suffix


def free_space_note(folder: str | Path) -> str:
    """``"; N MiB free on that disk"`` for ``folder`` (or its nearest existing parent), else ``""``."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"; {free / 2**20:.1f} MiB free on that disk"


_REMEDIES = {k: v for k, v in {
    errno.EROFS: "the folder is on a read-only file system: choose an output in a writable folder",
    errno.EACCES: "you have no permission to write there: choose another folder, or fix the folder's permissions",
    errno.EPERM: "you have no permission to write there: choose another folder, or fix the folder's permissions",
    errno.ENOSPC: "the disk is full: free some space on it, or write to another disk",
    getattr(errno, "EDQUOT", -1): "your disk quota is used up: free some space, or write to another disk",
    errno.EFBIG: "the file is larger than this system or process allows (or the disk is full): write it elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "a file is in the way of a folder of that path: choose another path",
    errno.EISDIR: "the path is a folder: give a file name",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter name",
}.items() if k > 0}
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_error(path: str | Path, exc: BaseException, what: str = "") -> WriteError:
    """A ``WriteError`` for ``path`` that names ``exc`` (an ``OSError``'s reason and errno, or another
    exception's message) and a remedy chosen from its errno.

    Args:
        path: the file (or folder) that could not be written.
        exc: the exception raised while writing.
        what: what the file is, e.g. "the mask" (for the message).
    """
    name = f"{what} {path}" if what else str(path)
    space = True  # worth saying how much space is left
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno is not None:
            reason = f"{reason} [errno {exc.errno}: {errno.errorcode.get(exc.errno, '?')}]"
        remedy = _REMEDIES.get(exc.errno or 0, "check that the folder exists and is writable and that the disk is not full")
        space = exc.errno in _SPACE_ERRNOS or exc.errno not in _REMEDIES
    else:
        lines = str(exc).strip().splitlines()
        reason = f"{exc.__class__.__name__}: {lines[-1][:200] if lines else ''}"
        remedy = "check that the folder is writable and that the disk is not full"
    return WriteError(f"Cannot write {name}: {reason}{free_space_note(Path(path).parent) if space else ''}", remedy)


def make_folder(folder: str | Path, what: str = "the output folder", writable: bool = False) -> Path:
    """Create ``folder`` (and its parents) if needed; OS errors become a ``WriteError``.

    Args:
        folder: the folder.
        what: what it is, for messages.
        writable: also check that a file can be created in it (a read-only or foreign folder is then
            refused before any work rather than after it).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"Cannot use {what} {folder}: it is a file, not a folder", "choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if writable:
            fd, probe = tempfile.mkstemp(prefix=".samsegment-write-test.", dir=str(folder))
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise write_error(folder, exc, what) from exc
    return folder


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", shareable: bool = False,
                verify: Callable[[Path], None] | None = None, what: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``; when the ``with`` block succeeds it replaces ``path``.

    Args:
        path: the file to (re)place.
        suffix: the temporary file's suffix (writers that pick a format from it need the real one).
        shareable: give the result the usual permissions (umask) instead of mkstemp's 0600.
        verify: called with the temporary path after it is written and flushed to disk, before the
            rename; it raises (preferably a ``WriteError``) when the file is not what was meant to
            be written, e.g. cut short by a full disk that the writer did not report.
        what: what the file is, for messages ("the mask", "the overlay", ...).

    Yields:
        The temporary path to write. Its content is fsynced and verified before the rename; if the
        block, the check or the rename fails, it is removed and ``path`` keeps its old content.

    Raises:
        WriteError: an OS error (read-only folder, no permission, full disk, ...) while creating,
            writing, flushing or renaming the file.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    except OSError as exc:
        raise write_error(path, exc, what) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            if shareable:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            raise write_error(path, exc, what) from exc
        if verify is not None:
            verify(tmp)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(path, exc, what) from exc
        _fsync_folder(path.parent)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def starts_with(path: str | Path, magic: bytes) -> bool:
    """Whether the file at ``path`` begins with ``magic`` (False when it cannot be read): what an
    output may replace with --overwrite is only a file of its own kind."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "") -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``), with the usual permissions; the
    file is read back before it replaces ``path``."""

    def verify(tmp: Path) -> None:
        if tmp.read_bytes() != data:
            raise WriteError(f"Cannot write {what + ' ' if what else ''}{path}: the written copy has "
                             f"{tmp.stat().st_size} of {len(data)} bytes{free_space_note(Path(path).parent)}",
                             "free some space on the disk, or write to another disk")

    with atomic_path(path, shareable=True, verify=verify, what=what) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, what: str = "") -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode("utf-8"), what)

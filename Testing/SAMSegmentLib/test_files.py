"""The one atomic-write mechanism: the target is replaced only by a complete file, never left half-written."""

from __future__ import annotations

import errno
import os

import pytest

from SAMSegmentLib.files import WriteError, atomic_path, atomic_write_text, image_suffix


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "marker.json"
    target.write_text("old")
    with pytest.raises(WriteError, match="disk full"):  # an OS error becomes the project's error + remedy
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["marker.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["marker.json"]


def test_shareable_files_get_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "mask.nii.gz", suffix=".nii.gz", shareable=True) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"x")
        with atomic_path(tmp_path / "private.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(umask)
    assert oct((tmp_path / "mask.nii.gz").stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "private.bin").stat().st_mode & 0o777) == "0o600"


def test_image_suffix():
    assert image_suffix("a/b/ct.nii.gz") == ".nii.gz" and image_suffix("x.NRRD") == ".nrrd"
    assert image_suffix("notes.txt") == ".txt"

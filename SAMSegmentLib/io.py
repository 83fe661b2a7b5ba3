"""Reading volumes and writing masks with their geometry, through SimpleITK.

Arrays are (K, J, I) as ``sitk.GetArrayFromImage`` returns them; physical points are LPS
millimetres, the convention of ITK, SimpleITK and DICOM (3D Slicer shows RAS = (-L, -P, S)).
Outputs are written to a temporary file beside the target, read back and compared with what was
meant to be written (SimpleITK's writers do not report a full disk), and only then renamed; never
onto an input. So a crash, a full disk or a typo cannot destroy the user's data. On reading,
what SimpleITK lets through is checked here: truncated NIfTI files, NaN/Inf stored in NIfTI
(read as 0), DICOM series off a regular grid (read with an averaged spacing).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import ImageIOError, VolumeError
from .files import IMAGE_EXTENSIONS, WriteError, atomic_path, free_space_note, image_suffix, make_folder, starts_with
from .volume import SliceRef, get_slice, validate_volume

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ImageGeometry:
    """Voxel grid in physical space: ITK order (i, j, k) for spacing, origin, size; 3x3 direction."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    size: tuple[int, int, int]

    @classmethod
    def from_sitk(cls, image) -> "ImageGeometry":
        d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        return cls(tuple(float(v) for v in image.GetSpacing()), tuple(float(v) for v in image.GetOrigin()),
                   tuple(tuple(float(v) for v in row) for row in d), tuple(int(v) for v in image.GetSize()))

    @classmethod
    def identity(cls, shape_kji: Sequence[int]) -> "ImageGeometry":
        k, j, i = (int(v) for v in shape_kji)
        return cls((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), (i, j, k))

    def apply_to(self, image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(v for row in self.direction for v in row))

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return self.size[2], self.size[1], self.size[0]

    def array_spacing(self) -> tuple[float, float, float]:
        """Spacing along the array axes (K, J, I)."""
        return self.spacing[2], self.spacing[1], self.spacing[0]

    def _matrix(self) -> np.ndarray:
        return np.asarray(self.direction) @ np.diag(self.spacing)

    def index_to_physical(self, ijk: Sequence[float]) -> np.ndarray:
        """Continuous ITK index (i, j, k) -> LPS point."""
        return np.asarray(self.origin) + self._matrix() @ np.asarray(ijk, dtype=np.float64)

    def physical_to_index(self, lps: Sequence[float]) -> np.ndarray:
        """LPS point -> continuous ITK index (i, j, k)."""
        return np.linalg.solve(self._matrix(), np.asarray(lps, dtype=np.float64) - np.asarray(self.origin))

    def physical_to_array_index(self, lps: Sequence[float]) -> np.ndarray:
        """LPS point -> continuous array index (k, j, i)."""
        return self.physical_to_index(lps)[::-1]


    def radiological_view(self, axis: int):
        """A function turning a slice along array ``axis`` into the orientation a reader expects.

        Axial: patient's right on the image left, anterior up; coronal: right on the left,
        superior up; sagittal: anterior on the left, superior up. Chosen from the direction
        matrix, so flipped or permuted acquisitions display the same way.
        """
        d = np.asarray(self.direction)
        rows_axis, cols_axis = [a for a in (0, 1, 2) if a != axis]

        def physical(array_axis: int) -> tuple[int, float]:
            vec = d[:, 2 - array_axis]  # array axis a is ITK index 2 - a
            c = int(np.argmax(np.abs(vec)))
            return c, float(np.sign(vec[c]))

        (r_c, r_s), (c_c, c_s) = physical(rows_axis), physical(cols_axis)
        transpose = r_c < c_c  # keep the lower LPS component (x before y before z) along the columns
        if transpose:
            (r_c, r_s), (c_c, c_s) = (c_c, c_s), (r_c, r_s)
        # columns increase towards +x (left) or +y (posterior); rows increase towards +y or -z (inferior)
        flip_cols = c_s < 0
        flip_rows = (r_s < 0) if r_c != 2 else (r_s > 0)

        def view(plane: np.ndarray) -> np.ndarray:
            out = plane.T if transpose else plane
            if flip_rows:
                out = out[::-1]
            if flip_cols:
                out = out[:, ::-1]
            return out

        return view, transpose


# ------------------------------------------------------------------------------------------ console
class _Console:
    """Captures what SimpleITK's C++ code prints on stdout/stderr (ITK warnings, MetaIO's and the
    NIfTI library's messages) while the ``with`` block runs, so the user sees the project's message
    instead of raw library text; ``lines`` holds it afterwards (also logged at DEBUG).

    Process-wide (file descriptors 1 and 2), so the blocks are serialised by a lock; where the
    descriptors cannot be redirected, ITK's warning display is switched off instead.
    """

    _lock = threading.RLock()

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._saved: list[tuple[int, int]] = []
        self._buffer: Any = None
        self._warnings: bool | None = None

    def __enter__(self) -> "_Console":
        import SimpleITK as sitk

        self._lock.acquire()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        try:
            self._buffer = tempfile.TemporaryFile()
            for fd in (1, 2):
                saved = os.dup(fd)
                self._saved.append((fd, saved))
                os.dup2(self._buffer.fileno(), fd)
        except OSError:  # no console descriptors (e.g. a GUI process on Windows)
            self._restore()
            self._warnings = bool(sitk.ProcessObject_GetGlobalWarningDisplay())
            sitk.ProcessObject_SetGlobalWarningDisplay(False)
        return self

    def _restore(self) -> None:
        _flush_c_stdio()
        for fd, saved in reversed(self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = []

    def __exit__(self, *exc_info: Any) -> None:
        import SimpleITK as sitk

        try:
            self._restore()
            if self._warnings is not None:
                sitk.ProcessObject_SetGlobalWarningDisplay(self._warnings)
            if self._buffer is not None:
                self._buffer.seek(0)
                text = self._buffer.read().decode("utf-8", errors="replace")
                self._buffer.close()
                self.lines = [line.strip() for line in text.splitlines() if line.strip()]
                for line in self.lines:
                    log.debug("SimpleITK: %s", line)
        finally:
            self._lock.release()


def _flush_c_stdio() -> None:
    """Flush the C library's stdout/stderr buffers (MetaIO prints through std::cout)."""
    if os.name != "posix":
        return
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _itk_reason(exc: BaseException, console_lines: Sequence[str] = ()) -> str:
    """The useful part of a SimpleITK error: MetaIO's and NIfTI's own messages when there are any,
    else ITK's error line; ITK's "Reason: <errno text>" is dropped (a stale errno, e.g. "No such file
    or directory" for a truncated file)."""
    text = "\n".join(console_lines)
    incomplete = re.search(r"ideal\s*=\s*(\d+)\s*:\s*actual\s*=\s*(\d+)", text)
    if incomplete or "not read completely" in text:
        detail = f": {incomplete.group(2)} of {incomplete.group(1)} bytes" if incomplete else ""
        return f"its voxel data is incomplete{detail}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Reason:", "Exception thrown in SimpleITK", "/"))]
    nrrd = [line for line in lines if line.startswith("[nrrd]")]
    if nrrd:  # teem's messages go from general to specific
        return nrrd[-1][:240]
    starts = [n for n, line in enumerate(lines) if line.startswith("ITK ERROR:")]
    if starts:  # ITK's message may span lines (e.g. the two matrices of a singular direction)
        text = " ".join(lines[starts[-1]:])
        return " ".join(re.sub(r"^ITK ERROR:\s*\w+\(0x[0-9a-f]+\):\s*", "", text).split())[:240]
    return (lines[-1] if lines else str(exc).strip())[:240]


# ------------------------------------------------------------------------------------------ NIfTI payload
# NIfTI-1 and -2 header fields: (dim, datatype, bitpix, vox_offset) offsets and formats
_NIFTI = {348: dict(dim=(40, "8h"), datatype=(70, "h"), bitpix=(72, "h"), vox_offset=(108, "f")),
          540: dict(dim=(16, "8q"), datatype=(12, "h"), bitpix=(14, "h"), vox_offset=(168, "q"))}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # datatype codes of float32 / float64 (the types that hold NaN)
_CHUNK = 1 << 24


def _nifti_payload(path: Path) -> tuple[str | None, int]:
    """Check a NIfTI file's voxel data as stored: (problem, non-finite voxel count).

    SimpleITK reads a truncated .nii or .nii.gz without an error (the missing voxels become 0) and
    returns NaN and infinite voxels of a NIfTI file as 0, so both are checked on the raw bytes: the
    whole gzip stream is read (its length and CRC are checked), or the file's size compared with the
    header's, and float data is scanned for NaN/Inf.

    Returns:
        (None, n) for a complete payload with ``n`` non-finite voxels; (a description of what is
        wrong, 0) for a truncated or corrupt file; (None, 0) for a header this check does not know
        (left to SimpleITK).
    """
    import gzip
    import struct
    import zlib

    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            header = f.read(540)
            fields = endian = None
            for order in "<>":
                if len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] in _NIFTI:
                    endian, fields = order, _NIFTI[struct.unpack(order + "i", header[:4])[0]]
                    break
            if fields is None or len(header) < max(o for o, _ in fields.values()) + 8:
                return None, 0
            get = {name: struct.unpack_from(endian + fmt, header, off) for name, (off, fmt) in fields.items()}
            dim, datatype, bitpix = get["dim"], get["datatype"][0], get["bitpix"][0]
            ndim = int(dim[0])
            if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1:ndim + 1]) or bitpix <= 0 or bitpix % 8:
                return None, 0
            offset = max(int(get["vox_offset"][0]), 352 if fields is _NIFTI[348] else 544)
            nbytes = int(np.prod([int(d) for d in dim[1:ndim + 1]], dtype=object)) * (bitpix // 8)
            dtype = np.dtype(endian + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
            if not gzipped:
                size = path.stat().st_size
                if size < offset + nbytes:
                    return (f"it has only {max(size - offset, 0)} of the {nbytes} bytes of voxel data its header "
                            "describes", 0)
                if dtype is None:
                    return None, 0
            f.seek(offset)
            remaining, bad, carry = nbytes, 0, b""
            while remaining > 0:
                chunk = f.read(min(remaining, _CHUNK))
                if not chunk:
                    return (f"it has only {nbytes - remaining} of the {nbytes} bytes of voxel data its header "
                            "describes", 0)
                remaining -= len(chunk)
                if dtype is not None:
                    buf = carry + chunk
                    whole = len(buf) - len(buf) % dtype.itemsize
                    bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(buf[:whole], dtype=dtype))))
                    carry = buf[whole:]
            if gzipped:
                while f.read(_CHUNK):  # to the end of the stream: gzip checks its length and CRC there
                    pass
    except EOFError:
        return "its compressed data ends early", 0
    except (gzip.BadGzipFile, zlib.error) as exc:
        return f"its compressed data is damaged: {exc}", 0
    return None, bad


# ------------------------------------------------------------------------------------------ reading
def _dicom_series(folder: Path, series_uid: str | None):
    import SimpleITK as sitk

    console = _Console()
    with console:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
        files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}
    if not files:
        raise ImageIOError(f"No DICOM series found in folder {folder}",
                           "point to a folder of DICOM files of one scan, or to an image file (.nii.gz, .nrrd, .mha)")
    if series_uid is not None:
        if series_uid not in files:
            raise ImageIOError(f"Series {series_uid} is not in {folder} (found: {', '.join(files)})",
                               "pass one of the listed series UIDs")
        chosen = series_uid
    else:
        # the series with the most files; among equals the lowest UID, so the choice never depends on the
        # order in which the folder happens to be listed
        chosen = min(files, key=lambda uid: (-len(files[uid]), uid))
        if len(files) > 1:
            tie = sum(len(f) == len(files[chosen]) for f in files.values()) > 1
            listing = "; ".join(f"{uid} ({len(files[uid])} files{_series_description(files[uid][0])})"
                                for uid in sorted(files, key=lambda uid: (-len(files[uid]), uid)))
            log.warning("%s holds %d DICOM series: %s. Using %s (%s). Choose another with --series-uid "
                        "(series_uid=...).", folder, len(files), listing, chosen,
                        "the lowest UID of those with the most files" if tie else "the one with the most files")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()
    console = _Console()
    try:
        with console:
            image = reader.Execute()
    except RuntimeError as exc:
        raise ImageIOError(f"Cannot read the DICOM series {chosen} in {folder}: {_itk_reason(exc, console.lines)}",
                           "re-export the series from the PACS or scanner") from exc
    _check_dicom_grid(reader, len(files[chosen]), folder, chosen)
    return image


def _series_description(first_file: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    try:
        with _Console():
            reader.ReadImageInformation()
        parts = [reader.GetMetaData(tag).strip() for tag in ("0008|0060", "0008|103e") if reader.HasMetaDataKey(tag)]
    except RuntimeError:
        return ""
    parts = [p for p in parts if p]
    return f", {' '.join(parts)}" if parts else ""


def _check_dicom_grid(reader, n_files: int, folder: Path, uid: str) -> None:
    """Refuse a series whose slices do not lie on one uniform grid (ITK would average the spacing).

    A missing slice, irregular spacing, duplicate positions, mixed orientations or a gantry tilt
    (slices shifted in-plane, i.e. a sheared volume) would otherwise be read as a regular volume, and
    every mask written on it would lie off the real slices.
    """
    if n_files < 2:
        return
    positions, orientations = [], []
    for i in range(n_files):
        try:
            positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
            orientations.append([float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")])
        except (RuntimeError, ValueError, IndexError):
            return  # no position/orientation tags (e.g. secondary capture): nothing to compare
    if any(len(p) != 3 for p in positions) or any(len(o) != 6 for o in orientations):
        return
    where = f"The DICOM series {uid} in {folder}"
    remedy = ("export the complete series again; if the acquisition really is irregular, resample it to a regular "
              "grid first (e.g. 3D Slicer's DICOM import does, with an acquisition transform) and save it as .nrrd")
    orient = np.asarray(orientations)
    if np.max(np.abs(orient - orient[0])) > 1e-4:
        raise ImageIOError(f"{where} mixes slices of different orientations", remedy)
    normal = np.cross(orient[0, :3], orient[0, 3:])
    pos = np.asarray(positions)
    depth = pos @ normal
    order = np.argsort(depth)
    depth, pos = depth[order], pos[order]
    gaps = np.diff(depth)
    mean_gap = (depth[-1] - depth[0]) / (n_files - 1)
    if np.min(gaps) < 1e-3:
        raise ImageIOError(f"{where} has {int(np.sum(gaps < 1e-3)) + 1} slices at the same position "
                           "(duplicate files, or several acquisitions in one series)", remedy)
    tolerance = max(0.01, 0.02 * mean_gap)
    off_grid = np.abs(depth - (depth[0] + mean_gap * np.arange(n_files)))
    if np.max(off_grid) > tolerance:
        worst = int(np.argmax(np.abs(gaps - np.median(gaps))))
        raise ImageIOError(
            f"{where} has non-uniform slice spacing: {n_files} slices, gaps from {np.min(gaps):.3g} to {np.max(gaps):.3g} mm "
            f"(between positions {depth[worst]:.2f} and {depth[worst + 1]:.2f} mm the gap is {gaps[worst]:.3g} mm, the "
            f"usual gap {np.median(gaps):.3g} mm): a slice is missing or the series is irregular, and reading it as a "
            "regular volume would put every slice after the gap at the wrong position", remedy)
    shift = (pos[-1] - pos[0]) - (depth[-1] - depth[0]) * normal
    if np.linalg.norm(shift) > tolerance * max(1, n_files - 1):
        raise ImageIOError(f"{where} is sheared (gantry tilt): its slices shift {np.linalg.norm(shift):.3g} mm in-plane "
                           "from first to last, which a regular volume cannot represent", remedy)


def read_image(path: str | Path, series_uid: str | None = None):
    """A SimpleITK image from a file or a DICOM folder, with errors that say what is wrong.

    ``series_uid`` chooses one series of a DICOM folder (default: the one with the most files, the
    lowest UID among equals; the series found are listed in a warning). A DICOM series whose slices
    are not on a uniform grid, and a truncated or corrupt NIfTI file, are refused (``ImageIOError``),
    and so is a NIfTI file with NaN or infinite voxels (``VolumeError``; SimpleITK would read them as 0).
    """
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.exists():
        raise ImageIOError(f"Image {path} does not exist", "check the path (and the current directory)")
    if series_uid is not None and not path.is_dir():
        raise ImageIOError(f"A series UID ({series_uid}) chooses a series of a DICOM folder, but {path} is a file",
                           "give the DICOM folder, or drop --series-uid (series_uid)")
    remedy = "give a NIfTI, NRRD, MHA/MHD file or a DICOM folder; re-export the image if it is damaged"
    if path.is_dir():
        return _dicom_series(path, series_uid)
    if image_suffix(path) in (".nii", ".nii.gz"):
        try:
            problem, bad = _nifti_payload(path)
        except OSError as exc:
            raise ImageIOError(f"Cannot read {path}: {exc.strerror or exc}", "check the file's permissions") from exc
        if problem:
            raise ImageIOError(f"Cannot read {path}: truncated or corrupt NIfTI file ({problem})",
                               "copy or export the image again; this copy is damaged")
        if bad:  # SimpleITK would read them as 0
            raise VolumeError(f"The image {path.name} has {bad} NaN or infinite voxel(s) (stored in the file)",
                              "replace them (e.g. with the minimum intensity) before segmenting")
    console = _Console()
    try:
        with console:
            return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = _itk_reason(exc, console.lines)
        if reason.startswith("its voxel data is incomplete"):
            raise ImageIOError(f"Cannot read {path}: the file is truncated ({reason})",
                               "copy or export the image again; this copy is damaged") from exc
        raise ImageIOError(f"Cannot read {path}: unsupported, truncated or corrupt file ({reason})", remedy) from exc


def read_volume(path: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, ImageGeometry]:
    """(array (K, J, I), geometry) of a 3D scalar image; 2D, 4D, vector and empty images are refused,
    and so are NaN/infinite voxels (also those SimpleITK reads as 0 from NIfTI files).

    ``series_uid`` chooses a series of a DICOM folder (see ``read_image``).
    """
    image = read_image(path, series_uid)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector)",
                          "convert it to a single scalar channel (e.g. luminance) first")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        import SimpleITK as sitk

        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        kind = {2: "a 2D image", 4: "a 4D image (time series or multi-volume)"}.get(dim, f"{dim}D")
        raise VolumeError(f"{path} is {kind} of size {image.GetSize()}; a 3D volume is needed",
                          "for 4D data extract one 3D frame first; for 2D images stack them into a volume")
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    validate_volume(array, name=f"image {Path(path).name}")
    return array, ImageGeometry.from_sitk(image)


# ------------------------------------------------------------------------------------------ writing
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _refuse_inputs(path: Path, source_paths: Iterable[str | Path | None]) -> None:
    target = path.expanduser().resolve()
    for src in source_paths:
        if src is None:
            continue
        src_path = Path(src).expanduser().resolve()
        if target == src_path or (src_path.is_dir() and src_path in target.parents):
            raise ImageIOError(f"Refusing to write onto the input {src}",
                               "choose a different output file name; inputs are never overwritten")


def _orthonormal(direction: Any, tol: float = 1e-4) -> bool:
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return bool(np.allclose(d.T @ d, np.eye(3), atol=tol))


def check_output_path(path: str | Path, overwrite: bool = False, source_paths: Iterable[str | Path | None] = (),
                      geometry: ImageGeometry | None = None) -> Path:
    """Refuse an image output before any work is done; create its folder.

    Args:
        path: the image file to write (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd).
        overwrite: allow replacing an existing file (never an input).
        source_paths: the inputs (files or DICOM folders); the output may not be one of them or lie in one.
        geometry: the grid to be written; a non-orthogonal (sheared) direction cannot be stored in NIfTI.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ImageIOError: an input, an unsupported type, a folder, an existing file without ``overwrite``,
            or a sheared grid for NIfTI.
        WriteError: the folder cannot be created or written (read-only, no permission, a file in the way).
    """
    path = Path(path)
    _refuse_inputs(path, source_paths)
    suffix = image_suffix(path)
    if suffix not in IMAGE_EXTENSIONS:
        raise ImageIOError(f"Unsupported output type {path.name!r}", f"use one of {', '.join(IMAGE_EXTENSIONS)}")
    if path.is_dir():
        raise ImageIOError(f"{path} is a folder", "give a file name for the output")
    if geometry is not None and suffix in _NIFTI_SUFFIXES and not _orthonormal(geometry.direction):
        raise ImageIOError(f"The image's axes are not perpendicular (a sheared or gantry-tilted grid), which NIfTI "
                           f"cannot store: {path.name} would not lie on the image",
                           "write the output as .nrrd or .mha, which keep the grid exactly")
    if path.exists() and not overwrite:
        raise ImageIOError(f"{path} already exists", "pass --overwrite (overwrite=True) or choose another name")
    make_folder(path.parent, writable=True)
    return path


def _readback_problem(tmp: Path, image: Any, array: np.ndarray) -> str | None:
    """What is wrong with the image file ``tmp`` just written from ``image``/``array``, or None."""
    import SimpleITK as sitk

    size = tmp.stat().st_size
    if size == 0:
        return "the written file is empty"
    if image_suffix(tmp) in _NIFTI_SUFFIXES:
        problem, _ = _nifti_payload(tmp)
        if problem:
            return f"the written copy is truncated or damaged ({problem})"
    console = _Console()
    try:
        with console:
            back = sitk.ReadImage(str(tmp))
    except RuntimeError as exc:
        return f"the written copy cannot be read back ({_itk_reason(exc, console.lines)}; {size} bytes)"
    if back.GetSize() != image.GetSize() or back.GetNumberOfComponentsPerPixel() != image.GetNumberOfComponentsPerPixel():
        return f"the written copy has size {back.GetSize()}, not {image.GetSize()}"
    got = sitk.GetArrayViewFromImage(back)
    if got.dtype != array.dtype or not np.array_equal(got, array, equal_nan=np.issubdtype(array.dtype, np.floating)):
        return "the written copy's voxels differ from the data written"
    if not np.allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-5, atol=1e-6):
        return f"the written copy's spacing is {back.GetSpacing()}, not {image.GetSpacing()}"
    if not np.allclose(back.GetOrigin(), image.GetOrigin(), rtol=1e-6, atol=1e-3):
        return f"the written copy's origin is {back.GetOrigin()}, not {image.GetOrigin()}"
    if not np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-4):
        return "the written copy's direction differs from the image's (the format cannot store this grid)"
    return None


def _write_atomic(image: Any, path: Path, array: np.ndarray) -> None:
    """Write ``image`` (made from ``array``) to ``path``: temp file, read back and compared, then renamed."""
    import SimpleITK as sitk

    def verify(tmp: Path) -> None:
        problem = _readback_problem(tmp, image, array)
        if problem:
            raise WriteError(f"Cannot write {path}: {problem}; the previous file, if any, is unchanged"
                             f"{free_space_note(path.parent)}",
                             "free some space on the disk (or write to another disk) and run again"
                             if "direction" not in problem else "write the output as .nrrd or .mha")

    with atomic_path(path, suffix=image_suffix(path), shareable=True, verify=verify, what="the image") as tmp:
        console = _Console()
        try:
            with console:
                sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as exc:
            raise WriteError(f"Cannot write {path}: {_itk_reason(exc, console.lines)}{free_space_note(path.parent)}",
                             "check that the folder is writable and the disk is not full") from exc


def write_array(path: str | Path, array: np.ndarray, geometry: ImageGeometry, overwrite: bool = False,
                source_paths: Iterable[str | Path] = ()) -> Path:
    """Write any (K, J, I) array with ``geometry``; same safety rules as ``write_mask``."""
    import SimpleITK as sitk

    path = Path(path)
    if tuple(array.shape) != geometry.shape_kji:
        raise ImageIOError(f"Array shape {array.shape} does not match the image grid {geometry.shape_kji}",
                           "write a mask computed on this image")
    check_output_path(path, overwrite, source_paths, geometry)
    array = np.ascontiguousarray(array)
    image = sitk.GetImageFromArray(array)
    geometry.apply_to(image)
    _write_atomic(image, path, array)
    return path


def write_mask(path: str | Path, mask: np.ndarray, geometry: ImageGeometry, overwrite: bool = False,
               source_paths: Iterable[str | Path] = ()) -> Path:
    """Write a uint8 labelmap with the image's spacing, origin and direction (atomic, never onto inputs)."""
    return write_array(path, np.asarray(mask).astype(np.uint8), geometry, overwrite, source_paths)


def write_volume(path: str | Path, array: np.ndarray, geometry: ImageGeometry, overwrite: bool = False,
                 source_paths: Iterable[str | Path] = ()) -> Path:
    """Write a float map (probabilities, uncertainty, ...) as float32."""
    return write_array(path, np.asarray(array, dtype=np.float32), geometry, overwrite, source_paths)


# ------------------------------------------------------------------------------------------ pictures
MAX_PIXEL_STRETCH = 16.0  # a picture's pixels are at most this many times longer one way than the other
MAX_TILE_SIDE = 4096
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def overlay_tile(image_u8: np.ndarray, masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
                 pixel_spacing: tuple[float, float] = (1.0, 1.0), label: str = "", alpha: float = 0.35,
                 min_side: int = 192) -> np.ndarray:
    """An RGB picture of a slice with filled, outlined masks, resampled to square pixels.

    The stretch for square pixels is limited to ``MAX_PIXEL_STRETCH`` and the picture to
    ``MAX_TILE_SIDE`` pixels a side, so an absurd spacing (1e300 mm) still gives a picture.
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage

    rgb = np.repeat(np.asarray(image_u8, dtype=np.float32)[:, :, None], 3, axis=2)
    for mask, color in masks:
        m = np.asarray(mask, dtype=bool)
        if not m.any():
            continue
        col = np.asarray(color, dtype=np.float32)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * col
        edge = m & ~ndimage.binary_erosion(m)
        rgb[edge] = col
    h, w = rgb.shape[:2]
    sp = np.asarray(pixel_spacing, dtype=np.float64)
    if sp.shape != (2,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        sp = np.ones(2)
    stretch = np.minimum(sp / sp.min(), MAX_PIXEL_STRETCH)  # square pixels (within reason)
    out_h, out_w = h * stretch[0], w * stretch[1]
    zoom = max(1.0, min_side / min(out_h, out_w))
    zoom = min(zoom, MAX_TILE_SIDE / max(out_h, out_w))
    out_h, out_w = max(1, int(round(out_h * zoom))), max(1, int(round(out_w * zoom)))
    tile = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((out_w, out_h), Image.NEAREST)
    if label:
        draw = ImageDraw.Draw(tile)
        draw.text((4, 2), label, fill=(255, 255, 0))
    return np.asarray(tile)


def check_png_path(path: str | Path, overwrite: bool = False, source_paths: Iterable[str | Path | None] = ()) -> Path:
    """Refuse a PNG output before any work is done; create its folder.

    An overlay is only ever a ``.png`` file; it never replaces an input, nor (even with
    ``overwrite``) an existing file that is not a PNG picture.

    Raises:
        ImageIOError: not ``.png``, an input or inside an input folder, a folder, an existing file
            without ``overwrite``, or an existing file that is not a PNG.
        WriteError: the folder cannot be created or written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ImageIOError(f"The overlay {path} is not a .png file name", "give --png a file name ending in .png")
    _refuse_inputs(path, source_paths)
    if path.is_dir():
        raise ImageIOError(f"{path} is a folder", "give a file name for the overlay")
    if path.exists():
        if not overwrite:
            raise ImageIOError(f"{path} exists", "pass --overwrite or choose another name")
        if not starts_with(path, _PNG_MAGIC):
            raise ImageIOError(f"{path} exists and is not a PNG picture; it is not replaced, even with --overwrite",
                               "choose another name for the overlay")
    make_folder(path.parent, writable=True)
    return path


def save_montage_png(path: str | Path, tiles: Sequence[np.ndarray], ncols: int = 4) -> Path:
    """Tiles of (possibly different) sizes on a black grid, row-major, written as a PNG (atomically,
    and read back before it replaces ``path``)."""
    from PIL import Image

    if not tiles:
        raise ImageIOError("Nothing to draw: no slices", "segment at least one slice")
    ncols = max(1, min(ncols, len(tiles)))
    nrows = (len(tiles) + ncols - 1) // ncols
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    canvas = np.zeros((nrows * th, ncols * tw, 3), dtype=np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, ncols)
        canvas[r * th:r * th + tile.shape[0], c * tw:c * tw + tile.shape[1]] = tile[..., :3]
    path = Path(path)
    make_folder(path.parent)

    def verify(tmp: Path) -> None:
        try:
            with Image.open(tmp) as back:
                back.load()
                same = back.format == "PNG" and np.array_equal(np.asarray(back.convert("RGB")), canvas)
        except (OSError, ValueError, SyntaxError) as exc:
            same, detail = False, f" ({exc})"
        else:
            detail = ""
        if not same:
            raise WriteError(f"Cannot write the overlay {path}: the written copy ({tmp.stat().st_size} bytes) does not read "
                             f"back as the picture{detail}; the previous file, if any, is unchanged"
                             f"{free_space_note(path.parent)}",
                             "free some space on the disk (or write to another disk) and run again")

    with atomic_path(path, suffix=".png", shareable=True, verify=verify, what="the overlay") as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def write_png_montage(path: str | Path, slice_image: Callable[[SliceRef], np.ndarray], mask_kji: np.ndarray,
                      axis: int, indices: Sequence[int], geometry: ImageGeometry, overwrite: bool = False,
                      max_tiles: int = 16, source_paths: Iterable[str | Path | None] = ()) -> Path:
    """A PNG of up to ``max_tiles`` of the slices ``indices`` along ``axis``, mask outlined in red.

    Args:
        path: PNG file to write (``.png``); refused if it exists unless ``overwrite``, and always
            refused when it is one of ``source_paths``, lies in an input folder, or is an existing
            file that is not a PNG (see ``check_png_path``).
        slice_image: the uint8 (windowed) picture of a slice, e.g. ``SegmentationSession.slice_image``.
        mask_kji: (K, J, I) mask; non-zero voxels are drawn.
        axis, indices: the slices to draw (evenly thinned out to ``max_tiles``).
        geometry: the image's geometry, for radiological orientation and square pixels.
        source_paths: the inputs (image files, DICOM folders) the picture must never replace.

    Returns:
        The path written.
    """
    check_png_path(path, overwrite, source_paths)
    indices = list(indices)
    if len(indices) > max_tiles:
        picks = np.linspace(0, len(indices) - 1, max_tiles).round().astype(int)
        indices = [indices[i] for i in sorted(set(picks.tolist()))]
    spacing = geometry.array_spacing()  # (K, J, I) spacing
    in_plane = [a for a in (0, 1, 2) if a != axis]
    view, transposed = geometry.radiological_view(axis)
    pixel_spacing = (spacing[in_plane[0]], spacing[in_plane[1]])
    if transposed:
        pixel_spacing = pixel_spacing[::-1]
    tiles = []
    for index in indices:
        ref = SliceRef(axis, index)
        tiles.append(overlay_tile(view(slice_image(ref)), [(view(get_slice(mask_kji, ref) > 0), (255, 64, 64))],
                                  pixel_spacing=pixel_spacing, label=f"{'kji'[axis]}={index}"))
    return save_montage_png(path, tiles, ncols=min(4, len(tiles)))

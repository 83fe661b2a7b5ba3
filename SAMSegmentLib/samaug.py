"""SAMAug input augmentation (Zhang et al., MICCAI 2023): SAM's view of an image as extra channels.

For each slice the everything-mode masks (``automatic``) give two prior maps:

* **segmentation prior**: every mask adds its stability score to its pixels (SAMAug's definition:
  a pixel covered by two stable masks gets about 2, one covered by nothing gets 0);
* **boundary prior**: 1 on the outer boundary of every mask (background pixels 4-adjacent to the
  mask, skimage's ``find_boundaries(mode="outer")``), 0 elsewhere.

A task-specific network (e.g. nnU-Net) is then trained on the 3-channel image
(intensity, segmentation prior, boundary prior). We write the channels as **three files** per
case, named the nnU-Net way: ``CASE_0000.nii.gz`` (the original intensities, unchanged dtype),
``CASE_0001.nii.gz`` (segmentation prior, float32), ``CASE_0002.nii.gz`` (boundary prior, float32),
each with the input's spacing, origin and direction. Three scalar files rather than one
3-component file because every reader (nnU-Net, Slicer, ITK-SNAP) loads scalar NIfTI the same
way, while vector NIfTI is read as a 4D or RGB image depending on the tool.

Batch runs are resumable: a case is finished only when its marker ``CASE.samaug.json`` exists;
the marker is written (atomically) after all three files, so a run killed half-way through a
case leaves no marker and the case is redone from scratch on the next run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .automatic import EverythingParams, Region, everything_slice
from .errors import ImageIOError, SAMSegmentError
from .files import IMAGE_EXTENSIONS, atomic_write_text, image_suffix, make_folder, write_error
from .session_protocol import SessionProtocol
from .volume import SliceRef, set_slice
from .worker import CancelToken, ProgressCallback

log = logging.getLogger(__name__)

CHANNEL_SUFFIXES = ("_0000", "_0001", "_0002")  # intensity, segmentation prior, boundary prior
MARKER_SUFFIX = ".samaug.json"


def outer_boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's outer boundary.

    Args:
        mask: a binary mask of any dimension.

    Returns:
        bool array: background pixels 4-adjacent (face-adjacent) to ``mask``.
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    return ndimage.binary_dilation(m, structure=ndimage.generate_binary_structure(m.ndim, 1)) & ~m


def priors_from_regions(regions: Sequence[Region], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """SAMAug's two priors from everything-mode regions.

    Args:
        regions: the regions of one slice.
        shape: (H, W) of the slice.

    Returns:
        (segmentation prior: per pixel, the sum of the stability scores of the regions covering
        it; boundary prior: 1 on the regions' outer boundaries), float32 (H, W).
    """
    seg = np.zeros(shape, dtype=np.float32)
    boundary = np.zeros(shape, dtype=bool)
    for region in regions:
        seg[region.mask] += np.float32(region.stability)
        boundary |= outer_boundary(region.mask)
    return seg, boundary.astype(np.float32)


def samaug_maps(session: SessionProtocol, ref: SliceRef, params: EverythingParams | None = None,
                regions: Sequence[Region] | None = None,
                cancel: CancelToken | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SAMAug priors of one slice.

    Args:
        session: the segmentation session holding the volume.
        ref: the slice.
        params: everything-mode settings (``automatic.EverythingParams``).
        regions: the slice's everything-mode regions when they were already computed (e.g. the
            GUI shows them), so the slice is not decoded twice.
        cancel: polled during everything mode.

    Returns:
        (segmentation prior, boundary prior), float32 (H, W); see ``priors_from_regions``.
    """
    if regions is None:
        regions = everything_slice(session, ref, params, cancel=cancel)
    return priors_from_regions(regions, session.slice_image(ref).shape)


def samaug_volume(session: SessionProtocol, axis: int = 0, params: EverythingParams | None = None,
                  progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SAMAug priors of every slice along ``axis``.

    Args:
        session: the segmentation session holding the volume.
        axis: the slicing axis.
        params: everything-mode settings.
        progress: ``progress(done, total, message)``, called with the finished slice count.
        cancel: polled between slices and during everything mode.

    Returns:
        (segmentation prior, boundary prior), float32 volumes of the session's shape.
    """
    shape = session.shape
    seg = np.zeros(shape, dtype=np.float32)
    bnd = np.zeros(shape, dtype=np.float32)
    n = shape[axis]
    for index in range(n):
        if cancel is not None:
            cancel.raise_if_cancelled()
        ref = SliceRef(axis, index)
        s, b = samaug_maps(session, ref, params, cancel=cancel)
        set_slice(seg, ref, s)
        set_slice(bnd, ref, b)
        if progress is not None:
            progress(index + 1, n, f"slice {index}")
    return seg, bnd


# ------------------------------------------------------------------------------------------ files
def case_name(path: str | Path) -> str:
    """Case id of an input file: its name without the image extension (``ct.nii.gz`` -> ``ct``).

    Args:
        path: the input file.

    Returns:
        The case id.
    """
    name, ext = Path(path).name, image_suffix(path)
    return name[: -len(ext)] if ext in IMAGE_EXTENSIONS else Path(path).stem


def output_paths(out_dir: str | Path, case: str, extension: str = ".nii.gz") -> list[Path]:
    """The three channel files of a case.

    Args:
        out_dir: the output folder.
        case: the case id.
        extension: the image file extension.

    Returns:
        [intensity, segmentation prior, boundary prior] paths.
    """
    return [Path(out_dir) / f"{case}{suffix}{extension}" for suffix in CHANNEL_SUFFIXES]


def marker_path(out_dir: str | Path, case: str) -> Path:
    """The completion marker of ``case`` in ``out_dir``.

    Args:
        out_dir: the output folder.
        case: the case name (``case_name``).

    Returns:
        The marker's path (written last, so its presence means the case is complete).
    """
    return Path(out_dir) / f"{case}{MARKER_SUFFIX}"


def is_finished(out_dir: str | Path, case: str, extension: str = ".nii.gz") -> bool:
    """Whether a case is finished.

    Args:
        out_dir: the output folder.
        case: the case id.
        extension: the image file extension.

    Returns:
        True when the case's completion marker and all three files exist (a half-written case is not).
    """
    return marker_path(out_dir, case).is_file() and all(p.is_file() for p in output_paths(out_dir, case, extension))


def write_samaug(out_dir: str | Path, case: str, volume: np.ndarray, seg_prior: np.ndarray,
                 boundary_prior: np.ndarray, geometry: Any, source_paths: Iterable[str | Path] = (),
                 info: dict[str, Any] | None = None, extension: str = ".nii.gz") -> list[Path]:
    """Write the three channel files (replacing leftovers of an unfinished run), then the marker.

    Args:
        out_dir: the output folder (created if missing).
        case: the case id.
        volume: the input intensities, written unchanged.
        seg_prior: the segmentation prior volume.
        boundary_prior: the boundary prior volume.
        geometry: the input's ``io.ImageGeometry`` (spacing, origin, direction).
        source_paths: inputs that must never be overwritten.
        info: extra fields for the marker.
        extension: the image file extension.

    Returns:
        The three channel files written; each is read back and compared before it replaces anything
        (``io.write_array``), and the marker is written only after all three.

    Raises:
        WriteError: a file cannot be written (full disk, read-only, no permission); no marker is left.
    """
    from . import io as sio

    out = make_folder(out_dir, "the SAMAug output folder")
    marker = marker_path(out, case)
    if marker.exists():
        try:
            marker.unlink()  # the files are about to change: not finished until the new marker
        except OSError as exc:
            raise write_error(marker, exc, "the SAMAug marker") from exc
    sources = list(source_paths)
    paths = output_paths(out, case, extension)
    sio.write_array(paths[0], np.asarray(volume), geometry, overwrite=True, source_paths=sources)
    sio.write_volume(paths[1], seg_prior, geometry, overwrite=True, source_paths=sources)
    sio.write_volume(paths[2], boundary_prior, geometry, overwrite=True, source_paths=sources)
    payload = {"case": case, "files": [p.name for p in paths], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               **(info or {})}
    atomic_write_text(marker, json.dumps(payload, indent=1))
    return paths


def find_inputs(folder: str | Path) -> list[Path]:
    """The volumes of a batch.

    Args:
        folder: the input folder.

    Returns:
        Image files directly in ``folder`` (NIfTI, NRRD, MHA/MHD), sorted by name.

    Raises:
        ImageIOError: not a folder, or no image file in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageIOError(f"{folder} is not a folder", "give a folder that holds the volumes (.nii.gz, .nrrd, .mha)")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and any(p.name.lower().endswith(e)
                                                                         for e in IMAGE_EXTENSIONS))
    if not files:
        raise ImageIOError(f"No volumes found in {folder}", f"put image files ({', '.join(IMAGE_EXTENSIONS)}) there")
    return files


@dataclass
class BatchSummary:
    """What a batch run did: case ids processed now, skipped as already finished, failed (with why)."""

    done: list[str]
    skipped: list[str]
    failed: dict[str, str]
    seconds: float


def samaug_batch(inputs: Sequence[str | Path], out_dir: str | Path, session: SessionProtocol, axis: int = 0,
                 params: EverythingParams | None = None, window: Any = None, modality: str = "auto",
                 redo: bool = False, progress: ProgressCallback | None = None,
                 slice_progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> BatchSummary:
    """SAMAug channels for many volumes, resumable: finished cases are skipped unless ``redo``.

    A case that fails to read or segment is reported in ``failed`` and the batch goes on; a cancel
    stops before the next slice and leaves the current case unfinished (no marker).

    Args:
        inputs: the volume files.
        out_dir: the output folder; not an input folder.
        session: the segmentation session each volume is loaded into.
        axis: the slicing axis.
        params: everything-mode settings.
        window: intensity window for every volume (None: chosen per volume from ``modality``).
        modality: "auto", "ct" or "mr", for the automatic window.
        redo: recompute finished cases too.
        progress: ``progress(done, total, case)``, called per case.
        slice_progress: ``progress(done, total, message)`` over the slices of the current case.
        cancel: polled between cases and slices.

    Returns:
        What was done, skipped and failed, and the run's seconds.

    Raises:
        ImageIOError: the output folder is an input folder.
        SAMSegmentError: two inputs with the same case id.
        CancelledError: ``cancel`` was set.
    """
    from . import io as sio

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    in_dirs = {Path(p).expanduser().resolve().parent for p in inputs}
    if out.expanduser().resolve() in in_dirs:
        raise ImageIOError(f"Output folder {out} is the input folder",
                           "write to a separate folder (channel files would be mistaken for new inputs)")
    names = [case_name(p) for p in inputs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SAMSegmentError(f"Several inputs share the case name(s) {', '.join(dupes)}",
                              "rename them so each case id is unique")
    summary = BatchSummary([], [], {}, 0.0)
    t0 = time.perf_counter()
    for n_done, (path, case) in enumerate(zip(inputs, names)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        if not redo and is_finished(out, case):
            summary.skipped.append(case)
            log.info("%s: finished before, skipped", case)
        else:
            t_case = time.perf_counter()
            try:
                volume, geometry = sio.read_volume(path)
                session.set_volume(volume, window=window, modality=modality)
                seg, bnd = samaug_volume(session, axis, params, progress=slice_progress, cancel=cancel)
                write_samaug(out, case, volume, seg, bnd, geometry, source_paths=[path],
                             info={"input": str(path), "axis": axis, "model": session.model_id,
                                   "seconds": round(time.perf_counter() - t_case, 2)})
                summary.done.append(case)
            except SAMSegmentError as exc:
                summary.failed[case] = exc.problem
                log.warning("%s: %s", case, exc)
        if progress is not None:
            progress(n_done + 1, len(inputs), case)
    summary.seconds = round(time.perf_counter() - t0, 2)
    return summary

"""Reading volumes and writing masks with their geometry, through SimpleITK.

Arrays are (K, J, I) as ``sitk.GetArrayFromImage`` returns them; physical points are LPS
millimetres, the convention of ITK, SimpleITK and DICOM (3D Slicer shows RAS = (-L, -P, S)).
Outputs are written to a temporary file beside the target and renamed, and never onto an
input, so a crash or a typo cannot destroy the user's data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import ImageIOError, VolumeError
from .files import IMAGE_EXTENSIONS, atomic_path, image_suffix
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


# ------------------------------------------------------------------------------------------ reading
def _dicom_series(folder: Path, series_uid: str | None):
    import SimpleITK as sitk

    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    if not uids:
        raise ImageIOError(f"No DICOM series found in folder {folder}",
                           "point to a folder of DICOM files of one scan, or to an image file (.nii.gz, .nrrd, .mha)")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}
    if series_uid is not None:
        if series_uid not in files:
            raise ImageIOError(f"Series {series_uid} is not in {folder} (found: {', '.join(files)})",
                               "pass one of the listed series UIDs")
        chosen = series_uid
    else:
        chosen = max(files, key=lambda uid: len(files[uid]))
        if len(files) > 1:
            others = ", ".join(f"{uid} ({len(files[uid])} files)" for uid in files if uid != chosen)
            log.warning("%s holds %d DICOM series; using %s (%d files). Choose another with --series-uid "
                        "(series_uid=...): %s", folder, len(files), chosen, len(files[chosen]), others)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    return reader.Execute()


def read_image(path: str | Path, series_uid: str | None = None):
    """A SimpleITK image from a file or a DICOM folder, with errors that say what is wrong.

    ``series_uid`` chooses one series of a DICOM folder (default: the one with the most files).
    """
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.exists():
        raise ImageIOError(f"Image {path} does not exist", "check the path (and the current directory)")
    if series_uid is not None and not path.is_dir():
        raise ImageIOError(f"A series UID ({series_uid}) chooses a series of a DICOM folder, but {path} is a file",
                           "give the DICOM folder, or drop --series-uid (series_uid)")
    try:
        if path.is_dir():
            return _dicom_series(path, series_uid)
        return sitk.ReadImage(str(path))
    except ImageIOError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise ImageIOError(f"Cannot read {path}: unsupported, truncated or corrupt file ({first[:200]})",
                           "give a NIfTI, NRRD, MHA/MHD file or a DICOM folder; re-export the image if it is damaged") from exc


def read_volume(path: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, ImageGeometry]:
    """(array (K, J, I), geometry) of a 3D scalar image; 2D, 4D, vector and empty images are refused."""
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
def _check_target(path: Path, overwrite: bool, source_paths: Iterable[str | Path]) -> None:
    target = path.expanduser().resolve()
    for src in source_paths:
        if src is None:
            continue
        src_path = Path(src).expanduser().resolve()
        if target == src_path or (src_path.is_dir() and src_path in target.parents):
            raise ImageIOError(f"Refusing to write onto the input {src}",
                               "choose a different output file name; inputs are never overwritten")
    if image_suffix(path) not in IMAGE_EXTENSIONS:
        raise ImageIOError(f"Unsupported output type {path.name!r}", f"use one of {', '.join(IMAGE_EXTENSIONS)}")
    if path.exists() and not overwrite:
        raise ImageIOError(f"{path} already exists", "pass --overwrite (overwrite=True) or choose another name")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)


def _write_atomic(image, path: Path) -> None:
    import SimpleITK as sitk

    try:
        with atomic_path(path, suffix=image_suffix(path), shareable=True) as tmp:
            sitk.WriteImage(image, str(tmp), True)
    except RuntimeError as exc:
        raise ImageIOError(f"Cannot write {path}: {str(exc).strip().splitlines()[-1][:200]}",
                           "check the folder is writable and the disk is not full") from exc


def write_array(path: str | Path, array: np.ndarray, geometry: ImageGeometry, overwrite: bool = False,
                source_paths: Iterable[str | Path] = ()) -> Path:
    """Write any (K, J, I) array with ``geometry``; same safety rules as ``write_mask``."""
    import SimpleITK as sitk

    path = Path(path)
    if tuple(array.shape) != geometry.shape_kji:
        raise ImageIOError(f"Array shape {array.shape} does not match the image grid {geometry.shape_kji}",
                           "write a mask computed on this image")
    _check_target(path, overwrite, source_paths)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    _write_atomic(image, path)
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
def overlay_tile(image_u8: np.ndarray, masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
                 pixel_spacing: tuple[float, float] = (1.0, 1.0), label: str = "", alpha: float = 0.35,
                 min_side: int = 192) -> np.ndarray:
    """An RGB picture of a slice with filled, outlined masks, resampled to square pixels."""
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
    row_sp, col_sp = pixel_spacing
    finest = min(row_sp, col_sp)
    out_h, out_w = h * row_sp / finest, w * col_sp / finest  # square pixels
    zoom = max(1.0, min_side / min(out_h, out_w))
    out_h, out_w = int(round(out_h * zoom)), int(round(out_w * zoom))
    tile = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((out_w, out_h), Image.NEAREST)
    if label:
        draw = ImageDraw.Draw(tile)
        draw.text((4, 2), label, fill=(255, 255, 0))
    return np.asarray(tile)


def save_montage_png(path: str | Path, tiles: Sequence[np.ndarray], ncols: int = 4) -> Path:
    """Tiles of (possibly different) sizes on a black grid, row-major."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def write_png_montage(path: str | Path, slice_image: Callable[[SliceRef], np.ndarray], mask_kji: np.ndarray,
                      axis: int, indices: Sequence[int], geometry: ImageGeometry, overwrite: bool = False,
                      max_tiles: int = 16) -> Path:
    """A PNG of up to ``max_tiles`` of the slices ``indices`` along ``axis``, mask outlined in red.

    Args:
        path: PNG file to write; refused if it exists unless ``overwrite``.
        slice_image: the uint8 (windowed) picture of a slice, e.g. ``SegmentationSession.slice_image``.
        mask_kji: (K, J, I) mask; non-zero voxels are drawn.
        axis, indices: the slices to draw (evenly thinned out to ``max_tiles``).
        geometry: the image's geometry, for radiological orientation and square pixels.

    Returns:
        The path written.
    """
    if Path(path).exists() and not overwrite:
        raise ImageIOError(f"{path} exists", "pass --overwrite or choose another name")
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

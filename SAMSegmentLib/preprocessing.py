"""Intensity windowing for a whole volume, and the geometry of feeding a slice to a model.

One window for the whole volume keeps neighbouring slices comparable: per-slice min-max
rescaling (used by some peers) makes the same tissue look different on adjacent slices and
hurts propagation. The windowed volume is uint8, which is what the models were trained on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .errors import PromptError, VolumeError

log = logging.getLogger(__name__)

# Window level / width presets (Hounsfield units).
CT_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_CT_PRESET = "abdomen"
MR_PERCENTILES = (0.5, 99.5)
# Sampling cap for percentile estimates: exact enough (<0.1 % rank error) and fast on 400-slice volumes.
_PERCENTILE_SAMPLE = 2_000_000
# Outliers: voxels further outside the bulk of the intensities (all but the lowest and highest 0.01 %,
# at least one voxel each) than this many times the bulk's span. A sentinel or corrupt value (1e300,
# INT32_MAX) must not decide whether an image is CT, nor where a percentile window starts.
_BULK_TAIL = 1e-4
_OUTLIER_SPANS = 10.0
# Windows whose arithmetic float32 cannot hold (values beyond its range, or a width near 0 or inf) run in float64.
_FLOAT32_SAFE = 1e37


@dataclass(frozen=True)
class IntensityWindow:
    """Linear map of ``[low, high]`` to ``[0, 255]`` with clipping."""

    low: float
    high: float
    source: str = "explicit"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise VolumeError(f"Intensity window [{self.low}, {self.high}] is not finite", "give finite bounds")
        if self.high <= self.low:
            raise VolumeError(f"Intensity window [{self.low}, {self.high}] is empty (high <= low)",
                              "give a window whose upper bound is above its lower bound (width > 0)")
        if not math.isfinite(self.high - self.low) or not 0.0 < 255.0 / (self.high - self.low) < math.inf:
            raise VolumeError(f"Intensity window [{self.low:g}, {self.high:g}] is too wide or too narrow to compute",
                              "rescale the image's intensities, or give a window of a sensible width")

    @classmethod
    def from_level_width(cls, level: float, width: float, source: str = "explicit") -> "IntensityWindow":
        return cls(level - width / 2.0, level + width / 2.0, source)

    @property
    def level(self) -> float:
        return (self.low + self.high) / 2.0

    @property
    def width(self) -> float:
        return self.high - self.low

    def key(self) -> str:
        return f"{self.low:.6g}:{self.high:.6g}"

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Window ``array`` to uint8 (rounded), slice by slice to bound temporary memory.

        float32 arithmetic (fast) where it is exact enough; 8-byte inputs are first clipped to the
        window in float64, so values beyond float32's range cannot overflow, and a window whose
        bounds or scale float32 cannot hold is computed in float64 throughout.
        """
        out = np.empty(array.shape, dtype=np.uint8)
        scale = 255.0 / (self.high - self.low)
        wide = not (max(abs(self.low), abs(self.high)) < _FLOAT32_SAFE and 1.0 / _FLOAT32_SAFE < scale < _FLOAT32_SAFE)
        flat_in = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
        flat_out = out.reshape(flat_in.shape)
        with np.errstate(over="ignore"):  # float64 beyond its range saturates to +-inf, which the clip maps to 0/255
            for row in range(flat_in.shape[0]):
                values = flat_in[row]
                if wide:
                    values = (values.astype(np.float64) - self.low) * scale
                else:
                    if values.dtype.itemsize > 4:
                        values = np.clip(values.astype(np.float64), self.low, self.high)
                    values = (values.astype(np.float32) - np.float32(self.low)) * np.float32(scale)
                np.clip(values, 0.0, 255.0, out=values)
                flat_out[row] = np.rint(values).astype(np.uint8)
        return out


@dataclass(frozen=True)
class IntensityRange:
    """The range of a volume's intensities without far outliers (see ``intensity_range``)."""

    low: float  # the lowest value that is not an outlier
    high: float  # the highest value that is not an outlier
    outliers: int  # voxels left out (of the whole volume)
    lowest: float  # the volume's minimum and maximum, outliers included
    highest: float


def intensity_range(volume: np.ndarray) -> IntensityRange:
    """The volume's intensity range, leaving out far outliers (a single 1e300 or INT32_MAX voxel).

    The bulk is every value but the lowest and highest 0.01 % (at least one voxel each); a value
    more than 10 bulk spans beyond it is an outlier.

    Args:
        volume: the voxels (finite).

    Returns:
        The range without outliers, how many voxels were left out, and the full range.
    """
    lowest, highest = float(np.min(volume)), float(np.max(volume))
    flat = _sample(volume).astype(np.float64)
    tail = min(flat.size // 2, max(1, int(flat.size * _BULK_TAIL)))
    if flat.size < 3 or lowest == highest:
        return IntensityRange(lowest, highest, 0, lowest, highest)
    bulk = np.partition(flat, (tail, flat.size - 1 - tail))
    bulk_lo, bulk_hi = float(bulk[tail]), float(bulk[flat.size - 1 - tail])
    with np.errstate(over="ignore"):
        span = max(bulk_hi - bulk_lo, abs(bulk_hi) * 1e-6, abs(bulk_lo) * 1e-6, 1.0)
        lo_limit, hi_limit = bulk_lo - _OUTLIER_SPANS * span, bulk_hi + _OUTLIER_SPANS * span
    if lowest >= lo_limit and highest <= hi_limit:
        return IntensityRange(lowest, highest, 0, lowest, highest)
    arr = np.asarray(volume)
    inside = (arr >= lo_limit) & (arr <= hi_limit)
    kept = arr[inside]
    return IntensityRange(float(kept.min()), float(kept.max()), int(arr.size - np.count_nonzero(inside)),
                          lowest, highest)


def looks_like_ct(volume: np.ndarray, value_range: IntensityRange | None = None) -> bool:
    """Heuristic: CT in HU has air near -1000 and rarely exceeds +4000 except metal.

    Args:
        volume: the voxels.
        value_range: ``intensity_range(volume)`` if already computed.

    Returns:
        True when the value range, far outliers left out, looks like Hounsfield units.
    """
    r = intensity_range(volume) if value_range is None else value_range
    return r.low <= -500.0 and r.high <= 35000.0


def _sample(volume: np.ndarray) -> np.ndarray:
    flat = volume.reshape(-1)
    if flat.size > _PERCENTILE_SAMPLE:
        step = int(math.ceil(flat.size / _PERCENTILE_SAMPLE))
        flat = flat[::step]
    return flat


def robust_window(volume: np.ndarray, percentiles: tuple[float, float] = MR_PERCENTILES,
                  value_range: IntensityRange | None = None) -> IntensityWindow:
    """Percentile window over non-background voxels (background = the volume's minimum, far
    outliers left out, see ``intensity_range``).

    Args:
        volume: the voxels.
        percentiles: (low, high) percentiles of the foreground that become the window's bounds.
        value_range: ``intensity_range(volume)`` if already computed.

    Returns:
        The window (the range without outliers when the percentiles coincide).

    Raises:
        VolumeError: the volume has one value everywhere, or a range no window can compute.
    """
    r = intensity_range(volume) if value_range is None else value_range
    flat = _sample(volume).astype(np.float64)
    if r.outliers:
        flat = flat[(flat >= r.low) & (flat <= r.high)]
    foreground = flat[flat > r.low]
    values = foreground if foreground.size >= 100 else flat
    with np.errstate(over="ignore", invalid="ignore"):
        low, high = (float(v) for v in np.percentile(values, percentiles))
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        low, high = r.low, r.high
    if high <= low:
        raise VolumeError("The volume has a single intensity value everywhere; there is nothing to segment",
                          "check that the right image was loaded")
    return IntensityWindow(low, high, source=f"percentiles {percentiles[0]}-{percentiles[1]}")


def auto_window(volume: np.ndarray, modality: str = "auto", preset: str | None = None) -> IntensityWindow:
    """The default window: a CT preset for CT, robust percentiles otherwise.

    Args:
        volume: the voxels.
        modality: "ct", "mr" or "auto" (``looks_like_ct`` decides).
        preset: a ``CT_PRESETS`` name that overrides the choice, or None.

    Returns:
        The window.

    Raises:
        VolumeError: an unknown ``preset``, or (percentiles) a volume of one value.
    """
    if preset is not None:
        if preset not in CT_PRESETS:
            raise VolumeError(f"Unknown window preset {preset!r}", f"choose one of {', '.join(CT_PRESETS)}")
        level, width = CT_PRESETS[preset]
        return IntensityWindow.from_level_width(level, width, source=f"CT preset {preset}")
    modality = modality.lower()
    if modality not in ("auto", "ct", "mr", "other"):
        raise VolumeError(f"Unknown modality {modality!r}", "use auto, ct, mr or other")
    if modality == "ct":
        level, width = CT_PRESETS[DEFAULT_CT_PRESET]
        return IntensityWindow.from_level_width(level, width, source=f"CT preset {DEFAULT_CT_PRESET}")
    r = intensity_range(volume)
    if modality == "auto" and looks_like_ct(volume, r):
        level, width = CT_PRESETS[DEFAULT_CT_PRESET]
        win = IntensityWindow.from_level_width(level, width, source=f"CT preset {DEFAULT_CT_PRESET}")
    else:
        win = robust_window(volume, value_range=r)
    if r.outliers:
        log.warning("%d voxel(s) lie far outside the image's other intensities (%s); they were left out when "
                    "choosing the window (%s, [%g, %g])", r.outliers,
                    ", ".join(f"{v:g}" for v in sorted({r.lowest, r.highest} - {r.low, r.high})), win.source,
                    win.low, win.high)
    return win


def check_window_shows(volume: np.ndarray, window: IntensityWindow) -> None:
    """Refuse a window through which every voxel has the same grey value, before any model work
    (windowing is monotone, so the volume's minimum and maximum decide).

    Args:
        volume: the voxels.
        window: the window to apply.

    Raises:
        VolumeError: nothing would be visible to segment.
    """
    arr = np.asarray(volume)
    ends = window.apply(np.array([np.min(arr), np.max(arr)], dtype=arr.dtype))
    if int(ends[0]) == int(ends[1]):
        raise VolumeError(f"After windowing to [{window.low:g}, {window.high:g}] ({window.source}) every voxel has the "
                          "same value; nothing is visible to segment",
                          "choose a window that covers the image's intensities (e.g. --window auto or --modality mr)")


@dataclass(frozen=True)
class SliceGeometry:
    """How a (H, W) slice maps into a model's square input, and back.

    ``longest_side``: scale both axes by ``image_size / max(H, W)`` then pad bottom/right.
    ``stretch``: scale each axis independently to ``image_size`` (MedSAM's recipe).
    Coordinates follow SAM: a point (x, y) in slice pixels scales to (x * sx, y * sy).
    """

    height: int
    width: int
    image_size: int
    resize: str

    @property
    def scaled_size(self) -> tuple[int, int]:
        """(new_h, new_w) inside the model input before padding."""
        if self.resize == "stretch":
            return self.image_size, self.image_size
        scale = self.image_size / max(self.height, self.width)
        return int(self.height * scale + 0.5), int(self.width * scale + 0.5)

    @property
    def scale_xy(self) -> tuple[float, float]:
        if self.resize == "stretch":
            return self.image_size / self.width, self.image_size / self.height
        scale = self.image_size / max(self.height, self.width)
        return scale, scale

    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        sx, sy = self.scale_xy
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return pts * np.array([sx, sy])

    def box_to_model(self, box: np.ndarray, rounding: str = "none") -> np.ndarray:
        sx, sy = self.scale_xy
        scaled = np.asarray(box, dtype=np.float64).reshape(4) * np.array([sx, sy, sx, sy])
        if rounding == "floor":
            # The upstream LiteMedSAM recipe truncates with int(); boxes are non-negative here.
            scaled = np.floor(scaled)
        return scaled

    def points_from_model(self, points: np.ndarray) -> np.ndarray:
        sx, sy = self.scale_xy
        return np.asarray(points, dtype=np.float64).reshape(-1, 2) / np.array([sx, sy])

    def low_res_to_slice(self, logits, low_res_size: int):
        """Map decoder logits (B, C, low, low) to slice logits (B, C, H, W) as SAM does.

        Upscale to the model input, crop the padding, resize to the slice. When the low-res grid
        already equals the input size (LiteMedSAM) the first step is the identity.
        """
        import torch.nn.functional as F

        x = logits
        if low_res_size != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        new_h, new_w = self.scaled_size
        x = x[..., :new_h, :new_w]
        return F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)

    def mask_to_low_res(self, mask: np.ndarray, low_res_size: int, logit_value: float = 8.0):
        """A binary slice mask as decoder mask-input logits (1, 1, low, low): the exact forward map."""
        import torch
        import torch.nn.functional as F

        m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
        new_h, new_w = self.scaled_size
        m = F.interpolate(m, size=(new_h, new_w), mode="bilinear", align_corners=False)
        m = F.pad(m, (0, self.image_size - new_w, 0, self.image_size - new_h))
        if low_res_size != self.image_size:
            m = F.interpolate(m, size=(low_res_size, low_res_size), mode="bilinear", align_corners=False)
        return (m * 2.0 - 1.0) * logit_value


def validate_prompt_geometry(height: int, width: int, points: np.ndarray | None, box: np.ndarray | None) -> None:
    """Reject prompts outside the slice or degenerate boxes before they reach the model.

    Args:
        height: slice rows.
        width: slice columns.
        points: (N, 2) points (x, y) in slice pixels, or None.
        box: (x0, y0, x1, y1) in slice pixels, or None.

    Raises:
        PromptError: a point outside the slice, or a box that is inverted, of (near) zero area or
            entirely outside the slice.
    """
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(pts).all():
            raise PromptError("A point prompt has a NaN or infinite coordinate", "place points inside the slice")
        outside = (pts[:, 0] < -0.5) | (pts[:, 0] > width - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > height - 0.5)
        if outside.any():
            x, y = pts[np.argmax(outside)]
            raise PromptError(f"Point ({x:.1f}, {y:.1f}) is outside the {width}x{height} slice "
                              f"(x in [0, {width - 1}], y in [0, {height - 1}])",
                              "place points on the image; check the slice axis and the (x=column, y=row) order")
    if box is not None:
        b = np.asarray(box, dtype=np.float64).reshape(-1)
        if b.size != 4 or not np.isfinite(b).all():
            raise PromptError(f"A box needs 4 finite numbers (x0, y0, x1, y1), got {box!r}", "draw the box again")
        x0, y0, x1, y1 = b
        if x1 < x0 or y1 < y0:
            raise PromptError(f"Box ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) has its corners swapped",
                              "give (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
        if x1 - x0 < 1.0 or y1 - y0 < 1.0:
            raise PromptError(f"Box ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) has (near) zero area",
                              "drag a box at least one pixel wide and tall, or click a point instead")
        if x1 < -0.5 or y1 < -0.5 or x0 > width - 0.5 or y0 > height - 0.5:
            raise PromptError(f"Box ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) lies entirely outside the "
                              f"{width}x{height} slice", "draw the box on the image")


def widen_box(box: np.ndarray, geometry: SliceGeometry, fraction: float, min_model_px: float = 0.0) -> np.ndarray:
    """``box`` enlarged on each side by ``fraction`` of its side, and by at least ``min_model_px``
    pixels of the model input, clipped to the slice.

    Why: box-trained models (MedSAM, LiteMedSAM) learnt from boxes perturbed around the object,
    so a box drawn tight to the boundary is at the edge of what they saw and they under-segment,
    badly on some MR slices (``bench/accuracy.py`` measures tight against widened boxes). A
    fraction keeps the margin in proportion to the object at any resolution; the floor keeps it
    above the model's pixel size for small objects.

    Args:
        box: (x0, y0, x1, y1) in slice pixels.
        geometry: the slice's mapping to the model input (its size and scale).
        fraction: margin per side as a fraction of the box's side.
        min_model_px: the least margin per side, in model-input pixels.

    Returns:
        The widened box, float64, clipped to the slice.
    """
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
    sx, sy = geometry.scale_xy
    mx = max(fraction * (x1 - x0 + 1.0), min_model_px / sx)
    my = max(fraction * (y1 - y0 + 1.0), min_model_px / sy)
    return clip_box(np.array([x0 - mx, y0 - my, x1 + mx, y1 + my]), geometry.height, geometry.width)


def clip_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip a box that overlaps the slice to its bounds (a box dragged past the edge is still meant).

    Only the sides past the edge move: (x0, y0) up to 0, (x1, y1) down to the last pixel.

    Args:
        box: (x0, y0, x1, y1) in slice pixels, or an (N, 4) array of such boxes.
        height: slice rows.
        width: slice columns.

    Returns:
        float64 (4,) for one box, (N, 4) for an (N, 4) array.
    """
    b = np.asarray(box, dtype=np.float64)
    if b.ndim == 2:
        return np.stack([np.maximum(b[:, 0], 0.0), np.maximum(b[:, 1], 0.0), np.minimum(b[:, 2], width - 1.0),
                         np.minimum(b[:, 3], height - 1.0)], axis=1)
    x0, y0, x1, y1 = b.reshape(4)
    return np.array([max(x0, 0.0), max(y0, 0.0), min(x1, width - 1.0), min(y1, height - 1.0)])


def mask_bbox(mask: np.ndarray) -> np.ndarray | None:
    """The bounding box of a 2D mask.

    Args:
        mask: (H, W); nonzero is inside.

    Returns:
        int64 (x0, y0, x1, y1): the first and last column and row that hold mask pixels
        (inclusive, so the box is ``x1 - x0 + 1`` pixels wide); None for an empty mask.
    """
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)

"""``samsegment``: segment medical volumes with Segment-Anything models from the command line.

Coordinates: with ``--coords voxel`` (default) a slice is chosen with ``--axis`` and ``--slice``
and points/boxes are the two in-plane voxel indices in ITK order (for an axial K slice: I then
J, i.e. column then row as in any image viewer showing the array). With ``--coords lps``,
points are physical millimetres in LPS, the convention of ITK/SimpleITK and DICOM (Slicer shows
RAS: negate the first two numbers); the slice is the one the points lie on.

Layout: options shared by several commands are defined once, in the parent parsers of
``_parents``; each command names its parents and its function in ``build_parser`` (dispatch
through ``set_defaults(func=...)``); every long engine call runs inside ``_interruptible``.

Checks come first: every number of every option is finite and in its range (``_check_numbers``),
then the image is read, then prompts, window, anchors and outputs are checked against it, and only
then is the model loaded, so a typo costs no model load and no output is half written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import CancelledError, CheckpointError, ImageIOError, PromptError, SAMSegmentError

log = logging.getLogger("samsegment")

AXES = {"0": 0, "1": 1, "2": 2, "k": 0, "j": 1, "i": 2}

EPILOG = """examples:
  samsegment demo --out demo_out
  samsegment segment ct.nii.gz --slice 22 --box 20 30 60 70 --out spleen_slice.nii.gz
  samsegment propagate ct.nii.gz --slice 22 --box 20 30 60 70 --out spleen.nii.gz --png spleen.png
  samsegment propagate ct.nii.gz --coords lps --box -120 -30 210 -60 10 210 --out spleen.nii.gz
  samsegment propagate dicom_folder --series-uid 1.2.840.1234 --slice 22 --box 20 30 60 70 --out spleen.nii.gz
  samsegment propagate ct.nii.gz --anchor-mask accepted.nii.gz --adapt --save-adapter spleen.samadapter --out spleen.nii.gz
  samsegment propagate ct2.nii.gz --anchor-mask accepted2.nii.gz --adapter spleen.samadapter --out spleen2.nii.gz
  samsegment embed ct.nii.gz --cache-dir ct_cache
  samsegment models --registry my_models.json
"""


# ------------------------------------------------------------------------------------------ options
def _input_options(g: Any) -> None:
    g.add_argument("image", help="image file or DICOM folder")
    g.add_argument("--series-uid", default=None, metavar="UID",
                   help="for a DICOM folder of several series: the one to read (default: the one with the most "
                        "files; the others are named in a warning)")


def _axis_option(g: Any) -> None:
    g.add_argument("--axis", default="k", help="slice axis: k (axial for most scans), j or i; or 0, 1, 2")


def _range_option(g: Any) -> None:
    g.add_argument("--range", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                   help="only slices FIRST..LAST (inclusive)")


def _out_file_options(g: Any) -> None:
    g.add_argument("--out", required=True, help="file to write (.nii.gz, .nrrd, .mha); keeps the image geometry")
    g.add_argument("--png", default=None, help="also write a PNG overlay (a montage when several slices)")


def _out_dir_option(g: Any) -> None:
    g.add_argument("--out", required=True, help="output folder (not the input folder)")


def _overwrite_option(g: Any) -> None:
    g.add_argument("--overwrite", action="store_true",
                   help="replace outputs that exist (inputs are never overwritten); for embed: rebuild a "
                        "--cache-dir that belongs to another image")


def _mask_options(g: Any) -> None:
    g.add_argument("--fill-holes", action="store_true", help="fill holes in each slice's mask")
    g.add_argument("--largest-component", action="store_true", help="keep only the largest connected region")


def _prompt_options(g: Any) -> None:
    g.add_argument("--coords", choices=["voxel", "lps"], default="voxel",
                   help="voxel: in-plane voxel indices in ITK order on --slice; lps: physical mm (x y z) in LPS")
    g.add_argument("--slice", type=int, default=None, help="slice index along --axis (voxel coords)")
    g.add_argument("--box", type=float, nargs="+", metavar="N",
                   help="box: voxel x0 y0 x1 y1, or lps two corners x y z x y z")
    g.add_argument("--point", type=float, nargs="+", action="append", default=[], metavar="N",
                   help="include point (x y, or x y z with --coords lps); repeat for more")
    g.add_argument("--exclude", type=float, nargs="+", action="append", default=[], metavar="N",
                   help="exclude point; repeat for more")
    g.add_argument("--box-margin", type=float, default=None, metavar="F",
                   help="enlarge the box by this fraction of its side before segmenting (default: the model's, "
                        "0.1 for LiteMedSAM, which under-segments from boxes drawn tight to the edge); 0 = as given")


def _propagation_options(g: Any) -> None:
    g.add_argument("--direction", choices=["both", "up", "down"], default="both",
                   help="up = increasing slice index, down = decreasing")
    g.add_argument("--max-slices", type=int, default=None, help="at most this many slices each way")
    g.add_argument("--min-iou", type=float, default=None, help="stop when the overlap with the previous slice drops below")
    g.add_argument("--min-area", type=int, default=None, help="stop when the mask has fewer pixels than this")
    g.add_argument("--min-score", type=float, default=None, help="stop when the model's quality score drops below")
    g.add_argument("--no-partial", action="store_true",
                   help="on Ctrl-C write nothing (default: write the slices propagated so far, and say so)")


def _everything_options(g: Any) -> None:
    g.add_argument("--grid", type=int, default=16, help="prompts per side of the grid on each slice (default 16)")
    g.add_argument("--grid-prompt", choices=["auto", "points", "boxes"], default="auto",
                   help="auto: boxes for box-only models (LiteMedSAM, MedSAM), points for SAM")
    g.add_argument("--box-scales", type=float, nargs="+", default=[0.12, 0.25], metavar="F",
                   help="box grids: box sides as fractions of the slice's longest side (default 0.12 0.25)")
    g.add_argument("--min-quality", type=float, default=None,
                   help="keep masks whose predicted IoU is at least this (default 0.88 SAM, 0.70 box-only models)")
    g.add_argument("--min-stability", type=float, default=None,
                   help="keep masks whose stability score is at least this (default 0.95 SAM, 0.80 box-only)")
    g.add_argument("--nms-iou", type=float, default=0.7, help="drop a mask overlapping a better one above this IoU")
    g.add_argument("--batch-size", type=int, default=0,
                   help="prompts per decoder call for the batched path (0 = auto: 64 on a GPU, 1 on CPU)")
    g.add_argument("--decoder", choices=["auto", "batched", "loop"], default="auto",
                   help="batched: many prompts per eager decoder call (GPU); loop: the backend's one-prompt "
                        "decoder (ONNX Runtime on CPU); auto picks by machine")


def _uncertainty_options(g: Any) -> None:
    g.add_argument("--prob-out", default=None, help="also write the mean probability map here")
    g.add_argument("--samples", type=int, default=16, help="number of jittered prompts (default 16)")
    g.add_argument("--jitter", type=float, default=0.1, help="jitter sd as a fraction of the box size (default 0.1)")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result)")
    g.add_argument("--measure", choices=["entropy", "variance"], default="entropy",
                   help="entropy of the mean probability (bits, 0..1) or variance of the masks (0..0.25)")


def _registry_option(g: Any) -> None:
    g.add_argument("--registry", default=None, metavar="FILE",
                   help='JSON file of extra models, {"format": 1, "models": [...]} with entries like the packaged '
                        'models.json; an entry may replace a packaged model of the same id only with "replaces": true')


def _model_options(g: Any) -> None:
    from .model_registry import default_model_id
    from .runtimes import RUNTIMES

    g.add_argument("--model", default=None,
                   help=f"model id (see 'samsegment models'); default: {default_model_id()}, bundled")
    _registry_option(g)
    g.add_argument("--checkpoint", default=None, help="weights file for models that are not bundled (SAM, MedSAM)")
    g.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    g.add_argument("--cache-mib", type=float, default=1024, help="memory budget for slice embeddings (MiB, default 1024)")
    g.add_argument("--cache-dir", default=None, help="folder of precomputed embeddings (see 'samsegment embed')")
    g.add_argument("--runtime", default=None, choices=RUNTIMES,
                   help="what runs the model: auto (default, or $SAMSEGMENT_RUNTIME; ONNX Runtime on CPU when "
                        "installed, else PyTorch), eager (PyTorch) or onnx")


def _server_options(g: Any) -> None:
    g.add_argument("--server", default=None, metavar="URL",
                   help="run the model on a SAMSegment server (samsegment serve) instead of in this process")
    g.add_argument("--token-file", default=None,
                   help="file whose first line is the server's token (default: $SAMSEGMENT_TOKEN)")


def _serve_options(g: Any) -> None:
    from .server.serve import DEFAULT_PORT

    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another address needs a token)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = a free one)")
    g.add_argument("--token-file", default=None,
                   help="file whose first line is the API token (default: $SAMSEGMENT_TOKEN, else a new one, printed)")
    g.add_argument("--no-auth", action="store_true", help="no token (refused unless --host is a loopback address)")
    g.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM), with --ssl-keyfile")
    g.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    g.add_argument("--port-file", default=None, help="write the port here once listening (for launchers)")
    g.add_argument("--max-volume-voxels", type=int, default=600_000_000, help="largest volume accepted")
    g.add_argument("--max-request-mib", type=float, default=1024, help="largest request body accepted (MiB)")
    g.add_argument("--encode-workers", type=int, default=1,
                   help="encoders per client session running ahead of a propagation's decode chain (default 1; "
                        "more on a machine with cores or GPUs to spare)")
    g.add_argument("--adapter-key", default=None, metavar="FILE",
                   help="the key that signs and verifies adapter files (adaptation to accepted slices); give every "
                        "server and workstation of a site the same file to share adapters (default: "
                        "$SAMSEGMENT_ADAPTER_KEY, else a key made for this user)")
    g.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: --replicas copies of the server behind one address, a volume's requests "
                        "routed to the replica holding it (pip install samsegment[cluster])")
    g.add_argument("--replicas", type=int, default=2, help="with --ray: number of replicas (default 2)")
    g.add_argument("--ray-address", default=None,
                   help="with --ray: an existing Ray cluster (auto, ray://HOST:10001; default: $RAY_ADDRESS, else a "
                        "local Ray started for this command)")
    g.add_argument("--replica-cpus", type=float, default=None,
                   help="with --ray: CPUs per replica (default: 1 with a GPU, else the cluster's CPUs split evenly)")
    g.add_argument("--replica-gpus", type=float, default=None,
                   help="with --ray: GPUs per replica (default: 1 each when the cluster has enough, else a share)")


def _intensity_options(g: Any) -> None:
    from .preprocessing import CT_PRESETS

    g.add_argument("--window", default="auto",
                   help=f"auto, a CT preset ({', '.join(CT_PRESETS)}) or LOW,HIGH")
    g.add_argument("--modality", default="auto", choices=["auto", "ct", "mr", "other"],
                   help="how 'auto' picks the window: CT preset for CT, 0.5-99.5 percentiles otherwise")


def _parent(*groups: tuple[str | None, Callable[[Any], None]]) -> argparse.ArgumentParser:
    """A parent parser holding the options that ``add`` defines, in the argument group ``title``
    (None: the command's plain options); parents with the same group title share one group."""
    parser = argparse.ArgumentParser(add_help=False)
    for title, add in groups:
        add(parser.add_argument_group(title) if title else parser)
    return parser


def _parents() -> dict[str, argparse.ArgumentParser]:
    return {
        "input": _parent(("input", _input_options)),
        "axis": _parent((None, _axis_option)),
        "range": _parent((None, _range_option)),
        "prompts": _parent(("prompts", _prompt_options)),
        "out_file": _parent(("output", _out_file_options)),
        "out_dir": _parent(("output", _out_dir_option)),
        "overwrite": _parent(("output", _overwrite_option)),
        "mask": _parent(("output", _mask_options)),
        "propagation": _parent(("propagation", _propagation_options)),
        "everything": _parent(("everything mode", _everything_options)),
        "uncertainty": _parent(("uncertainty", _uncertainty_options)),
        "registry": _parent(("model", _registry_option)),
        "server": _parent(("server", _server_options)),
        "serve": _parent(("server", _serve_options)),
        "model": _parent(("model", _model_options), ("intensity", _intensity_options)),
    }


# ------------------------------------------------------------------------------------------ helpers
def _axis(text: str) -> int:
    key = str(text).lower()
    if key not in AXES:
        raise PromptError(f"Unknown axis {text!r}", "use k, j or i (or 0, 1, 2)")
    return AXES[key]


def _window(text: str) -> Any:
    """``--window`` as ``set_volume`` takes it: None (auto), (low, high) or a preset name; refused
    here, before anything is read, when it is none of these."""
    from .preprocessing import CT_PRESETS, IntensityWindow

    if text in (None, "", "auto"):
        return None
    if "," in text:
        try:
            low, high = (float(v) for v in text.split(","))
        except ValueError as exc:
            raise SAMSegmentError(f"Cannot read window {text!r}", "write it as LOW,HIGH, e.g. -160,240") from exc
        IntensityWindow(low, high)  # finite, not empty
        return (low, high)
    if text not in CT_PRESETS:
        raise SAMSegmentError(f"Unknown window preset {text!r}", f"choose one of {', '.join(CT_PRESETS)}, or LOW,HIGH")
    return text


def _intensity_window(args: argparse.Namespace, volume: np.ndarray):
    """The ``IntensityWindow`` of the command for ``volume``, refused before the model loads when
    nothing would be visible through it."""
    from .preprocessing import IntensityWindow, auto_window, check_window_shows

    window = _window(args.window)
    if window is None:
        win = auto_window(volume, args.modality)
    elif isinstance(window, tuple):
        win = IntensityWindow(*window)
    else:
        win = auto_window(volume, args.modality, preset=window)
    check_window_shows(volume, win)
    return win


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    """The longest option string of ``dest`` (e.g. "--cache-mib"), for messages."""
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return max(action.option_strings, key=len)
    return dest


def _flatten(value: Any) -> list[Any]:
    """The numbers of an option's value (a number, or lists of them: nargs and append options)."""
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flatten(item)]
    return [value]


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything is read or loaded, every non-finite number of every numeric option
    of the command (argparse's ``float`` takes "nan", "inf" and "1e999"), and the values that
    mean nothing whatever the image: the ranges of the engine's own checks are applied where the
    command builds its settings (``StopRules``, ``EverythingParams``, ``check_sampling``)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    for action in sub._actions:
        if action.type is not float:
            continue
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        flat = _flatten(value)
        if not all(np.isfinite(v) for v in flat):
            shown = " ".join(f"{v:g}" for v in flat)
            raise SAMSegmentError(f"{max(action.option_strings, key=len)} {shown}: not a finite number",
                                  "give finite numbers (NaN and infinity are not accepted)")
    limits = [  # dest, what it is, lowest allowed, highest allowed, remedy
        ("cache_mib", "Embedding cache budget", 0.0, None, "give the embedding memory budget in MiB, e.g. 1024"),
        ("box_margin", "Box margin", 0.0, 1.0, "give e.g. 0.1 for 10 % of the box side, or 0 to use boxes as drawn"),
        ("max_slices", "Slice count", 1, None, "give how many slices each way at most (or use 'segment' for one slice)"),
        ("link_iou", "Linking overlap", 0.0, 1.0, "give the overlap needed to link regions, e.g. 0.5"),
    ]
    for dest, what, low, high, remedy in limits:
        value = getattr(args, dest, None)
        if value is None:
            continue
        too_low = value <= low if dest == "cache_mib" else value < low
        if too_low or (high is not None and value > high):
            span = f"between {low:g} and {high:g}" if high is not None else (
                f"above {low:g}" if dest == "cache_mib" else f"at least {low:g}")
            raise SAMSegmentError(f"{what} {_flag(sub, dest)} {value:g} must be {span}", remedy)
    if getattr(args, "range", None) is not None:
        first, last = args.range
        if first < 0 or last < first:
            raise PromptError(f"--range {first} {last} is not a range of slices: "
                              + ("slice indices start at 0" if first < 0 else "the first slice is after the last"),
                              "give the first slice, then the last (both >= 0), e.g. --range 10 40")


def _sources(args: argparse.Namespace) -> list[str]:
    """The command's inputs, which no output may replace."""
    return [args.image] + [path for path in (getattr(args, "anchor_mask", None), getattr(args, "adapter", None)) if path]


def _check_outputs(args: argparse.Namespace, geometry: Any, images: Sequence[str] = ("out",)) -> None:
    """Refuse every output of the command before any work (an input, an existing file without
    --overwrite, a wrong type, the same file given twice) and create their folders."""
    from . import io as sio

    sources = _sources(args)
    given = [(f"--{dest.replace('_', '-')}", getattr(args, dest, None)) for dest in (*images, "png")]
    given = [(flag, path) for flag, path in given if path]
    for flag, path in given:
        if flag == "--png":
            sio.check_png_path(path, args.overwrite, sources)
        else:
            sio.check_output_path(path, args.overwrite, sources, geometry)
    seen: dict[Path, str] = {}
    for flag, path in given:
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise ImageIOError(f"{seen[key]} and {flag} name the same file {path}", "give each output its own name")
        seen[key] = flag
    _check_cache_dir(args)


def _check_cache_dir(args: argparse.Namespace) -> None:
    """Refuse a --cache-dir that can never be an embedding cache (a file, a foreign folder) before
    the model loads; whether it holds this volume's embeddings is decided once the volume is set."""
    if getattr(args, "cache_dir", None) and not getattr(args, "server", None):
        from .cache import DiskTier

        DiskTier.check_folder(args.cache_dir)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _anchor_masks(args: argparse.Namespace, volume: np.ndarray, geometry: Any, axis: int) -> dict[int, np.ndarray]:
    """The accepted slices of ``--anchor-mask`` along ``axis``, on the image's grid.

    Refused: the image itself or a copy of it, or anything that is not a label map (negative or
    fractional values, hundreds of distinct values: an intensity image). A mask on another grid is resampled onto the
    image's (``volume.mask_on_grid``), with a note on stderr.
    """
    from . import io as sio
    from .preprocessing import _sample
    from .volume import mask_on_grid

    remedy = "give a label map of this image: 0 outside, 1 (or another positive label) inside, e.g. the --out of " \
             "samsegment segment"
    if _same_file(args.anchor_mask, args.image):
        raise PromptError(f"--anchor-mask {args.anchor_mask} is the image itself, not a mask of it", remedy)
    given, mask_geometry = sio.read_volume(args.anchor_mask)
    values = np.unique(_sample(given))
    if values.size and (values.min() < 0 or (given.dtype.kind == "f" and np.any(np.mod(given, 1) != 0))):
        raise PromptError(f"--anchor-mask {args.anchor_mask} holds {'negative' if values.min() < 0 else 'fractional'} "
                          f"values ({float(values.min()):g} to {float(values.max()):g}): it is not a mask", remedy)
    if values.size > 256:
        raise PromptError(f"--anchor-mask {args.anchor_mask} holds {values.size} or more different values: it looks like "
                          "an intensity image, not a mask", remedy)
    if given.shape == volume.shape and np.array_equal(given, volume):
        raise PromptError(f"--anchor-mask {args.anchor_mask} holds the same voxels as the image: it is a copy of the "
                          "image, not a mask of it", remedy)
    labels = [v for v in values.tolist() if v]
    if len(labels) > 1:
        print(f"note: --anchor-mask holds labels {', '.join(f'{v:g}' for v in labels[:10])}"
              f"{', ...' if len(labels) > 10 else ''}; every nonzero voxel is used, as one mask", file=sys.stderr)
    given, note = mask_on_grid(given, mask_geometry, geometry, "--anchor-mask")
    if note:
        print(f"note: {note}", file=sys.stderr)
    moved = np.moveaxis(given > 0, axis, 0)
    anchors = {int(i): moved[i] for i in range(moved.shape[0]) if moved[i].any()}
    if not anchors:
        raise PromptError(f"--anchor-mask {args.anchor_mask} is empty: it has no accepted slice to propagate from",
                          "segment a slice and save it first (samsegment segment ... --out mask.nii.gz)")
    return anchors


def _read(args: argparse.Namespace):
    """(volume, geometry) of the command's image (the chosen series of a DICOM folder)."""
    from . import io as sio

    return sio.read_volume(args.image, series_uid=args.series_uid)


def _remote(session: Any) -> bool:
    """True for a session on a server: the engine's long functions then run there (same results)."""
    from .client import RemoteSession

    return isinstance(session, RemoteSession)


def _token(token_file: str | None) -> str | None:
    if token_file is None:
        return os.environ.get("SAMSEGMENT_TOKEN")
    try:
        lines = Path(token_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SAMSegmentError(f"Cannot read the token file {token_file}: {exc.strerror}",
                              "give the file holding the server's token") from exc
    return lines[0].strip() if lines else None


def _session(args: argparse.Namespace):
    """The session of a command: its model from the packaged registry and ``--registry``, built here,
    or a ``RemoteSession`` on ``--server`` (where the server's own model, device and cache apply)."""
    from .backends import SamBackend
    from .session import SegmentationSession

    if getattr(args, "server", None):
        from .client import RemoteSession

        local_only = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--cache-dir", args.cache_dir),
                                               ("--runtime", args.runtime), ("--registry", args.registry))
                      if value is not None] + (["--device"] if args.device != "auto" else []) + \
            [flag for flag in ("--fill-holes", "--largest-component") if getattr(args, flag[2:].replace("-", "_"), False)]
        if local_only:
            raise SAMSegmentError(f"{', '.join(local_only)} cannot be used with --server",
                                  "these are the server's settings (samsegment serve ...); drop them here")
        return RemoteSession(args.server, _token(args.token_file), model=args.model,
                             box_margin=getattr(args, "box_margin", None))

    backend = SamBackend.from_model_id(args.model, args.checkpoint, args.device, extra_registry=args.registry,
                                       runtime=args.runtime)
    return SegmentationSession(model=backend, cache_bytes=int(args.cache_mib * 2**20), cache_dir=args.cache_dir,
                               fill_holes=getattr(args, "fill_holes", False),
                               largest_component=getattr(args, "largest_component", False),
                               box_margin=getattr(args, "box_margin", None))


def _progress(desc: str, position: int, unit: str = "slice") -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    """(update, close) of a progress bar on stderr, drawn from the first update on (hidden when
    stderr is not a terminal); ``position`` keeps several bars of one command in a fixed order."""
    bars: list[Any] = []

    def update(done: int, total: int, message: str) -> None:
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None,
                             position=position))
        bar = bars[0]
        bar.total = max(total, done)
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    def close() -> None:
        for bar in bars:
            bar.close()

    return update, close


def _first_ctrl_c_cancels(cancel: Any) -> Callable[[], None]:
    """Make the first Ctrl-C set ``cancel`` (the engine stops at its next check and returns or raises
    in order) and a second one raise ``KeyboardInterrupt`` (stop at once). Returns the function that
    restores the previous handler. Nothing changes off the main thread, or where SIGINT is ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        print("\nCtrl-C: stopping after the current step (press Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous == signal.SIG_IGN:
            return lambda: None
        signal.signal(signal.SIGINT, handler)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


@contextlib.contextmanager
def _interruptible(*bars: str, interrupted: str = "", unit: str = "slice") -> Iterator[tuple[Any, ...]]:
    """(one progress callback per name in ``bars``, ..., cancel token) for one long engine call
    (``unit``: what the bars count);
    the bars are always closed. The first Ctrl-C cancels the token, so the engine and the session's
    workers stop in order: a call that returns what it did (propagation) returns, one that raises
    ``CancelledError`` goes on up to ``main`` as a KeyboardInterrupt that carries ``interrupted``
    (the message to print; default: nothing was written). A second Ctrl-C stops at once, the same way."""
    from .worker import CancelToken

    cancel = CancelToken()
    progress = [_progress(desc, position, unit) for position, desc in enumerate(bars)]
    restore = _first_ctrl_c_cancels(cancel)
    try:
        yield (*(update for update, _ in progress), cancel)
    except CancelledError as exc:
        if not cancel.cancelled:
            raise
        raise KeyboardInterrupt(interrupted) from exc
    except KeyboardInterrupt as exc:
        cancel.cancel()
        if interrupted:
            raise KeyboardInterrupt(interrupted) from exc
        raise
    finally:
        restore()
        for _, close in progress:
            close()


def _ignore_ctrl_c() -> Callable[[], None]:
    """Ignore SIGINT (on the main thread); returns the function that restores the previous handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _stop_workers(mark: int, hard: bool) -> None:
    """After Ctrl-C: stop the threads this command started and wait for the model call each is in,
    Ctrl-C ignored meanwhile (a thread still inside torch/ONNX Runtime at interpreter exit aborts the
    process). ``hard``: if one is still busy after a minute, leave with ``os._exit(130)``, which ends
    the process without the teardown that aborts."""
    from .worker import shutdown_all

    if shutdown_all(timeout=1.0, since=mark):
        return
    print("waiting for the model call in progress to finish ...", file=sys.stderr, flush=True)
    if shutdown_all(timeout=60.0, since=mark) or not hard:
        return
    print("the model call did not finish; exiting without waiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


def _slice_prompts(args: argparse.Namespace, geometry: Any, shape: tuple[int, ...]):
    """(SliceRef, Prompts) from the command line, in slice pixel coordinates."""
    from .prompts import Prompts
    from .volume import SliceRef

    axis = _axis(args.axis)
    in_plane = [a for a in (0, 1, 2) if a != axis]  # array axes; columns = in_plane[1], rows = in_plane[0]
    if args.coords == "voxel":
        for pt in args.point + args.exclude:
            if len(pt) != 2:
                raise PromptError(f"A voxel point needs 2 numbers (x y), got {pt}", "write --point X Y")
        if args.box is not None and len(args.box) != 4:
            raise PromptError(f"A voxel box needs 4 numbers (x0 y0 x1 y1), got {args.box}", "write --box X0 Y0 X1 Y1")
        if args.slice is None:
            raise PromptError("--slice is required with voxel coordinates", "give the slice index along --axis")
        ref = SliceRef(axis, args.slice)
        box = None if args.box is None else [min(args.box[0], args.box[2]), min(args.box[1], args.box[3]),
                                             max(args.box[0], args.box[2]), max(args.box[1], args.box[3])]
        return ref, Prompts.from_lists([tuple(p) for p in args.point], [tuple(p) for p in args.exclude], box)
    if args.slice is not None and args.slice < 0:
        raise PromptError(f"--slice {args.slice} is negative", "slice indices start at 0; or drop --slice with LPS prompts")
    # physical LPS: convert to array (K, J, I) continuous indices, then to slice pixels
    groups = [("include", p) for p in args.point] + [("exclude", p) for p in args.exclude]
    for _, pt in groups:
        if len(pt) != 3:
            raise PromptError(f"An LPS point needs 3 numbers (x y z in mm), got {pt}", "write --point X Y Z")
    if args.box is not None and len(args.box) != 6:
        raise PromptError(f"An LPS box needs two corners (6 numbers), got {args.box}", "write --box X0 Y0 Z0 X1 Y1 Z1")
    physical = [pt for _, pt in groups] + ([args.box[:3], args.box[3:]] if args.box is not None else [])
    with np.errstate(over="ignore", invalid="ignore"):
        kji = np.array([geometry.physical_to_array_index(p) for p in physical])
    far = ~np.isfinite(kji).all(axis=1) | (np.abs(kji) > 10 * max(shape)).any(axis=1)
    if far.any():
        raise PromptError(f"The LPS point {list(physical[int(np.argmax(far))])} lies far outside the image",
                          "check the coordinates (LPS, in mm; Slicer shows RAS: negate the first two) and the image")
    slice_pos = kji[:, axis]
    on = int(np.rint(np.median(slice_pos)))
    if np.abs(slice_pos - on).max() > 0.5 + 1e-6:
        raise PromptError(f"The LPS prompts lie on different slices along axis {axis} "
                          f"(positions {np.round(slice_pos, 2).tolist()})",
                          "give points on one slice, or choose another --axis")
    if args.slice is not None and args.slice != on:
        raise PromptError(f"The LPS prompts lie on slice {on} along axis {axis}, not on --slice {args.slice}",
                          f"drop --slice (LPS prompts choose their slice), or give --slice {on}")
    index = on
    if not 0 <= index < shape[axis]:
        raise PromptError(f"The LPS prompts lie on slice {index}, outside the volume (0..{shape[axis] - 1})",
                          "check the coordinates (LPS, mm) and the image")
    xy = kji[:, [in_plane[1], in_plane[0]]]
    n_pts = len(groups)
    include = [tuple(xy[i]) for i, (kind, _) in enumerate(groups) if kind == "include"]
    exclude = [tuple(xy[i]) for i, (kind, _) in enumerate(groups) if kind == "exclude"]
    box = None
    if args.box is not None:
        c = xy[n_pts:]
        box = [c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()]
    return SliceRef(axis, index), Prompts.from_lists(include, exclude, box)


def _checked_prompts(args: argparse.Namespace, volume: np.ndarray, geometry: Any, window: Any):
    """``_slice_prompts``, refused before the model loads when the session would refuse them: a slice
    outside the volume or constant in ``window``, a prompt outside the slice, points alone for a
    model that needs a box (the model's registry entry says; a server checks its own)."""
    from .model_registry import get_spec
    from .prompts import check_prompts, require_box
    from .volume import check_slice_ref, constant_slice_error, get_slice, slice_shape

    ref, prompts = _slice_prompts(args, geometry, volume.shape)
    check_slice_ref(volume.shape, ref)
    check_prompts(prompts, *slice_shape(volume.shape, ref.axis))
    if not getattr(args, "server", None):
        require_box(get_spec(args.model, args.registry), prompts)
    image = window.apply(get_slice(volume, ref))
    if int(image.min()) == int(image.max()):
        raise constant_slice_error(ref, image)
    return ref, prompts


def _write_outputs(args: argparse.Namespace, mask_kji: np.ndarray, geometry: Any, session: Any,
                   axis: int, indices: list[int]) -> None:
    from . import io as sio

    sio.write_mask(args.out, mask_kji.astype(np.uint8), geometry, overwrite=args.overwrite,
                   source_paths=_sources(args))
    print(f"Mask written: {args.out}")
    _write_png(args, session, mask_kji, axis, indices, geometry)


def _write_png(args: argparse.Namespace, session: Any, mask_kji: np.ndarray, axis: int, indices: list[int],
               geometry: Any) -> None:
    from . import io as sio

    if args.png:
        sio.write_png_montage(args.png, session.slice_image, mask_kji, axis, indices, geometry,
                              overwrite=args.overwrite, source_paths=_sources(args))
        print(f"Overlay written: {args.png}")


def _everything_params(args: argparse.Namespace):
    from .automatic import EverythingParams

    return EverythingParams(points_per_side=args.grid, prompt=args.grid_prompt, box_scales=tuple(args.box_scales),
                            pred_iou_thresh=args.min_quality, stability_thresh=args.min_stability,
                            nms_iou=args.nms_iou, batch_size=args.batch_size, decoder=args.decoder)


# ------------------------------------------------------------------------------------------ commands
def cmd_models(args: argparse.Namespace) -> int:
    from .device import available_devices
    from .model_registry import default_model_id, load_registry, resolve_weights

    default = default_model_id()
    packaged = load_registry()
    for spec in load_registry(args.registry).values():
        if spec.needs_user_checkpoint:
            where = f"your file ({spec.weights.get('filename')}), pass --checkpoint"
        else:
            try:
                where = f"bundled: {resolve_weights(spec, verify=False)}"
            except SAMSegmentError as exc:
                where = f"MISSING: {exc}"
        mark = " (default)" if spec.id == default else ""
        if packaged.get(spec.id) != spec:
            mark += f" (from {args.registry})"
        prompts = "a box (points refine it)" if spec.needs_box else "points and/or a box"
        if spec.box_margin > 0:
            prompts += f"; boxes widened by {spec.box_margin:.0%} of their side (--box-margin)"
        print(f"{spec.id}{mark}\n  {spec.name}: {spec.description}\n  input {spec.image_size}px, weights: {where}\n"
              f"  prompts: {prompts}\n  license {spec.license}; cite: {spec.citation}")
    try:
        print(f"devices: {', '.join(available_devices())} (auto picks the first)")
    except ImportError:
        print("devices: torch is not installed")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .volume import set_slice

    volume, geometry = _read(args)
    window = _intensity_window(args, volume)
    ref, prompts = _checked_prompts(args, volume, geometry, window)
    _check_outputs(args, geometry)
    with _session(args) as session:
        session.set_volume(volume, window=window, modality=args.modality)
        t0 = time.perf_counter()
        pred = session.predict(ref, prompts)
        log.info("slice %s segmented in %.2f s", ref, time.perf_counter() - t0)
        mask = np.zeros(volume.shape, dtype=np.uint8)
        set_slice(mask, ref, pred.mask)
        print(f"Slice {ref.index} (axis {'kji'[ref.axis]}): {pred.area} pixels, model score {pred.score:.3f}")
        _write_outputs(args, mask, geometry, session, ref.axis, [ref.index])
    return 0


def _rules(args: argparse.Namespace):
    """The command's ``StopRules`` (refused when they mean nothing: ``StopRules.check``)."""
    from .propagation import StopRules

    given = {"min_iou": args.min_iou, "min_area_px": args.min_area, "min_score": args.min_score}
    return StopRules(max_slices=args.max_slices, index_range=tuple(args.range) if args.range else None,
                     **{name: value for name, value in given.items() if value is not None})


def _box_prompts(args: argparse.Namespace, volume: np.ndarray, axis: int):
    """(boxes, bounds) of ``--box-at`` and ``--box3d``, refused before the model loads when they cannot
    be propagated from: boxes slice -> (x0, y0, x1, y1), bounds a ``Box3D`` or None."""
    from .box3d import Box3D
    from .prompts import Prompts, check_prompts
    from .volume import SliceRef, check_slice_ref, slice_shape

    if (args.box3d or args.box_at) and (args.coords != "voxel" or args.point or args.exclude):
        raise PromptError("--box3d and --box-at take voxel indices and boxes only",
                          "drop --coords lps, --point and --exclude (or prompt one slice with them instead)")
    bounds = Box3D.from_ijk(*args.box3d) if args.box3d else None
    if bounds is not None:
        bounds.check(volume.shape)
    boxes = {}
    for k, *box in args.box_at:
        if k != int(k):
            raise PromptError(f"--box-at {k:g}: the slice must be a whole number", "write --box-at K X0 Y0 X1 Y1")
        k = int(k)
        check_slice_ref(volume.shape, SliceRef(axis, k))
        if k in boxes:
            raise PromptError(f"--box-at gives two boxes on slice {k}", "give one box per slice")
        boxes[k] = check_prompts(Prompts(box=box), *slice_shape(volume.shape, axis)).box
    if bounds is not None:
        first, last = bounds.slice_range(axis)
        outside = sorted(k for k in boxes if not first <= k <= last)
        if outside:
            raise PromptError(f"--box-at slice(s) {', '.join(map(str, outside))} lie outside the 3D box's slices "
                              f"{first}..{last}", "draw the boxes inside the 3D box, or widen it")
    return boxes, bounds


def _adapt_settings(args: argparse.Namespace):
    """The ``AdaptSettings`` of ``--adapt`` (the engine's defaults)."""
    from .adaptation import AdaptSettings

    return AdaptSettings()


def _check_adaptation(args: argparse.Namespace) -> Any:
    """Refuse ``--adapt``, ``--adapter`` and ``--save-adapter`` before the image is read and the model
    loads: --adapt without --anchor-mask, --adapt with --adapter, --save-adapter without --adapt or
    onto a folder, an input, an output or a file that is not an adapter, or into a missing folder.

    Returns:
        What ``--adapter`` gives, checked as far as it can be without the model: a verified
        ``DecoderAdapter`` of the command's model (in-process), or the file's bytes (``--server``,
        whose own key verifies it); None without ``--adapter``.
    """
    from .adaptation import DecoderAdapter, read_adapter_file

    if args.adapt and not args.anchor_mask:
        raise PromptError("--adapt needs --anchor-mask: it trains on the slices you accepted, and none are given",
                          "give them with --anchor-mask MASK (a label map of this image, e.g. an earlier --out)")
    if args.adapt and args.adapter:
        raise PromptError("--adapt and --adapter both choose the decoder", "give --adapt to adapt to this scan, or "
                          "--adapter FILE to use one adapted before, not both")
    if args.save_adapter:
        if not args.adapt:
            raise PromptError("--save-adapter saves the decoder --adapt makes, and --adapt is not given",
                              "add --adapt (with --anchor-mask), or drop --save-adapter")
        _check_adapter_output(args)
    if not args.adapter:
        return None
    path = Path(args.adapter).expanduser()
    if getattr(args, "server", None):  # the server verifies it with its own key and its model
        return read_adapter_file(path)
    from .model_registry import get_spec

    adapter = DecoderAdapter.load(path)
    model = get_spec(args.model, args.registry).id
    if adapter.model_id != model:
        raise CheckpointError(f"Adapter file {path} was trained for model {adapter.model_id!r}, not {model!r}",
                              f"use it with --model {adapter.model_id}, or adapt again with this model")
    return adapter


def _check_adapter_output(args: argparse.Namespace) -> None:
    """``--save-adapter``: not a folder, not an input or another output, in a folder that exists, and
    (with --overwrite) replacing only an adapter file."""
    from . import io as sio
    from .adaptation import MAGIC
    from .files import starts_with

    path = Path(args.save_adapter).expanduser()
    if path.is_dir():
        raise ImageIOError(f"--save-adapter {args.save_adapter} is a folder", "give a file name for the adapter")
    if not path.parent.is_dir():
        raise ImageIOError(f"--save-adapter {args.save_adapter}: the folder {path.parent} does not exist",
                           "give a file in an existing folder (or create the folder first)")
    sio._refuse_inputs(path, _sources(args))
    for flag, other in (("--out", args.out), ("--png", args.png)):
        if other and _same_file(str(path), other):
            raise ImageIOError(f"--save-adapter and {flag} name the same file {other}", "give each output its own name")
    if path.exists():
        if not args.overwrite:
            raise ImageIOError(f"--save-adapter {args.save_adapter} already exists",
                               "pass --overwrite or choose another name")
        if not starts_with(path, MAGIC):
            raise ImageIOError(f"--save-adapter {args.save_adapter} exists and is not an adapter file; it is not "
                               "replaced, even with --overwrite", "choose another name for the adapter")


def _use_adapter(args: argparse.Namespace, session: Any, adapter: Any) -> None:
    """Decode with ``--adapter`` (checked against the loaded model, or by the server)."""
    if _remote(session):
        loaded = session.load_adapter_file_bytes(adapter, source=f"Adapter file {args.adapter}")
        structure, report = loaded.get("structure"), loaded.get("report") or {}
    else:
        session.use_adapter(adapter)
        structure, report = adapter.structure, adapter.report
    detail = [f"structure {structure}"] if structure else []
    if report.get("slices"):
        detail.append(f"adapted from {len(report['slices'])} accepted slice(s)")
    print(f"Adapter loaded: {args.adapter}" + (f" ({'; '.join(detail)})" if detail else ""))


def _adapt(args: argparse.Namespace, session: Any, axis: int, anchors: dict[int, np.ndarray]) -> Any:
    """``--adapt``: adapt the decoder to the accepted slices, print the report, and write
    ``--save-adapter`` when the adapted decoder was kept. Returns the ``AdaptationReport``."""
    from .files import atomic_write_bytes

    settings = _adapt_settings(args)
    with _interruptible("adapting", unit="step",
                        interrupted="interrupted during the adaptation; nothing was written") as (update, cancel):
        report = session.adapt(axis, anchors, None, settings, progress=update, cancel=cancel)
        if cancel.cancelled:  # the last step finished as Ctrl-C came: stop before propagating
            raise CancelledError("The adaptation was interrupted")
    print(f"Adaptation {report.summary()}; {len(report.slices)} accepted slice(s), {report.steps} steps in "
          f"{report.seconds:.1f} s")
    log.info(json.dumps(report.as_json()))
    if args.save_adapter:
        if report.kept:  # on a server, the client already holds the signed file it fetched when the adapter was kept
            data = session.held_adapter_bytes if _remote(session) else None
            atomic_write_bytes(Path(args.save_adapter).expanduser(), data if data is not None else session.adapter_file_bytes(),
                               "the adapter")
            print(f"Adapter written: {args.save_adapter}")
        else:
            print(f"The adapted decoder was not kept, so no adapter was written to {args.save_adapter}")
    return report


def cmd_propagate(args: argparse.Namespace) -> int:
    from .propagation import check_anchors_in_range, propagate

    adapter = _check_adaptation(args)
    rules = _rules(args)
    volume, geometry = _read(args)
    axis = _axis(args.axis)
    window = _intensity_window(args, volume)
    anchors = ref = prompts = None
    if args.anchor_mask and (args.box is not None or args.point or args.exclude or args.slice is not None or args.box_at):
        raise PromptError("--anchor-mask gives the accepted slices, so --slice, --box, --box-at, --point and --exclude "
                          "would be ignored", "give either prompts or --anchor-mask, not both")
    boxes, bounds = _box_prompts(args, volume, axis)
    if args.anchor_mask:
        anchors = _anchor_masks(args, volume, geometry, axis)
        check_anchors_in_range(anchors, rules.index_range)
        if bounds is not None:
            check_anchors_in_range(anchors, bounds.slice_range(axis))
    elif boxes or bounds is not None:
        if args.box is not None:  # --box on --slice: one more drawn box
            ref, prompts = _checked_prompts(args, volume, geometry, window)
            if ref.index in boxes:
                raise PromptError(f"--box and --box-at both give a box on slice {ref.index}", "give one box per slice")
            boxes[ref.index] = prompts.box
        elif args.slice is not None and bounds is not None:  # the 3D box seeds the slice chosen
            from .volume import SliceRef, check_slice_ref

            check_slice_ref(volume.shape, SliceRef(axis, args.slice))
            boxes[args.slice] = bounds.plane_box(axis)
        seeds = dict(boxes) or {bounds.middle(axis): None}
        check_anchors_in_range(seeds, rules.index_range)
        if bounds is not None:
            check_anchors_in_range(seeds, bounds.slice_range(axis))
        anchors = {}
    else:
        ref, prompts = _checked_prompts(args, volume, geometry, window)
        axis = ref.axis
        check_anchors_in_range({ref.index: None}, rules.index_range)
    _check_outputs(args, geometry)
    with _session(args) as session:
        session.set_volume(volume, window=window, modality=args.modality)
        adapted = adapter is not None
        if adapter is not None:
            _use_adapter(args, session, adapter)
        if args.adapt:
            adapted = _adapt(args, session, axis, anchors).kept
        if anchors is None:
            pred = session.predict(ref, prompts)
            print(f"Slice {ref.index} (axis {'kji'[axis]}): {pred.area} pixels, model score {pred.score:.3f}")
            anchors = {ref.index: pred.mask}
        t0 = time.perf_counter()
        run = session.propagate if _remote(session) else partial(propagate, session)
        with _interruptible("propagating") as (update, cancel):
            extra = {"boxes": boxes or None, "bounds": bounds} if boxes or bounds is not None else {}
            result = run(axis, anchors, direction=args.direction, rules=rules, progress=update, cancel=cancel, **extra)
        elapsed = time.perf_counter() - t0
        _report_seeds(result, boxes, bounds, axis)
        for stop in result.stops:
            way = "up" if stop.direction > 0 else "down"
            print(f"  from slice {stop.anchor} {way}: stopped after slice {stop.last_index} ({stop.reason.value})")
        print(f"Propagated to {len(result.masks)} slice(s) in {elapsed:.1f} s"
              + (" with the adapted decoder" if adapted else " with the stock model" if args.adapt else ""))
        if result.cancelled:
            print(f"Interrupted (Ctrl-C) after {len(result.masks)} propagated slice(s): stop reason "
                  f"'{result.stops[0].reason.value if result.stops else 'cancelled'}'", file=sys.stderr)
            if args.no_partial:
                raise KeyboardInterrupt("interrupted; --no-partial: nothing was written")
        mask = result.to_volume(volume.shape, anchors)
        indices = sorted(set(anchors) | set(result.masks))
        _write_outputs(args, mask, geometry, session, axis, indices)
        if result.cancelled:
            print(f"The mask holds the {len(anchors)} accepted and {len(result.masks)} propagated slice(s) done before "
                  "Ctrl-C; run again (or pass --no-partial to write nothing)", file=sys.stderr)
            return 130
    return 0


def _report_seeds(result: Any, boxes: dict, bounds: Any, axis: int) -> None:
    """Print each slice the run decoded from a box (``--box-at``, ``--box`` on ``--slice``, or the 3D box's
    cross-section) with its area and the model's score; a 3D box alone seeds its middle slice, which can
    miss a structure that is off-centre in the box (the score says how sure the model is there)."""
    for outcome in result.seeds():
        index, where = outcome.index, ""
        if bounds is not None and not boxes and index == bounds.middle(axis):
            where = (" (the 3D box's middle slice; where the structure lies off-centre in the box, give --slice K on "
                     "its largest cross-section)")
        print(f"  seed: slice {index} from its box: {outcome.area} pixels, model score {outcome.score:.3f}{where}")


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.serve import serve
    from .server.state import Limits

    limits = Limits(max_volume_voxels=args.max_volume_voxels, max_request_bytes=int(args.max_request_mib * 2**20))
    if not 1 <= args.encode_workers <= 64:
        raise SAMSegmentError(f"--encode-workers must be from 1 to 64, got {args.encode_workers}",
                              "give 1, or the number of encoders to run side by side")
    checkpoints = _serve_checkpoints(args)
    if args.adapter_key:  # checked now; the replicas (Ray's too) read it from the environment
        from .adaptation import KEY_ENV, signing_key

        key_path = Path(args.adapter_key).expanduser().resolve()
        if not key_path.is_file():
            raise CheckpointError(f"--adapter-key {args.adapter_key} is not a file",
                                  "give the site's adapter key file (at least 32 bytes; any long random text)")
        signing_key(key_path, create=False)
        os.environ[KEY_ENV] = str(key_path)
    if args.ray:
        return _serve_on_ray(args, limits, checkpoints)
    serve(args.host, args.port, token_file=args.token_file, no_auth=args.no_auth, ssl_certfile=args.ssl_certfile,
          ssl_keyfile=args.ssl_keyfile, device=None if args.device == "auto" else args.device, runtime=args.runtime,
          limits=limits, cache_bytes=int(args.cache_mib * 2**20), registry=args.registry, port_file=args.port_file,
          checkpoints=checkpoints, encode_workers=args.encode_workers)
    return 0


def _serve_checkpoints(args: argparse.Namespace) -> dict[str, str] | None:
    """``--model M --checkpoint FILE`` for ``serve``: the server loads ``M`` from ``FILE`` (checked now,
    not at the first client's request)."""
    if not args.checkpoint:
        return None
    from .model_registry import get_spec, resolve_weights

    spec = get_spec(args.model, args.registry)
    return {spec.id: str(resolve_weights(spec, args.checkpoint, verify=False).resolve())}


def _serve_on_ray(args: argparse.Namespace, limits: Any, checkpoints: dict[str, str] | None = None) -> int:
    """``samsegment serve --ray``: the same server as N Ray Serve replicas (see server/ray_serve.py)."""
    try:
        from .server import ray_serve
    except ImportError as exc:
        raise SAMSegmentError(f"--ray needs Ray Serve, which is not installed here ({exc.name})",
                              "pip install 'samsegment[cluster]' (or 'ray[serve]'), or serve without --ray") from exc
    if args.replicas < 1:
        raise SAMSegmentError(f"--replicas must be at least 1, got {args.replicas}", "give --replicas 1 or more")
    ray_serve.serve_on_ray(args.replicas, args.host, args.port, token_file=args.token_file, no_auth=args.no_auth,
                           ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, port_file=args.port_file,
                           limits=limits, device=None if args.device == "auto" else args.device, runtime=args.runtime,
                           cache_bytes=int(args.cache_mib * 2**20), registry=args.registry, model=args.model,
                           ray_address=args.ray_address, replica_cpus=args.replica_cpus,
                           replica_gpus=args.replica_gpus, checkpoints=checkpoints)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .volume import SliceRef

    if not args.cache_dir:
        raise SAMSegmentError("embed needs --cache-dir", "give a folder to store the embeddings in")
    axis = _axis(args.axis)
    volume, _ = _read(args)
    window = _intensity_window(args, volume)
    _check_cache_dir(args)
    with _session(args) as session:
        session.set_volume(volume, window=window, modality=args.modality, overwrite_disk_cache=args.overwrite)
        refs = [SliceRef(axis, i) for i in range(volume.shape[axis])]
        t0 = time.perf_counter()
        kept = (f"interrupted; the slices encoded so far are kept in {args.cache_dir} (run the same command again "
                "to encode the rest)")
        with _interruptible("encoding", interrupted=kept) as (update, cancel):
            encoded = session.encode_slices(refs, progress=update, cancel=cancel)
        print(f"{encoded} slice(s) encoded, {len(refs) - encoded} already cached or blank, "
              f"in {time.perf_counter() - t0:.1f} s -> {args.cache_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with _interruptible("propagating") as (update, cancel):
        summary = run_demo(args.out, structure=args.structure, model=args.model, registry=args.registry,
                           checkpoint=args.checkpoint, device=args.device, overwrite=args.overwrite,
                           window=_window(args.window), modality=args.modality,
                           cache_bytes=int(args.cache_mib * 2**20), runtime=args.runtime,
                           progress=update, cancel=cancel)
    print(f"Structure: {summary['structure']}, model {summary['model']} on {summary['device']}")
    print(f"Box {[round(v) for v in summary['box_xyxy']]} on slice {summary['anchor_slice']}; propagated to "
          f"{summary['slices_written']} slices in {summary['seconds_total']:.1f} s")
    print(f"Mask: {summary['mask']}\nOverlay: {summary['overlay']}")
    print(f"Dice: {summary['dice']:.4f}")
    log.info(json.dumps(summary, indent=1))
    if cancel.cancelled:
        print("Interrupted (Ctrl-C): the mask and the Dice cover only the slices propagated before it", file=sys.stderr)
        return 130
    return 0


def cmd_everything(args: argparse.Namespace) -> int:
    from . import io as sio
    from .automatic import everything_volume

    params = _everything_params(args)
    if args.slice is not None and args.range is not None:
        raise PromptError("--slice and --range both choose the slices", "give one of them")
    axis = _axis(args.axis)
    volume, geometry = _read(args)
    n = volume.shape[axis]
    if args.slice is not None:
        indices = [args.slice]
    elif args.range is not None:
        indices = list(range(max(0, args.range[0]), min(n - 1, args.range[1]) + 1))
    else:
        indices = list(range(n))
    if not indices or not all(0 <= i < n for i in indices):
        raise PromptError(f"No valid slice to process (axis {'kji'[axis]} has 0..{n - 1})", "check --slice/--range")
    window = _intensity_window(args, volume)
    _check_outputs(args, geometry)  # fail before minutes of work, not after
    with _session(args) as session:
        session.set_volume(volume, window=window, modality=args.modality)
        t0 = time.perf_counter()
        with _interruptible("everything") as (update, cancel):
            labels = everything_volume(session, axis, indices, params, link=not args.per_slice_labels,
                                       link_iou=args.link_iou, progress=update, cancel=cancel)
        elapsed = time.perf_counter() - t0
        count = len(np.unique(labels)) - (1 if (labels == 0).any() else 0)
        dtype = np.uint16 if labels.max() < 2**16 else np.int32
        sio.write_array(args.out, labels.astype(dtype), geometry, overwrite=args.overwrite, source_paths=[args.image])
        print(f"{count} label(s) on {len(indices)} slice(s) in {elapsed:.1f} s "
              f"({elapsed / len(indices):.2f} s/slice); labels written: {args.out}")
        _write_png(args, session, labels, axis, indices, geometry)
    return 0


def cmd_samaug(args: argparse.Namespace) -> int:
    from .samaug import find_inputs, samaug_batch

    params = _everything_params(args)
    axis = _axis(args.axis)
    window = _window(args.window)
    inputs = find_inputs(args.input_dir)
    resume = "interrupted; finished cases are kept, run the same command again to resume"
    with _session(args) as session:
        with _interruptible("cases", "slices", interrupted=resume) as (cases_update, slices_update, cancel):
            summary = samaug_batch(inputs, args.out, session, axis, params, window=window,
                                   modality=args.modality, redo=args.redo, progress=cases_update,
                                   slice_progress=slices_update, cancel=cancel)
    print(f"{len(summary.done)} case(s) written, {len(summary.skipped)} already finished (skipped), "
          f"{len(summary.failed)} failed, in {summary.seconds:.1f} s -> {args.out}")
    for case, why in summary.failed.items():
        print(f"  {case}: {why}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_uncertainty(args: argparse.Namespace) -> int:
    from . import io as sio
    from .uncertainty import check_sampling, prompt_uncertainty
    from .volume import set_slice

    check_sampling(args.samples, args.jitter, args.seed, args.measure)
    volume, geometry = _read(args)
    window = _intensity_window(args, volume)
    ref, prompts = _checked_prompts(args, volume, geometry, window)
    _check_outputs(args, geometry, images=("out", "prob_out"))
    with _session(args) as session:
        session.set_volume(volume, window=window, modality=args.modality)
        t0 = time.perf_counter()
        run = session.prompt_uncertainty if _remote(session) else partial(prompt_uncertainty, session)
        mean, unc = run(ref, prompts, n=args.samples, jitter=args.jitter, seed=args.seed, measure=args.measure)
        elapsed = time.perf_counter() - t0
        unc_vol = np.zeros(volume.shape, dtype=np.float32)
        set_slice(unc_vol, ref, unc)
        sio.write_volume(args.out, unc_vol, geometry, overwrite=args.overwrite, source_paths=[args.image])
        inside = mean > 0.5
        print(f"Slice {ref.index} (axis {'kji'[ref.axis]}): {args.samples} jittered prompts in {elapsed:.2f} s; "
              f"mean-mask {int(inside.sum())} pixels, mean {args.measure} {float(unc.mean()):.4f}, "
              f"max {float(unc.max()):.4f}")
        print(f"Uncertainty written: {args.out}")
        if args.prob_out:
            prob_vol = np.zeros(volume.shape, dtype=np.float32)
            set_slice(prob_vol, ref, mean)
            sio.write_volume(args.prob_out, prob_vol, geometry, overwrite=args.overwrite, source_paths=[args.image])
            print(f"Mean probability written: {args.prob_out}")
        mask = np.zeros(volume.shape, dtype=np.uint8)
        set_slice(mask, ref, inside)
        _write_png(args, session, mask, ref.axis, [ref.index], geometry)
    return 0


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samsegment", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Segment 3D medical images (CT, MR; NIfTI, NRRD, MHA or a DICOM folder) with Segment-Anything "
                    "models: prompt one slice with a box or points, then propagate through the neighbouring slices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="print more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parents = _parents()

    def command(name: str, func: Callable[[argparse.Namespace], int], uses: str, summary: str,
                description: str) -> argparse.ArgumentParser:
        """A subcommand running ``func``, with the options of the parents named in ``uses``."""
        p = sub.add_parser(name, help=summary, description=description, parents=[parents[u] for u in uses.split()])
        p.set_defaults(func=func)
        return p

    command("segment", cmd_segment, "input axis prompts out_file overwrite mask model server",
            "segment one slice from a box and/or points",
            "Segment one slice and write a 3D mask with only that slice set.")
    p = command("propagate", cmd_propagate,
                "input axis prompts out_file overwrite mask propagation range model server",
                "segment one slice, then propagate through adjacent slices",
                "Segment a slice from prompts (or take an existing mask's slices as accepted anchors with "
                "--anchor-mask) and propagate slice by slice. With --adapt, the model's mask decoder is first "
                "adapted to this scan from the accepted slices (kept only when it does better on a held-back "
                "slice); --adapter uses a decoder adapted before.")
    p.add_argument("--anchor-mask", default=None,
                   help="mask file whose non-empty slices along --axis are accepted anchors (instead of prompts)")
    p.add_argument("--box3d", type=int, nargs=6, default=None, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                   help="a 3D box as the prompt: two opposite corners in voxel indices (ITK order, inclusive). Its "
                        "in-plane box (across --axis) seeds its middle slice, or --slice K (better: the slice where "
                        "the structure is largest, measured); no slice outside its range along --axis and no voxel "
                        "outside it is written, and every propagated slice's box stays inside it. With --box (on "
                        "--slice), --box-at or --anchor-mask, those seed instead, kept inside the 3D box")
    p.add_argument("--box-at", type=float, nargs=5, action="append", default=[], metavar=("K", "X0", "Y0", "X1", "Y1"),
                   help="a box drawn on slice K (along --axis, voxel coords); repeat for boxes on several slices: "
                        "each seeds the propagation, and slices between two boxes are prompted with the box "
                        "interpolated between them, averaged with the box from their neighbour's mask")
    g = p.add_argument_group("adaptation")
    g.add_argument("--adapt", action="store_true",
                   help="adapt the model's mask decoder to this scan from the accepted slices of --anchor-mask "
                        "before propagating (about 15 s on a CPU for 3 slices; the image encoder is not changed). "
                        "One accepted slice (with a single one: its mirror image) is held back: the adapted decoder "
                        "is used only when it segments it better than the stock model; the report line says which "
                        "was kept. With --server the server adapts")
    g.add_argument("--adapter", default=None, metavar="FILE",
                   help="decode with an adapter saved before (--save-adapter, or the Slicer module's Save), made "
                        "with the same model; it must be signed with this machine's adapter key ($SAMSEGMENT_ADAPTER_KEY "
                        "names a site's shared key file; with --server, the server's key)")
    g.add_argument("--save-adapter", default=None, metavar="FILE",
                   help="with --adapt: write the adapted decoder to FILE (a signed adapter file, for --adapter) "
                        "when it was kept; nothing is written when the stock model stays. The folder must exist; "
                        "an existing adapter file is replaced only with --overwrite. With --server the file is "
                        "signed with the server's key")
    command("embed", cmd_embed, "input axis overwrite model",
            "precompute a volume's slice embeddings into a cache folder",
            "Encode every slice along --axis once and save the embeddings, so later segment/propagate runs "
            "with --cache-dir answer in milliseconds per prompt.")
    p = command("demo", cmd_demo, "out_dir overwrite model",
                "segment a structure of the bundled sample CT and report Dice",
                "One box on the structure's largest slice (taken from the reference label), propagation both "
                "ways, mask + PNG montage written to --out, Dice printed.")
    p.add_argument("--structure", default="spleen", help="spleen (default), liver, kidney_left, ... (see labels)")
    command("serve", cmd_serve, "serve model",
            "run the engine behind an HTTP API for Slicer and other clients (--server URL)",
            "Serve the models over HTTP (API v1) on 127.0.0.1 by default, with a token; CUDA when present. "
            "Clients: Slicer's SAMSegment module, 'samsegment ... --server URL', SAMSegmentLib.client.")
    command("models", cmd_models, "registry", "list the models, where their weights come from, and the devices",
            "List the known models and whether their weights are available.")
    p = command("everything", cmd_everything, "input axis range out_file overwrite everything model",
                "automatic segmentation of every slice with a prompt grid (no prompts)",
                "SAM's 'everything' mode: a grid of prompts per slice, masks filtered by predicted quality and "
                "stability, duplicates removed; writes a label volume. Labels are linked across adjacent slices "
                "by overlap unless --per-slice-labels.")
    p.add_argument("--slice", type=int, default=None, help="only this slice (default: all)")
    p.add_argument("--per-slice-labels", action="store_true",
                   help="give every region of every slice its own label (default: link regions across slices)")
    p.add_argument("--link-iou", type=float, default=0.5, help="overlap needed to continue a label on the next slice")
    p = command("samaug", cmd_samaug, "axis out_dir everything model",
                "SAMAug: write (intensity, segmentation prior, boundary prior) channels for every volume of a "
                "folder, resumable",
                "For each volume in INPUT_DIR, everything mode on every slice gives a segmentation prior (sum of "
                "the masks' stability scores) and a boundary prior (outer mask boundaries). Writes CASE_0000 "
                "(intensity), CASE_0001 (segmentation prior), CASE_0002 (boundary prior) with the input geometry, "
                "then CASE.samaug.json. Cases with a marker are skipped, so an interrupted run resumes where it "
                "stopped.")
    p.add_argument("input_dir", help="folder of volumes (.nii.gz, .nii, .nrrd, .mha, .mhd)")
    p.add_argument("--redo", action="store_true", help="recompute finished cases too")
    command("uncertainty", cmd_uncertainty, "input axis prompts out_file overwrite mask uncertainty model server",
            "mean probability and uncertainty over jittered copies of a prompt",
            "Decode N randomly jittered copies of the box/points (SAM-U style) and write the per-pixel "
            "uncertainty (entropy of the mean probability, or variance of the N masks) and optionally the mean "
            "probability, on the prompted slice.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0; 2 for the user's errors, with what to do; 130
    after Ctrl-C; 3 out of memory). ``argv`` None: the process's own command line, which may then
    end with ``os._exit`` if a model call cannot be waited for after Ctrl-C (see ``_stop_workers``)."""
    import warnings

    from .worker import worker_mark

    mark = worker_mark()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
        _check_numbers(parser, args)
        return args.func(args)
    except SAMSegmentError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.remedy:
            print(f"  what to do: {exc.remedy}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        restore = _ignore_ctrl_c()  # a further Ctrl-C must not interrupt the orderly stop
        try:
            print(str(exc) or "interrupted; nothing was written", file=sys.stderr, flush=True)
            _stop_workers(mark, hard=argv is None)
        finally:
            if argv is not None:  # called in-process (tests, scripts): leave Ctrl-C as it was
                restore()
        if argv is None:
            # the process's own Ctrl-C: its workers have stopped and its files are settled; leave now,
            # so that a Ctrl-C still pending cannot turn the exit into an unhandled KeyboardInterrupt
            # (the process would then end by SIGINT instead of with status 130)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except MemoryError:
        print("error: out of memory\n  what to do: lower --cache-mib, close other programs, or crop the image",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

"""``samsegment``: segment medical volumes with Segment-Anything models from the command line.

Coordinates: with ``--coords voxel`` (default) a slice is chosen with ``--axis`` and ``--slice``
and points/boxes are the two in-plane voxel indices in ITK order (for an axial K slice: I then
J, i.e. column then row as in any image viewer showing the array). With ``--coords lps``,
points are physical millimetres in LPS, the convention of ITK/SimpleITK and DICOM (Slicer shows
RAS: negate the first two numbers); the slice is the one the points lie on.

Layout: options shared by several commands are defined once, in the parent parsers of
``_parents``; each command names its parents and its function in ``build_parser`` (dispatch
through ``set_defaults(func=...)``); every long engine call runs inside ``_interruptible``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import PromptError, SAMSegmentError

log = logging.getLogger("samsegment")

AXES = {"0": 0, "1": 1, "2": 2, "k": 0, "j": 1, "i": 2}

EPILOG = """examples:
  samsegment demo --out demo_out
  samsegment segment ct.nii.gz --slice 22 --box 20 30 60 70 --out spleen_slice.nii.gz
  samsegment propagate ct.nii.gz --slice 22 --box 20 30 60 70 --out spleen.nii.gz --png spleen.png
  samsegment propagate ct.nii.gz --coords lps --box -120 -30 210 -60 10 210 --out spleen.nii.gz
  samsegment propagate dicom_folder --series-uid 1.2.840.1234 --slice 22 --box 20 30 60 70 --out spleen.nii.gz
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
    if text in (None, "", "auto"):
        return None
    if "," in text:
        try:
            low, high = (float(v) for v in text.split(","))
        except ValueError as exc:
            raise SAMSegmentError(f"Cannot read window {text!r}", "write it as LOW,HIGH, e.g. -160,240") from exc
        return (low, high)
    return text


def _read(args: argparse.Namespace):
    """(volume, geometry) of the command's image (the chosen series of a DICOM folder)."""
    from . import io as sio

    return sio.read_volume(args.image, series_uid=args.series_uid)


def _remote(session: Any) -> bool:
    """True for a session on a server: the engine's long functions then run there (same results)."""
    from .client import RemoteSession

    return isinstance(session, RemoteSession)


def _token(token_file: str | None) -> str | None:
    import os

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


def _progress(desc: str, position: int) -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    """(update, close) of a progress bar on stderr, drawn from the first update on (hidden when
    stderr is not a terminal); ``position`` keeps several bars of one command in a fixed order."""
    bars: list[Any] = []

    def update(done: int, total: int, message: str) -> None:
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=total, desc=desc, unit="slice", file=sys.stderr, leave=False, disable=None,
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


@contextlib.contextmanager
def _interruptible(*bars: str, interrupted: str = "") -> Iterator[tuple[Any, ...]]:
    """(one progress callback per name in ``bars``, ..., cancel token) for one long engine call;
    the bars are always closed. Ctrl-C first cancels the token, so the session's workers stop
    too, then goes on up to ``main`` as a KeyboardInterrupt that carries ``interrupted`` (the
    message to print; default: nothing was written)."""
    from .worker import CancelToken

    cancel = CancelToken()
    progress = [_progress(desc, position) for position, desc in enumerate(bars)]
    try:
        yield (*(update for update, _ in progress), cancel)
    except KeyboardInterrupt as exc:
        cancel.cancel()
        if interrupted:
            raise KeyboardInterrupt(interrupted) from exc
        raise
    finally:
        for _, close in progress:
            close()


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
    # physical LPS: convert to array (K, J, I) continuous indices, then to slice pixels
    groups = [("include", p) for p in args.point] + [("exclude", p) for p in args.exclude]
    for _, pt in groups:
        if len(pt) != 3:
            raise PromptError(f"An LPS point needs 3 numbers (x y z in mm), got {pt}", "write --point X Y Z")
    if args.box is not None and len(args.box) != 6:
        raise PromptError(f"An LPS box needs two corners (6 numbers), got {args.box}", "write --box X0 Y0 Z0 X1 Y1 Z1")
    physical = [pt for _, pt in groups] + ([args.box[:3], args.box[3:]] if args.box is not None else [])
    kji = np.array([geometry.physical_to_array_index(p) for p in physical])
    slice_pos = kji[:, axis]
    index = int(np.rint(np.median(slice_pos))) if args.slice is None else args.slice
    if np.abs(slice_pos - index).max() > 0.5 + 1e-6:
        raise PromptError(f"The LPS prompts lie on different slices along axis {axis} "
                          f"(positions {np.round(slice_pos, 2).tolist()})",
                          "give points on one slice, or choose another --axis")
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


def _write_outputs(args: argparse.Namespace, mask_kji: np.ndarray, geometry: Any, session: Any,
                   axis: int, indices: list[int]) -> None:
    from . import io as sio

    sio.write_mask(args.out, mask_kji.astype(np.uint8), geometry, overwrite=args.overwrite,
                   source_paths=[args.image] + ([args.anchor_mask] if getattr(args, "anchor_mask", None) else []))
    print(f"Mask written: {args.out}")
    _write_png(args, session, mask_kji, axis, indices, geometry)


def _write_png(args: argparse.Namespace, session: Any, mask_kji: np.ndarray, axis: int, indices: list[int],
               geometry: Any) -> None:
    from . import io as sio

    if args.png:
        sio.write_png_montage(args.png, session.slice_image, mask_kji, axis, indices, geometry,
                              overwrite=args.overwrite)
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
    with _session(args) as session:
        session.set_volume(volume, window=_window(args.window), modality=args.modality)
        ref, prompts = _slice_prompts(args, geometry, volume.shape)
        t0 = time.perf_counter()
        pred = session.predict(ref, prompts)
        log.info("slice %s segmented in %.2f s", ref, time.perf_counter() - t0)
        mask = np.zeros(volume.shape, dtype=np.uint8)
        set_slice(mask, ref, pred.mask)
        print(f"Slice {ref.index} (axis {'kji'[ref.axis]}): {pred.area} pixels, model score {pred.score:.3f}")
        _write_outputs(args, mask, geometry, session, ref.axis, [ref.index])
    return 0


def _rules(args: argparse.Namespace):
    from .propagation import StopRules

    rules = StopRules(max_slices=args.max_slices, index_range=tuple(args.range) if args.range else None)
    if args.min_iou is not None:
        rules.min_iou = args.min_iou
    if args.min_area is not None:
        rules.min_area_px = args.min_area
    if args.min_score is not None:
        rules.min_score = args.min_score
    return rules


def cmd_propagate(args: argparse.Namespace) -> int:
    from . import io as sio
    from .propagation import propagate

    volume, geometry = _read(args)
    axis = _axis(args.axis)
    with _session(args) as session:
        session.set_volume(volume, window=_window(args.window), modality=args.modality)
        if args.anchor_mask:
            given, _ = sio.read_volume(args.anchor_mask)
            if given.shape != volume.shape:
                raise PromptError(f"--anchor-mask has shape {given.shape}, the image {volume.shape}",
                                  "give a mask on the same voxel grid as the image")
            moved = np.moveaxis(given > 0, axis, 0)
            anchors = {int(i): moved[i] for i in range(moved.shape[0]) if moved[i].any()}
        else:
            ref, prompts = _slice_prompts(args, geometry, volume.shape)
            axis = ref.axis
            pred = session.predict(ref, prompts)
            print(f"Slice {ref.index} (axis {'kji'[axis]}): {pred.area} pixels, model score {pred.score:.3f}")
            anchors = {ref.index: pred.mask}
        t0 = time.perf_counter()
        run = session.propagate if _remote(session) else partial(propagate, session)
        with _interruptible("propagating") as (update, cancel):
            result = run(axis, anchors, direction=args.direction, rules=_rules(args), progress=update, cancel=cancel)
        elapsed = time.perf_counter() - t0
        for stop in result.stops:
            way = "up" if stop.direction > 0 else "down"
            print(f"  from slice {stop.anchor} {way}: stopped after slice {stop.last_index} ({stop.reason.value})")
        print(f"Propagated to {len(result.masks)} slice(s) in {elapsed:.1f} s")
        mask = result.to_volume(volume.shape, anchors)
        indices = sorted(set(anchors) | set(result.masks))
        _write_outputs(args, mask, geometry, session, axis, indices)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.serve import serve
    from .server.state import Limits

    limits = Limits(max_volume_voxels=args.max_volume_voxels, max_request_bytes=int(args.max_request_mib * 2**20))
    serve(args.host, args.port, token_file=args.token_file, no_auth=args.no_auth, ssl_certfile=args.ssl_certfile,
          ssl_keyfile=args.ssl_keyfile, device=None if args.device == "auto" else args.device, runtime=args.runtime,
          limits=limits, cache_bytes=int(args.cache_mib * 2**20), registry=args.registry, port_file=args.port_file)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .volume import SliceRef

    if not args.cache_dir:
        raise SAMSegmentError("embed needs --cache-dir", "give a folder to store the embeddings in")
    volume, _ = _read(args)
    axis = _axis(args.axis)
    with _session(args) as session:
        session.set_volume(volume, window=_window(args.window), modality=args.modality,
                           overwrite_disk_cache=args.overwrite)
        refs = [SliceRef(axis, i) for i in range(volume.shape[axis])]
        t0 = time.perf_counter()
        with _interruptible("encoding") as (update, cancel):
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
    return 0


def cmd_everything(args: argparse.Namespace) -> int:
    from . import io as sio
    from .automatic import everything_volume

    volume, geometry = _read(args)
    axis = _axis(args.axis)
    n = volume.shape[axis]
    if args.slice is not None:
        indices = [args.slice]
    elif args.range is not None:
        indices = list(range(max(0, args.range[0]), min(n - 1, args.range[1]) + 1))
    else:
        indices = list(range(n))
    if not indices or not all(0 <= i < n for i in indices):
        raise PromptError(f"No valid slice to process (axis {'kji'[axis]} has 0..{n - 1})", "check --slice/--range")
    if Path(args.out).exists() and not args.overwrite:  # fail before minutes of work, not after
        raise sio.ImageIOError(f"{args.out} already exists", "pass --overwrite or choose another name")
    params = _everything_params(args)
    with _session(args) as session:
        session.set_volume(volume, window=_window(args.window), modality=args.modality)
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

    inputs = find_inputs(args.input_dir)
    axis = _axis(args.axis)
    params = _everything_params(args)
    resume = "interrupted; finished cases are kept, run the same command again to resume"
    with _session(args) as session:
        with _interruptible("cases", "slices", interrupted=resume) as (cases_update, slices_update, cancel):
            summary = samaug_batch(inputs, args.out, session, axis, params, window=_window(args.window),
                                   modality=args.modality, redo=args.redo, progress=cases_update,
                                   slice_progress=slices_update, cancel=cancel)
    print(f"{len(summary.done)} case(s) written, {len(summary.skipped)} already finished (skipped), "
          f"{len(summary.failed)} failed, in {summary.seconds:.1f} s -> {args.out}")
    for case, why in summary.failed.items():
        print(f"  {case}: {why}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_uncertainty(args: argparse.Namespace) -> int:
    from . import io as sio
    from .uncertainty import prompt_uncertainty
    from .volume import set_slice

    volume, geometry = _read(args)
    for target in [args.out] + ([args.prob_out] if args.prob_out else []):
        if Path(target).exists() and not args.overwrite:
            raise sio.ImageIOError(f"{target} already exists", "pass --overwrite or choose another name")
    with _session(args) as session:
        session.set_volume(volume, window=_window(args.window), modality=args.modality)
        ref, prompts = _slice_prompts(args, geometry, volume.shape)
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
                "--anchor-mask) and propagate slice by slice.")
    p.add_argument("--anchor-mask", default=None,
                   help="mask file whose non-empty slices along --axis are accepted anchors (instead of prompts)")
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
    import warnings

    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
        return args.func(args)
    except SAMSegmentError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.remedy:
            print(f"  what to do: {exc.remedy}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(str(exc) or "interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory\n  what to do: lower --cache-mib, close other programs, or crop the image",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

"""Exported ONNX graphs on disk: signatures, export, verification, reuse and pruning.

A graph is exported from the loaded network on first use and kept in a cache folder. Each graph
lives in its own folder whose name carries a hash of its signature (model id, weights sha256,
torch and onnxruntime versions, opset, export format); the full signature is stored beside it,
with the sha256 of every file of the graph (``model.onnx`` and any external data files), and both
are compared on load. A graph whose signature or file hashes do not match (a damaged or replaced
file, even one that still parses), or that ONNX Runtime cannot open, is exported again, never used.
A fresh export is checked against eager PyTorch before it is kept.
Every failure raises; the caller (``SamBackend``) then runs that part in eager PyTorch.

Cache folder: the ``cache_dir`` argument, else ``$SAMSEGMENT_CACHE/onnx``, else
``$XDG_CACHE_HOME/samsegment/onnx``, else ``~/.cache/samsegment/onnx``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import SAMSegmentError
from .files import WriteError, atomic_write_text

log = logging.getLogger(__name__)

CACHE_ENV = "SAMSEGMENT_CACHE"
ONNX_OPSET = 17
# Bump whenever the exported graphs change (wrapper code, inputs, outputs): old files are then stale.
EXPORT_FORMAT = 3
MODEL_FILE = "model.onnx"
SIGNATURE_FILE = "signature.json"
FILES_KEY = "files"  # in a stored signature: {file name: sha256} of every file of the graph
# Exported graphs are checked against eager PyTorch once, on the export's own example input.
VERIFY_RTOL = 1e-3

_export_lock = threading.Lock()


@dataclass(frozen=True)
class GraphRecipe:
    """What to export: a module factory, its example inputs and the graph's interface."""

    build_module: Callable[[], Any]
    example_inputs: Sequence[Any]
    input_names: Sequence[str]
    output_names: Sequence[str]
    dynamic_axes: dict[str, dict[int, str]] | None = None
    check_inputs: Sequence[Sequence[Any]] = ()  # more inputs the exported graph must reproduce PyTorch on


@dataclass
class OnnxGraph:
    """One exported graph loaded in ONNX Runtime."""

    part: str
    path: Path
    signature: dict[str, Any]
    session: Any  # onnxruntime.InferenceSession
    exported: bool  # True when this process exported it, False when it came from the disk cache

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of the graph, in its output order, for ``feeds`` (input name -> array)."""
        return self.session.run(None, feeds)


def default_cache_dir() -> Path:
    """The cache folder used when the caller names none (see the module docstring)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "samsegment" / "onnx"


# ----------------------------------------------------------------------------- signatures
def weights_digest(weights_path: str | Path, cache_dir: str | Path, known_sha256: str | None = None) -> str:
    """sha256 of a checkpoint file, remembered per (path, size, mtime) in ``cache_dir``.

    Args:
        weights_path: the checkpoint file.
        cache_dir: where the memo file ``weights-sha256.json`` lives.
        known_sha256: a digest the caller already verified; returned as is.

    Returns:
        The hex digest; a large checkpoint is hashed once, not at every start.
    """
    if known_sha256:
        return known_sha256
    from .model_registry import sha256_of

    path = Path(weights_path).resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo_path = Path(cache_dir) / "weights-sha256.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path)) if isinstance(memo, dict) else None
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and entry.get("sha256"):
        return str(entry["sha256"])
    digest = sha256_of(path)
    memo = memo if isinstance(memo, dict) else {}
    memo[str(path)] = {**stamp, "sha256": digest}
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo, indent=1))
    except (OSError, WriteError) as exc:  # a read-only cache only costs a re-hash next time
        log.debug("could not remember the weights digest in %s: %s", memo_path, exc)
    return digest


def export_signature(model_id: str, architecture: str, image_size: int, part: str,
                     weights_sha256: str) -> dict[str, Any]:
    """Everything an exported graph depends on; a cached file is used only when all of it matches.

    Args:
        model_id: the registry id of the model.
        architecture: its architecture ("litemedsam", "vit_b", ...).
        image_size: the encoder's input size.
        part: "encoder", "features" or "decoder".
        weights_sha256: the checkpoint's digest (``weights_digest``).

    Returns:
        A JSON-serialisable dict, which also names the graph's folder (``artifact_dir``).
    """
    import onnxruntime
    import torch

    return {"format": EXPORT_FORMAT, "part": part, "model_id": model_id, "architecture": architecture,
            "image_size": int(image_size), "weights_sha256": weights_sha256, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": ONNX_OPSET, "exporter": "torchscript"}


def signature_hash(signature: dict[str, Any]) -> str:
    """A short stable hash of ``signature`` (16 hex digits); the file hashes a stored signature also
    holds (``FILES_KEY``) are not part of it."""
    core = {k: v for k, v in signature.items() if k != FILES_KEY}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def artifact_dir(cache_dir: str | Path, signature: dict[str, Any]) -> Path:
    """The folder of the graph with ``signature`` under ``cache_dir``: ``<model>-<part>-<hash>``."""
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", str(signature["model_id"]))
    return Path(cache_dir) / f"{safe_id}-{signature['part']}-{signature_hash(signature)}"


# ----------------------------------------------------------------------------- ONNX Runtime sessions
def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options: ``threads`` intra-op threads (default: as many as torch uses),
    sequential execution, all graph optimisations, no busy-waiting between runs."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool threads otherwise spin after each run and take the CPU from the torch ops that
    # follow on a small machine, without making ORT itself faster.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return opts


def _open_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"])


def _read_signature(folder: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((folder / SIGNATURE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _signature_core(found: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored signature without its file hashes (what ``export_signature`` returns)."""
    return None if found is None else {k: v for k, v in found.items() if k != FILES_KEY}


def _graph_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of the graph in ``folder`` (all but the signature file)."""
    from .model_registry import sha256_of

    return {f.name: sha256_of(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != SIGNATURE_FILE}


def _files_problem(folder: Path, found: dict[str, Any]) -> str | None:
    """Why the graph files in ``folder`` are not the ones its stored signature ``found`` records, or None."""
    from .model_registry import sha256_of

    recorded = found.get(FILES_KEY)
    if not isinstance(recorded, dict) or MODEL_FILE not in recorded:
        return "no file hashes recorded (made by an older version)"
    for name, digest in recorded.items():
        path = folder / str(name)
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != digest:
            return f"{name} does not match its recorded sha256 (damaged or replaced)"
    return None


# ----------------------------------------------------------------------------- load or export
def load_or_export(part: str, signature: dict[str, Any], cache_dir: str | Path, recipe: GraphRecipe) -> OnnxGraph:
    """The cached graph for ``signature`` if it is valid, otherwise a fresh, verified export.

    Args:
        part: "encoder", "features" or "decoder" (for messages and ``OnnxGraph.part``).
        signature: from ``export_signature``.
        cache_dir: the cache folder.
        recipe: what to export; a fresh export must reproduce eager PyTorch on the recipe's example
            and check inputs.

    Returns:
        The loaded graph; ``exported`` says whether this call exported it.

    Raises:
        Exception: whatever the export, the verification or ONNX Runtime raised; nothing half
            written is left in ``cache_dir``.
    """
    folder = artifact_dir(cache_dir, signature)
    with _export_lock:
        if folder.exists():
            found = _read_signature(folder)
            problem = _files_problem(folder, found) if found is not None and _signature_core(found) == signature else None
            if problem:
                log.warning("Cached ONNX graph %s is not used: %s; exporting it again", folder, problem)
            elif _signature_core(found) == signature:
                try:
                    graph = OnnxGraph(part, folder / MODEL_FILE, signature, _open_session(folder / MODEL_FILE), False)
                    log.info("%s %s: using cached ONNX graph %s", signature["model_id"], part, folder)
                    return graph
                except Exception as exc:  # noqa: BLE001 - a truncated or corrupted file is exported again
                    log.warning("Cached ONNX graph %s cannot be opened (%s); exporting it again", folder,
                                str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
            else:
                differs = sorted(k for k in signature if (found or {}).get(k) != signature[k])
                log.warning("Cached ONNX graph %s has a different signature (%s); exporting it again", folder,
                            ", ".join(differs) if found else "signature missing or unreadable")
            shutil.rmtree(folder, ignore_errors=True)
        return _export(part, signature, folder, recipe)


def _export(part: str, signature: dict[str, Any], folder: Path, recipe: GraphRecipe) -> OnnxGraph:
    import warnings

    import torch

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        module = recipe.build_module()
        log.info("exporting the %s of %s to ONNX (once; cached in %s)", part, signature["model_id"], folder)
        traced: list[Any] = []  # the tracer's own forward pass is the reference for the example input
        hook = module.register_forward_hook(lambda _m, _i, out: traced.append(out))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
                # The TorchScript exporter handles these models as they are; models over 2 GB (ViT-H)
                # get their weights written as external data files beside model.onnx.
                torch.onnx.export(module, tuple(recipe.example_inputs), str(tmp / MODEL_FILE),
                                  input_names=list(recipe.input_names), output_names=list(recipe.output_names),
                                  dynamic_axes=recipe.dynamic_axes or {}, opset_version=ONNX_OPSET,
                                  do_constant_folding=True, dynamo=False)
        finally:
            hook.remove()
        session = _open_session(tmp / MODEL_FILE)
        _verify(part, module, session, recipe.example_inputs, recipe, traced[0] if traced else None)
        for inputs in recipe.check_inputs:
            _verify(part, module, session, inputs, recipe)
        del session  # closed before the folder is renamed (Windows cannot rename open or mapped files)
        for f in tmp.iterdir():  # on disk before the signature vouches for them
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
        # the verified files' hashes: a graph changed later, even one that still parses, is never used
        stored = {**signature, FILES_KEY: _graph_files(tmp)}
        atomic_write_text(tmp / SIGNATURE_FILE, json.dumps(stored, indent=1, sort_keys=True), what="the ONNX signature")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same export first: use its copy if valid
            found = _read_signature(folder)
            if _signature_core(found) != signature or _files_problem(folder, found):
                raise
        _prune_stale(folder, signature)
        return OnnxGraph(part, folder / MODEL_FILE, signature, _open_session(folder / MODEL_FILE), True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _verify(part: str, module: Any, session: Any, inputs: Sequence[Any], recipe: GraphRecipe,
            expected: Any = None) -> None:
    """Raise unless the ORT session reproduces the PyTorch module (or its ``expected`` outputs) on ``inputs``."""
    import torch

    if expected is None:
        with torch.inference_mode():
            expected = module(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    got = session.run(None, {name: _to_numpy(x) for name, x in zip(recipe.input_names, inputs)})
    for name, want, have in zip(recipe.output_names, expected, got):
        want = _to_numpy(want)
        if want.shape != have.shape:
            raise SAMSegmentError(f"the exported {part} graph's {name} has shape {have.shape}, PyTorch {want.shape}")
        err = float(np.max(np.abs(want - have))) if want.size else 0.0
        tol = VERIFY_RTOL * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
        if not np.isfinite(err) or err > tol:
            raise SAMSegmentError(f"the exported {part} graph's {name} differs from PyTorch by {err:.3g} "
                                  f"(tolerance {tol:.3g})")


def _prune_stale(folder: Path, signature: dict[str, Any]) -> None:
    """Delete graphs of the same model, part and weights made by other versions (they can never match again)."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    for other in folder.parent.glob(prefix + "*"):
        if other == folder or not other.is_dir() or other.name.startswith("."):
            continue
        found = _read_signature(other) or {}
        if all(found.get(k) == signature[k] for k in ("model_id", "part", "weights_sha256")):
            shutil.rmtree(other, ignore_errors=True)


def prune_oldest(cache_dir: str | Path, keep: int) -> None:
    """Keep only the ``keep`` most recently written or used graph folders directly under ``cache_dir``
    (adapted decoders' graphs: one set per adapter, which would otherwise pile up)."""
    folders = [f for f in Path(cache_dir).iterdir() if f.is_dir() and not f.name.startswith(".")]
    folders.sort(key=lambda f: f.stat().st_mtime_ns, reverse=True)
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().to("cpu").contiguous().numpy()
    return np.ascontiguousarray(x)

"""Per-slice image embeddings, kept in memory under a byte budget and optionally on disk.

Encoding is ~98 % of the cost of a prompt on CPU, so every embedding is kept as long as the
budget allows. Stored in fp16: half the memory, and the decoded masks agree with fp32 to
IoU 0.9999. The disk tier lets ``samsegment embed`` precompute a volume once; each file carries
the volume signature and preprocessing key, so a cache built for another image or another
window is refused rather than silently producing wrong masks, and a sha256 of its content, so a
damaged file is encoded again rather than used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MemoryBudgetError, SAMSegmentError
from .files import WriteError, atomic_path, atomic_write_text, free_space_note, make_folder, write_error

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 1 << 30
DISK_FORMAT = 1


class CacheMismatchError(SAMSegmentError):
    """An on-disk cache belongs to another volume, model or window."""


@dataclass(frozen=True)
class CacheKey:
    """Names one slice's embedding: the volume's content, the slice, the model and the preprocessing."""

    volume_signature: str
    axis: int
    index: int
    model_id: str
    preprocessing: str

    def filename(self) -> str:
        """The embedding's file name in a disk tier (which holds one volume, model and preprocessing).

        Returns:
            ``axis<axis>_<index>.pt``, the index zero-padded to 5 digits.
        """
        return f"axis{self.axis}_{self.index:05d}.pt"


@dataclass
class CacheStats:
    """Counters of an ``EmbeddingCache`` (hits and misses count ``get`` calls)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    disk_hits: int = 0
    disk_writes: int = 0
    entries: int = 0
    bytes: int = 0
    budget_bytes: int = 0


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


class EmbeddingCache:
    """Thread-safe LRU of fp16 embeddings with a byte budget and an optional disk tier."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, disk_dir: str | Path | None = None,
                 store_dtype: str = "float16") -> None:
        if budget_bytes <= 0:
            raise MemoryBudgetError(f"Embedding cache budget must be positive, got {budget_bytes} bytes",
                                    "give a budget of at least a few MiB (one LiteMedSAM embedding is 2 MiB)")
        self.budget_bytes = int(budget_bytes)
        self.store_dtype = store_dtype
        self._entries: OrderedDict[CacheKey, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats(budget_bytes=self.budget_bytes)
        self.disk: DiskTier | None = DiskTier(disk_dir) if disk_dir is not None else None

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            if key in self._entries:
                return True
        return self.disk is not None and self.disk.has(key)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        """Bytes held in memory (the disk tier is not counted)."""
        return self._bytes

    def cached_indices(self, volume_signature: str, axis: int) -> list[int]:
        """The slice indices held in memory for one volume and axis.

        Args:
            volume_signature: the volume's ``volume_signature``.
            axis: the slice axis.

        Returns:
            The indices, sorted (any model or preprocessing).
        """
        with self._lock:
            return sorted(k.index for k in self._entries if k.volume_signature == volume_signature and k.axis == axis)

    # ------------------------------------------------------------------ get / put
    def get(self, key: CacheKey):
        """The embedding stored under ``key``, from memory or else the disk tier.

        Args:
            key: the slice's key.

        Returns:
            The embedding as a float32 CPU tensor, or None. A hit refreshes the entry's LRU
            position; a disk hit is loaded into memory.
        """
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return tensor.float()
        if self.disk is not None:
            tensor = self.disk.load(key)
            if tensor is not None:
                with self._lock:
                    self.stats.disk_hits += 1
                self._insert(key, tensor)
                return tensor.float()
        with self._lock:
            self.stats.misses += 1
        return None

    def as_stored(self, embedding: Any):
        """``embedding`` as the cache holds it: ``store_dtype``, on the CPU, contiguous. A session
        decodes from this rounding on a miss too, so a mask never depends on who encoded first."""
        import torch

        return embedding.detach().to("cpu", getattr(torch, self.store_dtype)).contiguous()

    def put(self, key: CacheKey, embedding: Any) -> None:
        """Store ``embedding`` under ``key`` (as ``store_dtype`` on CPU), evicting the least recently used.

        Args:
            key: the slice's key.
            embedding: a torch tensor; also written to the disk tier if there is one and it is
                bound to the key's volume, model and preprocessing.

        Raises:
            MemoryBudgetError: the budget cannot hold even this one embedding.
        """
        stored = self.as_stored(embedding)
        if _nbytes(stored) > self.budget_bytes:
            raise MemoryBudgetError(
                f"Embedding cache budget of {self.budget_bytes / 2**20:.1f} MiB cannot hold one embedding of "
                f"{_nbytes(stored) / 2**20:.1f} MiB", "raise the cache budget (--cache-mib) to at least a few embeddings")
        self._insert(key, stored)
        if self.disk is not None:
            self.disk.save(key, stored)
            with self._lock:
                self.stats.disk_writes += 1

    def _insert(self, key: CacheKey, stored: Any) -> None:
        size = _nbytes(stored)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            while self._entries and self._bytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)
                self.stats.evictions += 1
            self._entries[key] = stored
            self._bytes += size
            self.stats.entries = len(self._entries)
            self.stats.bytes = self._bytes

    def clear(self) -> None:
        """Drop every embedding held in memory (the disk tier keeps its files)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.stats.entries = 0
            self.stats.bytes = 0


_FILE_NAME = re.compile(r"axis[0-2]_[0-9]{5}\.pt")
_IDENTITY_KEYS = ("format", "volume_signature", "model_id", "preprocessing")


def embedding_digest(meta: dict[str, Any], tensor: Any) -> str:
    """sha256 of an embedding record: its meta (key), dtype, shape and tensor bytes.

    Stored in each disk-tier file and checked on load, so a flipped bit, a spliced tensor or another
    slice's tensor under this slice's meta is detected (``torch.load`` checks none of that).
    """
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8"))
    digest.update(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _is_cache_manifest(found: Any) -> bool:
    """Whether ``found`` (a parsed manifest.json) is the manifest of an embedding cache (any version)."""
    return isinstance(found, dict) and set(found) == set(_IDENTITY_KEYS) and isinstance(found.get("format"), int)


class DiskTier:
    """A folder of embeddings for ONE volume + model + preprocessing, described by ``manifest.json``.

    Each file holds the embedding, its key (``meta``) and a sha256 of both; a file that is unreadable,
    carries another key or fails its hash is not used: the slice is encoded again and the file
    rewritten. Writes are atomic and read back before they replace anything.
    """

    MANIFEST = "manifest.json"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self._identity: dict[str, Any] | None = None
        # bind (the caller's thread) vs save (the worker): a save checked against the old
        # identity never lands in a folder that bind has meanwhile handed to another volume
        self._lock = threading.Lock()
        self.rejected = 0  # files found damaged or foreign by load (each then re-encoded)
        self._bad: dict[str, tuple[int, int]] = {}  # file name -> (size, mtime) of a file found bad

    def bind(self, volume_signature: str, model_id: str, preprocessing: str, overwrite: bool = False) -> None:
        """Attach to the volume about to be used; refuse a folder that belongs to something else.

        Args:
            volume_signature, model_id, preprocessing: what every embedding in the folder must
                belong to (``CacheKey``'s fields).
            overwrite: rebuild a cache built for something else instead of refusing it. Only files
                provably written by such a cache are deleted (``axisA_NNNNN.pt`` files whose own
                record carries that cache's key); a folder that is not an embedding cache is never
                emptied.

        Raises:
            CacheMismatchError: the folder belongs to another volume, model or preprocessing (and
                not ``overwrite``), it is not an embedding cache (a manifest that is not ours, other
                files), its manifest is corrupt, or the path is a file.
            WriteError: the folder or its manifest cannot be written (read-only, no permission, full).
        """
        with self._lock:
            self._bind(volume_signature, model_id, preprocessing, overwrite)

    @classmethod
    def check_folder(cls, root: str | Path) -> dict[str, Any] | None:
        """Refuse a folder that can never be an embedding cache, whatever the volume (the CLI asks
        before it loads the model): a file, an unreadable manifest or one that is not ours, a
        non-empty folder without a manifest. Returns the cache's manifest, or None (new or empty).

        Raises:
            CacheMismatchError: as for ``bind``.
        """
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise CacheMismatchError(f"The cache folder {root} is a file, not a folder",
                                     "give --cache-dir a folder (new or empty, or one made by 'samsegment embed')")
        manifest = root / cls.MANIFEST
        if not manifest.exists():
            if root.exists() and any(root.iterdir()):
                raise CacheMismatchError(f"Cache folder {root} is not empty and is not an embedding cache",
                                         "choose an empty or new folder for --cache-dir")
            return None
        try:
            found = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise CacheMismatchError(f"Embedding cache manifest {manifest} is unreadable or corrupt",
                                     "delete the cache folder and run 'samsegment embed' again") from exc
        if not _is_cache_manifest(found):
            raise CacheMismatchError(
                f"Cache folder {root} holds a manifest.json that is not an embedding cache's; the folder is "
                "left as it is (also with --overwrite)", "choose an empty or new folder for --cache-dir")
        return found

    def _bind(self, volume_signature: str, model_id: str, preprocessing: str, overwrite: bool) -> None:
        identity = {"format": DISK_FORMAT, "volume_signature": volume_signature, "model_id": model_id,
                    "preprocessing": preprocessing}
        manifest = self.root / self.MANIFEST
        found = self.check_folder(self.root)
        if found is not None:
            if found != identity and not overwrite:
                differs = [k for k in identity if found.get(k) != identity[k]]
                raise CacheMismatchError(
                    f"Embedding cache {self.root} was built for a different {' / '.join(differs)} "
                    f"(cache: {', '.join(f'{k}={found.get(k)}' for k in differs)})",
                    "use another --cache-dir for this image/model/window, rebuild it with 'samsegment embed "
                    "--overwrite', or delete this folder")
            if found != identity:
                self._remove_own_files(found)
        make_folder(self.root, "the embedding cache folder")
        atomic_write_text(manifest, json.dumps(identity, indent=1), what="the embedding cache manifest")
        self._identity = identity

    def _remove_own_files(self, found: dict[str, Any]) -> None:
        """Delete the embeddings of the cache described by ``found``: only files named as this tier
        names them whose own record carries that cache's volume, model and preprocessing."""
        import torch

        for f in self.root.iterdir():
            if not _FILE_NAME.fullmatch(f.name) or not f.is_file():
                continue
            try:
                record = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                meta = record.get("meta") if isinstance(record, dict) else None
            except Exception:  # noqa: BLE001 - not provably ours: left alone
                continue
            if isinstance(meta, dict) and all(meta.get(k) == found[k] for k in _IDENTITY_KEYS[1:]):
                try:
                    f.unlink()
                except OSError as exc:
                    raise write_error(f, exc, "the old cached embedding") from exc

    def _holds(self, key: CacheKey) -> bool:
        """Whether the folder is bound to ``key``'s volume, model and preprocessing (False when unbound)."""
        ident = self._identity
        return ident is not None and (ident["volume_signature"], ident["model_id"], ident["preprocessing"]) == (
            key.volume_signature, key.model_id, key.preprocessing)

    def has(self, key: CacheKey) -> bool:
        """Whether the folder holds the embedding of ``key``.

        Args:
            key: the slice's key.

        Returns:
            True when the folder is bound to the key's volume, model and preprocessing and has its file
            (its content is checked by ``load``).
        """
        return self._holds(key) and (self.root / key.filename()).exists()

    @staticmethod
    def _meta(key: CacheKey) -> dict[str, Any]:
        return {"volume_signature": key.volume_signature, "model_id": key.model_id,
                "preprocessing": key.preprocessing, "axis": key.axis, "index": key.index}

    def _problem(self, record: Any, key: CacheKey) -> str | None:
        """What is wrong with a loaded record for ``key``, or None when it is intact and ``key``'s."""
        import torch

        if not isinstance(record, dict) or not isinstance(record.get("embedding"), torch.Tensor):
            return "it is not an embedding record"
        meta, expected = record.get("meta"), self._meta(key)
        if meta != expected:
            if isinstance(meta, dict) and all(meta.get(k) == expected[k] for k in _IDENTITY_KEYS[1:]):
                return f"it holds the embedding of slice {meta.get('index')} along axis {meta.get('axis')}"
            return "it holds an embedding of another volume, model or window"
        if not isinstance(record.get("sha256"), str):
            return "it has no content hash (written by an older version)"
        if embedding_digest(meta, record["embedding"]) != record["sha256"]:
            return "its content does not match its hash (damaged)"
        return None

    def load(self, key: CacheKey):
        """The stored embedding of ``key``, if its file is intact.

        Args:
            key: the slice's key.

        Returns:
            The tensor as stored (fp16), or None when the folder is not bound to the key's volume,
            model and preprocessing, has no file for it, or the file is unreadable, carries another
            key or fails its hash (logged; the caller then encodes the slice again and ``save``
            replaces the file).
        """
        import torch

        if not self._holds(key):
            return None
        path = self.root / key.filename()
        try:
            stat = path.stat()
        except OSError:
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        if self._bad.get(path.name) == stamp:  # already found bad (and said so); not rewritten since
            return None
        try:
            record = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, damaged, not a torch file: encoded again
            problem = f"it cannot be read ({exc.__class__.__name__})"
        else:
            problem = self._problem(record, key)
        if problem is None:
            return record["embedding"]
        self.rejected += 1
        self._bad[path.name] = stamp
        log.warning("Cached embedding %s is not used: %s; encoding that slice again", path, problem)
        return None

    def save(self, key: CacheKey, tensor: Any) -> None:
        """Write ``tensor`` as the embedding of ``key`` (atomically, read back before it replaces the
        old file), if the folder is bound to the key's volume, model and preprocessing; otherwise do
        nothing.

        Args:
            key: the slice's key.
            tensor: the embedding as it is to be stored.

        Raises:
            WriteError: the file cannot be written (full disk, read-only, no permission); nothing is
                left behind and an older file of the slice is kept.
        """
        import torch

        meta = self._meta(key)
        path = self.root / key.filename()
        record = {"meta": meta, "embedding": tensor, "sha256": embedding_digest(meta, tensor)}

        def verify(tmp: Path) -> None:
            try:
                problem = self._problem(torch.load(str(tmp), map_location="cpu", weights_only=True), key)
            except Exception as exc:  # noqa: BLE001
                problem = f"it cannot be read back ({exc.__class__.__name__})"
            if problem:
                raise WriteError(f"Cannot write the cached embedding {path}: the written copy is incomplete "
                                 f"({problem}){free_space_note(self.root)}",
                                 "free some space on the disk, or use another --cache-dir")

        with self._lock:
            if not self._holds(key):
                return
            with atomic_path(path, shareable=True, verify=verify, what="the cached embedding") as tmp:
                try:
                    torch.save(record, str(tmp))
                except RuntimeError as exc:  # torch's zip writer reports a full disk as an "enforce fail"
                    full = shutil.disk_usage(self.root).free < _nbytes(tensor) + (1 << 16)
                    cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full else exc
                    raise write_error(path, cause, "the cached embedding") from exc

"""Adapt the mask decoder to one structure of one scan, from the slices the user accepted.

The Medical SAM Adapter idea, sized for a laptop: the image encoder stays frozen (the cached
embeddings stay valid and no encoder backward pass is needed), and the mask decoder's transformer,
mask tokens, output upscaling and hypernetwork heads are fine-tuned on the accepted masks with
prompt augmentation (boxes with jittered sides and padding, as propagation draws them; optionally
with an include and an exclude click, as a user refines a mask, ``AdaptSettings.click_prompts``). The prompt
encoder and the IoU head are not trained.

A held-back check decides whether the adapted weights are kept: with two or more accepted slices
the middle one (in slice order) is left out of the first training phase and both models decode it
from the boxes propagation would draw; with one slice, its mirror image (encoded once; the model
never saw it) is the held-back view. Only when the adapted decoder does better there is it kept
and trained a few more steps on every accepted slice. So adaptation never does worse than the
stock model on the user's own evidence.

``DecoderAdapter`` holds the trained tensors, tied to the model they were trained from (model id
and weights sha256). It is saved as a signed file: a JSON header and raw float32 tensors, never
pickled, with an HMAC-SHA256 over both made with a key that stays on the machine (or the site's
key, see ``signing_key``). ``SegmentationSession.adapt`` / ``use_adapter`` put one in use;
``SamBackend.decode_batch(adapter=...)`` decodes through it (with ONNX graphs of its own where the
decoder runs in ONNX Runtime, ``SamBackend.prepare_adapter``; else in PyTorch).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CheckpointError, SAMSegmentError
from .metrics import dice
from .preprocessing import SliceGeometry, clip_box, mask_bbox
from .volume import SliceRef
from .worker import PRIORITY_PROPAGATION, CancelToken, ProgressCallback

if TYPE_CHECKING:
    from .backends import SamBackend
    from .session import SegmentationSession

log = logging.getLogger(__name__)

# The mask decoder's parameters that are trained (and saved): everything that shapes the mask.
TRAINED_PREFIXES = ("transformer.", "output_upscaling.", "output_hypernetworks_mlps.", "mask_tokens.")
MAGIC = b"SAMSEGMENT-ADAPTER\n"
FORMAT_VERSION = 1
HEADER_LIMIT = 1 << 20  # bytes of JSON header a file may announce
KEY_ENV = "SAMSEGMENT_ADAPTER_KEY"
# Paddings (px) of the held-back boxes: propagation's tight and loose boxes.
CHECK_PADDINGS = (2.0, 3.0)
CHECK_JITTERED = 2  # plus this many jittered boxes (fixed seed)


@dataclass(frozen=True)
class AdaptSettings:
    """How adaptation trains.

    ``check_steps`` optimiser steps on the training slices come before the held-back check;
    ``final_steps`` more on every accepted slice follow when the adapted decoder is kept. Each step
    decodes ``prompts_per_slice`` augmented boxes on each slice (with ``click_prompts``, all but one
    with two clicks; one forward and backward pass each). ``min_gain``: how much the held-back Dice must
    improve for the adapted decoder to be kept; ``mirror_min_gain`` replaces it with one accepted
    slice, whose mirror image is weaker evidence than another slice (a near tie there came with
    losses elsewhere in the volume).
    """

    check_steps: int = 10
    final_steps: int = 8
    prompts_per_slice: int = 2
    learning_rate: float = 3e-4
    min_gain: float = 0.0
    mirror_min_gain: float = 0.01
    seed: int = 0
    # Train on boxes with clicks too (``augmented_points``): off, as measured in bench/adapt.py (with
    # one accepted slice it let a harmful adapter through the mirrored check: README).
    click_prompts: bool = False

    def check(self) -> None:
        """Raise ``SAMSegmentError`` naming the first setting out of range."""
        for name, low, high in (("check_steps", 1, 1000), ("final_steps", 0, 1000), ("prompts_per_slice", 1, 64)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise SAMSegmentError(f"Adaptation setting {name}={value!r} is not a whole number from {low} to {high}",
                                      f"give {name} between {low} and {high}")
        if not (isinstance(self.learning_rate, (int, float)) and np.isfinite(self.learning_rate)
                and 0.0 < self.learning_rate <= 0.1):
            raise SAMSegmentError(f"Adaptation learning rate {self.learning_rate!r} is not in (0, 0.1]",
                                  "give e.g. 3e-4")
        if not isinstance(self.click_prompts, bool):
            raise SAMSegmentError(f"Adaptation setting click_prompts={self.click_prompts!r} is not true or false",
                                  "give click_prompts as true or false")
        for name in ("min_gain", "mirror_min_gain"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and -1.0 <= value <= 1.0):
                raise SAMSegmentError(f"Adaptation {name} {value!r} is not a Dice difference in [-1, 1]",
                                      "give e.g. 0 (keep only what does better on the held-back slice)")


@dataclass(frozen=True)
class AdaptationReport:
    """What an adaptation did and what the held-back check found."""

    kept: bool
    axis: int
    slices: tuple[int, ...]  # the accepted slices used
    held_back: str  # "slice 12", or "slice 12 mirrored" with one accepted slice
    held_back_dice_stock: float
    held_back_dice_adapted: float
    steps: int  # optimiser steps run
    seconds: float  # wall time of the whole adaptation
    seconds_per_step: float
    prompts_per_step: int  # forward + backward passes per step
    structure: str | None = None

    def summary(self) -> str:
        """One line for the user: "kept: Dice on held-back slice 12 0.71 -> 0.84" or "not kept: ..."."""
        what = f"Dice on held-back {self.held_back} {self.held_back_dice_stock:.2f} -> {self.held_back_dice_adapted:.2f}"
        return f"kept: {what}" if self.kept else f"not kept: {what} (the stock model stays)"

    def as_json(self) -> dict[str, Any]:
        """The report as plain JSON values."""
        out = asdict(self)
        out["slices"] = list(self.slices)
        out["summary"] = self.summary()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AdaptationReport:
        """The report from ``as_json`` (the server's answer); unknown keys are ignored."""
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in names}
        values["slices"] = tuple(int(i) for i in values.get("slices", ()))
        return cls(**values)


@dataclass
class DecoderAdapter:
    """Trained mask-decoder tensors for one structure, tied to the model they were trained from.

    ``tensors``: parameter name (in the mask decoder, see ``TRAINED_PREFIXES``) -> float32 array.
    """

    model_id: str
    model_sha256: str
    tensors: dict[str, np.ndarray]
    structure: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    _modules: dict[int, tuple[Any, Any]] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _digest: str = field(default="", repr=False, compare=False)

    @property
    def digest(self) -> str:
        """sha256 of the model's weights digest and the tensors: names this adapter's decoder (its
        ONNX graphs are cached under it)."""
        if not self._digest:
            h = hashlib.sha256(self.model_sha256.encode("ascii"))
            for name in sorted(self.tensors):
                arr = np.ascontiguousarray(self.tensors[name], dtype="<f4")
                h.update(name.encode("utf-8"))
                h.update(str(arr.shape).encode("ascii"))
                h.update(arr.tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def matches(self, backend: SamBackend) -> bool:
        """Whether this adapter was trained from ``backend``'s model (id and weights)."""
        return self.model_id == backend.spec.id and self.model_sha256 == backend.model_sha256

    def check_model(self, backend: SamBackend) -> None:
        """Raise ``CheckpointError`` unless this adapter belongs to ``backend``'s model."""
        if self.model_id != backend.spec.id:
            raise CheckpointError(f"This adapter was trained for model {self.model_id!r}, not {backend.spec.id!r}",
                                  f"use it with --model {self.model_id}, or adapt again with this model")
        if self.model_sha256 != backend.model_sha256:
            raise CheckpointError(f"This adapter was trained from other {self.model_id} weights "
                                  f"(sha256 {self.model_sha256[:12]}..., loaded: {backend.model_sha256[:12]}...)",
                                  "use the checkpoint it was trained with, or adapt again")

    def modules(self, backend: SamBackend) -> tuple[Any, Any]:
        """(prompt encoder, mask decoder) to decode with: the backend's, the decoder a copy with
        this adapter's tensors, built once per backend and kept."""
        key = id(backend)
        with self._lock:
            found = self._modules.get(key)
            if found is None:
                self.check_model(backend)
                decoder = copy.deepcopy(backend.net.mask_decoder)
                load_trained(decoder, self.tensors)
                decoder.eval().requires_grad_(False)
                found = (backend.net.prompt_encoder, decoder)
                self._modules[key] = found
            return found

    # ------------------------------------------------------------------ signed file
    def to_bytes(self, key: bytes) -> bytes:
        """The signed file's content (see the module docstring)."""
        names = sorted(self.tensors)
        entries, offset, blobs = [], 0, []
        for name in names:
            arr = np.ascontiguousarray(self.tensors[name], dtype="<f4")
            blob = arr.tobytes()
            entries.append({"name": name, "shape": list(arr.shape), "offset": offset, "nbytes": len(blob)})
            offset += len(blob)
            blobs.append(blob)
        payload = b"".join(blobs)
        header = {"format": FORMAT_VERSION, "model_id": self.model_id, "model_sha256": self.model_sha256,
                  "structure": self.structure, "report": self.report, "dtype": "float32", "tensors": entries,
                  "payload_sha256": hashlib.sha256(payload).hexdigest()}
        body = _canonical(header)
        header["signature"] = hmac.new(key, body, hashlib.sha256).hexdigest()
        raw = _canonical(header)
        return MAGIC + len(raw).to_bytes(8, "little") + raw + payload

    @classmethod
    def from_bytes(cls, data: bytes, key: bytes, source: str = "the adapter") -> DecoderAdapter:
        """Read and verify a signed adapter (never unpickles anything).

        Args:
            data: the file's content.
            key: the signing key (``signing_key``).
            source: what ``data`` is, for messages (a file name).

        Returns:
            The adapter; check it against the model with ``check_model`` (sessions do).

        Raises:
            CheckpointError: not an adapter file, damaged, or not signed with ``key``.
        """
        def bad(problem: str, remedy: str = "save the adapter again from the session that trained it") -> CheckpointError:
            return CheckpointError(f"{source} {problem}", remedy)

        data = bytes(data)
        if not data.startswith(MAGIC):
            raise bad("is not a SAMSegment adapter file", "give a file written by --save-adapter or the module's Save")
        start = len(MAGIC) + 8
        if len(data) < start:
            raise bad("is cut short (no header)")
        size = int.from_bytes(data[len(MAGIC):start], "little")
        if size > HEADER_LIMIT or start + size > len(data):
            raise bad("is cut short or damaged (its header length does not fit the file)")
        try:
            header = json.loads(data[start:start + size].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"has a damaged header ({exc.__class__.__name__})") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            raise bad(f"has format {header.get('format') if isinstance(header, dict) else '?'!r}; this version reads "
                      f"format {FORMAT_VERSION}", "update SAMSegment, or adapt again")
        signature = header.pop("signature", None)
        payload = data[start + size:]
        expected = hmac.new(key, _canonical(header), hashlib.sha256).hexdigest()
        if not isinstance(signature, str) or not hmac.compare_digest(signature, expected):
            raise bad("is not signed with this machine's adapter key (changed, or made elsewhere)",
                      f"use the site's key (${KEY_ENV} = its path) that signed it, or adapt again here")
        if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
            raise bad("has tensors that do not match its signed digest (damaged)")
        tensors: dict[str, np.ndarray] = {}
        try:
            for entry in header["tensors"]:
                name, shape = str(entry["name"]), tuple(int(v) for v in entry["shape"])
                offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
                if not name.startswith(TRAINED_PREFIXES) or nbytes != 4 * int(np.prod(shape)) \
                        or offset < 0 or offset + nbytes > len(payload):
                    raise bad(f"lists a tensor {name!r} that does not fit")
                tensors[name] = np.frombuffer(payload, "<f4", count=nbytes // 4, offset=offset).reshape(shape).copy()
            adapter = cls(str(header["model_id"]), str(header["model_sha256"]), tensors,
                          header.get("structure"), dict(header.get("report") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"has a header without the expected fields ({exc.__class__.__name__}: {exc})") from exc
        return adapter

    def save(self, path: str | Path, key: bytes | None = None) -> Path:
        """Write the signed file atomically (an existing file at ``path`` is replaced only when the
        new one is complete). ``key``: the signing key (None: ``signing_key()``)."""
        from .files import atomic_write_bytes

        path = Path(path).expanduser()
        atomic_write_bytes(path, self.to_bytes(key if key is not None else signing_key()), "the adapter")
        return path

    @classmethod
    def load(cls, path: str | Path, key: bytes | None = None) -> DecoderAdapter:
        """Read and verify a signed adapter file (``from_bytes``); ``key`` None: ``signing_key()``."""
        path = Path(path).expanduser()
        return cls.from_bytes(read_adapter_file(path), key if key is not None else signing_key(), f"Adapter file {path}")


def read_adapter_file(path: str | Path) -> bytes:
    """The bytes of an adapter file, after checking that it exists, is readable and starts like one
    (not yet verified: ``DecoderAdapter.from_bytes`` does that, or the server with its key).

    Raises:
        CheckpointError: no such file, unreadable, or not an adapter file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Adapter file {path} not found",
                              "give the path of a file saved with --save-adapter or the module's Save adapter")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"Cannot read adapter file {path}: {exc.strerror or exc}",
                              "check the path and its permissions") from exc
    if not data.startswith(MAGIC):
        raise CheckpointError(f"Adapter file {path} is not a SAMSegment adapter file",
                              "give a file written by --save-adapter or the module's Save adapter")
    return data


def _canonical(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def default_key_path() -> Path:
    """Where this user's adapter signing key lives: ``$SAMSEGMENT_ADAPTER_KEY``, else
    ``$XDG_CONFIG_HOME/samsegment/adapter-signing.key`` (``~/.config`` by default)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".config") / "samsegment" / "adapter-signing.key"


def signing_key(path: str | Path | None = None, create: bool = True) -> bytes:
    """The key that signs and verifies adapter files.

    A random 256-bit key made on first use (readable by the user only). A site that shares
    adapters between machines gives every machine the same key file (``$SAMSEGMENT_ADAPTER_KEY``).

    Args:
        path: the key file (None: ``default_key_path()``).
        create: make the key file when it does not exist.

    Returns:
        The key bytes.

    Raises:
        CheckpointError: the key file cannot be read or made, or is too short to be a key.
    """
    path = Path(path).expanduser() if path is not None else default_key_path()
    if not path.exists() and create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            pass  # made by another process meanwhile
        except OSError as exc:
            raise CheckpointError(f"Cannot create the adapter signing key {path}: {exc.strerror or exc}",
                                  f"set ${KEY_ENV} to a key file you can write or read") from exc
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise CheckpointError(f"Cannot read the adapter signing key {path}: {exc.strerror or exc}",
                              f"set ${KEY_ENV} to a readable key file") from exc
    if len(key) < 32:
        raise CheckpointError(f"The adapter signing key {path} has {len(key)} bytes; a key has at least 32",
                              "delete it to have a new one made, or use the site's key file")
    return key


# ---------------------------------------------------------------------------------------- tensors
def trained_parameters(decoder: Any) -> dict[str, Any]:
    """The mask decoder's parameters that adaptation trains, by name."""
    return {name: p for name, p in decoder.named_parameters() if name.startswith(TRAINED_PREFIXES)}


def load_trained(decoder: Any, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy adapter tensors into ``decoder`` (a copy of the backend's mask decoder).

    Raises:
        CheckpointError: a tensor the decoder does not have, or of another shape.
    """
    import torch

    params = trained_parameters(decoder)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"The adapter lacks {len(missing)} decoder tensors (e.g. {missing[0]})",
                              "adapt again; the file belongs to another decoder layout")
    with torch.no_grad():
        for name, value in tensors.items():
            target = params.get(name)
            if target is None or tuple(target.shape) != tuple(np.shape(value)):
                raise CheckpointError(f"The adapter's tensor {name} {tuple(np.shape(value))} does not fit this decoder",
                                      "adapt again; the file belongs to another decoder layout")
            target.copy_(torch.as_tensor(np.asarray(value), dtype=target.dtype))


# ---------------------------------------------------------------------------------------- training
@dataclass
class _Sample:
    embedding: Any  # (1, 256, 64, 64) float32 on the device
    geom: SliceGeometry
    mask: np.ndarray  # (H, W) bool
    target: Any  # (1, 1, L, L) float32 in [0, 1]
    valid: Any  # (1, 1, L, L) 1 where the low-res grid shows the image


def _sample(backend: SamBackend, embedding: Any, geom: SliceGeometry, mask: np.ndarray) -> _Sample:
    import torch

    from .backends import LOW_RES_SIZE

    target = ((geom.mask_to_low_res(mask, LOW_RES_SIZE, 1.0) + 1.0) / 2.0).clamp(0.0, 1.0)
    valid = torch.zeros_like(target)
    new_h, new_w = geom.scaled_size
    scale = LOW_RES_SIZE / geom.image_size
    valid[..., :max(1, round(new_h * scale)), :max(1, round(new_w * scale))] = 1.0
    dev = backend.device
    return _Sample(embedding.to(dev, torch.float32), geom, np.asarray(mask, bool), target.to(dev), valid.to(dev))


def augmented_box(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A box as propagation might draw it around ``mask``: each side moved by up to 10 % of the box
    side, plus 0-5 px of padding, clipped to the slice."""
    box = mask_bbox(mask).astype(np.float64)
    side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2)
    pad = rng.uniform(0.0, 5.0)
    box = box + rng.uniform(-0.1, 0.1, 4) * side + np.array([-pad, -pad, pad, pad])
    return clip_box(box, *mask.shape)


def augmented_points(mask: np.ndarray, box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two clicks as a user might place them with ``box``: an include point on the mask and an
    exclude point inside the box off the mask (a second include point when the box holds nothing else).

    Returns:
        (2, 3) rows of (x, y, label), label 1 include, 0 exclude.
    """
    inside = np.argwhere(mask)
    y, x = inside[rng.integers(len(inside))]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    region = np.zeros_like(mask)
    region[max(0, y0):y1 + 1, max(0, x0):x1 + 1] = True
    outside = np.argwhere(region & ~mask)
    if len(outside):
        ny, nx = outside[rng.integers(len(outside))]
        second = (nx, ny, 0)
    else:  # the box lies within the structure: a second click on it, inside the box
        within = np.argwhere(region & mask)
        ny, nx = (within if len(within) else inside)[rng.integers(len(within) or len(inside))]
        second = (nx, ny, 1)
    return np.array([(x, y, 1), second], dtype=np.float64)


def _loss(low_res: Any, sample: _Sample) -> Any:
    """Binary cross-entropy + soft Dice over the image part of the low-res grid."""
    import torch
    import torch.nn.functional as F

    target, valid = sample.target.expand_as(low_res), sample.valid.expand_as(low_res)
    bce = (F.binary_cross_entropy_with_logits(low_res, target, reduction="none") * valid).sum() / valid.sum()
    prob = torch.sigmoid(low_res) * valid
    soft_dice = (2.0 * (prob * target).sum((1, 2, 3)) + 1.0) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1.0)
    return bce + (1.0 - soft_dice).mean()


class _Trainer:
    """The decoder copy being trained, its optimiser and the prompt sampler."""

    def __init__(self, backend: SamBackend, settings: AdaptSettings) -> None:
        import torch

        self.backend = backend
        self.settings = settings
        self.decoder = copy.deepcopy(backend.net.mask_decoder)
        self.decoder.requires_grad_(False)
        self.params = trained_parameters(self.decoder)
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimiser = torch.optim.AdamW(list(self.params.values()), lr=settings.learning_rate, weight_decay=0.0)
        self.rng = np.random.default_rng(settings.seed)
        self.prompt_encoder = backend.net.prompt_encoder
        with torch.no_grad():
            self.dense_pe = self.prompt_encoder.get_dense_pe().detach()

    def step(self, samples: list[_Sample]) -> float:
        """One optimiser step over ``samples``: on each, ``prompts_per_slice`` augmented boxes (as
        propagation prompts); with ``click_prompts``, all but the first of them with an include and
        an exclude point (as a user's corrective clicks, ``augmented_points``)."""
        import torch

        self.decoder.train()
        self.optimiser.zero_grad(set_to_none=True)
        total = 0.0
        dev = self.backend.device
        count = self.settings.prompts_per_slice
        for sample in samples:
            boxes = [augmented_box(sample.mask, self.rng) for _ in range(count)]
            batches = [(boxes[:1], None)] if self.settings.click_prompts else [(boxes, None)]
            if self.settings.click_prompts and count > 1:
                points = np.stack([augmented_points(sample.mask, box, self.rng) for box in boxes[1:]])
                batches.append((boxes[1:], points))
            for batch_boxes, points in batches:
                model_boxes = np.stack([sample.geom.box_to_model(b, self.backend.spec.box_rounding) for b in batch_boxes])
                point_arg = None
                if points is not None:
                    coords = sample.geom.points_to_model(points[:, :, :2].reshape(-1, 2)).reshape(len(points), -1, 2)
                    point_arg = (torch.as_tensor(coords, dtype=torch.float32, device=dev),
                                 torch.as_tensor(points[:, :, 2], dtype=torch.int64, device=dev))
                with torch.no_grad():
                    sparse, dense = self.prompt_encoder(points=point_arg, masks=None, boxes=torch.as_tensor(
                        model_boxes, dtype=torch.float32, device=dev))
                low_res, _ = self.decoder(image_embeddings=sample.embedding, image_pe=self.dense_pe,
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
                loss = _loss(low_res, sample) * (len(batch_boxes) / count) / len(samples)
                loss.backward()
                total += float(loss.detach())
        self.optimiser.step()
        self.decoder.eval()
        return total

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: p.detach().to("cpu", copy=True).float().numpy() for name, p in self.params.items()}


def check_boxes(mask: np.ndarray, seed: int) -> list[np.ndarray]:
    """The boxes both decoders are judged with on a held-back mask: propagation's tight and loose
    boxes (``CHECK_PADDINGS``) and ``CHECK_JITTERED`` augmented ones."""
    box = mask_bbox(mask).astype(np.float64)
    boxes = [clip_box(box + np.array([-p, -p, p, p]), *mask.shape) for p in CHECK_PADDINGS]
    rng = np.random.default_rng(seed + 7919)
    return boxes + [augmented_box(mask, rng) for _ in range(CHECK_JITTERED)]


def held_back_dice(backend: SamBackend, sample: _Sample, decoder: Any, seed: int) -> float:
    """Mean Dice of ``decoder`` (None: the stock one) on a held-back slice, over ``check_boxes``."""
    import torch

    from .backends import LOW_RES_SIZE

    pe = backend.net.prompt_encoder
    md = decoder if decoder is not None else backend.net.mask_decoder
    scores = []
    with torch.inference_mode():
        dense_pe = pe.get_dense_pe()
        for box in check_boxes(sample.mask, seed):
            model_box = sample.geom.box_to_model(box, backend.spec.box_rounding)[None]
            sparse, dense = pe(points=None, masks=None,
                               boxes=torch.as_tensor(model_box, dtype=torch.float32, device=backend.device))
            low, _ = md(image_embeddings=sample.embedding, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense, multimask_output=False)
            full = sample.geom.low_res_to_slice(low.float().cpu(), LOW_RES_SIZE)[0, 0].numpy() > 0.0
            scores.append(dice(full, sample.mask))
    return float(np.mean(scores))


def checked_accepted(shape: tuple[int, int, int], axis: int, accepted: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The accepted masks as {slice: bool (H, W)} after checking them against the volume.

    Raises:
        SAMSegmentError: no mask, an empty mask, a slice outside the volume or a mask of the wrong shape.
    """
    from .volume import slice_shape

    if axis not in (0, 1, 2):
        raise SAMSegmentError(f"Axis {axis!r} is not 0, 1 or 2", "give the slice axis of the accepted masks")
    if not accepted:
        raise SAMSegmentError("No accepted slice to adapt to", "accept the mask on at least one slice first")
    want = slice_shape(shape, axis)
    out: dict[int, np.ndarray] = {}
    for index, mask in sorted(accepted.items()):
        index = int(index)
        if not 0 <= index < shape[axis]:
            raise SAMSegmentError(f"Accepted slice {index} is outside the volume (0-{shape[axis] - 1} on axis {axis})",
                                  "give slices of the current volume")
        arr = np.asarray(mask).astype(bool)
        if arr.shape != tuple(want):
            raise SAMSegmentError(f"The accepted mask of slice {index} has shape {arr.shape}, the slice {tuple(want)}",
                                  "give masks of the slice's shape")
        if not arr.any():
            raise SAMSegmentError(f"The accepted mask of slice {index} is empty", "leave out slices without the structure")
        out[index] = arr
    return out


def adapt(session: SegmentationSession, axis: int, accepted: Mapping[int, np.ndarray], structure: str | None = None,
          settings: AdaptSettings | None = None, cancel: CancelToken | None = None,
          progress: ProgressCallback | None = None) -> tuple[AdaptationReport, DecoderAdapter | None]:
    """Train the decoder on the accepted masks of one structure and decide, on held-back evidence,
    whether to keep it.

    Every model call runs on the session's worker, one optimiser step per call, so the user's
    prompts on other slices are served between steps.

    Args:
        session: a session with the volume loaded (its embeddings are used, and encoded if missing).
        axis: the slice axis of the accepted masks.
        accepted: {slice index: mask} of one structure, as accepted by the user.
        structure: the structure's name, kept with the adapter (for files and the GUI).
        settings: the training settings (None: ``AdaptSettings()``).
        cancel: stops the training between steps (``CancelledError``).
        progress: called with (steps done, steps planned, message).

    Returns:
        (report, adapter): the adapter is None when the held-back check did not keep it.

    Raises:
        SAMSegmentError: bad accepted masks or settings; CancelledError when cancelled.
    """
    settings = settings or AdaptSettings()
    settings.check()
    masks = checked_accepted(session.shape, axis, accepted)
    backend = session.backend
    started = time.perf_counter()
    order = sorted(masks)
    held = order[len(order) // 2] if len(order) >= 2 else None
    total = settings.check_steps + settings.final_steps
    if progress is not None:
        progress(0, total, "preparing the accepted slices")

    def prepared(index: int, mirrored: bool = False) -> _Sample:
        ref = SliceRef(axis, index)
        geom = session.geometry(ref)
        if mirrored:
            image = np.ascontiguousarray(session.slice_image(ref)[:, ::-1])
            return _sample(backend, session.worker.call(lambda: backend.encode(image), PRIORITY_PROPAGATION), geom,
                           masks[index][:, ::-1])
        return _sample(backend, session.embedding(ref, PRIORITY_PROPAGATION), geom, masks[index])

    samples = {index: prepared(index) for index in order}
    if held is not None:
        check_sample, train = samples[held], [samples[i] for i in order if i != held]
        held_name = f"slice {held}"
    else:
        check_sample, train = prepared(order[0], mirrored=True), [samples[order[0]]]
        held_name = f"slice {order[0]} mirrored"
    trainer = session.worker.call(lambda: _Trainer(backend, settings), PRIORITY_PROPAGATION)
    steps = 0
    step_seconds = 0.0

    def run_steps(count: int, batch: list[_Sample], phase: str) -> None:
        nonlocal steps, step_seconds
        for _ in range(count):
            if cancel is not None:
                cancel.raise_if_cancelled()
            t0 = time.perf_counter()
            loss = session.worker.call(lambda: trainer.step(batch), PRIORITY_PROPAGATION)
            step_seconds += time.perf_counter() - t0
            steps += 1
            if progress is not None:
                progress(steps, total, f"{phase}: step {steps} of {total}, loss {loss:.3f}")

    run_steps(settings.check_steps, train, "training")
    if cancel is not None:
        cancel.raise_if_cancelled()
    stock = session.worker.call(lambda: held_back_dice(backend, check_sample, None, settings.seed), PRIORITY_PROPAGATION)
    tuned = session.worker.call(lambda: held_back_dice(backend, check_sample, trainer.decoder, settings.seed),
                                PRIORITY_PROPAGATION)
    kept = tuned > stock + (settings.min_gain if held is not None else settings.mirror_min_gain)
    adapter = None
    if kept:
        if settings.final_steps:
            run_steps(settings.final_steps, [samples[i] for i in order], "training on every accepted slice")
        adapter = DecoderAdapter(backend.spec.id, backend.model_sha256, trainer.tensors(), structure)
        if progress is not None:
            progress(total, total, "preparing the adapted decoder")
        # its ONNX graphs (where the decoder runs in ONNX Runtime), so that no decode waits for them
        session.worker.call(lambda: backend.prepare_adapter(adapter), PRIORITY_PROPAGATION)
    seconds = time.perf_counter() - started
    report = AdaptationReport(kept, axis, tuple(order), held_name, round(stock, 4), round(tuned, 4), steps,
                              round(seconds, 3), round(step_seconds / max(1, steps), 4),
                              settings.prompts_per_slice * len(order), structure)
    if progress is not None:
        progress(total, total, report.summary())
    log.info("adaptation %s (%d steps, %.1f s)", report.summary(), steps, seconds)
    if adapter is not None:
        adapter.report = report.as_json()
    return report, adapter


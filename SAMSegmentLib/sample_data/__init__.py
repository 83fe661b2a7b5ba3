"""A small real abdominal CT with reference labels, so ``samsegment demo`` works offline anywhere."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

IMAGE = "ct_abdomen_3mm.nii.gz"
LABELS = "ct_abdomen_3mm_labels.nii.gz"
LABEL_NAMES = "ct_abdomen_3mm_labels.json"


def path(name: str) -> Path:
    return Path(str(importlib.resources.files(__name__).joinpath(name)))


def label_values() -> dict[str, int]:
    """Structure name -> label value in ``LABELS``."""
    names = json.loads(path(LABEL_NAMES).read_text(encoding="utf-8"))
    return {name: int(value) for value, name in names.items()}

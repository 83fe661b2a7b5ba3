"""Prompts on one slice, in that slice's pixel coordinates (x = column, y = row)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PromptError

INCLUDE = 1
EXCLUDE = 0


@dataclass
class Prompts:
    """Points with labels (1 include, 0 exclude) and/or one box (x0, y0, x1, y1)."""

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    box: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.points) != len(self.labels):
            raise PromptError(f"{len(self.points)} points but {len(self.labels)} labels",
                              "give one label (1 include, 0 exclude) per point")
        if len(self.labels) and not np.isin(self.labels, (INCLUDE, EXCLUDE)).all():
            raise PromptError(f"Point labels must be 1 (include) or 0 (exclude), got {sorted(set(self.labels.tolist()))}",
                              "use 1 for include and 0 for exclude")
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float64).reshape(-1)

    @classmethod
    def from_lists(cls, include: list[tuple[float, float]] = (), exclude: list[tuple[float, float]] = (),
                   box: tuple[float, float, float, float] | None = None) -> "Prompts":
        pts = list(include) + list(exclude)
        labels = [INCLUDE] * len(include) + [EXCLUDE] * len(exclude)
        return cls(np.array(pts, dtype=np.float64).reshape(-1, 2), np.array(labels, dtype=np.int64), box)

    @property
    def is_empty(self) -> bool:
        return self.box is None and len(self.points) == 0

    @property
    def has_include(self) -> bool:
        return self.box is not None or bool((self.labels == INCLUDE).any())

    def with_point(self, x: float, y: float, label: int) -> "Prompts":
        return Prompts(np.vstack([self.points, [[x, y]]]), np.append(self.labels, label), self.box)

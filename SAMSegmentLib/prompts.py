"""Prompts on one slice, in that slice's pixel coordinates (x = column, y = row)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import PromptError
from .preprocessing import clip_box, validate_prompt_geometry

if TYPE_CHECKING:
    from .model_registry import ModelSpec

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
        """Prompts from plain lists.

        Args:
            include: include points (x, y).
            exclude: exclude points (x, y).
            box: (x0, y0, x1, y1), or None.

        Returns:
            The prompts, include points first.
        """
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
        """A copy with one more point.

        Args:
            x: column in slice pixels.
            y: row in slice pixels.
            label: ``INCLUDE`` or ``EXCLUDE``.

        Returns:
            New prompts; this one is unchanged.
        """
        return Prompts(np.vstack([self.points, [[x, y]]]), np.append(self.labels, label), self.box)


def check_prompts(prompts: Prompts, height: int, width: int) -> Prompts:
    """Refuse a prompt that cannot be decoded on a ``height`` x ``width`` slice.

    Args:
        prompts: points and/or box in slice pixels.
        height: slice rows.
        width: slice columns.

    Returns:
        The same prompts with the box clipped to the slice (a box dragged past the edge is meant).

    Raises:
        PromptError: no prompt, only exclude points, a point outside the slice, or a box that is
            inverted, of (near) zero area or entirely outside the slice.
    """
    if prompts.is_empty:
        raise PromptError("No prompt given", "click an include point or drag a box on the structure")
    if not prompts.has_include:
        raise PromptError("Only exclude points were given; SAM needs to know what to include",
                          "add an include point or a box on the structure")
    validate_prompt_geometry(height, width, prompts.points, prompts.box)
    box = None if prompts.box is None else clip_box(prompts.box, height, width)
    return Prompts(prompts.points, prompts.labels, box)


def require_box(spec: ModelSpec, prompts: Prompts) -> None:
    """Refuse points without a box for a model that segments from a box (``spec.needs_box``).

    Args:
        spec: the model's registry entry.
        prompts: the prompts to decode.

    Raises:
        PromptError: ``spec.needs_box`` and ``prompts`` has points but no box.
    """
    if spec.needs_box and prompts.box is None and len(prompts.points):
        raise PromptError(f"{spec.name} segments from a box; points alone give no reliable mask",
                          "drag a box around the structure first (points then refine it), "
                          "or choose a SAM model for click-only prompts")

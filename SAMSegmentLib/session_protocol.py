"""What the engine's algorithms use from a session, as a ``typing.Protocol``.

Propagation, everything mode, SAMAug and prompt uncertainty take a session and call only the
members below. ``SegmentationSession`` implements them; so must any stand-in (a test double, a
wrapper that counts calls): the algorithms do not probe for optional methods.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .worker import PRIORITY_INTERACTIVE, PRIORITY_PROPAGATION

if TYPE_CHECKING:  # annotations only: importing the backend here would pull in the model code
    from .adaptation import DecoderAdapter
    from .backends import SamBackend
    from .preprocessing import IntensityWindow, SliceGeometry
    from .prompts import Prompts
    from .session import Prediction
    from .volume import SliceRef
    from .worker import InferenceWorker


@runtime_checkable
class SessionProtocol(Protocol):
    """One volume and one model, as the algorithms see them.

    Used by: propagation (``shape``, ``slice_image``, ``is_constant``, ``encode_async``,
    ``decode``); everything mode (``shape``, ``is_constant``, ``backend``, ``worker``,
    ``embedding``, ``geometry``, ``adapter``); SAMAug (everything mode's members, ``slice_image``, and for a
    batch ``set_volume`` and ``model_id``); prompt uncertainty (``shape``, ``slice_image``, ``is_constant``,
    ``backend``, ``user_box``, ``worker``, ``embedding``, ``geometry``, ``adapter``).
    """

    backend: SamBackend
    """The model: its spec (``needs_box``, ``multimask_output``, ``name``) and its decoder."""

    worker: InferenceWorker
    """The thread every model call runs on; algorithms that decode many prompts run there."""

    @property
    def adapter(self) -> DecoderAdapter | None:
        """The adapted decoder the session decodes through (``SegmentationSession.adapt``), or None
        for the stock model; algorithms that call the backend's decoder themselves pass it on."""
        ...

    @property
    def model_id(self) -> str:
        """Registry id of the session's model."""
        ...

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape (K, J, I) of the loaded volume."""
        ...

    def set_volume(self, volume: np.ndarray, window: IntensityWindow | str | tuple[float, float] | None = None,
                   modality: str = "auto", overwrite_disk_cache: bool = False) -> IntensityWindow:
        """Load a (K, J, I) volume with an intensity window.

        Args:
            volume: the voxels, (K, J, I).
            window: an ``IntensityWindow``, a CT preset name, (low, high), or None for automatic.
            modality: "ct", "mr" or "auto", for the automatic window.
            overwrite_disk_cache: replace a disk cache bound to another volume or model.

        Returns:
            The window applied.
        """
        ...

    def slice_image(self, ref: SliceRef) -> np.ndarray:
        """The windowed uint8 (H, W) image of slice ``ref``, as the model sees it before resizing."""
        ...

    def geometry(self, ref: SliceRef) -> SliceGeometry:
        """How slice ``ref`` maps to and from the model's input frame."""
        ...

    def is_constant(self, ref: SliceRef) -> bool:
        """Whether slice ``ref`` has one value after windowing (nothing to segment on it)."""
        ...

    def embedding(self, ref: SliceRef, priority: int = PRIORITY_INTERACTIVE) -> Any:
        """The image embedding of slice ``ref``, encoded on ``worker`` if not cached (inline on it)."""
        ...

    def encode_async(self, ref: SliceRef, priority: int = PRIORITY_PROPAGATION) -> Future:
        """Queue the encode of slice ``ref`` on ``worker`` and return at once.

        Returns:
            A future that resolves when the encode is done (or was not needed); cancelling it
            before it runs drops the encode.
        """
        ...

    def decode(self, ref: SliceRef, prompts: Prompts, mask_input: Any = None, priority: int = PRIORITY_INTERACTIVE,
               record: bool = False) -> Prediction:
        """Decode ``prompts`` on slice ``ref`` (encoding it first if needed), boxes as given.

        Args:
            ref: the slice.
            prompts: points and/or box in slice pixels.
            mask_input: low-res logits to prompt with as well, or None.
            priority: worker priority (``worker.PRIORITY_*``).
            record: append the prediction to the slice's prompt history.

        Returns:
            The mask, its logits and the decoder's score.
        """
        ...

    def user_box(self, ref: SliceRef, box: np.ndarray) -> np.ndarray:
        """The box the session decodes for ``box`` drawn by the user on ``ref`` (with its margin)."""
        ...

"""Everything mode, SAMAug priors and prompt-robustness uncertainty, as MRML nodes.

The server computes numpy arrays (its jobs run SAMSegmentLib.automatic / samaug / uncertainty);
the ``*_flow`` functions here are those requests, run by ``SAMSegmentCore.start_task`` /
``run_task``, whose ``finish`` step builds the nodes on the GUI thread with the source volume's
geometry: a new segmentation with one segment per found region, two new scalar volumes for the
SAMAug prior maps, and a toggleable outline of the uncertain pixels over the current proposal.
Nothing existing is modified.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from SAMSegmentLib.client import Flow
from SAMSegmentLib.errors import SAMSegmentError
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.volume import SliceRef, set_slice
from SAMSegmentLib.worker import CancelToken

from .geometry import ViewSlice
from .segment_io import remove_with_display

# Entropy (bits) above which a pixel counts as uncertain in the overlay: the jittered prompts
# disagree on it at least ~1 time in 9 (H(0.11) = 0.5 bit).
UNCERTAIN_ENTROPY_BITS = 0.5


def _copy_geometry(source_volume, target_volume) -> None:
    import vtk

    m = vtk.vtkMatrix4x4()
    source_volume.GetIJKToRASMatrix(m)
    target_volume.SetIJKToRASMatrix(m)
    parent = source_volume.GetParentTransformNode()
    if parent is not None:
        target_volume.SetAndObserveTransformNodeID(parent.GetID())


def labels_to_segmentation(scene, source_volume, labels: np.ndarray, name: str):
    """A new segmentation with one segment per non-zero label of a (K, J, I) label array."""
    import slicer

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels")
    try:
        slicer.util.updateVolumeFromArray(labelmap, labels.astype(np.int32))
        _copy_geometry(source_volume, labelmap)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(source_volume)
        if labels.any():
            slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
    finally:
        remove_with_display(scene, labelmap)
    return seg


def everything_flow(core: Any, view: ViewSlice | None = None, axis: int | None = None, params: Any = None,
                    progress: Callable[[int, int, str], None] | None = None,
                    cancel: CancelToken | None = None) -> Flow:
    """Everything mode on ``view``'s slice, or on every slice along ``axis`` (regions linked in 3D),
    as a server request. Returns a (K, J, I) label array and a name for the result."""
    session = core.session
    name = core.volume_node.GetName()
    if view is not None:
        plane = yield from session.everything_flow(view.axis, view.index, params, progress, cancel)
        labels = np.zeros(session.shape, dtype=np.int32)
        set_slice(labels, view.ref, plane)
        return labels, f"{name} everything (slice {view.index})"
    if axis is not None:
        labels = yield from session.everything_flow(axis, None, params, progress, cancel)
        return labels, f"{name} everything"
    raise SAMSegmentError("Everything mode needs a slice view or an axis", "pass view=... or axis=...")


def everything_to_segmentation(core: Any, view: ViewSlice | None = None, axis: int | None = None,
                               params: Any = None):
    """Everything mode into a new segmentation node (one segment per region); blocking."""
    return core.run_task("everything mode", lambda progress, cancel: everything_flow(core, view, axis, params,
                                                                                      progress, cancel),
                         lambda result: labels_to_segmentation(core.scene, core.volume_node, *result))


def samaug_flow(core: Any, axis: int = 0, params: Any = None, progress: Callable[[int, int, str], None] | None = None,
                cancel: CancelToken | None = None) -> Flow:
    """SAMAug (segmentation prior, boundary prior) of every slice along ``axis``, as a server request."""
    return (yield from core.session.samaug_flow(axis, None, params, progress, cancel))


def priors_to_volumes(core: Any, seg_prior: np.ndarray, boundary_prior: np.ndarray) -> tuple[Any, Any]:
    """The two prior maps as new scalar volumes with the source volume's geometry."""
    import slicer

    nodes = []
    for array, suffix in ((seg_prior, "SAMAug segmentation prior"), (boundary_prior, "SAMAug boundary prior")):
        node = core.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{core.volume_node.GetName()} {suffix}")
        slicer.util.updateVolumeFromArray(node, np.asarray(array, dtype=np.float32))
        _copy_geometry(core.volume_node, node)
        node.CreateDefaultDisplayNodes()
        nodes.append(node)
    return nodes[0], nodes[1]


def uncertainty_flow(core: Any, view: ViewSlice | None = None, prompts: Prompts | None = None, n: int = 16,
                     jitter: float = 0.1, seed: int = 0) -> Flow:
    """Jitter the current prompt on the server: (view, mean probability, entropy) of the samples."""
    view = view or core.current_view
    if prompts is None:
        prompts = core.current_prompts
    if view is None or prompts is None:
        raise SAMSegmentError("No prompt to measure the uncertainty of", "segment a slice first")
    mean, entropy = yield from core.session.uncertainty_flow(SliceRef(view.axis, view.index), prompts, n=n,
                                                             jitter=jitter, seed=seed, measure="entropy")
    return view, mean, entropy


def overlay_uncertainty(core: Any, view: ViewSlice, entropy: np.ndarray, visible: bool = True) -> None:
    """Outline the pixels the jittered prompts disagree on over the preview."""
    core.preview.show_uncertainty(view.axis, view.index, entropy >= UNCERTAIN_ENTROPY_BITS, visible)


def show_uncertainty(core: Any, view: ViewSlice | None = None, prompts: Prompts | None = None, n: int = 16,
                     jitter: float = 0.1, seed: int = 0, visible: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Jitter the current prompt, overlay the pixels the samples disagree on; returns (mean, entropy). Blocking."""
    def finish(result: tuple[ViewSlice, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        shown, mean, entropy = result
        overlay_uncertainty(core, shown, entropy, visible)
        return mean, entropy

    return core.run_task("uncertainty", lambda progress, cancel: uncertainty_flow(core, view, prompts, n, jitter, seed),
                         finish)

"""Render Resources/Screenshots/SAMSegment-screenshot.png from a real SAMSegment session.

Headless, on slicer-core: the bundled sample CT is loaded by Slicer's volumes logic, the spleen
and liver are segmented through the module logic exactly as in the tutorial (a box ROI on one
axial slice, Accept, Propagate both ways), and each of the three slice views is resliced by
Slicer's own slice logic (the pipeline behind the slice views). The colour mapping and outline
drawing of the views need Qt/OpenGL, so they are done here with numpy on the resliced data.

    .venv/bin/python Resources/make_screenshot.py [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAMSegment"))

VIEW_PX = 360
COLORS = {"spleen": (157, 108, 162), "liver": (221, 130, 101)}


def reslice(slice_logic, layer: str) -> np.ndarray:
    from vtk.util import numpy_support

    logic = slice_logic.GetBackgroundLayer() if layer == "background" else slice_logic.GetLabelLayer()
    reslice_filter = logic.GetReslice()
    if layer == "background":
        reslice_filter.SetBackgroundLevel(-32768)  # outside the volume: black, as in Slicer
    reslice_filter.Update()
    image = reslice_filter.GetOutput()
    w, h, _ = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w)[::-1]


def outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "Resources" / "Screenshots" / "SAMSegment-screenshot.png"))
    args = parser.parse_args()

    import slicer
    import SimpleITK as sitk
    from PIL import Image, ImageDraw

    from SAMSegmentLib import sample_data
    from SAMSegmentSlicer import geometry
    from SAMSegmentSlicer.logic import SAMSegmentCore
    from SAMSegmentSlicer.selftest import headless_mrml

    scene, app, logics = headless_mrml()
    volumes_logic = logics[3]
    ct = volumes_logic.AddArchetypeVolume(str(sample_data.path(sample_data.IMAGE)), "CT abdomen", 0)
    ct.GetDisplayNode().SetAutoWindowLevel(False)
    ct.GetDisplayNode().SetWindowLevel(400, 40)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.LABELS))))
    values = sample_data.label_values()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SAM")
    seg.CreateDefaultDisplayNodes()

    core = SAMSegmentCore(scene, app)
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(app)
    slice_logic.SetMRMLScene(scene)
    red = slice_logic.AddSliceNode("Red")
    red.SetDimensions(VIEW_PX, VIEW_PX, 1)
    boxes = {}
    for name in ("liver", "spleen"):
        truth = labels == values[name]
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        sid = seg.GetSegmentation().AddEmptySegment(name, name, tuple(c / 255 for c in COLORS[name]))
        core.set_inputs(ct, seg, sid)
        ys, xs = np.nonzero(truth[k])
        corners = geometry.ijk_to_ras(ct, [[xs.min() - 2, ys.min() - 2, k], [xs.max() + 2, ys.max() + 2, k]])
        red.SetOrientation("Axial")
        red.JumpSliceByCentering(*corners.mean(axis=0))
        red.UpdateMatrices()
        core.watch_markups(lambda: core.view_slice(red), asynchronous=False)
        core.prompts.set_box(corners[0], corners[1], geometry.vtk_to_numpy_matrix(red.GetSliceToRAS()))
        core.accept()
        job = core.propagate("both", axis=0)
        print(f"{name}: {core.describe_job(job)}")
        boxes[name] = (k, corners)
        core.prompts.clear()

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(seg, labelmap)
    composite = slice_logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(ct.GetID())
    composite.SetLabelVolumeID(labelmap.GetID())

    spleen_k, spleen_corners = boxes["spleen"]
    centre = spleen_corners.mean(axis=0)
    panels = []
    for orientation in ("Axial", "Coronal", "Sagittal"):
        red.SetOrientation(orientation)
        slice_logic.FitSliceToAll()  # as Slicer's "fit to window": the whole volume in view
        red.JumpSliceByOffsetting(*centre)  # through the spleen's box centre
        red.UpdateMatrices()
        background = reslice(slice_logic, "background").astype(np.float32)
        label = reslice(slice_logic, "label")
        gray = np.clip((background - (40 - 200)) / 400 * 255, 0, 255)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        # The label map holds segment indices in segmentation order: 1 liver, 2 spleen.
        for index, name in enumerate(("liver", "spleen"), start=1):
            mask = label == index
            color = np.array(COLORS[name], dtype=np.float32)
            rgb[mask] = 0.6 * rgb[mask] + 0.4 * color
            rgb[outline(mask)] = color
        panel = Image.fromarray(rgb.astype(np.uint8))
        draw = ImageDraw.Draw(panel)
        if orientation == "Axial":  # the box prompt on the slice it was drawn on
            xy_to_ras = geometry.vtk_to_numpy_matrix(red.GetXYToRAS())
            xy = [(np.linalg.inv(xy_to_ras) @ np.r_[c, 1.0])[:2] for c in spleen_corners]
            (x0, y0), (x1, y1) = xy
            h = panel.height
            draw.rectangle([min(x0, x1), h - max(y0, y1), max(x0, x1), h - min(y0, y1)], outline=(240, 220, 30), width=2)
        draw.text((8, 6), orientation, fill=(255, 255, 255))
        panels.append(panel)
    sheet = Image.new("RGB", (3 * VIEW_PX + 8, VIEW_PX + 26), (25, 25, 25))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (VIEW_PX + 4), 0))
    ImageDraw.Draw(sheet).text((8, VIEW_PX + 7), "SAMSegment: box on one axial slice, Accept, Propagate "
                               "(LiteMedSAM, CPU) - liver and spleen, sample CT", fill=(230, 230, 230))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    print(f"wrote {out}")
    core.close()


if __name__ == "__main__":
    main()

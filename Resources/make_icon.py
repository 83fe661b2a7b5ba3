"""Draw the SAMSegment icons with Pillow and numpy (no external artwork).

Writes:
  Resources/Icons/SAMSegment.png                 128x128 extension icon (Extensions Index)
  SAMSegment/Resources/Icons/SAMSegment.png      same image, the module icon
  SAMSegment/Resources/Icons/SAMSegmentEffect.png 21x21 Segment Editor effect icon

The picture: a stylised axial slice (body outline, organs, spine) on a dark rounded tile, one
organ covered by a translucent segmentation with a bright contour, the dashed box prompt around
it and a green "include" click inside it. Everything is drawn at a multiple of the final size and
reduced with a Lanczos filter, which gives smooth edges. Re-run after changing the drawing:

    python Resources/make_icon.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]

MASK_RGB = (255, 170, 40)  # segment fill and contour (warm orange)
CLICK_RGB = (60, 215, 110)  # positive click (green)
BOX_RGB = (90, 200, 255)  # box prompt (light blue)


def _blob(cx: float, cy: float, r: float, wobble: list[tuple[int, float, float]], n: int = 360):
    """Closed smooth outline r(t) = r * (1 + sum a_k cos(k t + phase_k)) as a list of points."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    rad = np.ones_like(t)
    for k, amp, phase in wobble:
        rad += amp * np.cos(k * t + phase)
    rad *= r
    return [(float(cx + x), float(cy + y)) for x, y in zip(rad * np.cos(t), rad * np.sin(t))]


def _radial_gradient(size: int, cx: float, cy: float, radius: float, inner: float, outer: float):
    """Float image (size x size) going from `inner` at (cx, cy) to `outer` at `radius`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    d = np.clip(np.hypot(xx - cx, yy - cy) / radius, 0.0, 1.0)
    return inner + (outer - inner) * d**1.5


def _rounded_mask(size: int, margin: float, corner: float) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rounded_rectangle(
        [margin, margin, size - 1 - margin, size - 1 - margin], radius=corner, fill=255
    )
    return m


def _dashed_rect(draw: ImageDraw.ImageDraw, box, dash: float, gap: float, width: int, fill):
    x0, y0, x1, y1 = box
    edges = [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))]
    for (ax, ay), (bx, by) in edges:
        length = math.hypot(bx - ax, by - ay)
        ux, uy = (bx - ax) / length, (by - ay) / length
        s = 0.0
        while s < length:
            e = min(s + dash, length)
            draw.line([(ax + ux * s, ay + uy * s), (ax + ux * e, ay + uy * e)], fill=fill, width=width)
            s = e + gap
    # square corner caps so the box reads as a box at small sizes
    h = width / 2.0
    for cx, cy in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)


def _click(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, ring: float):
    draw.ellipse([x - r - ring, y - r - ring, x + r + ring, y + r + ring], fill=(255, 255, 255, 255))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=CLICK_RGB + (255,))


def draw_extension_icon(size: int = 128, scale: int = 4) -> Image.Image:
    s = size * scale
    u = s / 128.0  # drawing unit: one pixel of the final 128x128 icon

    # Tile: dark blue-grey vertical gradient in a rounded square, transparent corners.
    yy = np.linspace(0.0, 1.0, s)[:, None] * np.ones((1, s))
    top, bottom = np.array([38, 50, 70], float), np.array([16, 22, 34], float)
    tile = top[None, None, :] * (1 - yy[..., None]) + bottom[None, None, :] * yy[..., None]
    img = Image.fromarray(tile.astype(np.uint8), "RGB").convert("RGBA")
    img.putalpha(_rounded_mask(s, 2 * u, 22 * u))

    # Slice: body (soft tissue grey, brighter towards the centre), organs, spine.
    cx, cy = 64 * u, 66 * u
    body_outline = _blob(cx, cy, 48 * u, [(2, 0.10, 0.0), (3, 0.025, 0.6), (4, 0.015, 0.3)])
    body_mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(body_mask).polygon(body_outline, fill=255)
    tissue = _radial_gradient(s, cx, cy - 6 * u, 52 * u, 150.0, 95.0)
    body = Image.fromarray(np.clip(tissue, 0, 255).astype(np.uint8), "L").convert("RGBA")
    img.paste(body, (0, 0), body_mask)

    d = ImageDraw.Draw(img)
    # thin fat layer
    d.line(body_outline + [body_outline[0]], fill=(190, 190, 185, 255), width=int(2 * u), joint="curve")
    # "liver" (left of image), "kidney" and "spine" (bottom centre), "bowel" loops
    liver = _blob(44 * u, 58 * u, 20 * u, [(2, 0.18, 0.9), (3, 0.07, 2.0), (5, 0.03, 0.4)])
    d.polygon(liver, fill=(178, 176, 170, 255))
    d.polygon(_blob(88 * u, 80 * u, 8 * u, [(2, 0.22, 0.3)]), fill=(170, 168, 162, 255))
    d.polygon(_blob(64 * u, 95 * u, 8 * u, [(4, 0.05, 0.0)]), fill=(235, 235, 230, 255))
    d.ellipse([60 * u, 91 * u, 68 * u, 99 * u], fill=(120, 118, 114, 255))
    d.polygon(_blob(82 * u, 50 * u, 9 * u, [(3, 0.15, 1.2)]), fill=(70, 70, 72, 255))
    d.ellipse([72 * u, 62 * u, 80 * u, 70 * u], fill=(205, 205, 200, 255))
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6 * u))

    # Segmentation of the "liver": translucent fill plus a bright contour.
    overlay = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    o = ImageDraw.Draw(overlay)
    seg = _blob(44 * u, 58 * u, 21.5 * u, [(2, 0.18, 0.9), (3, 0.07, 2.0), (5, 0.03, 0.4)])
    o.polygon(seg, fill=MASK_RGB + (105,))
    o.line(seg + [seg[0]], fill=MASK_RGB + (255,), width=int(3.2 * u), joint="curve")
    img = Image.alpha_composite(img, overlay)

    # Prompts: dashed box around the organ and an include click inside it.
    prompts = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    p = ImageDraw.Draw(prompts)
    xs = [q[0] for q in seg]
    ys = [q[1] for q in seg]
    pad = 4 * u
    _dashed_rect(p, (min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad),
                 dash=7 * u, gap=4 * u, width=int(2.2 * u), fill=BOX_RGB + (255,))
    _click(p, 47 * u, 58 * u, 5.5 * u, 2.2 * u)
    img = Image.alpha_composite(img, prompts)

    # Keep the tile's rounded corners after blurring and compositing.
    alpha = np.minimum(np.asarray(img.getchannel("A")), np.asarray(_rounded_mask(s, 2 * u, 22 * u)))
    img.putalpha(Image.fromarray(alpha))
    return img.resize((size, size), Image.LANCZOS)


def draw_effect_icon(size: int = 21, scale: int = 8) -> Image.Image:
    """Small Segment Editor effect icon: a segment blob with a contour and an include click."""
    s = size * scale
    u = s / 21.0
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    blob = _blob(10.5 * u, 10.5 * u, 8.0 * u, [(2, 0.16, 0.9), (3, 0.06, 2.0)])
    d.polygon(blob, fill=MASK_RGB + (150,))
    d.line(blob + [blob[0]], fill=(230, 120, 0, 255), width=int(1.6 * u), joint="curve")
    _click(d, 10.5 * u, 10.5 * u, 2.6 * u, 1.3 * u)
    return img.resize((size, size), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root to write into")
    args = ap.parse_args(argv)
    icon = draw_extension_icon()
    effect = draw_effect_icon()
    targets = {
        args.root / "Resources" / "Icons" / "SAMSegment.png": icon,
        args.root / "SAMSegment" / "Resources" / "Icons" / "SAMSegment.png": icon,
        args.root / "SAMSegment" / "Resources" / "Icons" / "SAMSegmentEffect.png": effect,
    }
    for path, image in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG", optimize=True)
        print(f"wrote {path.relative_to(args.root)} {image.size[0]}x{image.size[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Draw the extension's icons (128 x 128 PNG) with numpy and Pillow; run from the repository root.

    python Resources/Icons/make_icons.py

Writes ``Resources/Icons/MultiModalRegistration.png`` (the extension),
``MIRegistration/Resources/Icons/MIRegistration.png``,
``RegistrationTraining/Resources/Icons/RegistrationTraining.png``,
``LearnedMetric/Resources/Icons/LearnedMetric.png``,
``MultiscaleRegistration/Resources/Icons/MultiscaleRegistration.png``,
``GradRegistration/Resources/Icons/GradRegistration.png`` and
``DisentangledRegistration/Resources/Icons/DisentangledRegistration.png`` (the modules). The motif: a
fixed image (grey, MR-like) and a moving image of another contrast (warm, CT-like) drawn over a
deformed grid, i.e. a deformable multi-modal registration; the training module's icon adds a
falling loss curve, the learned-metric module's the B-spline control points and a metric
converging level by level, the multiscale module's two images of the same contrast under an
attention glow (Viridis colours) with the three scales of displacement (1/4, 1/2, full) as
nested grids, the gradient module's CT-like and MR-like images with their gradient-magnitude map (bright
edges) and the two branches meeting at a gate, the disentangled module's T1-like and T2-like images (dark and bright
fluid) each split into a shared content code (the same cyan grid) and its own style (a coloured dot), with
arrows both ways between the two modalities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[2]
SIZE = 128
SCALE = 4  # draw large, then downsample (anti-aliasing)


def _warp(x, y, amplitude=7.0):
    """A smooth deformation of the canvas (pixels of the large canvas)."""
    s = SIZE * SCALE
    return (x + amplitude * SCALE * np.sin(2 * np.pi * y / s * 1.5),
            y + amplitude * SCALE * np.sin(2 * np.pi * x / s * 1.2))


def _canvas():
    s = SIZE * SCALE
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle([0, 0, s - 1, s - 1], radius=22 * SCALE, fill=(28, 44, 66, 255))
    for k in range(1, 8):  # deformed grid
        t = np.linspace(0, s, 60)
        c = k * s / 8
        for xs, ys in ((np.full_like(t, c), t), (t, np.full_like(t, c))):
            wx, wy = _warp(xs, ys)
            draw.line(list(zip(wx, wy)), fill=(90, 140, 190, 150), width=2 * SCALE)
    return image, draw


def _blob(draw, centre, radii, fill, outline=None, width=0):
    s = SCALE
    cx, cy = centre
    angles = np.linspace(0, 2 * np.pi, 120)
    r = 1 + 0.08 * np.sin(3 * angles) + 0.05 * np.cos(5 * angles)
    pts = [(s * (cx + radii[0] * r[i] * np.cos(a)), s * (cy + radii[1] * r[i] * np.sin(a))) for i, a in enumerate(angles)]
    draw.polygon(pts, fill=fill, outline=outline, width=width * s)


def _loss_curve(draw):
    """A falling, slightly noisy training-loss curve across the upper part of the icon."""
    s = SCALE
    x = np.linspace(20, 112, 80)
    y = 78 - 58 * np.exp(-(x - 20) / 20) + 1.5 * np.sin(x * 0.45)  # image y grows downwards: the loss falls
    draw.line([(s * 16, s * 14), (s * 16, s * 86), (s * 114, s * 86)], fill=(255, 255, 255, 200), width=3 * s)
    draw.line([(s * a, s * b) for a, b in zip(x, y)], fill=(255, 210, 80, 255), width=6 * s, joint="curve")


def _control_points(draw):
    """B-spline control points: dots on the deformed grid's crossings."""
    s = SIZE * SCALE
    for i in range(1, 8, 2):
        for j in range(1, 8, 2):
            x, y = _warp(np.array([i * s / 8]), np.array([j * s / 8]))
            r = 3.2 * SCALE
            draw.ellipse([x[0] - r, y[0] - r, x[0] + r, y[0] + r], fill=(120, 230, 255, 255))


def _metric_steps(draw):
    """A metric falling in two stages (coarse level, then fine level), in the upper right corner."""
    s = SCALE
    draw.rounded_rectangle([s * 60, s * 6, s * 120, s * 50], radius=6 * s, fill=(20, 32, 50, 235))
    draw.line([(s * 65, s * 10), (s * 65, s * 45), (s * 116, s * 45)], fill=(255, 255, 255, 200), width=2 * s)
    x1 = np.linspace(68, 90, 30)
    x2 = np.linspace(90, 114, 30)
    y1 = 12 + 20 * (1 - np.exp(-(x1 - 68) / 6))
    y2 = 22 + 18 * (1 - np.exp(-(x2 - 90) / 6))
    draw.line([(s * a, s * b) for a, b in zip(x1, y1)], fill=(255, 210, 80, 255), width=5 * s, joint="curve")
    draw.line([(s * a, s * b) for a, b in zip(x2, y2)], fill=(255, 150, 60, 255), width=5 * s, joint="curve")


#: A few colours of the Viridis map (low to high), for the attention glow.
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _attention_glow(image, centre, radius):
    """A soft radial attention map (Viridis, high in the centre) blended over the image (pixels of the small icon)."""
    s = SIZE * SCALE
    yy, xx = np.mgrid[0:s, 0:s].astype(float)
    r = np.hypot(xx - centre[0] * SCALE, yy - centre[1] * SCALE) / (radius * SCALE)
    weight = np.clip(1.0 - r, 0.0, 1.0) ** 0.8
    stops = np.array(VIRIDIS, dtype=float)
    position = weight * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    t = (position - low)[..., None]
    rgb = stops[low] * (1 - t) + stops[low + 1] * t
    alpha = (np.where(r < 1.0, 150.0 * weight + 40.0 * (r < 1.0), 0.0)).clip(0, 200)
    overlay = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")
    image.alpha_composite(overlay)


def _scale_grids(draw):
    """Three nested grids in the upper right corner: the 1/4, 1/2 and full-resolution displacement scales."""
    s = SCALE
    draw.rounded_rectangle([s * 70, s * 6, s * 122, s * 58], radius=6 * s, fill=(20, 32, 50, 235))
    grids = ((2, (120, 230, 255, 255), 3), (4, (255, 210, 80, 230), 2), (8, (255, 255, 255, 170), 1))
    for cells, colour, width in grids:
        x0, y0, size = 76, 12, 40
        step = size / cells
        for k in range(cells + 1):
            draw.line([(s * (x0 + k * step), s * y0), (s * (x0 + k * step), s * (y0 + size))], fill=colour,
                      width=width * s)
            draw.line([(s * x0, s * (y0 + k * step)), (s * (x0 + size), s * (y0 + k * step))], fill=colour,
                      width=width * s)


def _gradient_branches(draw):
    """Upper right: the gradient-magnitude map of a blob (bright edges on black) and, below it, the image branch
    (grey) and the gradient branch (cyan) meeting at a gate (a yellow node)."""
    s = SCALE
    draw.rounded_rectangle([s * 70, s * 6, s * 122, s * 58], radius=6 * s, fill=(10, 14, 22, 240))
    angles = np.linspace(0, 2 * np.pi, 90)
    r = 1 + 0.08 * np.sin(3 * angles) + 0.05 * np.cos(5 * angles)
    for radii, colour, width in (((18, 14), (120, 230, 255, 255), 3), ((9, 7), (255, 255, 255, 220), 2)):
        pts = [(s * (96 + radii[0] * r[i] * np.cos(a)), s * (30 + radii[1] * r[i] * np.sin(a)))
               for i, a in enumerate(angles)]
        draw.line(pts + pts[:1], fill=colour, width=width * s, joint="curve")
    draw.line([(s * 74, s * 66), (s * 100, s * 78)], fill=(200, 200, 205, 255), width=4 * s)   # image branch
    draw.line([(s * 96, s * 56), (s * 100, s * 78)], fill=(120, 230, 255, 255), width=4 * s)   # gradient branch
    draw.line([(s * 100, s * 78), (s * 120, s * 84)], fill=(255, 210, 80, 255), width=4 * s)  # fused field
    draw.ellipse([s * 95, s * 73, s * 105, s * 83], fill=(255, 210, 80, 255))                   # the gate


def _disentangled_codes(draw):
    """Upper right: a T1-like and a T2-like thumbnail (dark and bright centre), each above the same content code (a
    small cyan grid: the shared anatomy) and its own style dot (grey for T1, warm for T2); arrows both ways between
    the two thumbnails (either image may be fixed)."""
    s = SCALE
    draw.rounded_rectangle([s * 66, s * 6, s * 122, s * 60], radius=6 * s, fill=(10, 14, 22, 240))
    for x0, centre, style in ((70, (60, 60, 66, 255), (200, 200, 205, 255)),
                              (98, (250, 240, 200, 255), (240, 140, 50, 255))):
        draw.rounded_rectangle([s * x0, s * 10, s * (x0 + 20), s * 30], radius=3 * s, fill=(150, 150, 158, 255))
        draw.ellipse([s * (x0 + 5), s * 15, s * (x0 + 15), s * 25], fill=centre)
        for k in range(4):  # the content code: the same grid under both
            draw.line([(s * (x0 + 2 + 4 * k), s * 36), (s * (x0 + 2 + 4 * k), s * 48)], fill=(120, 230, 255, 255),
                      width=s)
            draw.line([(s * (x0 + 2), s * (36 + 4 * k)), (s * (x0 + 14), s * (36 + 4 * k))],
                      fill=(120, 230, 255, 255), width=s)
        draw.ellipse([s * (x0 + 15), s * 39, s * (x0 + 21), s * 45], fill=style)  # its style
    for y, (a, b) in ((16, (91, 97)), (24, (97, 91))):  # arrows both ways
        draw.line([(s * a, s * y), (s * b, s * y)], fill=(255, 210, 80, 255), width=2 * s)
        tip = 1 if b > a else -1
        draw.polygon([(s * b, s * y), (s * (b - 3 * tip), s * (y - 2)), (s * (b - 3 * tip), s * (y + 2))],
                     fill=(255, 210, 80, 255))


def _finish(image, path: Path, label: str | None = None, font_size: int = 30):
    if label:
        draw = ImageDraw.Draw(image)
        try:
            font = ImageFont.truetype("DejaVuSans-Bold.ttf", font_size * SCALE)
        except OSError:
            font = ImageFont.load_default()
        box = draw.textbbox((0, 0), label, font=font)
        x = SIZE * SCALE - (box[2] - box[0]) - 10 * SCALE
        y = SIZE * SCALE - (box[3] - box[1]) - 16 * SCALE
        draw.text((x, y), label, font=font, fill=(255, 255, 255, 255), stroke_width=2 * SCALE,
                  stroke_fill=(28, 44, 66, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((SIZE, SIZE), Image.LANCZOS).save(path, optimize=True)
    print(path)


def main():
    """Draw every icon."""
    image, draw = _canvas()
    _blob(draw, (54, 60), (34, 30), fill=(200, 200, 205, 235))                                  # fixed (MR-like)
    _blob(draw, (74, 70), (32, 28), fill=(240, 140, 50, 150), outline=(255, 190, 90, 255), width=3)  # moving (CT-like)
    _finish(image, REPO / "Resources" / "Icons" / "MultiModalRegistration.png")

    image, draw = _canvas()
    _blob(draw, (56, 52), (36, 30), fill=(200, 200, 205, 235))
    _blob(draw, (66, 58), (34, 28), fill=(240, 140, 50, 140), outline=(255, 190, 90, 255), width=3)
    _finish(image, REPO / "MIRegistration" / "Resources" / "Icons" / "MIRegistration.png", label="MI")

    image, draw = _canvas()
    _blob(draw, (52, 56), (30, 26), fill=(200, 200, 205, 90))
    _blob(draw, (62, 62), (28, 24), fill=(240, 140, 50, 70))
    _loss_curve(draw)
    _finish(image, REPO / "RegistrationTraining" / "Resources" / "Icons" / "RegistrationTraining.png", label="Train",
            font_size=24)

    image, draw = _canvas()
    _blob(draw, (50, 66), (32, 28), fill=(200, 200, 205, 225))
    _blob(draw, (60, 72), (30, 26), fill=(240, 140, 50, 140), outline=(255, 190, 90, 255), width=3)
    _control_points(draw)
    _metric_steps(draw)
    _finish(image, REPO / "LearnedMetric" / "Resources" / "Icons" / "LearnedMetric.png", label="Metric", font_size=22)

    image, draw = _canvas()
    _blob(draw, (48, 68), (32, 28), fill=(200, 200, 205, 225))                                  # fixed
    _blob(draw, (58, 74), (30, 26), fill=(205, 205, 215, 110), outline=(235, 235, 245, 255), width=3)  # moving
    _attention_glow(image, (52, 70), 34)
    draw = ImageDraw.Draw(image)
    _scale_grids(draw)
    _finish(image, REPO / "MultiscaleRegistration" / "Resources" / "Icons" / "MultiscaleRegistration.png", label="FMIR",
            font_size=24)

    image, draw = _canvas()
    _blob(draw, (46, 66), (32, 28), fill=(200, 200, 205, 225))                                  # fixed (MR-like)
    _blob(draw, (56, 72), (30, 26), fill=(240, 140, 50, 140), outline=(255, 190, 90, 255), width=3)  # moving (CT-like)
    _gradient_branches(draw)
    _finish(image, REPO / "GradRegistration" / "Resources" / "Icons" / "GradRegistration.png", label="Grad",
            font_size=24)

    image, draw = _canvas()
    _blob(draw, (46, 68), (32, 28), fill=(200, 200, 205, 225))                                  # fixed (T1-like)
    _blob(draw, (56, 74), (30, 26), fill=(240, 140, 50, 140), outline=(255, 190, 90, 255), width=3)  # moving (T2-like)
    _disentangled_codes(draw)
    _finish(image, REPO / "DisentangledRegistration" / "Resources" / "Icons" / "DisentangledRegistration.png",
            label="T1⇄T2", font_size=20)


if __name__ == "__main__":
    main()

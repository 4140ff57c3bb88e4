"""A synthetic captioned dataset of simple shapes, and a checker that reads an image back.

Images are one shape (circle, square, triangle, star) in a named colour on a background of
another named colour, at a random size and position; captions name the three in varied
wording. The checker measures the pixels directly: background from the border, the shape as the
pixels far from it, its colour as their median, its kind from how much of its bounding box it
fills (square 1.0, circle 0.79, triangle 0.5, star 0.33) and, for the last two, where its
widest row is (a triangle's at the bottom, a star's across its arms). NumPy and Pillow only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 40),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
TEMPLATES = (
    "a {color} {shape} on a {bg} background",
    "a {size} {color} {shape} on a {bg} background",
    "{color} {shape}, {bg} background",
    "a picture of a {color} {shape} in front of a {bg} background",
    "a {color} {shape} on {bg}",
    "{bg} background with a {color} {shape}",
)
SIZES = {"small": (0.28, 0.4), "large": (0.6, 0.8)}
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.64  # between 1.0, 0.79 and the pointed shapes' 0.5 / 0.33
TRIANGLE_WIDEST = 0.7  # widest row, as a fraction of the height from the top: 1.0 vs 0.38
CORNER, CORNER_FILL = 0.2, 0.5  # corner patches (fraction of the box side): a circle fills ~17%
# of them, a square all, a square with rounded corners (as decoders draw them) ~80%


@dataclass(frozen=True)
class Sample:
    shape: str
    color: str
    background: str
    caption: str


def draw(shape: str, color: str, background: str, size: int, rng: np.random.Generator,
         scale: float | None = None) -> Image.Image:
    """One shape of `scale` (fraction of the image side) at a random position."""
    img = Image.new("RGB", (size, size), COLORS[background])
    pen = ImageDraw.Draw(img)
    scale = rng.uniform(0.35, 0.75) if scale is None else scale
    d = scale * size
    cx = rng.uniform(d / 2 + 1, size - d / 2 - 1)
    cy = rng.uniform(d / 2 + 1, size - d / 2 - 1)
    r = d / 2
    fill = COLORS[color]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.382
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + r * 0.1 + radius * math.sin(angle)))
        pen.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def sample(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, Sample]:
    """A random image and its caption."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    background = rng.choice([c for c in names if c != color])
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    size_word = None
    scale = None
    if "{size}" in template:
        size_word = ("small", "large")[rng.integers(2)]
        scale = rng.uniform(*SIZES[size_word])
    caption = template.format(color=color, shape=shape, bg=background, size=size_word)
    return draw(shape, color, str(background), size, rng, scale), Sample(shape, color, str(background), caption)


def batch(rng: np.random.Generator, n: int, size: int = 64) -> tuple[np.ndarray, list[Sample]]:
    """n images as a float32 array [n, 3, size, size] in [-1, 1], with their samples."""
    images, samples = zip(*(sample(rng, size) for _ in range(n)), strict=True)
    arr = np.stack([np.asarray(im, np.float32) for im in images]) / 127.5 - 1
    return arr.transpose(0, 3, 1, 2), list(samples)


def _nearest(rgb: np.ndarray) -> str:
    names = list(COLORS)
    table = np.array([COLORS[n] for n in names], np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


@dataclass(frozen=True)
class Reading:
    shape: str | None
    color: str | None
    background: str

    def matches(self, target: Sample) -> bool:
        return (self.shape, self.color, self.background) == (target.shape, target.color, target.background)


def check(image: Image.Image) -> Reading:
    """What the image shows: background colour, shape colour, shape kind (None if no shape)."""
    px = np.asarray(image.convert("RGB"), np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb)
    distance = np.sqrt(((px - bg_rgb) ** 2).sum(-1))
    far = np.percentile(distance, 99)
    if far < 40:
        return Reading(None, None, background)
    mask = distance > far / 2
    if mask.sum() < 12:
        return Reading(None, None, background)
    color = _nearest(np.median(px[mask], axis=0))
    rows = np.nonzero(mask.any(1))[0]
    cols = np.nonzero(mask.any(0))[0]
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    fill = box.mean()
    c = max(1, round(CORNER * min(box.shape)))
    corners = np.mean([box[:c, :c].mean(), box[:c, -c:].mean(), box[-c:, :c].mean(), box[-c:, -c:].mean()])
    if fill >= SQUARE_FILL or (fill >= CIRCLE_FILL and corners >= CORNER_FILL):
        shape = "square"
    elif fill >= CIRCLE_FILL:
        shape = "circle"
    else:
        widths = box.sum(1)
        widest = np.nonzero(widths >= widths.max() * 0.95)[0].mean() / max(len(widths) - 1, 1)
        shape = "triangle" if widest >= TRIANGLE_WIDEST else "star"
    return Reading(shape, color, background)

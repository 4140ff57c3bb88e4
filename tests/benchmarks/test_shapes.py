"""The shapes dataset and its checker agree on the dataset's own images."""

from __future__ import annotations

import numpy as np
from PIL import ImageFilter

from edgediff.benchmarks import shapes


def test_checker_reads_generated_images():
    rng = np.random.default_rng(123)
    pairs = [shapes.sample(rng) for _ in range(500)]
    agree = sum(shapes.check(img).matches(s) for img, s in pairs) / len(pairs)
    assert agree >= 0.98


def test_checker_survives_soft_edges():
    """Decoded images are softer than drawn ones."""
    rng = np.random.default_rng(7)
    pairs = [shapes.sample(rng) for _ in range(300)]
    soft = [(img.filter(ImageFilter.GaussianBlur(0.8)), s) for img, s in pairs]
    assert sum(shapes.check(img).matches(s) for img, s in soft) / len(soft) >= 0.95


def test_captions_name_what_is_drawn():
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, s = shapes.sample(rng)
        assert s.shape in s.caption and s.color in s.caption and s.background in s.caption
        assert s.color != s.background


def test_checker_rejects_a_blank_image():
    from PIL import Image

    reading = shapes.check(Image.new("RGB", (64, 64), shapes.COLORS["blue"]))
    assert reading.shape is None and reading.background == "blue"


def test_batch_is_scaled_to_unit_range():
    images, samples = shapes.batch(np.random.default_rng(0), 4)
    assert images.shape == (4, 3, 64, 64) and len(samples) == 4
    assert images.min() >= -1 and images.max() <= 1


def test_rounded_squares_are_squares_and_circles_stay_circles():
    """Decoders round a square's corners; corner occupancy still tells it from a circle."""
    from PIL import Image, ImageDraw

    for radius in (0.1, 0.2, 0.25):
        img = Image.new("RGB", (64, 64), shapes.COLORS["green"])
        ImageDraw.Draw(img).rounded_rectangle((12, 14, 50, 52), radius=radius * 38, fill=shapes.COLORS["red"])
        assert shapes.check(img).shape == "square", radius
    img = Image.new("RGB", (64, 64), shapes.COLORS["green"])
    ImageDraw.Draw(img).ellipse((12, 14, 50, 52), fill=shapes.COLORS["red"])
    assert shapes.check(img).shape == "circle"

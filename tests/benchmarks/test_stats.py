"""Statistics and quality metrics on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgediff.benchmarks.stats import psnr, ssim, summary


def test_summary():
    assert summary([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert math.isnan(summary([])["median"])


def test_psnr_known_values():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[...] = 1  # MSE 1 -> 20 log10(255)
    assert psnr(a, b) == pytest.approx(48.1308, abs=1e-4)
    with pytest.raises(ValueError, match="shape"):
        psnr(a, np.zeros((2, 2, 3)))


def _ssim_naive(a, b, peak=255.0):
    """Direct per-window evaluation of Wang et al.'s formula, for one channel."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / 4.5)
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cv = (w * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cv + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_definition():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 20)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    assert ssim(a, b) == pytest.approx(_ssim_naive(a, b), rel=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0

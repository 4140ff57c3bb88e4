"""The pixels Stable Video Diffusion's image encoder sees, in NumPy: what diffusers'
StableVideoDiffusionPipeline._encode_image does before the CLIP vision model. The image in [0, 1]
is taken to [-1, 1], blurred with a separable Gaussian (reflect padding; sigma and kernel size
from the scale factors, as skimage's anti-aliasing picks them), resized by bicubic interpolation
with aligned corners (torch's, a = -0.75, edges clamped), taken back to [0, 1] and normalised with
the feature extractor's mean and std (no resize, crop or rescale there). The image is never
cropped: a non-square one is squeezed to size x size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from edgediff.errors import SourceError, UsageError

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CUBIC_A = -0.75  # torch's bicubic


def _pixels01(image) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1] from a PIL image or an HxWx3 uint8 (0-255) or float (0-1) array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 1:
        raise UsageError(f"image: give an RGB image (a PIL image or an HxWx3 array), got an array of shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise UsageError(f"image: an array of {array.dtype}; give uint8 (0-255) or floats (0-1)")
    return array.astype(np.float32)


def _gaussian(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float32) - size // 2  # size is odd
    kernel = np.exp(-(x * x) / (2 * np.float32(sigma) ** 2))
    return kernel / kernel.sum()


def _reflect(q: np.ndarray, n: int) -> np.ndarray:
    """Indices past either edge mirrored back (the edge itself not repeated: torch's 'reflect')."""
    if n == 1:
        return np.zeros_like(q)
    q = np.abs(q) % (2 * n - 2)
    return np.where(q > n - 1, 2 * n - 2 - q, q)


def _cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The 4 source indices [n_out, 4] (clamped to the edge) and weights of each output position,
    as torch's bicubic interpolation with align_corners=True computes them (in float32)."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = (scale * np.arange(n_out, dtype=np.float32)).astype(np.float32)
    base = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - base.astype(np.float32), 0, 1).astype(np.float32)
    a = np.float32(_CUBIC_A)

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    taps = np.clip(base[:, None] + np.arange(-1, 3)[None], 0, n_in - 1)
    return taps, weights


def _axis_weights(n_in: int, n_out: int, blur: np.ndarray) -> np.ndarray:
    """[n_out, n_in]: the blur (reflect-padded) followed by the bicubic resize along one axis."""
    taps, cubic = _cubic_taps(n_in, n_out)
    pad = (len(blur) - 1) // 2
    sources = _reflect(taps[:, :, None] - pad + np.arange(len(blur))[None, None], n_in)  # [n_out, 4, k]
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out)[:, None, None], sources),
              cubic[:, :, None].astype(np.float64) * blur[None, None].astype(np.float64))
    return weights


def _apply(x: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """x contracted with weights [n_out, n_in] along `axis`: each output reads one short run of
    inputs (the cubic's 4 taps widened by the blur), so a few strided sums, not a matmul."""
    nonzero = weights != 0
    n_out, n_in = weights.shape
    first = nonzero.argmax(axis=1)
    last = n_in - 1 - nonzero[:, ::-1].argmax(axis=1)
    span = int((last - first).max()) + 1
    start = np.clip(first, 0, n_in - span)
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = np.zeros(x.shape[:axis] + (n_out,) + x.shape[axis + 1:], np.float32)
    for offset in range(span):
        column = weights[np.arange(n_out), start + offset].astype(np.float32)
        out += column.reshape(shape) * np.take(x, start + offset, axis=axis)
    return out


def resize_with_antialiasing(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """diffusers' `_resize_with_antialiasing` on one [H, W, C] float32 image: per axis a Gaussian
    blur (sigma (factor - 1) / 2, at least 0.001; an odd kernel of about 4 sigma, at least 3),
    then the bicubic resize, both linear and so applied as one weight matrix an axis."""
    out = x
    for axis, n_out in ((0, size[0]), (1, size[1])):
        n_in = x.shape[axis]
        sigma = max((n_in / n_out - 1.0) / 2.0, 0.001)
        k = int(max(2.0 * 2 * sigma, 3))
        out = _apply(out, _axis_weights(n_in, n_out, _gaussian(k + 1 - k % 2, sigma)), axis)
    return out


def clip_pixels(image, size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """The `pixel_values` [1, 3, size, size] float32 SVD's image encoder takes for `image` (a PIL
    image, or an HxWx3 uint8 or [0, 1] float array), as StableVideoDiffusionPipeline makes them."""
    x = _pixels01(image) * np.float32(2.0) - np.float32(1.0)
    x = resize_with_antialiasing(x, (size, size))
    x = (x + np.float32(1.0)) / np.float32(2.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def read_normalisation(folder) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from a diffusers folder's feature_extractor/preprocessor_config.json
    (`image_mean`, `image_std`); OpenAI CLIP's where the folder has no such file or key."""
    path = Path(folder) / "feature_extractor" / "preprocessor_config.json"
    if not path.is_file():
        return CLIP_MEAN, CLIP_STD
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        mean = tuple(float(v) for v in config.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in config.get("image_std", CLIP_STD))
    except (ValueError, TypeError, AttributeError) as exc:
        raise SourceError(f"{path}: not a readable preprocessor config ({exc})") from exc
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(s) and s > 0 for s in std):
        raise SourceError(f"{path}: image_mean and image_std must be three numbers each, the std positive "
                          f"(got {list(mean)} and {list(std)})")
    return mean, std

"""Hires fix, A1111's two-pass txt2img: the image drawn at the asked size, made larger (in latent
space, or as pixels with Lanczos, Nearest or an ESRGAN-family model), then image to image at the
larger size with the same seed.

Ported from AUTOMATIC1111/stable-diffusion-webui v1.10 (`modules/processing.py`:
StableDiffusionProcessingTxt2Img.calculate_target_resolution and sample_hr_pass;
`modules/sd_samplers_common.py` setup_img2img_steps; `modules/upscaler.py` Upscaler.upscale and its
Lanczos/Nearest; `modules/shared.py` latent_upscale_modes). The latent upscalers are
torch.nn.functional.interpolate's modes, written here in NumPy after torch's CPU kernels
(`aten/src/ATen/native/UpSample.h`, `UpSampleKernel.cpp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgediff.errors import SourceError, UsageError, arg

# A1111's latent upscalers: name -> (torch interpolate mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# pixel upscalers without a model: 'None' resizes straight to the size with Lanczos
IMAGE_FILTERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
DEFAULT_UPSCALER = "Latent"  # A1111's when none is named


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distance |t| (a = -0.75 torch's bicubic, -0.5 its
    antialiased one and Pillow's)."""
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))


def _weights(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    """[n_out, n_in]: how each output row mixes input rows, as torch.nn.functional.interpolate
    with `size` (align_corners=False) computes it along one axis."""
    scale = n_in / n_out
    out = np.arange(n_out, dtype=np.float64)
    w = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    if mode in ("nearest", "nearest-exact"):
        src = np.floor((out + 0.5) * scale if mode == "nearest-exact" else out * scale).astype(int)
        w[rows, np.minimum(src, n_in - 1)] = 1
        return w
    if antialias:  # a filter over every input within its support, normalized (as Pillow resamples)
        size = 2 if mode == "bilinear" else 4
        support = size / 2 * scale if scale >= 1 else size / 2
        inv = 1 / scale if scale >= 1 else 1.0
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            x = (np.arange(lo, hi) - center + 0.5) * inv
            taps = np.maximum(0.0, 1 - np.abs(x)) if mode == "bilinear" else _cubic(x, -0.5)
            w[i, lo:hi] = taps / taps.sum() if taps.sum() else 0
        return w
    src = (out + 0.5) * scale - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0)
        lo = np.floor(src).astype(int)
        frac = src - lo
        hi = np.minimum(lo + 1, n_in - 1)
        np.add.at(w, (rows, lo), 1 - frac)
        np.add.at(w, (rows, hi), frac)
        return w
    if mode == "bicubic":
        lo = np.floor(src).astype(int)
        frac = src - lo
        for k in range(-1, 3):
            np.add.at(w, (rows, np.clip(lo + k, 0, n_in - 1)), _cubic(frac - k, -0.75))
        return w
    raise UsageError(f"unknown interpolation mode '{mode}'")


def interpolate(x: np.ndarray, height: int, width: int, mode: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """[B, C, h, w] -> [B, C, height, width], as torch.nn.functional.interpolate(x, size=(height,
    width), mode=mode, antialias=antialias) (align_corners=False)."""
    rows = _weights(x.shape[-2], height, mode, antialias)
    cols = _weights(x.shape[-1], width, mode, antialias)
    return np.einsum("oh,bchw,pw->bcop", rows, x.astype(np.float64), cols).astype(np.float32)


@dataclass(frozen=True)
class Target:
    """The second pass's size and how it is reached: the first image is made `upscale` (width,
    height) large, then its latent cropped from (`left`, `top`) (latent pixels) to `latent` (h, w)."""

    upscale: tuple[int, int]
    latent: tuple[int, int]
    top: int
    left: int
    fields: dict

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the final image in pixels: the latent's times the VAE's factor."""
        return self.latent[1] * self.down, self.latent[0] * self.down

    down: int = 8  # image pixels per latent pixel


def target(width: int, height: int, scale: float | None, resize_x: int, resize_y: int, down: int = 8,
           patch: int = 1) -> Target:
    """calculate_target_resolution: `scale` times the first size, or `resize_x` x `resize_y` (one
    of them 0: the other side kept in proportion; both: the image covers that size and its latent is
    cropped to it, centred). The latent is `down` times smaller than the image and its sides are
    a multiple of `patch` (a DiT's), what is left over cropped off the bottom and right."""
    if resize_x == 0 and resize_y == 0:
        fields = {"Hires upscale": f"{scale:g}"}
        up_x, up_y = int(width * scale), int(height * scale)
        cut_x = cut_y = 0
    else:
        fields = {"Hires resize": f"{resize_x}x{resize_y}"}
        cut_x = cut_y = 0
        if resize_y == 0:
            up_x, up_y = resize_x, resize_x * height // width
        elif resize_x == 0:
            up_x, up_y = resize_y * width // height, resize_y
        else:
            if width / height < resize_x / resize_y:
                up_x, up_y = resize_x, resize_x * height // width
            else:
                up_x, up_y = resize_y * width // height, resize_y
            cut_x, cut_y = (up_x - resize_x) // down, (up_y - resize_y) // down
    lat_h, lat_w = up_y // down - cut_y, up_x // down - cut_x
    lat_h, lat_w = lat_h - lat_h % patch, lat_w - lat_w % patch
    if lat_h <= 0 or lat_w <= 0:
        raise UsageError(f"hires fix to {up_x}x{up_y}: too small for a {down * patch}-pixel multiple; raise "
                         f"{arg('hires_scale')} or {arg('hires_width')}/{arg('hires_height')}")
    return Target((up_x, up_y), (lat_h, lat_w), cut_y // 2, cut_x // 2, fields, down)


def second_pass_steps(steps: int, strength: float) -> tuple[int, int]:
    """setup_img2img_steps with the steps given (A1111's hires pass, or img2img_fix_steps): a
    schedule of int(steps / strength) steps (strength at most 0.999) of which the last `steps` run.
    (total, first step run)."""
    total = int(steps / min(strength, 0.999))
    return total, total - steps


def resolve_upscaler(upscaler, device: str = "cpu", threads: int | None = None):
    """A latent mode's or image filter's A1111 name (any case), a loaded runtime.upscale.Upscaler,
    or an ESRGAN-family file (.pth/.pt/.safetensors), loaded. (name for the parameters text, what
    runs it)."""
    from edgediff.runtime import upscale

    if isinstance(upscaler, upscale.Upscaler):
        return upscaler.name, upscaler
    if isinstance(upscaler, str):
        for name in (*LATENT_MODES, *IMAGE_FILTERS):
            if upscaler.strip().lower() == name.lower():
                return name, name
    if isinstance(upscaler, (str, Path)) and (Path(upscaler).suffix.lower() in upscale.SUFFIXES
                                              or Path(upscaler).is_file()):
        try:
            loaded = upscale.load_upscaler(upscaler, device, threads)
        except SourceError as exc:
            raise UsageError(f"{arg('hires_upscaler')}: {exc}") from exc
        return loaded.name, loaded
    raise UsageError(f"{arg('hires_upscaler')} {upscaler!r}: not an upscaler; give one of "
                     f"{', '.join(repr(n) for n in (*LATENT_MODES, *IMAGE_FILTERS))}, or an ESRGAN-family model "
                     f"file ({', '.join(upscale.SUFFIXES)})")


def upscale_image(image: Image.Image, width: int, height: int, upscaler) -> Image.Image:
    """images.resize_image(0, image, width, height, upscaler): the upscaler (a filter's name or a
    loaded model) run toward the larger scale of the two sides, at most 3 passes, to that scale's
    size rounded down to 8 pixels; then Lanczos to exactly `width` x `height`."""
    from edgediff.runtime import upscale

    scale = max(width / image.width, height / image.height)
    if upscaler != "None" and scale > 1:
        dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
        if isinstance(upscaler, upscale.Upscaler):
            image = upscale.upscale(upscaler, image, size=dest)
        else:
            for i in range(3):
                if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
                    break
                shape = image.size
                image = image.resize((int(image.width * scale), int(image.height * scale)),
                                     resample=IMAGE_FILTERS[upscaler])
                if shape == image.size:
                    break
            if image.size != dest:
                image = image.resize(dest, resample=Image.Resampling.LANCZOS)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image


def first_pass_image(pixels: np.ndarray) -> Image.Image:
    """The decoded first pass [1, 3, H, W] in [-1, 1] as A1111 hands it to the upscaler: clamped
    to [0, 1], times 255 and truncated (not rounded) to 8 bits."""
    values = np.clip((pixels[0] + 1.0) / 2.0, 0.0, 1.0).transpose(1, 2, 0)
    return Image.fromarray((255.0 * values).astype(np.uint8))


def check(scale, width, height, steps, strength) -> None:
    for name, value in (("hires_width", width), ("hires_height", height), ("hires_steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{arg(name)} must be a whole number >= 0 (got {value!r})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise UsageError(f"{arg('hires_scale')} must be a positive number (got {scale!r})")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise UsageError(f"{arg('hires_strength')} must be in (0, 1] (got {strength!r})")

"""VAE decode/encode around the latent format's scale and shift, whole or in tiles.

Tiles bound the memory of large images: the decoder's activations at 2048x2048 take ~20 GB
whole, a 512-pixel tile's ~1 GB. Neighbouring tiles overlap and are blended with linear
ramps, so no seam shows; what tiling cannot keep is the global statistics of the VAE's
GroupNorms and its mid-block attention, computed per tile (as in diffusers' tiled decode)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgediff.runtime.sessions import Component


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of `tile` covering `length`, each sharing at least `overlap` with the
    one before (the last is aligned to the end)."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def _ramp(n: int, rise: int, fall: int) -> np.ndarray:
    """Weights along one side of a tile: rising over its first `rise` values, falling over its
    last `fall` (0 at the image's border, where no neighbour blends in)."""
    w = np.ones(n)
    if rise:
        w[:rise] = np.minimum(w[:rise], (np.arange(rise) + 0.5) / rise)
    if fall:
        w[-fall:] = np.minimum(w[-fall:], (np.arange(fall)[::-1] + 0.5) / fall)
    return w


def tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, overlap: int,
          up: int = 1, down: int = 1) -> np.ndarray:
    """`run` over overlapping tiles of `x` (tile and overlap in x's pixels), blended; `run` maps a
    tile of h x w to h*up/down x w*up/down (8/1 for a decoder, 1/8 for an encoder)."""
    height, width = x.shape[-2:]
    out = weight = None
    edge = overlap * up // down
    for y in starts(height, tile, overlap):
        for x0 in starts(width, tile, overlap):
            part = run(x[..., y:y + tile, x0:x0 + tile])
            if out is None:
                out = np.zeros(part.shape[:-2] + (height * up // down, width * up // down), np.float32)
                weight = np.zeros(out.shape[-2:], np.float32)
            h, w = part.shape[-2:]
            oy, ox = y * up // down, x0 * up // down
            mask = np.outer(_ramp(h, edge * (y > 0), edge * (y + tile < height)),
                            _ramp(w, edge * (x0 > 0), edge * (x0 + tile < width))).astype(np.float32)
            out[..., oy:oy + h, ox:ox + w] += part * mask
            weight[oy:oy + h, ox:ox + w] += mask
    return out / weight


def decode(vae_decoder: Component, latents: np.ndarray, scale: float, shift: float,
           tile: int = 0, downscale: int = 8, frames: int = 0) -> np.ndarray:
    """Denoiser latents -> images in [-1, 1]; with `tile` (pixels), in overlapping tiles. With
    `frames`, the batch axis is one video's frames, decoded `frames` at a time (a temporal decoder
    mixes the frames of one call: diffusers' decode_chunk_size)."""
    latents = latents / scale + shift
    run = lambda z: vae_decoder.run({"latent_sample": z})["sample"]  # noqa: E731
    if frames > 0:
        return np.concatenate([decode(vae_decoder, latents[i:i + frames], 1.0, 0.0, tile, downscale)
                               for i in range(0, len(latents), frames)])
    if not tile:
        return run(latents)
    return tiled(run, latents, tile // downscale, tile // 4 // downscale, up=downscale)


def encode(vae_encoder: Component, images: np.ndarray, rng, scale: float, shift: float,
           tile: int = 0, downscale: int = 8) -> np.ndarray:
    """Images in [-1, 1] -> denoiser latents, sampling the posterior with `rng` as diffusers does."""
    run = lambda x: vae_encoder.run({"sample": x})["latent_parameters"]  # noqa: E731
    moments = tiled(run, images, tile, tile // 4, down=downscale) if tile else run(images)
    mean, logvar = np.split(moments, 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    z = mean + std * rng.randn(mean.shape)
    return ((z - shift) * scale).astype(np.float32)

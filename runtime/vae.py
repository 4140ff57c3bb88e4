"""VAE decode/encode around the latent format's scale and shift."""

from __future__ import annotations

import numpy as np

from edgediff.runtime.sessions import Component


def decode(vae_decoder: Component, latents: np.ndarray, scale: float, shift: float) -> np.ndarray:
    """Denoiser latents -> images in [-1, 1]."""
    return vae_decoder.run({"latent_sample": latents / scale + shift})["sample"]


def encode(vae_encoder: Component, images: np.ndarray, rng, scale: float, shift: float) -> np.ndarray:
    """Images in [-1, 1] -> denoiser latents, sampling the posterior with `rng` as diffusers does."""
    moments = vae_encoder.run({"sample": images})["latent_parameters"]
    mean, logvar = np.split(moments, 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    z = mean + std * rng.randn(mean.shape)
    return ((z - shift) * scale).astype(np.float32)

"""A cheap look at an image while it is being sampled: the latent mapped to RGB by one fixed linear
map per latent format ("latent2rgb", as ComfyUI's latent previews and A1111's "Approx cheap" do),
with no VAE. The server's `/progress` `current_image` is this; the CLI can write it to a file.

The maps are ComfyUI's `latent_rgb_factors` and `latent_rgb_factors_bias` in `comfy/latent_formats.py`
(comfyanonymous/ComfyUI at 040a3243468ecefd1f2802592d90458f1ce4d65f): per latent channel, its
contribution to R, G and B, fitted from latents to their VAE decodes. They apply to the latent the
denoiser sees (the VAE's latent scaled and shifted), and the result maps from [-1, 1] to [0, 255]
as ComfyUI's `preview_to_image` does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from edgediff.errors import UsageError

# (channels, scale, shift) as families.LatentFormat states them -> (channels x RGB factors, RGB bias)
LATENT_RGB: dict[tuple[int, float, float], tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    (4, 0.18215, 0.0): (  # SD 1.x, SD 2.x, SD-Turbo (ComfyUI's SD15)
        ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
        (0.0, 0.0, 0.0)),
    (4, 0.13025, 0.0): (  # SDXL, its refiner, SDXL-Turbo (ComfyUI's SDXL)
        ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
        (0.1084, -0.0175, -0.0011)),
    (16, 1.5305, 0.0609): (  # SD3 (ComfyUI's SD3)
        ((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
         (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
         (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
         (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189)),
        (0.2394, 0.2135, 0.1925)),
    (16, 0.3611, 0.1159): (  # Flux.1 (ComfyUI's Flux)
        ((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
         (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
         (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
         (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778)),
        (-0.0329, -0.0718, -0.0851)),
}


def _format(of) -> tuple[int, float, float, int]:
    """(channels, scale, shift, VAE downscale) of a package's manifest, a family name or a
    families.LatentFormat."""
    if isinstance(of, str):
        from edgediff.families import get_family

        of = get_family(of).latent
    if hasattr(of, "latent_channels"):  # a Manifest
        return of.latent_channels, of.latent_scale, of.latent_shift, of.vae_downscale
    return of.channels, of.scale, of.shift, of.downscale


def latent_rgb(channels: int, scale: float, shift: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The (channels x 3) factors and bias for this latent format: its own, else those of a format
    with as many channels; None where no format has that many."""
    found = LATENT_RGB.get((channels, scale, shift)) or next(
        (v for (c, _, _), v in LATENT_RGB.items() if c == channels), None)
    if found is None:
        return None
    return np.asarray(found[0], np.float32), np.asarray(found[1], np.float32)


def preview(latent: np.ndarray, of, size: tuple[int, int] | None = None) -> Image.Image:
    """The image a latent (1, C, h, w) or (C, h, w) shows, cheaply. `of`: the package's manifest,
    a family name ("sd1", "flux", ...) or a LatentFormat; `size` (width, height): the default is the
    image's, the latent's times the VAE's downscale. A latent of a format with an unknown channel
    count shows its channel mean in grey."""
    channels, scale, shift, downscale = _format(of)
    x = np.asarray(latent, np.float32)
    x = x[0] if x.ndim == 4 else x
    if x.ndim != 3 or x.shape[0] != channels:
        raise UsageError(f"preview: a latent of {channels} channels, (1, {channels}, h, w), was expected; got the "
                         f"shape {tuple(np.shape(latent))}")
    found = latent_rgb(channels, scale, shift)
    if found is None:
        rgb = np.repeat(x.mean(axis=0)[..., None], 3, axis=2)
    else:
        factors, bias = found
        rgb = np.einsum("chw,cr->hwr", x, factors) + bias
    pixels = np.round(np.clip((rgb + 1) / 2, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    size = size or (x.shape[2] * downscale, x.shape[1] * downscale)
    return image if image.size == tuple(size) else image.resize(size, Image.Resampling.BILINEAR)

"""The cheap latent preview: one fixed linear map per latent format (ComfyUI's latent2rgb
factors), sized as the image, for every family's latent format."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import UsageError
from edgediff.families import FAMILIES
from edgediff.runtime.preview import LATENT_RGB, preview


def test_every_family_has_its_own_map():
    """A family whose latent format has no row would preview with another format's colours."""
    for family in FAMILIES.values():
        f = family.latent
        assert (f.channels, f.scale, f.shift) in LATENT_RGB, family.name
    for (channels, _, _), (factors, bias) in LATENT_RGB.items():
        assert np.shape(factors) == (channels, 3) and len(bias) == 3


def test_a_channel_shows_its_row_of_factors_at_the_image_size():
    latent = np.zeros((1, 4, 8, 12), np.float32)
    latent[0, 2] = 1.0
    image = preview(latent, "sd1")
    assert image.mode == "RGB" and image.size == (96, 64)  # the image's size: 8x the latent's
    expected = np.round((np.array([-0.2829, 0.1762, 0.2721]) + 1) / 2 * 255)
    assert np.array_equal(np.asarray(image)[10, 10], expected)
    grey = preview(np.zeros((4, 8, 12), np.float32), "sdxl", size=(12, 8))  # SDXL's bias, at the latent's size
    assert grey.size == (12, 8)
    assert np.array_equal(np.asarray(grey)[0, 0], np.round((np.array([0.1084, -0.0175, -0.0011]) + 1) / 2 * 255))


def test_flux_and_sd3_latents_and_a_package_manifest(tiny_package):
    from edgediff.runtime.package import open_package

    rng = np.random.default_rng(0)
    for family in ("flux", "sd3"):
        image = preview(rng.standard_normal((1, 16, 4, 6)).astype(np.float32), family)
        assert image.size == (48, 32) and np.asarray(image).std() > 0
    manifest = open_package(tiny_package("sd1")).manifest
    assert preview(rng.standard_normal((1, 4, 5, 7)), manifest).size == (7 * manifest.vae_downscale,
                                                                         5 * manifest.vae_downscale)


def test_unknown_formats_and_wrong_shapes():
    from edgediff.families import LatentFormat

    odd_scale = preview(np.ones((1, 4, 2, 2)), LatentFormat(channels=4, scale=0.5))  # 4 channels: SD's map
    assert odd_scale.size == (16, 16)
    grey = np.asarray(preview(np.full((1, 8, 2, 2), 0.5), LatentFormat(channels=8, scale=1.0)))
    assert (grey == round(0.75 * 255)).all()  # no map for 8 channels: their mean in grey
    with pytest.raises(UsageError, match=r"a latent of 4 channels"):
        preview(np.zeros((1, 16, 2, 2)), "sd1")

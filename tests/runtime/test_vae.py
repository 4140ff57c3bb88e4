"""Tiled VAE: the blending is exact for a model without reach across pixels, and the trained
embedded model's tiled image stays close to its whole one."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.runtime import vae

from reference import psnr


def _psnr_signed(a, b) -> float:
    """PSNR of images in [-1, 1]."""
    return float(10 * np.log10(4.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


@pytest.mark.parametrize("length,tile,overlap", [(8, 8, 2), (20, 8, 2), (33, 16, 4), (5, 16, 4)])
def test_tiles_cover_the_length_with_at_least_the_overlap(length, tile, overlap):
    s = vae.starts(length, tile, overlap)
    covered = np.zeros(length, bool)
    for a in s:
        covered[a:a + tile] = True
    assert covered.all() and s[0] == 0 and s[-1] + min(tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(s, s[1:], strict=False))


def test_blending_is_exact_for_pixelwise_models():
    """Upsampling by repetition (a decoder without reach) and 8x8 block means (an encoder whose
    tiles start on block edges): the blended tiles equal the whole result, border rows too."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4, 21, 30)).astype(np.float32)
    up = lambda t: t.repeat(8, -2).repeat(8, -1)  # noqa: E731
    np.testing.assert_allclose(vae.tiled(up, z, 8, 2, up=8), up(z), rtol=1e-6)
    x = rng.standard_normal((1, 3, 96, 136)).astype(np.float32)
    down = lambda t: t.reshape(*t.shape[:2], t.shape[2] // 8, 8, t.shape[3] // 8, 8).mean((3, 5))  # noqa: E731
    np.testing.assert_allclose(vae.tiled(down, x, 32, 8, down=8), down(x), rtol=1e-5, atol=1e-6)


def test_tiled_decode_keeps_the_image_as_well_as_diffusers_own(default_package):
    """The embedded model's trained VAE on 64-pixel tiles (its GroupNorm statistics and mid-block
    attention see one tile at a time): as close to the whole decode as diffusers' tiled_decode
    with the same tiles, and through the pipeline, txt2img and img2img, as close as that."""
    import torch
    from diffusers import AutoencoderKL

    from edgediff.convert import BUILTIN, DEFAULT_MODEL
    from edgediff.runtime import Pipeline

    pipe = Pipeline(default_package, device="cpu", vae_tile=64)
    plain = Pipeline(default_package, device="cpu")
    args = dict(prompt="a red circle on a blue background", steps=6, seed=3, width=192, height=192)
    whole = plain.generate(**args)
    tiled = pipe.generate(**args)

    ae = AutoencoderKL.from_pretrained(BUILTIN / DEFAULT_MODEL / "vae").eval()
    ae.tile_sample_min_size, ae.tile_latent_min_size = 64, 8
    with torch.no_grad():
        z = ae.encode(torch.from_numpy(np.asarray(whole, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)).latent_dist.mean
        reference = ae.decode(z).sample.numpy()
        theirs = _psnr_signed(reference, ae.tiled_decode(z).sample.numpy())
    decoder = pipe.component("vae_decoder")
    run = lambda t: decoder.run({"latent_sample": t})["sample"]  # noqa: E731
    ours = _psnr_signed(run(z.numpy()), vae.tiled(run, z.numpy(), 8, 2, up=8))
    assert ours > theirs - 0.5, (ours, theirs)  # measured 21.7 dB against diffusers' 21.2
    assert psnr(whole, tiled) > 24  # measured 26.6 dB
    back = pipe.generate(**args, init_image=whole, strength=0.5)  # encodes in tiles too
    assert psnr(plain.generate(**args, init_image=whole, strength=0.5), back) > 21  # measured 24.1 dB


def test_a_tile_size_the_latent_grid_cannot_hold_is_refused(default_package):
    from edgediff.errors import UsageError
    from edgediff.runtime import Pipeline

    with pytest.raises(UsageError, match="vae_tile 100: give a multiple of 32"):
        Pipeline(default_package, device="cpu", vae_tile=100)

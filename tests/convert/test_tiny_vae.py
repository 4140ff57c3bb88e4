"""A tiny autoencoder (TAESD's architecture, random weights) given with `--vae` replaces the
full VAE: the package's images match diffusers' pipelines with the same AutoencoderTiny."""

from __future__ import annotations

import pytest

from edgediff.convert import convert
from edgediff.errors import SourceError
from edgediff.runtime import Pipeline

from reference import NEGATIVE, PROMPT, diffusers_pipeline, psnr

SIZE = 64


def _tiny_vae(folder, latent_channels: int):
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                          latent_channels=latent_channels)
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.mark.parametrize(("name", "channels", "img2img"), [("sd1", 4, False), ("sd1", 4, True),
                                                           ("flux-schnell", 16, False)])
def test_a_tiny_vae_package_matches_diffusers(tiny_source, tmp_path, name, channels, img2img):
    import numpy as np
    import torch
    from PIL import Image

    tiny = _tiny_vae(tmp_path / "taesd", channels)
    manifest = convert(tiny_source(name), tmp_path / "pkg", vae=tmp_path / "taesd")
    full = convert(tiny_source(name), tmp_path / "full")
    # the latent format stays the model's (TAESD decodes the denoiser's latents as they are)
    assert (manifest.latent_scale, manifest.latent_shift) == (full.latent_scale, full.latent_shift)
    assert manifest.components["vae_decoder"].bytes < full.components["vae_decoder"].bytes

    flux = name.startswith("flux")
    init = Image.fromarray((np.indices((SIZE, SIZE)).sum(0) * 2 % 256).astype(np.uint8)).convert("RGB")
    extra = {"init_image": init, "strength": 0.6} if img2img else {"width": SIZE, "height": SIZE}
    image = Pipeline(tmp_path / "pkg", device="cpu").generate(
        PROMPT, None if flux else NEGATIVE, steps=4, guidance=1.0 if flux else 7.5, sampler="euler", schedule="normal",
        seed=7, **extra)
    pipe = diffusers_pipeline(tiny_source(name), img2img=img2img)
    pipe.vae = tiny
    kw = {"image": init, "strength": 0.6} if img2img else {"width": SIZE, "height": SIZE}
    ref = pipe(PROMPT, **({} if flux else {"negative_prompt": NEGATIVE}), guidance_scale=7.5, num_inference_steps=4,
               generator=torch.Generator().manual_seed(7), **kw).images[0]
    assert psnr(ref, image) >= 45.0
    plain = Pipeline(tmp_path / "full", device="cpu").generate(
        PROMPT, None if flux else NEGATIVE, steps=4, guidance=1.0 if flux else 7.5, sampler="euler", schedule="normal", seed=7, **extra)
    assert psnr(plain, image) < 30  # the tiny decoder did the decoding


def test_a_tiny_vae_for_another_latent_format_is_refused(tiny_source, tmp_path):
    _tiny_vae(tmp_path / "taef1", 16)
    with pytest.raises(SourceError, match="16 latent channels .* the model's VAE has 4 .*TAESD is for SD 1.x"):
        convert(tiny_source("sd1"), tmp_path / "pkg", vae=tmp_path / "taef1")
    assert not (tmp_path / "pkg").exists()

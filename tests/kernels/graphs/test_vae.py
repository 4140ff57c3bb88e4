"""The KL autoencoder's graphs, written from LDM-named shapes, against diffusers' AutoencoderKL:
tiny seeded models of the SD 1.x layout (4 latent channels, quant convs) and the SD3/Flux one
(16 channels, none), at two latent sizes, one odd, through the same graph."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import SourceError
from edgediff.kernels.graphs.vae import build_vae_decoder, build_vae_encoder

from built import ldm_vae_weights, run
from tiny_models import CONFIGS

PREFIX = "first_stage_model."
SIZES = ((4, 4), (5, 7))  # latent sizes; 5x7 is odd both ways


@pytest.fixture(scope="module", params=["sd1", "sd3"])
def tiny_vae(request):
    """(diffusers AutoencoderKL, its weights under LDM names and shapes)."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    cfg = CONFIGS[request.param]["vae"]
    levels = len(cfg["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, **cfg).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: give each its own values
        for param in vae.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    weights = ldm_vae_weights(vae.state_dict(), dict(vae.config))
    assert all(name.startswith(PREFIX) for name in weights)
    return vae, weights


def _shapes(weights):
    return {name: array.shape for name, array in weights.items()}


def test_decoder_matches_diffusers(tiny_vae):
    import torch

    vae, weights = tiny_vae
    model = build_vae_decoder(_shapes(weights))
    latent = vae.config.latent_channels
    assert [i.name for i in model.graph.input] == ["latent_sample"]
    assert [o.name for o in model.graph.output] == ["sample"]
    rng = np.random.default_rng(1)
    for h, w in SIZES:
        z = rng.standard_normal((2, latent, h, w)).astype(np.float32)
        (got,) = run(model, weights, {"latent_sample": z})
        with torch.no_grad():
            want = vae.decode(torch.from_numpy(z)).sample.numpy()
        assert got.shape == want.shape == (2, 3, 8 * h, 8 * w)
        assert np.abs(got - want).max() <= 1e-4


def test_encoder_matches_diffusers(tiny_vae):
    import torch

    vae, weights = tiny_vae
    model = build_vae_encoder(_shapes(weights))
    assert [i.name for i in model.graph.input] == ["sample"]
    assert [o.name for o in model.graph.output] == ["latent_parameters"]
    rng = np.random.default_rng(2)
    for h, w in SIZES:
        x = rng.standard_normal((2, 3, 8 * h, 8 * w)).astype(np.float32)
        (got,) = run(model, weights, {"sample": x})
        with torch.no_grad():
            want = vae.encoder(torch.from_numpy(x))
            if vae.quant_conv is not None:
                want = vae.quant_conv(want)
        want = want.numpy()
        assert got.shape == want.shape == (2, 2 * vae.config.latent_channels, h, w)
        assert np.abs(got - want).max() <= 1e-4


def test_linear_attention_weights(tiny_vae):
    """Files that store the mid attention's q/k/v/proj_out as Linear [C, C] give the same graph
    output as the 1x1 convolutions."""
    vae, weights = tiny_vae
    flat = {name: (a.reshape(a.shape[:2]) if ".attn_1." in name and a.ndim == 4 else a)
            for name, a in weights.items()}
    z = np.random.default_rng(3).standard_normal((1, vae.config.latent_channels, 3, 5)).astype(np.float32)
    (conv,) = run(build_vae_decoder(_shapes(weights)), weights, {"latent_sample": z})
    (lin,) = run(build_vae_decoder(_shapes(flat)), flat, {"latent_sample": z})
    assert np.abs(conv - lin).max() <= 1e-5


def test_missing_tensor_is_named(tiny_vae):
    _, weights = tiny_vae
    shapes = _shapes(weights)
    for build, name in ((build_vae_decoder, PREFIX + "decoder.mid.attn_1.k.weight"),
                        (build_vae_encoder, PREFIX + "encoder.down.1.downsample.conv.weight")):
        partial = {k: v for k, v in shapes.items() if k != name}
        with pytest.raises(SourceError, match=name.replace(".", r"\.")) as info:
            build(partial, where="vae.safetensors")
        assert "vae.safetensors" in str(info.value)
    with pytest.raises(SourceError, match="decoder"):
        build_vae_decoder({k: v for k, v in shapes.items() if ".decoder." not in "." + k})

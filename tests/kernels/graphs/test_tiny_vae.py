"""The tiny autoencoders' graphs, written from the names a diffusers AutoencoderTiny folder stores,
against diffusers' AutoencoderTiny under `convert.load.tiny_vae`'s contract: tiny seeded models
of TAESD's layout (4 latent channels, SD 1.x's scale) and TAEF1's (16, Flux's scale and shift,
levels with several blocks and one with none), at two sizes, one not square, through the same
graph."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import Graph
from edgediff.kernels.graphs.tiny_vae import _block, build_tiny_vae_decoder, build_tiny_vae_encoder

from built import run

PREFIX = "vae."
SIZES = ((4, 4), (5, 7))  # latent sizes; the images are 8x
CONFIGS = {
    "taesd": ({"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
               "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1), "latent_channels": 4},
              0.18215, 0.0),
    "taef1": ({"encoder_block_out_channels": (12, 12, 12, 12), "decoder_block_out_channels": (10, 10, 10, 10),
               "num_encoder_blocks": (1, 2, 0, 1), "num_decoder_blocks": (2, 0, 1, 1), "latent_channels": 16},
              0.3611, 0.1159),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request):
    """(diffusers AutoencoderTiny, its weights under the prefix, scale, shift)."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderTiny

    config, scale, shift = CONFIGS[request.param]
    torch.manual_seed(0)
    vae = AutoencoderTiny(**config).eval()
    with torch.no_grad():  # biases start at 0 and the default init shrinks the signal: perturb all
        for param in vae.parameters():
            param.add_(torch.randn_like(param) * (0.1 if param.ndim == 1 else 0.05))
    weights = {PREFIX + k: v.numpy() for k, v in vae.state_dict().items()}
    return vae, weights, scale, shift


def _shapes(weights):
    return {name: array.shape for name, array in weights.items()}


def test_decoder_matches_diffusers(tiny):
    import torch

    vae, weights, scale, shift = tiny
    model = build_tiny_vae_decoder(_shapes(weights), scale=scale, shift=shift)
    latent = vae.config.latent_channels
    assert [i.name for i in model.graph.input] == ["latent_sample"]
    assert [o.name for o in model.graph.output] == ["sample"]
    rng = np.random.default_rng(1)
    for h, w in SIZES:
        z = rng.standard_normal((2, latent, h, w)).astype(np.float32) * 3
        (got,) = run(model, weights, {"latent_sample": z})
        with torch.no_grad():
            want = vae.decoder((torch.from_numpy(z) - shift) * scale).numpy()
        assert got.shape == want.shape == (2, 3, 8 * h, 8 * w)
        assert np.abs(want).max() > 0.1  # a signal, not a constant
        assert np.abs(got - want).max() <= 1e-4


def test_encoder_matches_diffusers(tiny):
    import torch

    vae, weights, scale, shift = tiny
    model = build_tiny_vae_encoder(_shapes(weights), scale=scale, shift=shift)
    latent = vae.config.latent_channels
    assert [i.name for i in model.graph.input] == ["sample"]
    assert [o.name for o in model.graph.output] == ["latent_parameters"]
    rng = np.random.default_rng(2)
    for h, w in SIZES:
        x = rng.uniform(-1, 1, (2, 3, 8 * h, 8 * w)).astype(np.float32)
        (got,) = run(model, weights, {"sample": x})
        with torch.no_grad():  # TinyVae.encoder in convert.load
            mean = vae.encoder(torch.from_numpy(x)) / scale + shift
            want = torch.cat([mean, torch.full_like(mean, -30.0)], 1).numpy()
        assert got.shape == want.shape == (2, 2 * latent, h, w)
        assert np.abs(mean.numpy()).max() > 0.1
        assert np.abs(got - want).max() <= 1e-4


def test_block_with_skip():
    """AutoencoderTinyBlock whose widths change (a 1x1 skip convolution), which diffusers'
    AutoencoderTiny itself never builds but the block allows."""
    torch = pytest.importorskip("torch")
    from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock

    torch.manual_seed(3)
    block = AutoencoderTinyBlock(4, 6, "relu").eval()
    weights = {"b." + k: v.detach().numpy() for k, v in block.state_dict().items()}
    weights["w"] = np.zeros((4, 1, 1, 1), np.float32)  # stands for the producer of the block's input
    assert "b.skip.weight" in weights
    g = Graph(_shapes(weights), "test")
    y, _ = _block(g, g.input("x", [1, 4, "h", "w"]), "b", "w")
    g.output(y, "y", [1, 6, "h", "w"])
    x = np.random.default_rng(4).standard_normal((1, 4, 5, 3)).astype(np.float32)
    (got,) = run(g.model(), weights, {"x": x})
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-5


def test_missing_tensor_is_named(tiny):
    _, weights, scale, _ = tiny
    shapes = _shapes(weights)
    last = max(int(k.split(".")[3]) for k in shapes if k.startswith(PREFIX + "decoder.layers."))
    for build, name in ((build_tiny_vae_decoder, PREFIX + "decoder.layers.2.conv.2.weight"),
                        (build_tiny_vae_decoder, PREFIX + "decoder.layers.0.weight"),
                        (build_tiny_vae_decoder, PREFIX + f"decoder.layers.{last}.bias"),
                        (build_tiny_vae_encoder, PREFIX + "encoder.layers.1.conv.4.weight"),
                        (build_tiny_vae_encoder, PREFIX + "encoder.layers.2.weight")):
        partial = {k: v for k, v in shapes.items() if k != name}
        with pytest.raises(SourceError, match=name.replace(".", r"\.")) as info:
            build(partial, scale=scale, where="taesd.safetensors")
        assert "taesd.safetensors" in str(info.value)
    with pytest.raises(SourceError, match=r"decoder\.layers\.0\.weight"):
        build_tiny_vae_decoder({k: v for k, v in shapes.items() if ".decoder." not in k}, scale=scale)
    with pytest.raises(SourceError, match="another architecture"):
        build_tiny_vae_encoder(shapes, prefix="", scale=scale)  # the prefix left in the names

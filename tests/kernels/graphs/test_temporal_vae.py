"""Stable Video Diffusion's temporal VAE decoder, written from SGM-named shapes, against diffusers'
AutoencoderKLTemporalDecoder: tiny seeded models of one and two layers a block (random mix
factors), several frame counts and latent sizes (one odd), the chunked runtime decode against
the pipeline's decode_chunk_size loop, and the (ordinary KL) encoder."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.kernels.bind import is_placeholder
from edgediff.kernels.graphs.vae import build_vae_decoder, build_vae_encoder
from edgediff.runtime import vae as runtime_vae

from built import filled, ldm_vae_weights, run
from tiny_models import svd_modules

PREFIX = "first_stage_model."
SIZES = ((4, 4), (5, 7))  # latent sizes; 5x7 is odd both ways


@pytest.fixture(scope="module", params=["svd", "svd-deep"])
def tiny_vae(request):
    """(diffusers AutoencoderKLTemporalDecoder, its weights under SGM names and shapes)."""
    pytest.importorskip("torch")
    vae = svd_modules(request.param)[2]
    weights = ldm_vae_weights(vae.state_dict(), dict(vae.config))
    assert all(name.startswith(PREFIX) for name in weights)
    assert len(weights) == len(vae.state_dict())  # no two diffusers names on one
    return vae, weights


def _shapes(weights):
    return {name: array.shape for name, array in weights.items()}


def _reference(vae, z: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return vae.decode(torch.from_numpy(z), num_frames=len(z)).sample.numpy()


def test_names_are_sgm(tiny_vae):
    _, weights = tiny_vae
    p = PREFIX + "decoder."
    for name in ("mid.block_1.time_stack.in_layers.0.weight", "mid.block_1.time_stack.in_layers.2.weight",
                 "mid.block_1.time_stack.out_layers.0.bias", "mid.block_1.time_stack.out_layers.3.weight",
                 "mid.block_1.mix_factor", "up.0.block.0.time_stack.in_layers.2.bias", "up.3.block.0.conv1.weight",
                 "mid.attn_1.q.weight", "conv_out.weight", "conv_out.time_mix_conv.weight",
                 "conv_out.time_mix_conv.bias"):
        assert p + name in weights, name
    assert weights[p + "mid.block_1.time_stack.in_layers.2.weight"].shape[2:] == (3, 1, 1)
    assert weights[p + "conv_out.time_mix_conv.weight"].shape == (3, 3, 3, 1, 1)
    assert weights[p + "mid.block_1.mix_factor"].shape == (1,)
    assert not any("res_block" in n or "time_mixer" in n or "time_conv_out" in n for n in weights)


def test_decoder_matches_diffusers(tiny_vae):
    vae, weights = tiny_vae
    model = build_vae_decoder(_shapes(weights))
    assert [i.name for i in model.graph.input] == ["latent_sample"]
    assert [o.name for o in model.graph.output] == ["sample"]
    used = {t.name for t in model.graph.initializer if is_placeholder(t)}
    unused = {n for n in weights if n.startswith(PREFIX + "decoder.")} - used
    # diffusers' mid block of one layer has one resnet: its attention's weights are never applied
    assert unused == ({n for n in weights if ".mid.attn_1." in n and ".decoder." in n}
                      if vae.config.layers_per_block == 1 else set())
    rng = np.random.default_rng(1)
    for frames in (3, 4):
        for h, w in SIZES:
            z = rng.standard_normal((frames, vae.config.latent_channels, h, w)).astype(np.float32)
            (got,) = run(model, weights, {"latent_sample": z})
            want = _reference(vae, z)
            assert got.shape == want.shape == (frames, 3, 8 * h, 8 * w)
            assert np.abs(got - want).max() <= 1e-4


def test_temporal_path_matters(tiny_vae):
    """The mix factors and the last temporal convolution change the output, and the frames of one
    call mix: the parity above is not that of a per-frame decoder."""
    vae, weights = tiny_vae
    model = build_vae_decoder(_shapes(weights))
    z = np.random.default_rng(2).standard_normal((3, vae.config.latent_channels, 3, 5)).astype(np.float32)
    (base,) = run(model, weights, {"latent_sample": z})
    spatial = {n: (np.full_like(a, -30.0) if n.endswith(".mix_factor") else a) for n, a in weights.items()}
    no_time_conv = {n: (a * 0 if ".time_mix_conv." in n else a) for n, a in weights.items()}
    for changed in (spatial, no_time_conv):
        (other,) = run(model, changed, {"latent_sample": z})
        assert np.abs(other - base).max() > 1e-2
    (alone,) = run(model, weights, {"latent_sample": z[:1]})
    assert np.abs(alone - base[:1]).max() > 1e-2


class _Decoder:
    """A Component's `run` over the built graph, counting the frames of each call."""

    def __init__(self, model, weights):
        import onnxruntime as ort

        self.session = ort.InferenceSession(filled(model, weights).SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        self.calls = []

    def run(self, feeds):
        self.calls.append(len(feeds["latent_sample"]))
        return dict(zip(["sample"], self.session.run(None, feeds), strict=True))


def test_chunked_decode_matches_pipeline(tiny_vae):
    """runtime.vae.decode(frames=k) is the SVD pipeline's decode_latents with decode_chunk_size k:
    chunks of k frames (the last shorter), each decoded on its own."""
    import torch

    vae, weights = tiny_vae
    decoder = _Decoder(build_vae_decoder(_shapes(weights)), weights)
    scale = vae.config.scaling_factor
    latents = np.random.default_rng(3).standard_normal((7, vae.config.latent_channels, 4, 5)).astype(np.float32)
    got = runtime_vae.decode(decoder, latents, scale, 0.0, frames=3)
    assert decoder.calls == [3, 3, 1]
    z = torch.from_numpy(latents) / scale
    with torch.no_grad():
        want = torch.cat([vae.decode(z[i:i + 3], num_frames=len(z[i:i + 3])).sample
                          for i in range(0, len(z), 3)]).numpy()
    assert got.shape == want.shape == (7, 3, 32, 40)
    assert np.abs(got - want).max() <= 1e-4
    whole = runtime_vae.decode(decoder, latents, scale, 0.0)  # one call: all seven frames mix
    assert np.abs(whole - want).max() > 1e-3
    decoder.calls.clear()
    tiles = runtime_vae.decode(decoder, latents, scale, 0.0, tile=24, frames=4)  # 2x2 tiles of each chunk
    assert decoder.calls == [4] * 4 + [3] * 4
    each = [runtime_vae.decode(decoder, latents[i:i + 4], scale, 0.0, tile=24) for i in (0, 4)]
    assert np.array_equal(tiles, np.concatenate(each))


def test_encoder_matches_diffusers(tiny_vae):
    """The ordinary KL encoder: with quant_conv (diffusers' folder) and without (SVD's single file,
    whose moments are then the encoder's own)."""
    import torch

    vae, weights = tiny_vae
    x = np.random.default_rng(4).standard_normal((2, 3, 40, 56)).astype(np.float32)
    (got,) = run(build_vae_encoder(_shapes(weights)), weights, {"sample": x})
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        bare = vae.encoder(torch.from_numpy(x)).numpy()
    mean, logvar = np.split(got, 2, axis=1)
    assert mean.shape == (2, vae.config.latent_channels, 5, 7)
    assert np.abs(mean - dist.mean.numpy()).max() <= 1e-4
    assert np.abs(logvar - dist.logvar.numpy()).max() <= 1e-4
    single = {n: a for n, a in weights.items() if not n.startswith(PREFIX + "quant_conv.")}
    (moments,) = run(build_vae_encoder(_shapes(single)), single, {"sample": x})
    assert np.abs(moments - bare).max() <= 1e-4

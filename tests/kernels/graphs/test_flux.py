"""The built Flux graph against diffusers' FluxTransformer2DModel, in BFL's names."""

import numpy as np
import pytest
import torch

from edgediff.errors import SourceError
from edgediff.families import DENOISER
from edgediff.kernels.graphs.flux import build_flux

from built import run
from reference import torch_wrappers
from tiny_models import CONFIGS


def _reference(name: str, seed: int = 0):
    import diffusers

    from edgediff.kernels.dit_names import flux_pieces

    from ldm_checkpoint import scatter

    config = dict(CONFIGS[name]["transformer"])
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than init's, so every path shows in the output
            p.add_(torch.randn_like(p) * 0.05)
    weights = {k: v.numpy() for k, v in scatter(flux_pieces(config, DENOISER), model.state_dict()).items()}
    return model, torch_wrappers()[2]["FluxTransformer2DModel"](model), weights, config


@pytest.mark.parametrize("name", ["flux-schnell", "flux-dev"])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_flux_matches_diffusers(name, size):
    _model, wrapper, weights, config = _reference(name)
    rng = np.random.default_rng(1)
    channels = config["in_channels"] // 4
    feeds = {"sample": rng.standard_normal((2, channels, *size), dtype=np.float32),
             "timestep": np.array([900.0, 250.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 7, config["joint_attention_dim"]), dtype=np.float32),
             "text_embeds": rng.standard_normal((2, config["pooled_projection_dim"]), dtype=np.float32)}
    if config["guidance_embeds"]:
        feeds["guidance"] = np.array([3.5, 1.0], np.float32)
    graph = build_flux({k: v.shape for k, v in weights.items()})
    (ours,) = run(graph, weights, feeds)
    with torch.no_grad():
        expected = wrapper(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_missing_tensor_is_named():
    *_, weights, _ = _reference("flux-schnell")
    del weights[DENOISER + "single_blocks.1.linear2.weight"]
    with pytest.raises(SourceError, match="single_blocks.1.linear2.weight"):
        build_flux({k: v.shape for k, v in weights.items()}, where="f.gguf")

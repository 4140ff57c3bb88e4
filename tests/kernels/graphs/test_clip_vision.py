"""The CLIP vision encoder graph (SVD's image conditioning) written from shapes against
transformers' CLIPVisionModelWithProjection: the tiny SVD configs' encoders, their weights named
as transformers names them and as SVD's single file does (OpenCLIP's visual tower, q/k/v fused,
the projection transposed), image_embeds at batch 2."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import SourceError
from edgediff.kernels.graphs.clip_vision import build_clip_vision
from edgediff.kernels.ldm_names import clip_vision_open_clip

from built import run
from tiny_models import svd_modules

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

SVD_PREFIX = "conditioner.embedders.0.open_clip.model.visual."


def _encoder(name: str):
    encoder = svd_modules(name)[0]
    state = {k: v.numpy() for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
    return encoder, state


def _pixels(batch: int = 2, size: int = 224, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _reference(encoder, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return encoder(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()


def _check(encoder, state: dict, prefix: str, layout: str) -> float:
    config = encoder.config
    shapes = {k: v.shape for k, v in state.items()}
    graph = build_clip_vision(shapes, prefix, layout, heads=config.num_attention_heads, hidden_act=config.hidden_act)
    # every weight is a tensor of the file under its own name: binding is a lookup
    assert {t.name for t in graph.graph.initializer} == set(state)
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    assert dims == {"image_embeds": ["batch", config.projection_dim]}
    pixels = _pixels()
    (embeds,) = run(graph, state, {"pixel_values": pixels})
    want = _reference(encoder, pixels)
    assert embeds.shape == want.shape == (2, config.projection_dim)
    err = float(np.abs(embeds - want).max())
    assert err <= 1e-4, err
    return err


@pytest.mark.parametrize("name", ["svd", "svd-deep"])
def test_hf_layout(name):
    """transformers' names, bare and under a prefix."""
    encoder, state = _encoder(name)
    _check(encoder, state, "", "hf")
    _check(encoder, {"image_encoder." + k: v for k, v in state.items()}, "image_encoder.", "hf")


@pytest.mark.parametrize("name", ["svd", "svd-deep"])
def test_open_clip_layout(name):
    """As SVD's svd.safetensors holds it: OpenCLIP's names, q/k/v one [3W, W] weight."""
    encoder, state = _encoder(name)
    fused = clip_vision_open_clip(state, SVD_PREFIX)
    width = encoder.config.hidden_size
    assert fused[SVD_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert fused[SVD_PREFIX + "proj"].shape == (width, encoder.config.projection_dim)
    assert fused[SVD_PREFIX + "conv1.weight"].shape == state["vision_model.embeddings.patch_embedding.weight"].shape
    assert len(fused) == len(state) - 4 * encoder.config.num_hidden_layers  # q, k, v: 6 tensors -> 2
    _check(encoder, fused, SVD_PREFIX, "open_clip")


def test_refuses_positions_that_do_not_fit():
    """A position table that is not (size/patch)^2 + 1 long is named in the error."""
    encoder, state = _encoder("svd")
    shapes = {k: v.shape for k, v in clip_vision_open_clip(state, SVD_PREFIX).items()}
    heads = encoder.config.num_attention_heads
    with pytest.raises(SourceError, match="positional_embedding"):
        build_clip_vision(shapes, SVD_PREFIX, "open_clip", heads=heads, size=256)
    shapes[SVD_PREFIX + "positional_embedding"] = (52, shapes[SVD_PREFIX + "positional_embedding"][1])
    with pytest.raises(SourceError, match="positional_embedding"):
        build_clip_vision(shapes, SVD_PREFIX, "open_clip", heads=heads)
    with pytest.raises(SourceError, match="position_embedding"):
        build_clip_vision({**{k: v.shape for k, v in state.items()},
                           "vision_model.embeddings.position_embedding.weight": (40, 32)}, "", "hf", heads=heads)


def test_refuses_missing_and_misfit_weights():
    encoder, state = _encoder("svd")
    shapes = {k: v.shape for k, v in state.items()}
    with pytest.raises(SourceError, match="visual_projection.weight"):
        build_clip_vision({k: v for k, v in shapes.items() if k != "visual_projection.weight"}, "", "hf", heads=2)
    with pytest.raises(SourceError, match="heads"):
        build_clip_vision(shapes, "", "hf", heads=3)
    with pytest.raises(SourceError, match="size mismatch"):
        build_clip_vision({**shapes, "vision_model.pre_layrnorm.weight": (48,)}, "", "hf", heads=2)
    with pytest.raises(ValueError, match="layout"):
        build_clip_vision(shapes, "", "openai", heads=2)

"""The built MMDiT graph against diffusers' SD3Transformer2DModel, in Stability's names: SD3,
SD3.5 medium (q/k norm, a second attention in block 0) and SD3.5 large's form (q/k norm only)."""

import numpy as np
import pytest
import torch

from edgediff.errors import SourceError
from edgediff.families import DENOISER
from edgediff.kernels.graphs.mmdit import build_mmdit

from built import run
from reference import torch_wrappers
from tiny_models import CONFIGS

_CONFIGS = {
    "sd3": CONFIGS["sd3"]["transformer"],
    "sd35-medium": CONFIGS["sd35"]["transformer"],
    "sd35-large": dict(CONFIGS["sd3"]["transformer"], qk_norm="rms_norm"),
}


def _reference(name: str, seed: int = 0):
    import diffusers

    from edgediff.kernels.dit_names import sd3_pieces

    from ldm_checkpoint import scatter

    config = dict(_CONFIGS[name])
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():  # so the zero-initialised ones (adaLN, gates) matter
            p.add_(torch.randn_like(p) * 0.05)
    state = model.state_dict()
    assert "pos_embed.pos_embed" in state
    weights = {k: v.numpy() for k, v in scatter(sd3_pieces(config, DENOISER), state).items()}
    return torch_wrappers()[2]["SD3Transformer2DModel"](model), weights, config


@pytest.mark.parametrize("name", list(_CONFIGS))
@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_mmdit_matches_diffusers(name, size):
    wrapper, weights, config = _reference(name)
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((2, config["in_channels"], *size), dtype=np.float32),
             "timestep": np.array([900.0, 250.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 7, config["joint_attention_dim"]), dtype=np.float32),
             "text_embeds": rng.standard_normal((2, config["pooled_projection_dim"]), dtype=np.float32)}
    graph = build_mmdit({k: v.shape for k, v in weights.items()})
    (ours,) = run(graph, weights, feeds)
    with torch.no_grad():
        expected = wrapper(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert ours.shape == expected.shape == (2, config["out_channels"], *size)
    assert np.abs(ours - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_one_graph_serves_every_size():
    """The graph is built once; the crop offsets and patch grid come from the input at run time."""
    wrapper, weights, config = _reference("sd3")
    graph = build_mmdit({k: v.shape for k, v in weights.items()})
    rng = np.random.default_rng(2)
    for size in ((4, 12), (10, 6)):
        feeds = {"sample": rng.standard_normal((1, config["in_channels"], *size), dtype=np.float32),
                 "timestep": np.array([500.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((1, 3, config["joint_attention_dim"]), dtype=np.float32),
                 "text_embeds": rng.standard_normal((1, config["pooled_projection_dim"]), dtype=np.float32)}
        (ours,) = run(graph, weights, feeds)
        with torch.no_grad():
            expected = wrapper(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        assert np.abs(ours - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_graph_form():
    """Fused q/k/v: one MatMul then Split per attention; the last block's context stream ends
    after the joint attention; the weights are placeholders under the file's names."""
    *_, weights, config = _reference("sd35-medium")
    graph = build_mmdit({k: v.shape for k, v in weights.items()})
    names = {t.name for t in graph.graph.initializer}
    assert {k for k in weights} <= names
    assert not any(n.startswith(DENOISER + "joint_blocks.1.context_block.mlp") for n in weights)
    consumers = {}
    for node in graph.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.op_type)
    qkv = [n for n in weights if n.endswith(".qkv.weight")]
    assert len(qkv) == 2 * config["num_layers"] + 1  # both streams in each block, and attn2
    for name in qkv:
        assert consumers[name] == ["Transpose"]
    assert sum(n.op_type == "MultiHeadAttention" for n in graph.graph.node) == config["num_layers"] + 1
    assert "Slice" not in {n.op_type for n in graph.graph.node if any(i.startswith("MatMul") for i in n.input)}
    assert [i.name for i in graph.graph.input] == ["sample", "timestep", "encoder_hidden_states", "text_embeds"]
    assert [o.name for o in graph.graph.output] == ["out_sample"]


@pytest.mark.parametrize("missing", ["joint_blocks.1.x_block.mlp.fc2.weight", "joint_blocks.0.x_block.attn2.qkv.weight",
                                     "joint_blocks.1.context_block.attn.ln_k.weight", "pos_embed"])
def test_missing_tensor_is_named(missing):
    *_, weights, _ = _reference("sd35-medium")
    del weights[DENOISER + missing]
    with pytest.raises(SourceError, match=f"f.safetensors.*{missing}"):
        build_mmdit({k: v.shape for k, v in weights.items()}, where="f.safetensors")

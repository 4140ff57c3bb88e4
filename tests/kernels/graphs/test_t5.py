"""The built T5 encoder against transformers' T5EncoderModel, in both names files use."""

import numpy as np
import pytest
import torch

from edgediff.errors import SourceError
from edgediff.kernels.graphs.t5 import build_t5, llama_cpp_names

from built import run
from tiny_models import _T5


def _reference(**changes):
    import transformers

    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=300, **{**_T5, **changes})).eval()
    weights = {k: v.numpy() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return model, weights


@pytest.mark.parametrize("layout", ["transformers", "llama.cpp"])
@pytest.mark.parametrize("changes", [{}, {"feed_forward_proj": "relu", "relative_attention_num_buckets": 32}])
def test_t5_matches_transformers(layout, changes):
    model, weights = _reference(**changes)
    prefix = "text_encoders.t5xxl.transformer."
    if layout == "llama.cpp":
        rename = llama_cpp_names(prefix)
        weights = {rename(k): v for k, v in weights.items()}
        assert any(k.startswith(prefix + "enc.blk.0.attn_q") for k in weights)
    else:
        weights = {prefix + k: v for k, v in weights.items()}
    graph = build_t5({k: v.shape for k, v in weights.items()}, prefix)
    ids = np.random.default_rng(0).integers(0, 300, (2, 150))  # past MAX_DISTANCE: every bucket kind
    (ours,) = run(graph, weights, {"input_ids": ids})
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    assert ours.shape == (1, *expected.shape)
    assert np.abs(ours[0] - expected).max() < 1e-4


def test_not_a_t5():
    _, weights = _reference()
    del weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    with pytest.raises(SourceError, match="relative_attention_bias"):
        build_t5({k: v.shape for k, v in weights.items()}, where="t5.gguf")

"""The mixed-precision policy."""

from __future__ import annotations

import pytest

from edgediff.errors import UsageError
from edgediff.kernels.policy import KEEP, Rule, precision_for


@pytest.mark.parametrize(("name", "shape", "expected"), [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", (320, 320), "int4"),
    ("unet.down_blocks.0.resnets.0.conv1.weight", (320, 320, 3, 3), "int4"),
    ("unet.down_blocks.0.resnets.0.conv1.bias", (320,), KEEP),
    ("unet.down_blocks.0.resnets.0.norm1.weight", (320,), KEEP),
    ("unet.down_blocks.0.attentions.0.norm.weight", (320,), KEEP),
    ("unet.conv_in.weight", (320, 4, 3, 3), KEEP),
    ("unet.conv_out.weight", (4, 320, 3, 3), KEEP),
    ("unet.time_embedding.linear_1.weight", (1280, 320), KEEP),
    ("text_encoder.embeddings.token_embedding.weight", (49408, 768), KEEP),
    ("tiny.weight", (16, 16), KEEP),
    # DiTs: the adaLN modulation matrices are quantized (a quarter of Flux), their norms are not
    ("transformer.transformer_blocks.0.norm1.linear.weight", (18432, 3072), "int4"),
    ("transformer.single_transformer_blocks.0.norm.linear.weight", (9216, 3072), "int4"),
    ("transformer.transformer_blocks.0.attn.norm_added_q.weight", (128,), KEEP),
    ("transformer.context_embedder.weight", (3072, 4096), KEEP),
    ("model.shared.weight", (32128, 4096), KEEP),  # T5's token embedding
    ("model.encoder.block.0.layer.1.layer_norm.weight", (4096,), KEEP),
])
def test_defaults(name, shape, expected):
    assert precision_for(name, shape, "int4") == expected


def test_user_rules_come_first():
    rules = [Rule.parse(r"attn2\.to_[kv]=fp32"), Rule.parse("conv_in=int8")]
    assert precision_for("unet.x.attn2.to_k.weight", (320, 768), "int4", rules) == "fp32"
    assert precision_for("unet.conv_in.weight", (320, 4, 3, 3), "int4", rules) == "int8"
    assert precision_for("unet.x.attn1.to_k.weight", (320, 320), "int4", rules) == "int4"


@pytest.mark.parametrize("text", ["attn2", "=int8", "(bad=int8"])
def test_bad_rules(text):
    with pytest.raises(UsageError):
        Rule.parse(text)

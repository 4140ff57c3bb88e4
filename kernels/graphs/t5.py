"""The T5 encoder (SD3's and Flux's text_encoder_3 / T5-XXL), in transformers' names as
ComfyUI and stable-diffusion.cpp store it, or llama.cpp's (`enc.blk.N.attn_q.weight`), read
through gguf-py's own name table.

Output: the final-normed last layer as `hidden_states` [1, batch, sequence, width] (the stacked
layout of the CLIP encoders, with the one layer T5 gives)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import Graph, activation, attention, matmul, rms_norm

MAX_DISTANCE = 128  # T5's relative_attention_max_distance; no file says it, every T5 uses it


def llama_cpp_names(prefix: str = "") -> Callable[[str], str]:
    """transformers' T5 name -> llama.cpp's, by gguf-py's table."""
    from gguf.constants import MODEL_ARCH
    from gguf.tensor_mapping import TensorNameMap

    table = TensorNameMap(MODEL_ARCH.T5ENCODER, 1024)

    def name(hf: str) -> str:
        module, _, kind = hf.rpartition(".")
        found = table.get_name(module)
        return prefix + (f"{found}.{kind}" if found else hf)

    return name


def transformers_names(prefix: str = "") -> Callable[[str], str]:
    return lambda hf: prefix + hf


def t5_names(shapes: Mapping[str, Sequence[int]], prefix: str) -> Callable[[str], str]:
    """The layout a file's T5 is in: llama.cpp's when it has `enc.blk.*`."""
    return llama_cpp_names(prefix) if any(n.startswith(prefix + "enc.blk.") for n in shapes) else \
        transformers_names(prefix)


@dataclass(frozen=True)
class T5Config:
    width: int
    heads: int
    head_dim: int
    layers: int
    buckets: int
    gated: bool


def t5_config(shapes: Mapping[str, Sequence[int]], name: Callable[[str], str], where: str) -> T5Config:
    p = "encoder.block.0.layer."
    try:
        buckets, heads = shapes[name(p + "0.SelfAttention.relative_attention_bias.weight")]
        layers = next(i for i in range(1, 1 << 16) if name(f"encoder.block.{i}.layer.0.layer_norm.weight") not in shapes)
        return T5Config(width=shapes[name("shared.weight")][1], heads=heads,
                        head_dim=shapes[name(p + "0.SelfAttention.q.weight")][0] // heads,
                        layers=layers, buckets=buckets,
                        gated=name(p + "1.DenseReluDense.wi_0.weight") in shapes)
    except KeyError as exc:
        raise SourceError(f"{where}: not a T5 encoder in transformers' or llama.cpp's names (no {exc}); pass "
                          "the t5xxl file") from None


def _buckets(g: Graph, length: str, cfg: T5Config) -> str:
    """T5's bidirectional relative position buckets [S, S] for the run-time length."""
    positions = g.op("Range", g.const(0), g.op("Squeeze", length), g.const(1))
    relative = g.op("Sub", g.op("Unsqueeze", positions, g.const([0])), g.op("Unsqueeze", positions, g.const([1])))
    half = cfg.buckets // 2
    exact = half // 2
    sign = g.op("Mul", g.op("Cast", g.op("Greater", relative, g.const(0)), to=onnx.TensorProto.INT64), g.const(half))
    distance = g.op("Abs", relative)
    far = g.op("Cast", g.op("Max", distance, g.const(1)), to=onnx.TensorProto.FLOAT)
    logs = g.op("Div", g.op("Log", g.op("Div", far, g.scalar(float(exact)))), g.scalar(math.log(MAX_DISTANCE / exact)))
    large = g.op("Add", g.op("Cast", g.op("Mul", logs, g.scalar(float(half - exact))), to=onnx.TensorProto.INT64),
                 g.const(exact))
    large = g.op("Min", large, g.const(half - 1))
    return g.op("Add", sign, g.op("Where", g.op("Less", distance, g.const(exact)), distance, large))


def build_t5(shapes: Mapping[str, Sequence[int]], prefix: str = "", where: str = "the model",
             name: Callable[[str], str] | None = None) -> onnx.ModelProto:
    name = name or t5_names(shapes, prefix)
    cfg = t5_config(shapes, name, where)
    g = Graph(shapes, where)
    ids = g.input("input_ids", ["batch", "sequence"], onnx.TensorProto.INT64)
    x = g.op("Gather", g.weight(name("shared.weight")), ids)
    bias_table = g.weight(name("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
    bias = g.op("Gather", bias_table, _buckets(g, g.dim(ids, 1), cfg))  # [S, S, heads]
    bias = g.op("Unsqueeze", g.op("Transpose", bias, perm=[2, 0, 1]), g.const([0]))
    for i in range(cfg.layers):
        p = f"encoder.block.{i}.layer."
        h = rms_norm(g, x, name(p + "0.layer_norm.weight"))
        q, k, v = (matmul(g, h, name(f"{p}0.SelfAttention.{t}.weight")) for t in "qkv")
        out = attention(g, q, k, v, cfg.heads, bias=bias, scale=1.0)  # T5 does not scale its scores
        x = g.op("Add", x, matmul(g, out, name(p + "0.SelfAttention.o.weight")))
        h = rms_norm(g, x, name(p + "1.layer_norm.weight"))
        ff = p + "1.DenseReluDense."
        if cfg.gated:  # T5 v1.1: gelu(wi_0 h) * wi_1 h
            hidden = g.op("Mul", activation(g, matmul(g, h, name(ff + "wi_0.weight")), "gelu_new"),
                          matmul(g, h, name(ff + "wi_1.weight")))
        else:
            hidden = g.op("Relu", matmul(g, h, name(ff + "wi.weight")))
        x = g.op("Add", x, matmul(g, hidden, name(ff + "wo.weight")))
    out = rms_norm(g, x, name("encoder.final_layer_norm.weight"))
    g.output(g.op("Unsqueeze", out, g.const([0])), "hidden_states", [1, "batch", "sequence", cfg.width])
    return g.model()

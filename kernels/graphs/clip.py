"""The CLIP text encoder as an ONNX graph written from the file's weight shapes (no torch).

Two layouts of the same network: transformers' names (`text_model.embeddings.*`,
`text_model.encoder.layers.N.self_attn.{q,k,v}_proj`, ...; some files leave out `text_model.`)
and OpenCLIP's (`transformer.resblocks.N.attn.in_proj_weight` with q, k and v fused,
`text_projection` stored [width, embed]). The graph keeps the runtime's text-encoder contract:
`input_ids` [batch, sequence] in, `hidden_states`
[layers, batch, sequence, width] (every layer's output, not the embeddings; through the final
layer norm when the family says so) and `pooled_output` [batch, width] out: the final-normed
state at each sequence's first end-of-text token, projected (`text_embeds`) when the model has
a projection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import Graph, activation, attention, layer_norm, linear, matmul

EPS = 1e-5  # CLIP's and OpenCLIP's layer norms
# added to the scores above the diagonal: fp16's lowest, so the graph keeps it finite in either
# precision; exp() of it (minus the row's maximum) is 0 in float32
_MASKED = float(np.finfo(np.float16).min)


def _names(layout: str, shapes: Mapping, prefix: str) -> dict:
    """Where each part lies in the file: the name stems the graph reads."""
    if layout == "open_clip":
        return dict(token=prefix + "token_embedding.weight", position=prefix + "positional_embedding",
                    layers=prefix + "transformer.resblocks.", ln1="ln_1", ln2="ln_2", fc1="mlp.c_fc",
                    fc2="mlp.c_proj", out="attn.out_proj", final=prefix + "ln_final",
                    projection=prefix + "text_projection", transposed=True)
    if layout != "hf":
        raise ValueError(f"unknown CLIP layout {layout!r} (hf, open_clip)")
    base = prefix + "text_model."
    if base + "embeddings.token_embedding.weight" not in shapes and \
            prefix + "embeddings.token_embedding.weight" in shapes:
        base = prefix  # files that leave out `text_model.`
    # transformers' projection [embed, width]; stable-diffusion.cpp's files keep OpenCLIP's,
    # [width, embed], as `text_model.text_projection` (kernels.ldm_names.stored_transposed)
    projection, transposed = prefix + "text_projection.weight", False
    if projection not in shapes and prefix + "text_model.text_projection" in shapes:
        projection, transposed = prefix + "text_model.text_projection", True
    return dict(token=base + "embeddings.token_embedding.weight",
                position=base + "embeddings.position_embedding.weight", layers=base + "encoder.layers.",
                ln1="layer_norm1", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2", out="self_attn.out_proj",
                final=base + "final_layer_norm", projection=projection, transposed=transposed)


def _layer_count(shapes: Mapping, stem: str) -> int:
    pattern = re.compile(re.escape(stem) + r"(\d+)\.")
    found = [int(m.group(1)) for m in map(pattern.match, shapes) if m]
    return max(found) + 1 if found else 0


def clip_layer(g: Graph, x: str, p: str, n: Mapping, layout: str, width: int, heads: int, hidden_act: str,
               bias: str | None = None) -> str:
    """One pre-norm transformer layer of CLIP's text or vision tower under `p` (`n`: the
    layout's layer names); OpenCLIP's fused q/k/v is one MatMul, then split."""
    h = layer_norm(g, x, p + n["ln1"], eps=EPS)
    if layout == "open_clip":
        q, k, v = g.chunk(matmul(g, h, p + "attn.in_proj_weight", p + "attn.in_proj_bias"), 3, width)
    else:
        q, k, v = (linear(g, h, p + f"self_attn.{part}_proj") for part in "qkv")
    x = g.op("Add", x, linear(g, attention(g, q, k, v, heads, bias), p + n["out"]))
    h = layer_norm(g, x, p + n["ln2"], eps=EPS)
    return g.op("Add", x, linear(g, activation(g, linear(g, h, p + n["fc1"]), hidden_act), p + n["fc2"]))


def _causal_bias(g: Graph, input_ids: str) -> str:
    """[1, 1, S, S] for the run-time S: 0 on and below the diagonal, `_MASKED` above."""
    s = g.dim(input_ids, 1)
    full = g.op("ConstantOfShape", g.dims(s, s), value=numpy_helper.from_array(np.array([_MASKED], np.float32)))
    upper = g.op("Trilu", full, g.const(1), upper=1)  # strictly above the diagonal
    return g.op("Unsqueeze", upper, g.const([0, 1]))


def build_clip(shapes: Mapping[str, tuple[int, ...]], prefix: str, layout: str, *, hidden_act: str,
               head_dim: int = 64, norm_hidden: bool, projection: bool, where: str = "the model",
               eos_token_id: int = 49407) -> onnx.ModelProto:
    """The text encoder whose weights `shapes` (the file's names -> torch-order shapes) hold under
    `prefix`, in `layout` 'hf' (transformers' names) or 'open_clip'. Heads are width // head_dim
    (at least one), as a config rebuilt from a single file has them. `projection`: the pooled
    output is the projected `text_embeds`. `eos_token_id`: the token pooled at (its first
    position; 2, as old transformers configs say, means the largest id, as transformers takes it)."""
    g = Graph(shapes, where)
    n = _names(layout, shapes, prefix)
    _vocab, width = g.shape(n["token"])
    layers = _layer_count(shapes, n["layers"])
    if layers == 0:  # names the first layer's first weight as missing
        g.shape(n["layers"] + "0." + n["ln1"] + ".weight")
    heads = max(1, width // head_dim)
    if width % heads:
        raise SourceError(f"{where}: a {width}-wide text encoder does not split into {heads} heads of {head_dim}")

    ids = g.input("input_ids", ["batch", "sequence"], onnx.TensorProto.INT64)
    tokens = g.op("Gather", g.weight(n["token"]), ids, axis=0)  # [B, S, W]
    positions = g.op("Slice", g.weight(n["position"]), g.const([0]), g.dim(ids, 1), g.const([0]))  # [S, W]
    x = g.op("Add", tokens, positions)
    bias = _causal_bias(g, ids)

    outputs = []
    for i in range(layers):
        x = clip_layer(g, x, f"{n['layers']}{i}.", n, layout, width, heads, hidden_act, bias)
        outputs.append(x)

    last = layer_norm(g, x, n["final"], eps=EPS)
    if norm_hidden:
        outputs = [layer_norm(g, h, n["final"], eps=EPS) for h in outputs[:-1]] + [last]
    stacked = g.op("Concat", *(g.op("Unsqueeze", h, g.const([0])) for h in outputs), axis=0)
    g.output(stacked, "hidden_states", [layers, "batch", "sequence", width])

    if eos_token_id == 2:  # transformers' rule for configs from before its fix: the largest id
        position = g.op("ArgMax", g.op("Cast", ids, to=onnx.TensorProto.INT32), axis=1, keepdims=1)
    else:  # the first position of the token (0 where it is absent, as transformers has it)
        hits = g.op("Cast", g.op("Equal", ids, g.const(eos_token_id)), to=onnx.TensorProto.INT32)
        position = g.op("ArgMax", hits, axis=1, keepdims=1, select_last_index=0)
    pooled = g.op("GatherND", last, position, batch_dims=1)  # [B, W]
    size = width
    if projection:
        name = g.weight(n["projection"])
        pooled = g.op("MatMul", pooled, name) if n["transposed"] else matmul(g, pooled, name)
        size = g.shape(name)[1 if n["transposed"] else 0]
    g.output(pooled, "pooled_output", ["batch", size])
    return g.model()

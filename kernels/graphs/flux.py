"""Flux.1 (schnell, dev) in Black Forest Labs' names, as BFL, ComfyUI-GGUF and
stable-diffusion.cpp store it: `double_blocks.N.*`, `single_blocks.N.*`, fused q/k/v (one
MatMul, then Split).

The graph takes the UNet's contract with unpacked latents: `sample` [B, C, H, W], `timestep`
(0..1000, as the runtime's flow wrapper gives it), `encoder_hidden_states` (T5), `text_embeds`
(CLIP's pooled vector) and, for dev, `guidance`; the 2x2 patches are packed and the rotary
positions made in the graph from the latent's size."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import (
    Graph,
    attention,
    gelu,
    layer_norm,
    linear,
    rms_norm,
    silu,
    timestep_embedding,
)

THETA = 10000.0


@dataclass(frozen=True)
class FluxConfig:
    width: int
    heads: int
    head_dim: int
    double: int
    single: int
    channels: int  # latent channels (the packed input is 4x)
    context: int  # T5's width
    pooled: int  # CLIP's pooled width
    guidance: bool
    axes: tuple[int, int, int]  # rotary dims per position axis (16, 56, 56 of 128)


def _count(names, pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(found) + 1 if found else 0


def flux_config(shapes: Mapping[str, Sequence[int]], prefix: str, where: str) -> FluxConfig:
    p = prefix
    try:
        width, packed = shapes[p + "img_in.weight"]
        head = shapes[p + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
        first = head // 8  # Flux's (16, 56, 56) for 128-wide heads; the tiny test models keep the rule
        return FluxConfig(
            width=width, heads=width // head, head_dim=head,
            double=_count(shapes, re.escape(p) + r"double_blocks\.(\d+)\."),
            single=_count(shapes, re.escape(p) + r"single_blocks\.(\d+)\."),
            channels=packed // 4, context=shapes[p + "txt_in.weight"][1],
            pooled=shapes[p + "vector_in.in_layer.weight"][1], guidance=p + "guidance_in.in_layer.weight" in shapes,
            axes=(first, (head - first) // 2, (head - first) // 2))
    except KeyError as exc:
        raise SourceError(f"{where}: not a Flux transformer in BFL's names (no {exc})") from None


def _mlp_embedder(g: Graph, x: str, name: str) -> str:
    return linear(g, silu(g, linear(g, x, name + ".in_layer")), name + ".out_layer")


def _modulation(g: Graph, vec: str, name: str, count: int, width: int) -> list[str]:
    """The block's shift/scale/gate vectors from silu(vec), each [B, 1, width]."""
    out = g.op("Unsqueeze", linear(g, silu(g, vec), name), g.const([1]))
    return g.chunk(out, count, width)


def _modulate(g: Graph, x: str, shift: str, scale: str, width: int) -> str:
    normed = layer_norm(g, x, width=width, eps=1e-6)
    return g.op("Add", g.op("Mul", normed, g.op("Add", scale, g.scalar(1.0))), shift)


def _rotary(g: Graph, cfg: FluxConfig, tokens: str, h2: str, w2: str) -> tuple[str, str]:
    """cos and sin [L, 1, D/2] of each token's angles: text tokens at position 0 on every axis,
    image patches at (0, row, col); each axis turns its own share of the head's pairs."""
    freqs = [1.0 / THETA ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in cfg.axes]
    grid = g.dims(h2, w2, 1)
    rows = g.op("Cast", g.op("Range", g.const(0), g.op("Squeeze", h2), g.const(1)), to=onnx.TensorProto.FLOAT)
    cols = g.op("Cast", g.op("Range", g.const(0), g.op("Squeeze", w2), g.const(1)), to=onnx.TensorProto.FLOAT)
    row_angles = g.op("Mul", g.reshape(rows, [-1, 1, 1]), g.const(freqs[1][None, None], np.float32))
    col_angles = g.op("Mul", g.reshape(cols, [1, -1, 1]), g.const(freqs[2][None, None], np.float32))
    half = cfg.head_dim // 2
    image = g.op("Concat", g.op("Expand", g.const(np.zeros((1, 1, len(freqs[0]))), np.float32), grid),
                 g.op("Expand", row_angles, g.dims(h2, w2, len(freqs[1]))),
                 g.op("Expand", col_angles, g.dims(h2, w2, len(freqs[2]))), axis=-1)
    text = g.op("Expand", g.const(np.zeros((1, half)), np.float32), g.dims(tokens, half))
    angles = g.reshape(g.op("Concat", text, g.reshape(image, [-1, half]), axis=0), [-1, 1, half])
    return g.op("Cos", angles), g.op("Sin", angles)


def _rope(g: Graph, x: str, cos: str, sin: str, cfg: FluxConfig) -> str:
    """Turn each (even, odd) pair of x [B, L, heads, D] by its angle."""
    pairs = g.reshape(x, [0, 0, cfg.heads, cfg.head_dim // 2, 2])
    even, odd = (g.op("Squeeze", p, g.const([-1])) for p in g.split(pairs, [1, 1], axis=-1))
    first = g.op("Sub", g.op("Mul", even, cos), g.op("Mul", odd, sin))
    second = g.op("Add", g.op("Mul", even, sin), g.op("Mul", odd, cos))
    turned = g.op("Concat", g.op("Unsqueeze", first, g.const([-1])), g.op("Unsqueeze", second, g.const([-1])), axis=-1)
    return g.reshape(turned, [0, 0, cfg.width])


def _qkv(g: Graph, x: str, weight: str, norm: str, cfg: FluxConfig) -> tuple[str, str, str]:
    """q, k, v [B, L, heads, D] from one fused projection, q and k RMS-normed per head."""
    q, k, v = (g.reshape(t, [0, 0, cfg.heads, cfg.head_dim]) for t in g.chunk(linear(g, x, weight), 3, cfg.width))
    return rms_norm(g, q, norm + ".query_norm.scale"), rms_norm(g, k, norm + ".key_norm.scale"), v


def _attend(g: Graph, qkvs: list[tuple[str, str, str]], cos: str, sin: str, cfg: FluxConfig) -> str:
    """Joint attention over the streams' tokens, in order, rotary on q and k: [B, L, width]."""
    q, k, v = (g.op("Concat", *parts, axis=1) if len(parts) > 1 else parts[0] for parts in zip(*qkvs, strict=True))
    return attention(g, _rope(g, q, cos, sin, cfg), _rope(g, k, cos, sin, cfg),
                     g.reshape(v, [0, 0, cfg.width]), cfg.heads)


def _double_block(g: Graph, p: str, img: str, txt: str, vec: str, rope, cfg: FluxConfig) -> tuple[str, str]:
    w = cfg.width
    img_mod = _modulation(g, vec, p + "img_mod.lin", 6, w)
    txt_mod = _modulation(g, vec, p + "txt_mod.lin", 6, w)
    txt_qkv = _qkv(g, _modulate(g, txt, txt_mod[0], txt_mod[1], w), p + "txt_attn.qkv", p + "txt_attn.norm", cfg)
    img_qkv = _qkv(g, _modulate(g, img, img_mod[0], img_mod[1], w), p + "img_attn.qkv", p + "img_attn.norm", cfg)
    joint = _attend(g, [txt_qkv, img_qkv], *rope, cfg)
    txt_attn, img_attn = g.split(joint, g.dims(g.dim(txt, 1), g.dim(img, 1)), axis=1)

    def stream(x, attn, mod, name):
        x = g.op("Add", x, g.op("Mul", mod[2], linear(g, attn, f"{p}{name}_attn.proj")))
        hidden = gelu(g, linear(g, _modulate(g, x, mod[3], mod[4], w), f"{p}{name}_mlp.0"), approximate=True)
        return g.op("Add", x, g.op("Mul", mod[5], linear(g, hidden, f"{p}{name}_mlp.2")))

    return stream(img, img_attn, img_mod, "img"), stream(txt, txt_attn, txt_mod, "txt")


def _single_block(g: Graph, p: str, x: str, vec: str, rope, cfg: FluxConfig) -> str:
    w = cfg.width
    shift, scale, gate = _modulation(g, vec, p + "modulation.lin", 3, w)
    fused = linear(g, _modulate(g, x, shift, scale, w), p + "linear1")
    mlp = g.shape(p + "linear1.weight")[0] - 3 * w
    qkv, hidden = g.split(fused, [3 * w, mlp])
    q, k, v = (g.reshape(t, [0, 0, cfg.heads, cfg.head_dim]) for t in g.chunk(qkv, 3, w))
    q, k = rms_norm(g, q, p + "norm.query_norm.scale"), rms_norm(g, k, p + "norm.key_norm.scale")
    attn = _attend(g, [(q, k, v)], *rope, cfg)
    out = linear(g, g.op("Concat", attn, gelu(g, hidden, approximate=True), axis=-1), p + "linear2")
    return g.op("Add", x, g.op("Mul", gate, out))


def build_flux(shapes: Mapping[str, Sequence[int]], prefix: str = "model.diffusion_model.",
               where: str = "the model") -> onnx.ModelProto:
    cfg = flux_config(shapes, prefix, where)
    g = Graph(shapes, where)
    p, c = prefix, cfg.channels
    sample = g.input("sample", ["batch", c, "height", "width"])
    timestep = g.input("timestep", ["batch"])
    context = g.input("encoder_hidden_states", ["batch", "sequence", cfg.context])
    pooled = g.input("text_embeds", ["batch", cfg.pooled])
    guidance = g.input("guidance", ["batch"]) if cfg.guidance else None

    batch, height, width = g.dim(sample, 0), g.dim(sample, 2), g.dim(sample, 3)
    h2, w2 = (g.op("Div", d, g.const([2])) for d in (height, width))
    patches = g.reshape(sample, g.dims(batch, c, h2, 2, w2, 2))
    img = g.reshape(g.op("Transpose", patches, perm=[0, 2, 4, 1, 3, 5]), [0, -1, 4 * c])

    vec = _mlp_embedder(g, timestep_embedding(g, timestep, 256), p + "time_in")
    if guidance:  # the guidance scale embedded as a timestep, x1000 as diffusers takes it
        scaled = g.op("Mul", guidance, g.scalar(1000.0))
        vec = g.op("Add", vec, _mlp_embedder(g, timestep_embedding(g, scaled, 256), p + "guidance_in"))
    vec = g.op("Add", vec, _mlp_embedder(g, pooled, p + "vector_in"))
    txt = linear(g, context, p + "txt_in")
    img = linear(g, img, p + "img_in")
    rope = _rotary(g, cfg, g.dim(context, 1), h2, w2)

    for i in range(cfg.double):
        img, txt = _double_block(g, f"{p}double_blocks.{i}.", img, txt, vec, rope, cfg)
    x = g.op("Concat", txt, img, axis=1)
    for i in range(cfg.single):
        x = _single_block(g, f"{p}single_blocks.{i}.", x, vec, rope, cfg)
    img = g.split(x, g.dims(g.dim(txt, 1), g.dim(img, 1)), axis=1)[1]

    shift, scale = _modulation(g, vec, p + "final_layer.adaLN_modulation.1", 2, cfg.width)
    out = linear(g, _modulate(g, img, shift, scale, cfg.width), p + "final_layer.linear")
    out = g.reshape(out, g.dims(batch, h2, w2, c, 2, 2))
    out = g.op("Transpose", out, perm=[0, 3, 1, 4, 2, 5])
    g.output(g.reshape(out, g.dims(batch, c, height, width)), "out_sample", ["batch", c, "height", "width"])
    return g.model()

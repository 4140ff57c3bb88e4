"""The MMDiT of Stable Diffusion 3 and 3.5 (medium, large) in Stability's names, as their single
files store it: `joint_blocks.N.{x_block,context_block}.*` with fused q/k/v (one MatMul, then
Split), `pos_embed` as the max x max table, `final_layer.adaLN_modulation.1` as (shift, scale).

What the file's shapes say decides the variant, block by block: q/k RMS norm where `attn.ln_q`
is present (3.5), a second self-attention on the image stream (`x_block.attn2`, 3.5 medium) where
the block's adaLN gives 9 vectors rather than 6, and the last block's context stream ending after
the joint attention (its adaLN gives (shift, scale) only; no projection, no MLP).

The graph takes the UNet's contract: `sample` [B, C, H, W], `timestep` [B] (0..1000),
`encoder_hidden_states` [B, S, joint_attention_dim], `text_embeds` [B, pooled]; `out_sample`
[B, C, H, W], unpatchified. The position embedding is cropped from the centre of the table for
the latent's patch grid, with the offsets computed in the graph from the input's size."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from edgediff.kernels.graphs.builder import (
    Graph,
    attention,
    conv,
    gelu,
    layer_norm,
    linear,
    rms_norm,
    silu,
    timestep_embedding,
)

HEAD = 64  # every SD3 and SD3.5 model's head width (what the file says when it has q/k norms)


@dataclass(frozen=True)
class MMDiTConfig:
    width: int
    heads: int
    head_dim: int
    layers: int
    patch: int
    channels: int  # latent channels in
    out_channels: int
    context: int  # joint_attention_dim (the text context's width)
    pooled: int
    max_size: int  # pos_embed's grid side
    qk_norm: bool  # RMS norm of q and k per head in every attention (SD3.5)


def mmdit_config(g: Graph, prefix: str) -> MMDiTConfig:
    """Read off the shapes; a tensor the graph cannot do without raises SourceError naming it."""
    p = prefix
    width, channels, patch, _ = g.shape(p + "x_embedder.proj.weight")
    positions = g.shape(p + "pos_embed")[1]
    max_size = int(round(math.sqrt(positions)))
    norms = [n for n in g.shapes if n.startswith(p) and n.endswith(".ln_q.weight")]
    head = g.shape(norms[0])[0] if norms else HEAD
    found = {int(m.group(1)) for n in g.shapes if (m := re.match(re.escape(p) + r"joint_blocks\.(\d+)\.", n))}
    layers = max(found) + 1 if found else 0
    if not layers:
        g.shape(p + "joint_blocks.0.x_block.attn.qkv.weight")  # raises, naming the first block's
    return MMDiTConfig(
        width=width, heads=width // head, head_dim=head, layers=layers, patch=patch, channels=channels,
        out_channels=g.shape(p + "final_layer.linear.weight")[0] // (patch * patch),
        context=g.shape(p + "context_embedder.weight")[1], pooled=g.shape(p + "y_embedder.mlp.0.weight")[1],
        max_size=max_size, qk_norm=bool(norms))


def _mlp(g: Graph, x: str, name: str) -> str:
    """Linear, SiLU, Linear (the timestep and pooled-text embedders)."""
    return linear(g, silu(g, linear(g, x, name + ".0")), name + ".2")


def _modulation(g: Graph, cond: str, name: str, width: int) -> list[str]:
    """The adaLN vectors from silu(cond), each [B, 1, width], as many as the weight's rows give."""
    count = g.shape(name + ".weight")[0] // width
    out = g.op("Unsqueeze", linear(g, silu(g, cond), name), g.const([1]))
    return g.chunk(out, count, width)


def _modulate(g: Graph, normed: str, shift: str, scale: str) -> str:
    return g.op("Add", g.op("Mul", normed, g.op("Add", scale, g.scalar(1.0))), shift)


def _qkv(g: Graph, x: str, name: str, cfg: MMDiTConfig) -> tuple[str, str, str]:
    """q, k, v [B, L, width] from the fused projection `name`.qkv (one MatMul, then Split), q and
    k RMS-normed per head by `name`.ln_q / ln_k in a model that has them."""
    q, k, v = g.chunk(linear(g, x, name + ".qkv"), 3, cfg.width)
    if cfg.qk_norm:
        def norm(t: str, which: str) -> str:
            heads = g.reshape(t, [0, 0, cfg.heads, cfg.head_dim])
            return g.reshape(rms_norm(g, heads, f"{name}.{which}.weight", eps=1e-6), [0, 0, cfg.width])
        q, k = norm(q, "ln_q"), norm(k, "ln_k")
    return q, k, v


def _mlp_out(g: Graph, x: str, name: str) -> str:
    return linear(g, gelu(g, linear(g, x, name + ".fc1"), approximate=True), name + ".fc2")


def _joint_block(g: Graph, p: str, img: str, txt: str, cond: str, last: bool,
                 cfg: MMDiTConfig) -> tuple[str, str | None]:
    w = cfg.width
    xb, cb = p + "x_block.", p + "context_block."
    x_mod = _modulation(g, cond, xb + "adaLN_modulation.1", w)  # 6, or 9 with attn2
    c_mod = _modulation(g, cond, cb + "adaLN_modulation.1", w)  # 6, or (shift, scale) in the last block
    x_normed = layer_norm(g, img, width=w, eps=1e-6)
    c_normed = layer_norm(g, txt, width=w, eps=1e-6)
    img_qkv = _qkv(g, _modulate(g, x_normed, x_mod[0], x_mod[1]), xb + "attn", cfg)
    txt_qkv = _qkv(g, _modulate(g, c_normed, c_mod[0], c_mod[1]), cb + "attn", cfg)
    q, k, v = (g.op("Concat", a, b, axis=1) for a, b in zip(img_qkv, txt_qkv, strict=True))  # image first
    joint = attention(g, q, k, v, cfg.heads)
    img_attn, txt_attn = g.split(joint, g.dims(g.dim(img, 1), g.dim(txt, 1)), axis=1)

    x = g.op("Add", img, g.op("Mul", x_mod[2], linear(g, img_attn, xb + "attn.proj")))
    if len(x_mod) == 9:  # SD3.5 medium: self-attention on the image stream, from the block's input norm
        q2, k2, v2 = _qkv(g, _modulate(g, x_normed, x_mod[6], x_mod[7]), xb + "attn2", cfg)
        x = g.op("Add", x, g.op("Mul", x_mod[8], linear(g, attention(g, q2, k2, v2, cfg.heads), xb + "attn2.proj")))
    hidden = _modulate(g, layer_norm(g, x, width=w, eps=1e-6), x_mod[3], x_mod[4])
    x = g.op("Add", x, g.op("Mul", x_mod[5], _mlp_out(g, hidden, xb + "mlp")))
    if last:
        return x, None
    c = g.op("Add", txt, g.op("Mul", c_mod[2], linear(g, txt_attn, cb + "attn.proj")))
    hidden = _modulate(g, layer_norm(g, c, width=w, eps=1e-6), c_mod[3], c_mod[4])
    return x, g.op("Add", c, g.op("Mul", c_mod[5], _mlp_out(g, hidden, cb + "mlp")))


def _position_embedding(g: Graph, grid_h: str, grid_w: str, name: str, cfg: MMDiTConfig) -> str:
    """pos_embed's centre crop for a grid_h x grid_w patch grid: [1, grid_h * grid_w, width]."""
    side = g.const([cfg.max_size])
    top = g.op("Div", g.op("Sub", side, grid_h), g.const([2]))  # sizes >= 0: Div floors as torch's //
    left = g.op("Div", g.op("Sub", side, grid_w), g.const([2]))
    table = g.reshape(g.weight(name), [cfg.max_size, cfg.max_size, cfg.width])
    starts = g.op("Concat", top, left, axis=0)
    ends = g.op("Concat", g.op("Add", top, grid_h), g.op("Add", left, grid_w), axis=0)
    crop = g.op("Slice", table, starts, ends, g.const([0, 1]))
    return g.reshape(crop, [1, -1, cfg.width])


def build_mmdit(shapes: Mapping[str, Sequence[int]], prefix: str = "model.diffusion_model.",
                where: str = "the model") -> onnx.ModelProto:
    """The SD3 / SD3.5 transformer as an ONNX graph whose weights are placeholders named as the
    file names them (`shapes`: its names -> shapes, `prefix` included)."""
    g = Graph(shapes, where)
    cfg = mmdit_config(g, prefix)
    p, c, ps = prefix, cfg.channels, cfg.patch
    sample = g.input("sample", ["batch", c, "height", "width"])
    timestep = g.input("timestep", ["batch"])
    context = g.input("encoder_hidden_states", ["batch", "sequence", cfg.context])
    pooled = g.input("text_embeds", ["batch", cfg.pooled])

    batch = g.dim(sample, 0)
    grid_h, grid_w = (g.op("Div", g.dim(sample, a), g.const([ps])) for a in (2, 3))
    patches = conv(g, sample, p + "x_embedder.proj", stride=ps, padding=0)  # [B, width, h, w]
    img = g.op("Transpose", g.reshape(patches, [0, cfg.width, -1]), perm=[0, 2, 1])
    img = g.op("Add", img, _position_embedding(g, grid_h, grid_w, p + "pos_embed", cfg))

    t_emb = _mlp(g, timestep_embedding(g, timestep, 256, flip_sin_to_cos=True, shift=0.0), p + "t_embedder.mlp")
    cond = g.op("Add", t_emb, _mlp(g, pooled, p + "y_embedder.mlp"))
    txt = linear(g, context, p + "context_embedder")

    for i in range(cfg.layers):
        img, txt = _joint_block(g, f"{p}joint_blocks.{i}.", img, txt, cond, i == cfg.layers - 1, cfg)

    shift, scale = _modulation(g, cond, p + "final_layer.adaLN_modulation.1", cfg.width)  # (shift, scale)
    out = linear(g, _modulate(g, layer_norm(g, img, width=cfg.width, eps=1e-6), shift, scale), p + "final_layer.linear")
    out = g.reshape(out, g.dims(batch, grid_h, grid_w, ps, ps, cfg.out_channels))
    out = g.op("Transpose", out, perm=[0, 5, 1, 3, 2, 4])  # n h w p q c -> n c h p w q
    height, width = (g.op("Mul", d, g.const([ps])) for d in (grid_h, grid_w))
    g.output(g.reshape(out, g.dims(batch, cfg.out_channels, height, width)), "out_sample",
             ["batch", cfg.out_channels, "height", "width"])
    return g.model()


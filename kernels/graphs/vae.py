"""The KL autoencoder (the VAE of SD 1.x/2.x, SDXL, SD3 and Flux) as ONNX graphs, written from the
weights' shapes under their LDM single-file names (`first_stage_model.decoder.up.3.block.0...`).

The decoder graph is `post_quant_conv` (where the file has one) then the decoder: latent
[batch, latent, h, w] -> image [batch, 3, 8h, 8w], unscaled (the runtime scales the latent). The
encoder graph is the encoder then `quant_conv` (where the file has one): image -> the moments
(mean and log-variance side by side, 2 * latent channels), so the runtime samples the latent
itself. These are the VAE contracts the runtime reads (runtime.vae).

The configuration comes from the shapes: the levels and blocks per level from the names, the
widths from the convolutions; every GroupNorm has eps 1e-6 and, unless a config says otherwise, 32 groups, as in every such VAE.
LDM's `up.{i}` runs the opposite way to diffusers' `up_blocks`: `up.{levels - 1}` is applied first.

Stable Video Diffusion's temporal decoder (SGM's VideoDecoder, time_mode "conv-only") is the same
decoder where the file has `time_stack` weights: the batch axis holds one video's consecutive
frames, each resnet blends in a temporal ResBlock (Conv3d [C, C, 3, 1, 1] over the frames, its
GroupNorms with eps 1e-5) by sigmoid(`mix_factor`), and `conv_out.time_mix_conv` (Conv3d over the
frames) follows the 2-D `conv_out`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from edgediff.kernels.graphs.builder import (
    Graph,
    attention,
    blend,
    conv,
    group_norm,
    indices,
    linear,
    silu,
    temporal_resblock,
)

GROUPS = 32
EPS = 1e-6


def _count(g: Graph, stem: str, first: str) -> int:
    """How many `stem{i}` the file holds (0 to max); none raises naming `first`, the weight looked
    for first."""
    found = indices(g.shapes, stem)
    if not found:
        g.shape(first)  # raises the SourceError that names it
    return found[-1] + 1


def _resnet(g: Graph, x: str, name: str, groups: int) -> str:
    g.fits((name + ".norm1.weight", 0), (name + ".conv1.weight", 1))
    g.fits((name + ".conv1.weight", 0), (name + ".norm2.weight", 0), (name + ".conv2.weight", 1))
    h = conv(g, silu(g, group_norm(g, x, name + ".norm1", groups, EPS)), name + ".conv1")
    h = conv(g, silu(g, group_norm(g, h, name + ".norm2", groups, EPS)), name + ".conv2")
    if g.has(name + ".nin_shortcut.weight"):
        x = conv(g, x, name + ".nin_shortcut")
    return g.op("Add", x, h)


def _attention(g: Graph, x: str, name: str, groups: int) -> str:
    """Single-head self-attention over the H*W positions, with the residual. q, k, v and proj_out
    are 1x1 convolutions [C, C, 1, 1] in LDM files, Linear [C, C] in some: each runs as stored."""
    shape = g.op("Shape", x)
    h = group_norm(g, x, name + ".norm", groups, EPS)
    width = g.shape(name + ".q.weight")[0]

    def tokens(y: str) -> str:  # [B, C, H, W] -> [B, HW, C]
        return g.op("Transpose", g.reshape(y, [0, width, -1]), perm=[0, 2, 1])

    def project(layer: str) -> str:
        if len(g.shape(f"{name}.{layer}.weight")) == 4:
            return tokens(conv(g, h, f"{name}.{layer}"))
        return linear(g, tokens(h), f"{name}.{layer}")

    q, k, v = (project(layer) for layer in ("q", "k", "v"))
    out = attention(g, q, k, v, heads=1)
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1]), shape)  # back to [B, C, H, W]
    if len(g.shape(name + ".proj_out.weight")) == 4:
        out = conv(g, out, name + ".proj_out")
    else:  # the Linear applies over channels: on the tokens, then back
        out = linear(g, tokens(out), name + ".proj_out")
        out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1]), shape)
    return g.op("Add", x, out)


def _frames(g: Graph, x: str) -> str:
    """[frames, C, H, W] -> [1, C, frames, H, W], one video for the 3-D convolutions."""
    return g.op("Unsqueeze", g.op("Transpose", x, perm=[1, 0, 2, 3]), g.const([0]))


def _unframes(g: Graph, x: str) -> str:
    return g.op("Transpose", g.op("Squeeze", x, g.const([0])), perm=[1, 0, 2, 3])


def _video_resnet(g: Graph, x: str, name: str, groups: int) -> str:
    """The spatial resnet, then its temporal ResBlock `time_stack` over the frames (no time
    embedding), blended: sigmoid(mix_factor) * temporal + (1 - sigmoid(mix_factor)) * spatial."""
    spatial = _resnet(g, x, name, groups)
    t = name + ".time_stack."
    g.fits((name + ".conv2.weight", 0), (t + "in_layers.0.weight", 0), (t + "in_layers.2.weight", 1),
           (t + "in_layers.2.weight", 0), (t + "out_layers.0.weight", 0), (t + "out_layers.3.weight", 1),
           (t + "out_layers.3.weight", 0))
    temporal = _unframes(g, temporal_resblock(g, _frames(g, spatial), t, groups))
    return blend(g, temporal, spatial, name + ".mix_factor")


def _mid(g: Graph, x: str, name: str, groups: int, resnet=_resnet) -> str:
    x = resnet(g, x, name + ".block_1", groups)
    if resnet is _video_resnet and not g.has(name + ".block_2.norm1.weight"):
        return x  # diffusers' temporal decoder of one layer a block: one resnet, its attention unused
    x = _attention(g, x, name + ".attn_1", groups)
    return resnet(g, x, name + ".block_2", groups)


def _out(g: Graph, x: str, name: str, groups: int) -> str:
    return conv(g, silu(g, group_norm(g, x, name + ".norm_out", groups, EPS)), name + ".conv_out")


def _upsample(g: Graph, x: str, name: str) -> str:
    """Nearest x2 as torch exports F.interpolate(scale_factor=2), then the 3x3 convolution."""
    scales = g.const([1.0, 1.0, 2.0, 2.0], "float32")
    x = g.op("Resize", x, "", scales, mode="nearest", coordinate_transformation_mode="asymmetric",
             nearest_mode="floor")
    return conv(g, x, name + ".conv")


def _downsample(g: Graph, x: str, name: str) -> str:
    """LDM's asymmetric padding: one zero row and column at the bottom and right, then the 3x3
    convolution with stride 2 and no padding of its own."""
    x = g.op("Pad", x, g.const([0, 0, 0, 0, 0, 0, 1, 1]), mode="constant")
    return conv(g, x, name + ".conv", stride=2, padding=0)


def build_vae_decoder(shapes: Mapping[str, Sequence[int]], prefix: str = "first_stage_model.",
                      where: str = "the model", groups: int = GROUPS) -> onnx.ModelProto:
    """latent_sample [batch, latent, height, width] -> sample [batch, 3, 8 height, 8 width]; for
    SVD's temporal decoder, latent_sample [frames, ...] -> sample [frames, ...], the frames of one
    video (decoded together: they mix)."""
    g = Graph(shapes, where)
    p = prefix + "decoder."
    video = g.has(p + "conv_out.time_mix_conv.weight") or g.has(p + "mid.block_1.time_stack.in_layers.0.weight")
    resnet = _video_resnet if video else _resnet
    post = prefix + "post_quant_conv"
    has_post = g.has(post + ".weight")
    latent = g.shape(post + ".weight" if has_post else p + "conv_in.weight")[1]
    levels = _count(g, p + "up.", p + "up.0.block.0.conv1.weight")
    blocks = _count(g, p + "up.0.block.", p + "up.0.block.0.conv1.weight")

    batch = "frames" if video else "batch"
    x = g.input("latent_sample", [batch, latent, "height", "width"])
    if has_post:
        x = conv(g, x, post)
    x = _mid(g, conv(g, x, p + "conv_in"), p + "mid", groups, resnet)
    for i in reversed(range(levels)):
        for j in range(blocks):
            x = resnet(g, x, f"{p}up.{i}.block.{j}", groups)
        if i != 0:
            x = _upsample(g, x, f"{p}up.{i}.upsample")
    x = _out(g, x, p[:-1], groups)
    if video:
        x = _unframes(g, conv(g, _frames(g, x), p + "conv_out.time_mix_conv"))
    g.output(x, "sample", [batch, g.shape(p + "conv_out.weight")[0], "height", "width"])
    return g.model()


def build_vae_encoder(shapes: Mapping[str, Sequence[int]], prefix: str = "first_stage_model.",
                      where: str = "the model", groups: int = GROUPS) -> onnx.ModelProto:
    """sample [batch, 3, height, width] -> latent_parameters [batch, 2 latent, height / 8, width / 8]
    (mean, then log-variance)."""
    g = Graph(shapes, where)
    p = prefix + "encoder."
    quant = prefix + "quant_conv"
    has_quant = g.has(quant + ".weight")
    levels = _count(g, p + "down.", p + "down.0.block.0.conv1.weight")
    blocks = _count(g, p + "down.0.block.", p + "down.0.block.0.conv1.weight")

    x = g.input("sample", ["batch", g.shape(p + "conv_in.weight")[1], "height", "width"])
    x = conv(g, x, p + "conv_in")
    for i in range(levels):
        for j in range(blocks):
            x = _resnet(g, x, f"{p}down.{i}.block.{j}", groups)
        if i != levels - 1:
            x = _downsample(g, x, f"{p}down.{i}.downsample")
    x = _out(g, _mid(g, x, p + "mid", groups), p[:-1], groups)
    if has_quant:
        x = conv(g, x, quant)
    moments = g.shape(quant + ".weight" if has_quant else p + "conv_out.weight")[0]
    g.output(x, "latent_parameters", ["batch", moments, "height", "width"])
    return g.model()

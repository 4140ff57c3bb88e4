"""A ControlNet (SD 1.x, 2.x, SDXL) as an ONNX graph, written from the weights' shapes under the
LDM names its single files use (`control_model.*`, lllyasviel's ControlNet 1.0/1.1 releases).

A ControlNet is the U-Net's encoder half (`time_embed`, SDXL's `label_emb`, `input_blocks`,
`middle_block`: built by kernels.graphs.unet's own layers) plus what steers it: the
`input_hint_block` that embeds the control image down to the latent's size (3x3 convolutions with
SiLU between, every second of the inner ones with stride 2, as diffusers'
ControlNetConditioningEmbedding), added after the first convolution; a 1x1 `zero_convs.{i}.0`
on each skip and `middle_block_out.0` on the middle block's output. Each of these residuals is
scaled by `conditioning_scale` (diffusers' ControlNetModel without guess mode).

The contract: the U-Net's inputs (`sample`, `timestep`, `encoder_hidden_states`; SDXL's
`text_embeds`, `time_ids`), `controlnet_cond` [batch, channels, 8h, 8w] (the control image in
[0, 1], as diffusers feeds it) and `conditioning_scale` [1] -> `down_block_res_sample_{i}` per
skip and `mid_block_res_sample`, which a U-Net built with `control` takes as its residuals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import conv, indices, silu
from edgediff.kernels.graphs.unet import GROUPS, _UNet

PREFIX = "control_model."
RES_SAMPLE = "down_block_res_sample_{}"
MID_RES_SAMPLE = "mid_block_res_sample"


def _hint(u: _UNet) -> str:
    """The control image embedded to the first convolution's width at the latent's size."""
    g, p = u.g, u.p
    convs = [f"{p}input_hint_block.{k}" for k in indices(g.shapes, p + "input_hint_block.")]
    if len(convs) < 2 or len(convs) % 2:
        raise SourceError(f"{g.where}: '{p}input_hint_block' has {len(convs)} convolutions; a ControlNet's has "
                          "an even number of at least 2 (8 in SD's)")
    g.fits((convs[-1] + ".weight", 0), (p + "input_blocks.0.0.weight", 0))
    x = u.cond
    for j, name in enumerate(convs):
        inner = 0 < j < len(convs) - 1
        x = conv(g, x, name, stride=2 if inner and j % 2 == 0 else 1)
        if j < len(convs) - 1:
            x = silu(g, x)
    return x


def build_controlnet(shapes: Mapping[str, Sequence[int]], *, heads: int | Sequence[int] | None = None,
                     head_dim: int | None = None, groups: int = GROUPS, time_ids: int = 6, time_id_dim: int = 256,
                     prefix: str = PREFIX, where: str = "the ControlNet") -> onnx.ModelProto:
    """The ControlNet graph; the keywords are kernels.graphs.unet.build_unet's."""
    u = _UNet(shapes, heads, head_dim, groups, time_ids, time_id_dim, prefix, where, decoder=False)
    g, lay = u.g, u.layout
    u.inputs()
    hint_channels = g.shape(prefix + "input_hint_block.0.weight")[1]
    u.cond = g.input("controlnet_cond", ["batch", hint_channels, "image_height", "image_width"])
    scale = g.input("conditioning_scale", [1])
    emb = u.embedding()
    skips, x, _ = u.encoder(emb, _hint(u))
    zero_convs = indices(g.shapes, prefix + "zero_convs.")
    if len(zero_convs) != len(skips):
        raise SourceError(f"{where}: {len(zero_convs)} zero convolutions for {len(skips)} input blocks; the file is "
                          "incomplete or of another architecture")
    for i, (skip, width) in enumerate(zip(skips, lay.skip_widths, strict=True)):
        out = g.op("Mul", conv(g, skip, f"{prefix}zero_convs.{i}.0"), scale)
        g.output(out, RES_SAMPLE.format(i), ["batch", width, f"height_{i}", f"width_{i}"])
    out = g.op("Mul", conv(g, x, prefix + "middle_block_out.0"), scale)
    g.output(out, MID_RES_SAMPLE, ["batch", u.middle_width(), "height_mid", "width_mid"])
    return g.model()

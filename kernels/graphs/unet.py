"""The Stable Diffusion U-Net (SD 1.x, 2.x, SDXL base and refiner, LCM) as ONNX graphs, written
from the weights' shapes under their LDM/SGM single-file names (`model.diffusion_model.*`).

The graph walks the file's own layout, as LDM's `UNetModel.forward` does: every
`input_blocks.N` is a sequence of layers (`.0` the first convolution, then resnets, spatial
transformers and `op` downsamples), each block's output kept as a skip; `middle_block`; every
`output_blocks.N` takes the last skip beside its input, then runs its resnet, transformer and
`conv` upsample. Each layer's kind is read from its weights' names, the widths and depths from
their shapes, so any level count, channel multipliers, layers per block and transformer depth
per block (SDXL's 1/2/10) need no configuration. What the shapes cannot say is a parameter:
the attention heads (SD 1.x: 8 per layer; SD 2.x and SDXL: 64-wide heads), the GroupNorm
groups (32 in every LDM model), and SDXL's time ids (how many, how wide each is embedded).

The contract is the runtime's for the UNet: `sample`
[batch, C, height, width], `timestep` [batch] (float), `encoder_hidden_states` [batch, sequence,
context]; SDXL's `text_embeds` [batch, pooled] and `time_ids` [batch, ids]; LCM's `timestep_cond`
[batch, width] -> `out_sample`. With `control`, the residuals a ControlNet gives (diffusers'
`down_block_additional_residuals`, one per skip, and `mid_block_additional_residual`) are inputs
too, `down_block_additional_residual_{i}` [batch, skip width, h, w] added to skip i where it
joins the up path, and `mid_block_additional_residual` to the middle block's output, as diffusers
and LDM's ControlledUnetModel add them; a caller without a ControlNet feeds zeros of
[1, width, 1, 1], which broadcast (13 Adds in SD 1.5's U-Net, nothing to fold). With `deep_cache` a second output, `deep_feature`, is what enters
the last up block's last SHALLOW_LAYERS layers before their skips join, and `build_unet_shallow`
is DeepCache's shallow branch that takes it back (tests/reference.py's `UNetGraph` and
`ShallowUNetGraph` are the torch modules they are held to).

Numerics follow diffusers' `UNet2DConditionModel` at its defaults: the sinusoidal timestep
embedding as wide as the first convolution, cos first, no shift; resnet and output GroupNorms
with eps 1e-5, the transformers' GroupNorm with eps 1e-6, LayerNorms 1e-5; GEGLU feed-forward;
upsampling is nearest x2 cut to the size of the skip it joins, which is what diffusers does
for latent sizes that are not multiples of 2**levels (and the same as x2 where they are).

LCM's guidance projection has no LDM name (`ldm_names.unet_name` does not map it):
diffusers' convert_diffusers_to_original_stable_diffusion.py keeps names it does not know, so
it is `time_embedding.cond_proj.weight` under the prefix (`COND_PROJ`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import (
    Graph,
    attention,
    blend,
    conv,
    gelu,
    group_norm,
    indices,
    layer_norm,
    linear,
    matmul,
    silu,
    temporal_resblock,
    timestep_embedding,
)

SHALLOW_LAYERS = 2  # DeepCache's shallow branch reruns this many up layers (its paper's finest setting)
COND_PROJ = "time_embedding.cond_proj.weight"  # LCM's, under the prefix (see above)
GROUPS = 32
NORM_EPS = 1e-5  # resnets' and the output's GroupNorm (diffusers' norm_eps)
TRANSFORMER_NORM_EPS = 1e-6  # the spatial transformer's GroupNorm
LAYER_NORM_EPS = 1e-5

# a layer's kind, by the weight only it has
_KINDS = (("resnet", "in_layers.2.weight"), ("transformer", "proj_in.weight"), ("down", "op.weight"),
          ("up", "conv.weight"))


@dataclass(frozen=True)
class UNetLayout:
    """What the shapes say: each block's layers as (kind, name prefix), the widths, the extras."""

    input_blocks: tuple[tuple[tuple[str, str], ...], ...]
    middle_block: tuple[tuple[str, str], ...]
    output_blocks: tuple[tuple[tuple[str, str], ...], ...]
    in_channels: int
    out_channels: int
    model_channels: int
    levels: int
    context: int
    skip_widths: tuple[int, ...]  # each input block's output width, the skips in order
    adm: int  # SDXL's label_emb input width (pooled text + embedded time ids), 0 when none
    cond: int  # LCM's timestep_cond width, 0 when none


def _layers(g: Graph, block: str) -> tuple[tuple[str, str], ...]:
    """The layers of `block` (a TimestepEmbedSequential, `…input_blocks.N`) by kind."""
    layers = []
    for k in indices(g.shapes, block + "."):
        name = f"{block}.{k}."
        kind = next((kind for kind, marker in _KINDS if g.has(name + marker)), None)
        if kind is None:
            raise SourceError(f"{g.where}: '{name}*' is no U-Net layer this graph knows (it has none of "
                              f"{', '.join(name + marker for _, marker in _KINDS)}); the file is incomplete "
                              "or of another architecture")
        layers.append((kind, name))
    return tuple(layers)


def unet_layout(g: Graph, prefix: str, decoder: bool = True) -> UNetLayout:
    """The layout under `prefix`; without `decoder`, the encoder half only (a ControlNet's: no
    output blocks, no output layers; `output_blocks` empty and `out_channels` 0)."""
    p = prefix
    conv_in = g.shape(p + "input_blocks.0.0.weight")
    inputs = [(("conv_in", p + "input_blocks.0.0."),)]
    inputs += [_layers(g, f"{p}input_blocks.{i}") for i in indices(g.shapes, p + "input_blocks.")[1:]]
    outputs = [_layers(g, f"{p}output_blocks.{i}") for i in indices(g.shapes, p + "output_blocks.")] if decoder else []
    middle = _layers(g, p + "middle_block")
    if not middle:
        g.shape(p + "middle_block.0.in_layers.2.weight")  # raises the SourceError naming it
    if decoder and len(outputs) != len(inputs):
        raise SourceError(f"{g.where}: {len(inputs)} input blocks but {len(outputs)} output blocks; the file is "
                          "incomplete or of another architecture")
    widths, width = [], conv_in[0]
    for block in inputs:
        for kind, name in block:
            if kind == "resnet":
                width = g.shape(name + "out_layers.3.weight")[0]
        widths.append(width)
    transformer = next((name for block in (*inputs, middle, *outputs) for kind, name in block
                        if kind == "transformer"), p + "middle_block.1.")
    context = g.shape(transformer + "transformer_blocks.0.attn2.to_k.weight")[1]
    adm = g.shape(p + "label_emb.0.0.weight")[1] if g.has(p + "label_emb.0.0.weight") else 0
    cond = g.shape(p + COND_PROJ)[1] if g.has(p + COND_PROJ) else 0
    levels = 1 + sum(kind == "down" for block in inputs for kind, _ in block)
    out = g.shape(p + "out.2.weight")[0] if decoder else 0
    return UNetLayout(tuple(inputs), middle, tuple(outputs), conv_in[1], out, conv_in[0], levels, context,
                      tuple(widths), adm, cond)


class _Heads:
    """Attention heads of a transformer from its width and level: a count for every layer (SD
    1.x's 8), one per level, or the head width (SD 2.x and SDXL: 64)."""

    def __init__(self, heads: int | Sequence[int] | None, head_dim: int | None, levels: int):
        if (heads is None) == (head_dim is None):
            raise ValueError("give the U-Net's attention heads either as `heads` (SD 1.x: 8) or as `head_dim` "
                             "(SD 2.x, SDXL: 64)")
        if heads is not None and not isinstance(heads, int) and len(heads) != levels:
            raise ValueError(f"{len(heads)} head counts for a U-Net of {levels} levels")
        self.heads, self.head_dim = heads, head_dim

    def __call__(self, width: int, level: int, where: str) -> int:
        if self.heads is not None:
            heads = self.heads if isinstance(self.heads, int) else self.heads[level]
        else:
            heads = width // self.head_dim
        if heads < 1 or width % heads:
            raise SourceError(f"{where}: a transformer {width} wide cannot have "
                              f"{f'{self.head_dim}-wide heads' if self.heads is None else f'{heads} heads'}")
        return heads


# -- layers ------------------------------------------------------------------------------------

def _resnet(g: Graph, x: str, name: str, emb: str, groups: int, video: _Frames | None = None) -> str:
    """ResBlock: norm, SiLU, conv; plus the projected embedding; norm, SiLU, conv; plus the
    input (through `skip_connection` where the width changes). `emb` is SiLU(embedding). In a
    video U-Net, its temporal twin follows (`_temporal_resnet`)."""
    g.fits((name + "in_layers.0.weight", 0), (name + "in_layers.2.weight", 1))
    g.fits((name + "in_layers.2.weight", 0), (name + "emb_layers.1.weight", 0), (name + "out_layers.0.weight", 0),
           (name + "out_layers.3.weight", 1))
    h = conv(g, silu(g, group_norm(g, x, name + "in_layers.0", groups, NORM_EPS)), name + "in_layers.2")
    h = g.op("Add", h, g.op("Unsqueeze", linear(g, emb, name + "emb_layers.1"), g.const([2, 3])))
    h = conv(g, silu(g, group_norm(g, h, name + "out_layers.0", groups, NORM_EPS)), name + "out_layers.3")
    if g.has(name + "skip_connection.weight"):
        x = conv(g, x, name + "skip_connection")
    x = g.op("Add", x, h)
    return _temporal_resnet(g, x, name, video, groups) if video is not None else x


def _attention(g: Graph, x: str, context: str, name: str, heads: int) -> str:
    q = linear(g, x, name + "to_q")
    k, v = linear(g, context, name + "to_k"), linear(g, context, name + "to_v")
    return linear(g, attention(g, q, k, v, heads), name + "to_out.0")


def _geglu(g: Graph, x: str, name: str) -> str:
    hidden, gate = g.chunk(linear(g, x, name + "net.0.proj"), 2, g.shape(name + "net.0.proj.weight")[0] // 2)
    return linear(g, g.op("Mul", hidden, gelu(g, gate)), name + "net.2")


def _transformer(g: Graph, x: str, name: str, context: str, heads: _Heads, level: int, groups: int,
                 video: _Frames | None = None) -> str:
    """SpatialTransformer: GroupNorm, proj_in (a 1x1 conv in SD 1.x, a Linear on the tokens in SD
    2.x/SDXL: as stored), the transformer blocks over the H*W tokens, proj_out, the residual. In
    a video U-Net each block is followed by its temporal twin over the frames (`_temporal`)."""
    inner = g.shape(name + "proj_in.weight")[0]
    count = heads(inner, level, f"{g.where}: {name[:-1]}")
    h = group_norm(g, x, name + "norm", groups, TRANSFORMER_NORM_EPS)

    def tokens(y: str, width: int) -> str:  # [B, C, H, W] -> [B, HW, C]
        return g.op("Transpose", g.reshape(y, [0, width, -1]), perm=[0, 2, 1])

    if len(g.shape(name + "proj_in.weight")) == 4:
        h = conv(g, h, name + "proj_in")
        image = g.op("Shape", h)
        t = tokens(h, inner)
    else:
        t = linear(g, tokens(h, g.shape(name + "norm.weight")[0]), name + "proj_in")
    blocks = indices(g.shapes, name + "transformer_blocks.")
    if not blocks:
        g.shape(name + "transformer_blocks.0.attn1.to_q.weight")  # raises the SourceError naming it
    positions = _frame_positions(g, name, video) if video is not None else None
    for k in blocks:
        b = f"{name}transformer_blocks.{k}."
        n = layer_norm(g, t, b + "norm1", eps=LAYER_NORM_EPS)
        t = g.op("Add", t, _attention(g, n, n, b + "attn1.", count))
        t = g.op("Add", t, _attention(g, layer_norm(g, t, b + "norm2", eps=LAYER_NORM_EPS), context,
                                      b + "attn2.", count))
        t = g.op("Add", t, _geglu(g, layer_norm(g, t, b + "norm3", eps=LAYER_NORM_EPS), b + "ff."))
        if video is not None:
            t = _temporal(g, t, name, k, count, video, positions, inner)
    if len(g.shape(name + "proj_out.weight")) == 4:
        out = conv(g, g.op("Reshape", g.op("Transpose", t, perm=[0, 2, 1]), image), name + "proj_out")
    else:
        out = g.op("Reshape", g.op("Transpose", linear(g, t, name + "proj_out"), perm=[0, 2, 1]), g.op("Shape", x))
    return g.op("Add", x, out)


def _upsample(g: Graph, x: str, name: str, like: str) -> str:
    """Nearest x2, cut to the height and width of `like` (the skip it joins next), then the conv."""
    x = g.op("Resize", x, "", g.const([1.0, 1.0, 2.0, 2.0], "float32"), mode="nearest",
             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    x = g.op("Slice", x, g.const([0, 0]), g.op("Shape", like, start=2, end=4), g.const([2, 3]))
    return conv(g, x, name + "conv")


# -- the frames of a video U-Net (Stable Video Diffusion) ---------------------------------------
#
# SVD's VideoUNet (SGM's `video_model.py`; diffusers' UNetSpatioTemporalConditionModel) is the
# image U-Net with frames on the batch axis and a temporal twin after every resnet and
# transformer block: a ResBlock of (3, 1, 1) convolutions over [B, C, F, H, W] (`time_stack`), a
# transformer block over each position's F frames (`time_stack.K`, after the frame index's
# embedding `time_pos_embed` is added), each blended back with the spatial output by a learned
# sigmoid(`time_mixer.mix_factor`): alpha * spatial + (1 - alpha) * temporal. The temporal
# attention's context is each video's (its first frame's) image embedding.

@dataclass(frozen=True)
class _Frames:
    """What the temporal layers take: the frame count (a 1-element tensor), SiLU(embedding) per
    frame [B, F, E] and each video's context [B, S, D]."""

    count: str
    emb: str
    context: str


def _to_video(g: Graph, x: str, frames: str) -> str:
    """[B * F, C, H, W] -> [B, C, F, H, W]."""
    v = g.op("Reshape", x, g.dims(-1, frames, g.op("Shape", x, start=1)))
    return g.op("Transpose", v, perm=[0, 2, 1, 3, 4])


def _temporal_resnet(g: Graph, x: str, name: str, video: _Frames, groups: int) -> str:
    """VideoResBlock's `time_stack`: a ResBlock of (3, 1, 1) convolutions over the frames, its
    embedding per frame, blended with the spatial output."""
    t = name + "time_stack."
    v = _to_video(g, x, video.count)
    e = g.op("Transpose", linear(g, video.emb, t + "emb_layers.1"), perm=[0, 2, 1])  # [B, C, F]
    temporal = temporal_resblock(g, v, t, groups, g.op("Unsqueeze", e, g.const([3, 4])))
    mixed = blend(g, v, temporal, name + "time_mixer.mix_factor")  # diffusers' AlphaBlender, no image-only frames
    return g.op("Reshape", g.op("Transpose", mixed, perm=[0, 2, 1, 3, 4]), g.op("Shape", x))


def _frame_positions(g: Graph, name: str, video: _Frames) -> str:
    """The frame index's embedding [F, C] (`time_pos_embed`), added before each temporal block."""
    frames = g.op("Cast", g.op("Range", g.const(0), g.op("Squeeze", video.count), g.const(1)),
                  to=onnx.TensorProto.FLOAT)
    e = timestep_embedding(g, frames, g.shape(name + "time_pos_embed.0.weight")[1])
    return linear(g, silu(g, linear(g, e, name + "time_pos_embed.0")), name + "time_pos_embed.2")


def _temporal(g: Graph, t: str, name: str, k: int, heads: int, video: _Frames, positions: str, width: int) -> str:
    """Transformer block K's temporal twin on the tokens t [B * F, S, C]: each position's frames
    attend to each other, then to the video's context; blended with t."""
    b = f"{name}time_stack.{k}."
    tokens = g.dim(t, 1)
    x = g.op("Reshape", t, g.dims(-1, video.count, tokens, width))  # [B, F, S, C]
    x = g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.dims(-1, video.count, width))  # [B * S, F, C]
    x = g.op("Add", x, positions)
    if g.has(b + "norm_in.weight"):
        h = _geglu(g, layer_norm(g, x, b + "norm_in", eps=LAYER_NORM_EPS), b + "ff_in.")
        x = g.op("Add", x, h) if g.shape(b + "ff_in.net.2.weight")[0] == width else h
    n = layer_norm(g, x, b + "norm1", eps=LAYER_NORM_EPS)
    x = g.op("Add", x, _attention(g, n, n, b + "attn1.", heads))
    if g.has(b + "attn2.to_q.weight"):  # keys and values of each video's context, then per position
        q = linear(g, layer_norm(g, x, b + "norm2", eps=LAYER_NORM_EPS), b + "attn2.to_q")
        rows = g.dims(1, tokens, 1, 1)
        k_, v_ = (g.op("Reshape", g.op("Expand", g.op("Unsqueeze", linear(g, video.context, b + f"attn2.to_{part}"),
                                                      g.const([1])), rows),
                       g.dims(-1, g.dim(video.context, 1), g.shape(b + f"attn2.to_{part}.weight")[0]))
                  for part in "kv")
        x = g.op("Add", x, linear(g, attention(g, q, k_, v_, heads), b + "attn2.to_out.0"))
    h = _geglu(g, layer_norm(g, x, b + "norm3", eps=LAYER_NORM_EPS), b + "ff.")
    x = g.op("Add", x, h) if g.shape(b + "ff.net.2.weight")[0] == width else h
    x = g.op("Reshape", x, g.dims(-1, tokens, video.count, width))  # [B, S, F, C]
    x = g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.dims(-1, tokens, width))
    return blend(g, t, x, name + "time_mixer.mix_factor")


# -- the graph ---------------------------------------------------------------------------------

class _UNet:
    def __init__(self, shapes, heads, head_dim, groups, time_ids, time_id_dim, prefix, where, decoder=True):
        self.g = Graph(shapes, where)
        self.p, self.groups = prefix, groups
        self.layout = unet_layout(self.g, prefix, decoder)
        self.heads = _Heads(heads, head_dim, self.layout.levels)
        self.time_ids, self.time_id_dim = time_ids, time_id_dim
        self.video: _Frames | None = None  # a video U-Net's frames (build_video_unet)

    def inputs(self) -> None:
        g, lay = self.g, self.layout
        self.sample = g.input("sample", ["batch", lay.in_channels, "height", "width"])
        self.timestep = g.input("timestep", ["batch"])
        self.context = g.input("encoder_hidden_states", ["batch", "sequence", lay.context])
        self.extras = {}
        if lay.adm:
            pooled = lay.adm - self.time_ids * self.time_id_dim
            if pooled < 1:
                raise SourceError(f"{g.where}: label_emb takes {lay.adm} numbers, too few for {self.time_ids} time "
                                  f"ids embedded {self.time_id_dim} wide and the pooled text")
            self.extras["text_embeds"] = g.input("text_embeds", ["batch", pooled])
            self.extras["time_ids"] = g.input("time_ids", ["batch", self.time_ids])
        if lay.cond:
            self.extras["timestep_cond"] = g.input("timestep_cond", ["batch", lay.cond])

    def embedding(self) -> str:
        """SiLU of the time embedding (plus SDXL's text-and-size embedding), as every resnet takes it."""
        g, p = self.g, self.p
        t = timestep_embedding(g, self.timestep, g.shape(p + "time_embed.0.weight")[1])
        if "timestep_cond" in self.extras:
            t = g.op("Add", t, matmul(g, self.extras["timestep_cond"], p + COND_PROJ))
        emb = linear(g, silu(g, linear(g, t, p + "time_embed.0")), p + "time_embed.2")
        if self.layout.adm:
            ids = timestep_embedding(g, g.reshape(self.extras["time_ids"], [-1]), self.time_id_dim)
            ids = g.reshape(ids, [-1, self.time_ids * self.time_id_dim])
            added = g.op("Concat", self.extras["text_embeds"], ids, axis=-1) if "text_embeds" in self.extras else ids
            emb = g.op("Add", emb, linear(g, silu(g, linear(g, added, p + "label_emb.0.0")), p + "label_emb.0.2"))
        return silu(g, emb)

    def block(self, x: str, layers, emb: str, level: int, like: str | None = None) -> tuple[str, int]:
        """Run one block's layers; returns the output and the level it ends at."""
        g = self.g
        for kind, name in layers:
            if kind == "conv_in":
                x = conv(g, x, name[:-1])
            elif kind == "resnet":
                x = _resnet(g, x, name, emb, self.groups, self.video)
            elif kind == "transformer":
                x = _transformer(g, x, name, self.context, self.heads, level, self.groups, self.video)
            elif kind == "down":
                x, level = conv(g, x, name + "op", stride=2), level + 1
            else:  # up
                if like is None:
                    raise SourceError(f"{g.where}: '{name}conv' upsamples in the last output block")
                x, level = _upsample(g, x, name, like), level - 1
        return x, level

    def out(self, x: str) -> None:
        g, p = self.g, self.p
        x = conv(g, silu(g, group_norm(g, x, p + "out.0", self.groups, NORM_EPS)), p + "out.2")
        if self.video is not None:  # [batch * frames, ...] -> [batch, frames, ...]
            x = g.op("Reshape", x, g.dims(-1, self.video.count, g.op("Shape", x, start=1)))
            g.output(x, "out_sample", ["batch", "frames", self.layout.out_channels, "height", "width"])
            return
        g.output(x, "out_sample", ["batch", self.layout.out_channels, "height", "width"])

    def feature_width(self) -> int:
        """The deep feature's channels: the shallow branch's first resnet's input less its skip."""
        lay = self.layout
        kind, name = lay.output_blocks[-SHALLOW_LAYERS][0]
        if kind != "resnet":
            raise SourceError(f"{self.g.where}: '{name}*' is no resnet; DeepCache needs one there")
        return self.g.shape(name + "in_layers.0.weight")[0] - lay.skip_widths[SHALLOW_LAYERS - 1]

    def middle_width(self) -> int:
        kind, name = self.layout.middle_block[-1]
        return self.g.shape(name + ("out_layers.3.weight" if kind == "resnet" else "proj_out.weight"))[0]

    def encoder(self, emb: str, hint: str | None = None) -> tuple[list[str], str, int]:
        """The input blocks and the middle block: (the skips, the middle block's output, its
        level). `hint` (a ControlNet's embedded control image) is added after the first
        convolution, as diffusers' ControlNetModel and LDM's ControlNet add it."""
        skips, x, level = [], self.sample, 0
        for i, layers in enumerate(self.layout.input_blocks):
            x, level = self.block(x, layers, emb, level)
            if i == 0 and hint is not None:
                x = self.g.op("Add", x, hint)
            skips.append(x)
        x, level = self.block(x, self.layout.middle_block, emb, level)
        return skips, x, level


RESIDUAL = "down_block_additional_residual_{}"  # a ControlNet's residual for skip i (diffusers' name, one each)
MID_RESIDUAL = "mid_block_additional_residual"


def build_unet(shapes: Mapping[str, Sequence[int]], *, heads: int | Sequence[int] | None = None,
               head_dim: int | None = None, groups: int = GROUPS, time_ids: int = 6, time_id_dim: int = 256,
               prefix: str = "model.diffusion_model.", deep_cache: bool = False, control: bool = False,
               where: str = "the model") -> onnx.ModelProto:
    """The U-Net: sample, timestep, encoder_hidden_states (+ text_embeds, time_ids for SDXL,
    timestep_cond for LCM; + a ControlNet's residuals with `control`) -> out_sample (+
    deep_feature with `deep_cache`).

    `heads`: attention heads per transformer (SD 1.x: 8), or one count per level (lowest
    first), or else `head_dim` (SD 2.x, SDXL: 64). `groups`: every GroupNorm's (32 in LDM models).
    `time_ids`, `time_id_dim`: SDXL's count of time ids (6 for base, 5 for the refiner) and each
    one's embedding width (256); the pooled text is the rest of `label_emb`'s input."""
    u = _UNet(shapes, heads, head_dim, groups, time_ids, time_id_dim, prefix, where)
    g, lay = u.g, u.layout
    u.inputs()
    emb = u.embedding()
    skips, x, level = u.encoder(emb)
    if control:  # each residual is its own tensor: sizes named apart, so zeros of [1, C, 1, 1] broadcast
        skips = [g.op("Add", skip, g.input(RESIDUAL.format(i), [f"residual_batch_{i}", width, f"residual_height_{i}",
                                                                 f"residual_width_{i}"]))
                 for i, (skip, width) in enumerate(zip(skips, lay.skip_widths, strict=True))]
        x = g.op("Add", x, g.input(MID_RESIDUAL, ["residual_batch_mid", u.middle_width(), "residual_height_mid",
                                                  "residual_width_mid"]))
    for i, layers in enumerate(lay.output_blocks):
        if deep_cache and i == len(lay.output_blocks) - SHALLOW_LAYERS:
            feature = x
            width = u.feature_width()
        x = g.op("Concat", x, skips.pop(), axis=1)
        x, level = u.block(x, layers, emb, level, skips[-1] if skips else None)
    u.out(x)
    if deep_cache:
        g.output(feature, "deep_feature", ["batch", width, "height", "width"])
    return g.model()


def build_unet_shallow(shapes: Mapping[str, Sequence[int]], *, heads: int | Sequence[int] | None = None,
                       head_dim: int | None = None, groups: int = GROUPS, time_ids: int = 6,
                       time_id_dim: int = 256, prefix: str = "model.diffusion_model.",
                       where: str = "the model") -> onnx.ModelProto:
    """DeepCache's shallow branch: the same inputs plus `deep_feature` (from an earlier step's
    `build_unet(..., deep_cache=True)`) -> out_sample. It runs the embedding, the first
    SHALLOW_LAYERS input blocks (the skips it needs), the last SHALLOW_LAYERS output blocks from
    the deep feature, and the output layers."""
    u = _UNet(shapes, heads, head_dim, groups, time_ids, time_id_dim, prefix, where)
    g, lay = u.g, u.layout
    u.inputs()
    feature = g.input("deep_feature", ["batch", u.feature_width(), "height", "width"])
    emb = u.embedding()
    skips, x, level = [], u.sample, 0
    for layers in lay.input_blocks[:SHALLOW_LAYERS]:
        x, level = u.block(x, layers, emb, level)
        skips.append(x)
    if level:
        raise SourceError(f"{where}: the U-Net downsamples within its first {SHALLOW_LAYERS} input blocks")
    x = feature
    for layers in lay.output_blocks[-SHALLOW_LAYERS:]:
        x = g.op("Concat", x, skips.pop(), axis=1)
        x, level = u.block(x, layers, emb, level, skips[-1] if skips else None)
    u.out(x)
    return g.model()


VIDEO = "middle_block.0.time_stack.in_layers.2.weight"  # under the prefix: a video U-Net's weight


def _per_frame(g: Graph, y: str, frames: str, rank: int) -> str:
    """[B, ...] -> [B * F, ...]: each video's tensor repeated for its frames."""
    many = g.op("Expand", g.op("Unsqueeze", y, g.const([1])), g.dims(1, frames, *[1] * (rank - 1)))
    return g.op("Reshape", many, g.dims(-1, g.op("Shape", y, start=1)))


def build_video_unet(shapes: Mapping[str, Sequence[int]], *, heads: int | Sequence[int] | None = None,
                     head_dim: int | None = None, groups: int = GROUPS, time_ids: int = 3, time_id_dim: int = 256,
                     prefix: str = "model.diffusion_model.", where: str = "the model") -> onnx.ModelProto:
    """Stable Video Diffusion's spatio-temporal U-Net: `sample` [batch, frames, C, h, w] (the
    scaled noisy latents), `image_latents` [batch, C', h, w] (the conditioning frame's latent,
    joined to every frame's channels), `timestep` [batch] (EDM's c_noise), `encoder_hidden_states`
    [batch, sequence, context] (the image embedding), `time_ids` [batch, 3] (fps - 1, motion
    bucket id, noise augmentation strength, each embedded `time_id_dim` wide) -> `out_sample`
    [batch, frames, C, h, w]. Frames run on the batch axis; heads as `build_unet`'s."""
    u = _UNet(shapes, heads, head_dim, groups, time_ids, time_id_dim, prefix, where)
    g, lay = u.g, u.layout
    if not g.has(prefix + VIDEO):
        g.shape(prefix + VIDEO)  # raises the SourceError naming it: an image U-Net
    if lay.adm != time_ids * time_id_dim:
        raise SourceError(f"{where}: label_emb takes {lay.adm} numbers, not {time_ids} time ids embedded "
                          f"{time_id_dim} wide; the file is not Stable Video Diffusion's")
    latent = lay.out_channels
    if not 0 < latent < lay.in_channels:
        raise SourceError(f"{where}: a U-Net of {lay.in_channels} input and {latent} output channels leaves no "
                          "channels for the conditioning frame")
    sample = g.input("sample", ["batch", "frames", latent, "height", "width"])
    image = g.input("image_latents", ["batch", lay.in_channels - latent, "height", "width"])
    u.timestep = g.input("timestep", ["batch"])
    context = g.input("encoder_hidden_states", ["batch", "sequence", lay.context])
    u.extras = {"time_ids": g.input("time_ids", ["batch", time_ids])}
    frames = g.dim(sample, 1)
    emb = u.embedding()  # [B, E]
    u.video = _Frames(frames, g.op("Expand", g.op("Unsqueeze", emb, g.const([1])), g.dims(1, frames, 1)), context)
    u.context = _per_frame(g, context, frames, 3)
    flat = g.op("Reshape", sample, g.dims(-1, g.op("Shape", sample, start=2)))
    u.sample = g.op("Concat", flat, _per_frame(g, image, frames, 4), axis=1)
    emb = _per_frame(g, emb, frames, 2)
    skips, x, level = u.encoder(emb)
    for layers in lay.output_blocks:
        x = g.op("Concat", x, skips.pop(), axis=1)
        x, level = u.block(x, layers, emb, level, skips[-1] if skips else None)
    u.out(x)
    return g.model()

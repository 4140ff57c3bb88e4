"""The CLIP vision encoder with its projection (Stable Video Diffusion's image conditioning) as an
ONNX graph written from the file's weight shapes (no torch).

Two layouts of the same network: transformers' CLIPVisionModelWithProjection names
(`vision_model.embeddings.*`, `vision_model.encoder.layers.N.self_attn.{q,k,v}_proj`,
`visual_projection.weight` [embed, width]) and OpenCLIP's visual tower as SVD's single file keeps
it under `conditioner.embedders.0.open_clip.model.visual.` (`conv1`, `class_embedding`,
`positional_embedding`, `transformer.resblocks.N.attn.in_proj_weight` with q, k and v fused,
`proj` stored [width, embed] and applied as x @ proj). The graph takes `pixel_values`
[batch, 3, size, size] (already normalised, `runtime.clip_image.clip_pixels`) and gives
`image_embeds` [batch, embed]: the projection of the final-normed class token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import Graph, conv, indices, layer_norm, matmul
from edgediff.kernels.graphs.clip import EPS, clip_layer


def _names(layout: str, prefix: str) -> dict:
    """Where each part lies in the file: the name stems the graph reads."""
    if layout == "open_clip":
        return dict(cls=prefix + "class_embedding", patch=prefix + "conv1", position=prefix + "positional_embedding",
                    pre=prefix + "ln_pre", layers=prefix + "transformer.resblocks.", ln1="ln_1", ln2="ln_2",
                    out="attn.out_proj", fc1="mlp.c_fc", fc2="mlp.c_proj", post=prefix + "ln_post",
                    projection=prefix + "proj")
    if layout != "hf":
        raise ValueError(f"unknown CLIP vision layout {layout!r} (hf, open_clip)")
    base = prefix + "vision_model."
    return dict(cls=base + "embeddings.class_embedding", patch=base + "embeddings.patch_embedding",
                position=base + "embeddings.position_embedding.weight", pre=base + "pre_layrnorm",
                layers=base + "encoder.layers.", ln1="layer_norm1", ln2="layer_norm2", out="self_attn.out_proj",
                fc1="mlp.fc1", fc2="mlp.fc2", post=base + "post_layernorm",
                projection=prefix + "visual_projection.weight")


def build_clip_vision(shapes: Mapping[str, tuple[int, ...]], prefix: str, layout: str, *, heads: int,
                      hidden_act: str = "gelu", size: int | None = None, where: str = "the model") -> onnx.ModelProto:
    """The image encoder whose weights `shapes` (the file's names -> torch-order shapes) hold under
    `prefix`, in `layout` 'hf' (transformers' names) or 'open_clip' (OpenCLIP's visual tower).
    `heads`: the attention heads (a file does not say; SVD's ViT-H/14: 16 of 80). The patch size
    is the patch convolution's; the input side is `size`, or read off the position embeddings
    ((size / patch)^2 + 1 of them, a square grid)."""
    g = Graph(shapes, where)
    n = _names(layout, prefix)
    patch_weight = n["patch"] + ".weight"
    width, channels, patch, patch_w = g.shape(patch_weight)
    if patch != patch_w:
        raise SourceError(f"{where}: '{patch_weight}' has a {patch}x{patch_w} kernel; CLIP's patches are square")
    g.fits((patch_weight, 0), (n["cls"], 0), (n["position"], 1), (n["pre"] + ".weight", 0), (n["post"] + ".weight", 0))
    positions = g.shape(n["position"])[0]
    if size is None:
        grid = math.isqrt(max(positions - 1, 0))
        size = grid * patch
    else:
        grid = size // patch
    if size % patch or grid * grid + 1 != positions:
        raise SourceError(f"{where}: '{n['position']}' holds {positions} positions where {size}-pixel images in "
                          f"{patch}-pixel patches need ({size}/{patch})^2 + 1 = {grid * grid + 1}; the file is "
                          "damaged or of another architecture")
    layers = indices(shapes, n["layers"])
    if not layers:  # names the first layer's first weight as missing
        g.shape(n["layers"] + "0." + n["ln1"] + ".weight")
    if heads < 1 or width % heads:
        raise SourceError(f"{where}: a {width}-wide image encoder does not split into {heads} heads")

    pixels = g.input("pixel_values", ["batch", channels, size, size])
    patches = conv(g, pixels, n["patch"], stride=patch, padding=0)  # [B, W, grid, grid]
    patches = g.op("Transpose", g.reshape(patches, [0, width, -1]), perm=[0, 2, 1])  # [B, grid^2, W]
    cls = g.op("Expand", g.reshape(g.weight(n["cls"]), [1, 1, width]), g.dims(g.dim(pixels, 0), 1, width))
    x = g.op("Add", g.op("Concat", cls, patches, axis=1), g.weight(n["position"]))
    x = layer_norm(g, x, n["pre"], eps=EPS)

    for i in layers:
        p = f"{n['layers']}{i}."
        if layout == "open_clip":
            g.fits((p + "attn.in_proj_weight", 1), (patch_weight, 0))
        x = clip_layer(g, x, p, n, layout, width, heads, hidden_act)

    pooled = layer_norm(g, g.op("Gather", x, g.const(0), axis=1), n["post"], eps=EPS)  # the class token [B, W]
    if layout == "open_clip":
        g.fits((n["projection"], 0), (patch_weight, 0))
        embeds, embed = g.op("MatMul", pooled, g.weight(n["projection"])), g.shape(n["projection"])[1]
    else:
        g.fits((n["projection"], 1), (patch_weight, 0))
        embeds, embed = matmul(g, pooled, n["projection"]), g.shape(n["projection"])[0]
    g.output(embeds, "image_embeds", ["batch", embed])
    return g.model()

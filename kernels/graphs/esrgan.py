"""The ESRGAN family of image upscalers as ONNX graphs, read from the weights' names and shapes:
RRDBNet (ESRGAN, Real-ESRGAN x4plus/x2plus and the community models trained on them) and
Real-ESRGAN's compact SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3).

RRDBNet as BasicSR's `basicsr/archs/rrdbnet_arch.py` defines it: conv_first, `body.N` residual-
in-residual dense blocks (three 5-convolution dense blocks, each scaled by 0.2 into its input),
conv_body added to conv_first's output, then per x2 a nearest upsample and a convolution, conv_hr
and conv_last; LeakyReLU(0.2) throughout. Real-ESRGAN's x2 and x1 models pixel-unshuffle the
image first (their conv_first takes 4x or 16x the image's channels), so the upsampling stays x4.
Three layouts name the same weights and are read through a `View` as BasicSR's names:
  basicsr      conv_first, body.N.rdb{1,2,3}.conv{1..5}, conv_body, conv_up{1,2}, conv_hr, conv_last
  esrgan       model.0, model.1.sub.N.RDB{1,2,3}.conv{1..5}.0, model.1.sub.<blocks>, then the
               upsampling convolutions, HR conv and last conv at the Sequential's later indices
               (the original ESRGAN release and A1111's/BasicSR's old-architecture loaders)
  esrgan-trunk conv_first, RRDB_trunk.N.RDB{1,2,3}.conv{1..5}, trunk_conv, upconv1, upconv2,
               HRconv, conv_last (xinntao/ESRGAN's later RRDBNet_arch.py)

SRVGGNetCompact as Real-ESRGAN's `realesrgan/archs/srvgg_arch.py`: `body.N` alternating 3x3
convolutions and PReLUs, the last convolution's channels pixel-shuffled by the scale, plus the
nearest-upsampled input.

The graph maps image [batch, channels, height, width] in [0, 1] (RGB, as the models' own
repositories feed them) to upscaled [batch, channels, scale height, scale width]. Every stored
tensor must be used: a file with more is a variant these graphs do not know, and is refused."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import Graph, View, conv

SLOPE = 0.2  # LeakyReLU's negative slope in RRDBNet
RESIDUAL = 0.2  # the scale of each dense block's (and each RRDB's) output into its input
KNOWN = ("RRDBNet (ESRGAN / Real-ESRGAN: conv_first, body.N.rdb1.conv1, ...; or the old model.0, "
         "model.1.sub.N.RDB1.conv1.0, ...) and SRVGGNetCompact (Real-ESRGAN compact: body.N.weight with PReLU)")


@dataclass(frozen=True)
class Architecture:
    """What a file holds, read from its tensors: `kind` RRDBNet or SRVGGNetCompact, the layout of
    its names, the scale, the image channels, widths and depth. `view` shows its tensors under
    BasicSR's names (what the builder reads)."""

    kind: str
    layout: str
    scale: int
    channels: int
    features: int
    blocks: int  # RRDBs, or the compact body's hidden convolutions
    unshuffle: int = 1  # the pixel-unshuffle of the input (Real-ESRGAN x2: 2); sizes must divide by it
    view: View = field(default=None, repr=False, compare=False)


def _unknown(shapes: Mapping[str, Sequence[int]], where: str, why: str = "") -> SourceError:
    names = sorted(shapes)
    found = ", ".join(f"'{n}' {list(shapes[n])}" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return SourceError(f"{where}: not an upscaler edgediff knows{': ' + why if why else ''}. It holds {len(names)} "
                       f"tensors ({found or 'none'}); edgediff runs {KNOWN}. Other architectures (SwinIR, HAT, DAT, "
                       "...) are not supported")


_RDB = re.compile(r"^(?:body|RRDB_trunk|model\.1\.sub)\.(\d+)\.(?:rdb|RDB)([123])\.conv([1-5])(?:\.0)?\.(weight|bias)$")


def _rrdb_names(shapes: Mapping[str, Sequence[int]], layout: str, where: str) -> dict[str, str]:
    """BasicSR's name -> the file's, for every tensor of an RRDBNet file; a tensor of no place in
    it raises."""
    tails = {"basicsr": {"conv_first": "conv_first", "conv_body": "conv_body", "conv_hr": "conv_hr",
                         "conv_last": "conv_last"},
             "esrgan-trunk": {"conv_first": "conv_first", "trunk_conv": "conv_body", "HRconv": "conv_hr",
                              "conv_last": "conv_last"}}
    blocks = {int(m.group(1)) for n in shapes if (m := _RDB.match(n))}
    if layout == "esrgan":  # the trunk's last convolution follows its blocks; the tail's places by order
        tail = sorted({int(n.split(".")[1]) for n in shapes if re.match(r"^model\.\d+\.(weight|bias)$", n)} - {0})
        if len(tail) < 2:
            raise _unknown(shapes, where, "an old-layout ESRGAN file without its HR and last convolutions")
        ups = tail[:-2]
        names = {f"model.{i}": f"conv_up{k + 1}" for k, i in enumerate(ups)}
        names |= {"model.0": "conv_first", f"model.1.sub.{len(blocks)}": "conv_body", f"model.{tail[-2]}": "conv_hr",
                  f"model.{tail[-1]}": "conv_last"}
    else:
        names = dict(tails[layout])
        up = "conv_up" if layout == "basicsr" else "upconv"
        names |= {f"{up}{k}": f"conv_up{k}" for k in range(1, 9)}
    out = {}
    for name in shapes:
        if m := _RDB.match(name):
            block, rdb, i, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{i}.{kind}"] = name
            continue
        stem, _, kind = name.rpartition(".")
        if stem in names and kind in ("weight", "bias"):
            out[f"{names[stem]}.{kind}"] = name
            continue
        raise _unknown(shapes, where, f"'{name}' has no place in an RRDBNet ({layout} layout)")
    return out


def detect(shapes: Mapping[str, Sequence[int]], where: str = "the upscaler") -> Architecture:
    """The architecture of a file's tensors (names -> torch-order shapes), or a SourceError that
    names what the file holds."""
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    layout = None
    if "conv_first.weight" in shapes and "body.0.rdb1.conv1.weight" in shapes:
        layout = "basicsr"
    elif "conv_first.weight" in shapes and "RRDB_trunk.0.RDB1.conv1.weight" in shapes:
        layout = "esrgan-trunk"
    elif "model.0.weight" in shapes and "model.1.sub.0.RDB1.conv1.0.weight" in shapes:
        layout = "esrgan"
    elif "body.0.weight" in shapes and len(shapes["body.0.weight"]) == 4:
        return _detect_compact(shapes, where)
    if layout is None:
        raise _unknown(shapes, where)
    view = View({k: [(v, 0, -1)] for k, v in _rrdb_names(shapes, layout, where).items()}, shapes)
    g = Graph(view, where)
    blocks = 1 + max(int(n.split(".")[1]) for n in view if n.startswith("body."))
    ups = sum(1 for k in range(1, 9) if g.has(f"conv_up{k}.weight"))
    first, last = g.shape("conv_first.weight"), g.shape("conv_last.weight")
    channels, features = last[0], first[0]
    unshuffle = math.isqrt(first[1] // channels) if first[1] % channels == 0 else 0
    if unshuffle not in (1, 2, 4) or unshuffle ** 2 * channels != first[1] or 2 ** ups % unshuffle:
        raise _unknown(shapes, where, f"conv_first takes {first[1]} channels and conv_last gives {channels}, with {ups} "
                                    "x2 upsamplings: no scale fits (the input is the image, or its pixel-unshuffle "
                                    "by 2 or 4)")
    return Architecture("RRDBNet", layout, 2 ** ups // unshuffle, channels, features, blocks, unshuffle, view)


def _detect_compact(shapes: dict[str, tuple[int, ...]], where: str) -> Architecture:
    for name in shapes:
        if not re.match(r"^body\.\d+\.(weight|bias)$", name):
            raise _unknown(shapes, where, f"'{name}' has no place in an SRVGGNetCompact")
    indices = sorted({int(n.split(".")[1]) for n in shapes})
    if indices != list(range(len(indices))) or len(indices) % 2 == 0:
        raise _unknown(shapes, where, "an SRVGGNetCompact body alternates convolutions and PReLUs (body.0, body.1, "
                                      f"... body.2N); this one has layers {indices[:6]}...: its activation is not "
                                      "PReLU, which is the only one the weights can show")
    for i in indices:
        rank = len(shapes.get(f"body.{i}.weight", ()))
        if rank != (4 if i % 2 == 0 else 1):
            raise _unknown(shapes, where, f"'body.{i}.weight' should be a {'convolution' if i % 2 == 0 else 'PReLU'}")
    channels, features = shapes["body.0.weight"][1], shapes["body.0.weight"][0]
    out = shapes[f"body.{indices[-1]}.weight"][0]
    scale = math.isqrt(out // channels)
    if scale < 1 or scale * scale * channels != out:
        raise _unknown(shapes, where, f"the last convolution gives {out} channels, not the image's {channels} times "
                                      "a square scale")
    view = View({k: [(k, 0, -1)] for k in shapes}, shapes)
    return Architecture("SRVGGNetCompact", "compact", scale, channels, features, (len(indices) - 3) // 2, 1, view)


# -- graphs ------------------------------------------------------------------------------------

def _lrelu(g: Graph, x: str) -> str:
    return g.op("LeakyRelu", x, alpha=SLOPE)


def _nearest(g: Graph, x: str, factor: int) -> str:
    return g.op("Resize", x, "", g.const([1.0, 1.0, float(factor), float(factor)], np.float32), mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _pixel_unshuffle(g: Graph, x: str, channels: int, r: int) -> str:
    """torch's pixel_unshuffle (output channel c r^2 + i r + j), as SpaceToDepth (whose output
    channel is (i r + j) C + c) followed by a fixed reordering of the channels."""
    order = [(i * r + j) * channels + c for c in range(channels) for i in range(r) for j in range(r)]
    return g.op("Gather", g.op("SpaceToDepth", x, blocksize=r), g.const(order), axis=1)


def _dense_block(g: Graph, x: str, name: str) -> str:
    """ResidualDenseBlock: each convolution sees the input and every output before it."""
    g.fits((f"{name}.conv1.weight", 1), (f"{name}.conv5.weight", 0))
    seen = [x]
    for i in range(1, 5):
        seen.append(_lrelu(g, conv(g, g.op("Concat", *seen, axis=1), f"{name}.conv{i}")))
    out = conv(g, g.op("Concat", *seen, axis=1), f"{name}.conv5")
    return g.op("Add", g.op("Mul", out, g.scalar(RESIDUAL)), x)


def _rrdb(g: Graph, x: str, name: str) -> str:
    h = x
    for k in (1, 2, 3):
        h = _dense_block(g, h, f"{name}.rdb{k}")
    return g.op("Add", g.op("Mul", h, g.scalar(RESIDUAL)), x)


def _build_rrdb(g: Graph, arch: Architecture, x: str) -> str:
    if arch.unshuffle > 1:
        x = _pixel_unshuffle(g, x, arch.channels, arch.unshuffle)
    feat = conv(g, x, "conv_first")
    h = feat
    for i in range(arch.blocks):
        g.fits(("conv_first.weight", 0), (f"body.{i}.rdb1.conv1.weight", 1))
        h = _rrdb(g, h, f"body.{i}")
    feat = g.op("Add", feat, conv(g, h, "conv_body"))
    k = 1
    while g.has(f"conv_up{k}.weight"):
        feat = _lrelu(g, conv(g, _nearest(g, feat, 2), f"conv_up{k}"))
        k += 1
    g.fits(("conv_first.weight", 0), ("conv_body.weight", 0), ("conv_hr.weight", 1), ("conv_last.weight", 1))
    return conv(g, _lrelu(g, conv(g, feat, "conv_hr")), "conv_last")


def _build_compact(g: Graph, arch: Architecture, x: str) -> str:
    h, last = x, 2 * arch.blocks + 2
    for i in range(0, last + 1, 2):
        if i:
            g.fits((f"body.{i - 2}.weight", 0), (f"body.{i}.weight", 1))
        h = conv(g, h, f"body.{i}")
        if i < last:
            g.fits((f"body.{i}.weight", 0), (f"body.{i + 1}.weight", 0))
            h = g.op("PRelu", h, g.reshape(g.weight(f"body.{i + 1}.weight"), [-1, 1, 1]))
    out = g.op("DepthToSpace", h, blocksize=arch.scale, mode="CRD")  # torch's PixelShuffle
    return g.op("Add", out, _nearest(g, x, arch.scale))


def build_upscaler(arch: Architecture, where: str = "the upscaler") -> onnx.ModelProto:
    """image [batch, channels, height, width] in [0, 1] -> upscaled [batch, channels, scale
    height, scale width]; with `unshuffle`, height and width must divide by it."""
    g = Graph(arch.view, where)
    x = g.input("image", ["batch", arch.channels, "height", "width"])
    out = (_build_rrdb if arch.kind == "RRDBNet" else _build_compact)(g, arch, x)
    g.output(out, "upscaled", ["batch", arch.channels, "upscaled_height", "upscaled_width"])
    unused = sorted(set(arch.view.stored_shapes) - set(g.initializers))
    if unused:
        raise _unknown(arch.view.stored_shapes, where, f"'{unused[0]}' has no place in its {arch.kind} (a variant "
                                                       "edgediff does not know)")
    return g.model()

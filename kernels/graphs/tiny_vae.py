"""The tiny autoencoders (TAESD, TAESDXL, TAESD3, TAEF1: diffusers' `AutoencoderTiny`) as ONNX
graphs, written from the weights' shapes under the names a diffusers AutoencoderTiny folder stores
them (`encoder.layers.N...`, `decoder.layers.N...`) behind a prefix.

Each of `encoder.layers` and `decoder.layers` is an `nn.Sequential` whose entries are told apart
by their weights: `layers.N.weight` (and `.bias`) is a 3x3 convolution, `layers.N.conv.{0,2,4}`
(with `layers.N.skip` where the widths change) an `AutoencoderTinyBlock`, conv-ReLU-conv-ReLU-conv
plus the skip, then ReLU. An index with no weights is weightless: in the decoder the ReLU after
its first convolution, and otherwise the nearest x2 `nn.Upsample` that stands between a level's
blocks and its bias-less convolution (what `DecoderTiny.__init__` builds); `EncoderTiny` has none.
Its convolutions other than the first and last are the bias-less stride-2 downsamples.

The graphs keep edgediff's VAE contract (the full VAE's latents in, its moments out), so the
package and the runtime need nothing new: the decoder takes the FULL VAE's latent and computes
`decoder((z - shift) * scale)` (TAESD works on the denoiser's scaled and shifted latents), with
`DecoderTiny.forward`'s tanh(x / 3) * 3 clamp and its [0, 1] -> [-1, 1] output; the encoder maps
the image from [-1, 1] to [0, 1] as `EncoderTiny.forward` does and gives `latent_parameters`, the
mean `encoder(x) / scale + shift` beside a constant log-variance of -30, so the runtime's sample
is the mean. `scale` and `shift` are the full VAE's `scaling_factor` and `shift_factor`.
Every activation is ReLU: TAESD's `act_fn`, which the shapes cannot say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from edgediff.errors import SourceError
from edgediff.kernels.graphs.builder import Graph, conv

CONV, BLOCK, NONE = "conv", "block", "none"


def _layers(g: Graph, stem: str) -> list[str]:
    """The kind of each `stem{N}` from 0 to the last index any weight names: CONV, BLOCK or NONE
    (weightless). No layers at all raises naming `stem0.weight`."""
    kinds: dict[int, str] = {}
    for name in g.shapes:
        if not name.startswith(stem):
            continue
        head, _, rest = name[len(stem):].partition(".")
        if not head.isdigit():
            continue
        if rest in ("weight", "bias"):
            kind = CONV
        elif rest.startswith(("conv.", "skip.")):
            kind = BLOCK
        else:
            raise SourceError(f"{g.where}: '{name}' is no tensor of a tiny autoencoder (AutoencoderTiny); "
                              "the file is of another architecture")
        if kinds.setdefault(int(head), kind) != kind:
            raise SourceError(f"{g.where}: '{stem}{head}' has both a convolution's and a block's weights; "
                              "the file is damaged or of another architecture")
    if not kinds:
        g.shape(stem + "0.weight")  # raises the SourceError that names it
    return [kinds.get(i, NONE) for i in range(max(kinds) + 1)]


def _conv(g: Graph, x: str, name: str, width: str, stride: int = 1) -> tuple[str, str]:
    """A 3x3 convolution on x, whose channels are `width` (a weight, its axis 0); returns the
    output and its own weight's name."""
    g.fits((width, 0), (name + ".weight", 1))
    return conv(g, x, name, stride=stride), name + ".weight"


def _block(g: Graph, x: str, name: str, width: str) -> tuple[str, str]:
    """AutoencoderTinyBlock: ReLU(conv.4(ReLU(conv.2(ReLU(conv.0(x))))) + skip(x)), skip the
    1x1 bias-less convolution where the file has one (the widths change), else x itself."""
    h, w = _conv(g, x, name + ".conv.0", width)
    h, w = _conv(g, g.op("Relu", h), name + ".conv.2", w)
    h, w = _conv(g, g.op("Relu", h), name + ".conv.4", w)
    if g.has(name + ".skip.weight"):
        g.fits((width, 0), (name + ".skip.weight", 1))
        g.fits((w, 0), (name + ".skip.weight", 0))
        x = conv(g, x, name + ".skip")
    else:
        g.fits((width, 0), (w, 0))
    return g.op("Relu", g.op("Add", h, x)), w


def _blocks(g: Graph, kinds: list[str], i: int, x: str, stem: str, width: str) -> tuple[int, str, str]:
    """The blocks from index i on: the next index, the output and the last weight."""
    while i < len(kinds) and kinds[i] == BLOCK:
        x, width = _block(g, x, f"{stem}{i}", width)
        i += 1
    return i, x, width


def _refuse(g: Graph, stem: str, i: int, what: str) -> SourceError:
    return SourceError(f"{g.where}: no tensor '{stem}{i}.weight', which this model's graph needs ({what}); the "
                       "file is incomplete or of another architecture (not a diffusers AutoencoderTiny)")


def build_tiny_vae_decoder(shapes: Mapping[str, Sequence[int]], prefix: str = "vae.", *, scale: float,
                           shift: float = 0.0, where: str = "the model") -> onnx.ModelProto:
    """latent_sample [batch, latent, height, width] (the full VAE's latent) -> sample
    [batch, 3, 2**(levels - 1) height, 2**(levels - 1) width] in [-1, 1]."""
    g = Graph(shapes, where)
    stem = prefix + "decoder.layers."
    kinds = _layers(g, stem)
    first = stem + "0.weight"
    latent = g.shape(first)[1]
    x = g.input("latent_sample", ["batch", latent, "height", "width"])
    if shift:
        x = g.op("Sub", x, g.scalar(shift))
    x = g.op("Mul", x, g.scalar(scale))
    x = g.op("Mul", g.op("Tanh", g.op("Div", x, g.scalar(3.0))), g.scalar(3.0))  # DecoderTiny's clamp

    if kinds[0] != CONV:
        raise _refuse(g, stem, 0, "the first convolution")
    x = conv(g, x, stem + "0")
    width = first
    i = 1
    if i < len(kinds) and kinds[i] == NONE:  # the activation after the first convolution
        x, i = g.op("Relu", x), i + 1
    else:
        raise SourceError(f"{where}: '{stem}1' is not the weightless ReLU a tiny autoencoder's decoder has "
                          "there; the file is of another architecture")
    while True:
        i, x, width = _blocks(g, kinds, i, x, stem, width)
        if i == len(kinds) - 1 and kinds[i] == CONV:  # the last convolution, to the image
            x, width = _conv(g, x, stem + str(i), width)
            g.shape(stem + f"{i}.bias")  # DecoderTiny's last convolution has one
            break
        if i < len(kinds) and kinds[i] == NONE:  # nn.Upsample(scale_factor=2), nearest
            x = g.op("Resize", x, "", g.const([1.0, 1.0, 2.0, 2.0], np.float32), mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            i += 1
            if i >= len(kinds) or kinds[i] != CONV:
                raise _refuse(g, stem, i, "the convolution after an upsampling")
            x, width = _conv(g, x, stem + str(i), width)
            i += 1
            continue
        raise _refuse(g, stem, i, "a block, an upsampling or the last convolution")
    x = g.op("Sub", g.op("Mul", x, g.scalar(2.0)), g.scalar(1.0))  # [0, 1] -> [-1, 1]
    g.output(x, "sample", ["batch", g.shape(width)[0], "height", "width"])
    return g.model()


def build_tiny_vae_encoder(shapes: Mapping[str, Sequence[int]], prefix: str = "vae.", *, scale: float,
                           shift: float = 0.0, where: str = "the model") -> onnx.ModelProto:
    """sample [batch, 3, height, width] in [-1, 1] -> latent_parameters [batch, 2 latent,
    height / 2**(levels - 1), width / 2**(levels - 1)]: the mean in the full VAE's latent format, then
    a log-variance of -30."""
    g = Graph(shapes, where)
    stem = prefix + "encoder.layers."
    kinds = _layers(g, stem)
    first = stem + "0.weight"
    x = g.input("sample", ["batch", g.shape(first)[1], "height", "width"])
    x = g.op("Div", g.op("Add", x, g.scalar(1.0)), g.scalar(2.0))  # [-1, 1] -> [0, 1]

    if kinds[0] != CONV:
        raise _refuse(g, stem, 0, "the first convolution")
    x = conv(g, x, stem + "0")
    width = first
    i = 1
    while True:
        i, x, width = _blocks(g, kinds, i, x, stem, width)
        if i >= len(kinds) or kinds[i] != CONV:
            raise _refuse(g, stem, i, "a block or a convolution")
        if i == len(kinds) - 1:  # the last convolution, to the latent
            x, width = _conv(g, x, stem + str(i), width)
            g.shape(stem + f"{i}.bias")
            break
        x, width = _conv(g, x, stem + str(i), width, stride=2)  # a level's bias-less downsample
        i += 1
    latent = g.shape(width)[0]
    mean = g.op("Div", x, g.scalar(scale))
    if shift:
        mean = g.op("Add", mean, g.scalar(shift))
    logvar = g.op("Expand", g.scalar(-30.0), g.op("Shape", mean))
    g.output(g.op("Concat", mean, logvar, axis=1), "latent_parameters", ["batch", 2 * latent, "height", "width"])
    return g.model()

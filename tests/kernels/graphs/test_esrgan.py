"""The ESRGAN-family graphs against torch references of the same random weights: RRDBNet at x4,
x2 (pixel-unshuffled input) and x1 in BasicSR's names, x4 in the original ESRGAN release's and in
xinntao/ESRGAN's trunk names, and SRVGGNetCompact at x4 and x2; files of no known architecture
are refused naming what they hold."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import SourceError
from edgediff.kernels.graphs.esrgan import build_upscaler, detect

from built import run
from tiny_upscalers import old_esrgan_names, psnr, tiny, trunk_names

CASES = [("rrdb", 4, None), ("rrdb", 2, None), ("rrdb", 1, None), ("rrdb", 4, old_esrgan_names),
         ("rrdb", 4, trunk_names), ("compact", 4, None), ("compact", 2, None)]
LAYOUTS = {None: "basicsr", old_esrgan_names: "esrgan", trunk_names: "esrgan-trunk"}


@pytest.mark.parametrize("kind,scale,rename", CASES,
                         ids=[f"{k}-x{s}-{LAYOUTS[r] if k == 'rrdb' else 'compact'}" for k, s, r in CASES])
def test_graph_matches_torch(kind, scale, rename):
    torch = pytest.importorskip("torch")
    model, state = tiny(kind, scale)
    if rename:
        state = rename(state)
    arch = detect({k: v.shape for k, v in state.items()})
    assert (arch.kind, arch.scale, arch.channels, arch.features) == (
        "RRDBNet" if kind == "rrdb" else "SRVGGNetCompact", scale, 3, 8)
    assert arch.layout == (LAYOUTS[rename] if kind == "rrdb" else "compact")
    graph = build_upscaler(arch)
    image = np.random.default_rng(1).random((2, 3, 12, 20), dtype=np.float32)
    (got,) = run(graph, state, {"image": image})
    with torch.no_grad():
        ref = model(torch.from_numpy(image)).numpy()
    assert got.shape == ref.shape == (2, 3, 12 * scale, 20 * scale)
    assert ref.std() > 0.01  # not a constant image
    assert psnr(got, ref) >= 45


def test_unknown_architecture_is_refused_naming_what_it_holds():
    shapes = {"layers.0.residual_group.blocks.0.attn.qkv.weight": (24, 8), "conv_first.weight": (8, 3, 3, 3)}
    with pytest.raises(SourceError, match=r"swinir\.pth: not an upscaler edgediff knows.*2 tensors.*"
                                          r"'conv_first.weight' \[8, 3, 3, 3\].*RRDBNet.*SRVGGNetCompact"):
        detect(shapes, "swinir.pth")


def test_extra_tensor_is_refused():
    """A variant with more (ESRGAN+'s 1x1 convolutions in its dense blocks) is not run as if it had none."""
    _, state = tiny("rrdb")
    shapes = {k: v.shape for k, v in state.items()} | {"body.0.rdb1.conv1x1.weight": (4, 8, 1, 1)}
    with pytest.raises(SourceError, match="'body.0.rdb1.conv1x1.weight' has no place in an RRDBNet"):
        detect(shapes, "plus.pth")


def test_compact_without_prelu_is_refused():
    _, state = tiny("compact")
    shapes = {k: v.shape for k, v in state.items() if not (k.startswith("body.") and len(v.shape) == 1)}
    with pytest.raises(SourceError, match="activation is not PReLU"):
        detect(shapes, "relu.pth")


def test_mismatched_widths_are_refused():
    _, state = tiny("rrdb")
    shapes = {k: v.shape for k, v in state.items()} | {"conv_hr.weight": (8, 6, 3, 3)}
    with pytest.raises(SourceError, match="size mismatch"):
        build_upscaler(detect(shapes, "bad.pth"), "bad.pth")

"""int8-static written one weight at a time: onnxruntime's quantize_static graph (the same codes,
scales and outputs) from the same activation ranges, in a fraction of its memory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgediff.convert import int8_static
from edgediff.convert.precision import chooser
from edgediff.runtime import Pipeline


@pytest.fixture(scope="module")
def unet(tiny_package):
    """The tiny SD 1.x U-Net's graph and the inputs it saw in two guided sampling runs."""
    package = tiny_package("sd1")
    feeds = []
    pipe = Pipeline(package, device="cpu")
    pipe.component("unet").tap = lambda f: feeds.append(dict(f))
    for seed in (0, 1):
        pipe.generate("a red circle", "blurry", steps=4, seed=seed, width=64, height=64)
    return package / "unet" / "model.onnx", feeds


def _fp32_ranges(path, feeds, kind="minmax"):
    """The ranges onnxruntime's calibrator reads: the fp32 graph's own tensors."""
    import onnxruntime as ort

    from edgediff.runtime.sessions import Component, SessionOptions

    model = onnx.load(str(path))
    found = int8_static.targets(model, chooser("unet", "int8-static"))
    names = int8_static.activations(found)
    int8_static.observing(model, names)
    ranges = int8_static.Ranges(kind)
    comp = Component("u", path, SessionOptions(device="cpu", graph_cache=False), seen=ranges.see)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as its calibrator runs
    comp._session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for f in feeds:
        comp.run(f)
    return ranges


def _onnxruntime(path, feeds, out):
    """onnxruntime's quantize_static as edgediff called it before (transposes folded first)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgediff.kernels import graph

    model = onnx.load(str(path))
    graph.fold_weight_transposes(model)
    choose = chooser("unet", "int8-static")
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    exclude = [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
               and any(i in inits and not choose(graph.weight_name(i), inits[i]) for i in n.input[1:2])]
    folded = out.with_name("folded.onnx")
    onnx.save(model, str(folded))

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

        def __len__(self):
            return len(feeds)

        def set_range(self, start_index, end_index):
            self.it = iter(feeds[start_index:end_index])

    quantize_static(str(folded), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul"],
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True, "CalibStridedMinMax": 1})
    return out


def _outputs(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _codes(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each quantized weight's int8 codes and scales, by the fp32 weight's name (transposes folded)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8 \
                and inits[n.input[0]].ndim > 1:
            name = n.input[0].removesuffix("_quantized").removesuffix(".transposed")
            out[name] = (inits[n.input[0]], inits[n.input[1]])
    return out


def test_the_graph_is_onnxruntimes_quantize_static(unet, tmp_path):
    path, feeds = unet
    theirs = _onnxruntime(path, feeds, tmp_path / "theirs.onnx")
    model = onnx.load(str(path))
    found = int8_static.targets(model, chooser("unet", "int8-static"))
    ours = tmp_path / "ours.onnx"
    counts = int8_static.write(model, path.parent, ours, found, ranges=_fp32_ranges(path, feeds))
    assert counts["quantized_nodes"] == len(found) > 10
    mine, ort_codes = _codes(ours), _codes(theirs)
    assert set(mine) == set(ort_codes)
    for name, (codes, scales) in mine.items():
        their_codes, their_scales = ort_codes[name]
        assert np.array_equal(scales, their_scales), name
        assert np.array_equal(codes, their_codes), name
    ops = [n.op_type for n in onnx.load(str(ours)).graph.node]
    assert ops.count("QuantizeLinear") == counts["activation_pairs"] > 0
    assert "Transpose" not in {n.op_type for n in onnx.load(str(ours)).graph.node
                               if n.output[0].endswith(".transposed")}
    for a, b in zip(_outputs(ours, feeds), _outputs(theirs, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_ranges_from_int8_weights_are_the_fp32_ranges_to_within_their_error(unet):
    """Calibration reads ranges from a copy with int8 weights (a quarter of the memory)."""
    path, feeds = unet
    fp32 = _fp32_ranges(path, feeds)
    int8 = int8_static.calibrate_feeds(path, chooser("unet", "int8-static"), feeds)
    assert int8.runs == fp32.runs == len(feeds)
    for name in fp32.lows:
        (lo, hi), (lo8, hi8) = fp32.of(name), int8.of(name)
        span = hi - lo
        assert abs(lo8 - lo) <= 0.02 * span and abs(hi8 - hi) <= 0.02 * span, name

"""Weights changed where the graph stores them: each stored form reads back as the changed
weight, requantized by the converters' own quantizer (so a zero change changes nothing)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgediff.kernels import graph
from edgediff.kernels.bind import Weight
from edgediff.kernels.gguf_blocks import FORMATS, dequantize, quantize
from edgediff.kernels.patch import changed_weight, changed_weights


def _model(w_linear: np.ndarray, w_conv: np.ndarray) -> onnx.ModelProto:
    """x -> MatMul(x, W^T) and a Conv, with the weights in torch layout as the exporter leaves them."""
    nodes = [helper.make_node("Transpose", ["lin.weight"], ["lin.t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "lin.t"], ["y"]),
             helper.make_node("Conv", ["img", "conv.weight"], ["z"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w_linear.shape[1]]),
                           helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, w_conv.shape[1], 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w_linear, "lin.weight"), numpy_helper.from_array(w_conv, "conv.weight")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _read(model, name):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[name]


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return rng.standard_normal((48, 64)).astype(np.float32), rng.standard_normal((8, 64, 3, 3)).astype(np.float32)


def _deltas(shapes, scale=0.05, seed=1):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def test_float_weights_in_torch_layout_and_transposed(weights):
    w, c = weights
    model = _model(w, c)
    d = _deltas({"lin.weight": w.shape, "conv.weight": c.shape})
    out = changed_weights(model, None, lambda n, s: d.get(n))
    np.testing.assert_allclose(out["lin.weight"], w + d["lin.weight"], rtol=1e-6)
    np.testing.assert_allclose(out["conv.weight"], c + d["conv.weight"], rtol=1e-6)
    graph.fold_weight_transposes(model)  # int4 packages keep float weights as MatMul's [K, N]
    out = changed_weights(model, None, lambda n, s: d.get(n))
    np.testing.assert_allclose(out["lin.weight.transposed"], (w + d["lin.weight"]).T, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_are_requantized_in_their_form(weights, bits):
    """MatMulNBits blocks and DequantizeLinear convolutions: the change lands as quantizing the
    dequantized weight plus the change would put it; without a change, nothing is rewritten."""
    w, c = weights
    model = _model(w, c)
    graph.fold_weight_transposes(model)
    graph.matmul_to_nbits(model, bits, 32, lambda n, s: True)
    graph.conv_weights_to_dq(model, bits, lambda n, s: True, 32)
    assert changed_weights(model, None, lambda n, s: None) == {}
    nb = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    zp = _read(model, nb.input[3]) if len(nb.input) > 3 else None
    before = graph.nbits_weight(_read(model, nb.input[1]), _read(model, nb.input[2]), zp, 48, 64, bits, 32)
    d = _deltas({"lin.weight": w.shape, "conv.weight": c.shape})
    out = changed_weights(model, None, lambda n, s: d.get(n))
    expected = {t.name: t for t in graph.nbits_tensors(before + d["lin.weight"], nb.input[1], bits, 32)}
    for name in nb.input[1:]:
        assert out[name].tobytes() == numpy_helper.to_array(expected[name]).tobytes()
    q_name = next(n for n in out if n.startswith("conv.weight"))
    for t in model.graph.initializer:  # the changed conv weight reads back near w + d
        if t.name in out:
            value = out[t.name]
            t.CopyFrom(value if isinstance(value, TensorProto) else numpy_helper.from_array(value, t.name))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    a = {x.name: helper.get_attribute_value(x) for x in dq.attribute}
    from edgediff.kernels.patch import _dequantize

    got = _dequantize(_read(model, q_name).astype(np.float32), _read(model, dq.input[1]), None, a["axis"], a.get("block_size", 0))
    step = np.abs(c).max() / (7 if bits == 4 else 127)
    assert np.abs(got - (c + d["conv.weight"])).max() <= step


@pytest.mark.parametrize("qmax", [64, 127])
def test_int8_static_weights_keep_their_range(weights, qmax):
    """int8-static stores 7-bit weights ([-64, 64]: AVX2's VPMADDUBSW saturates wider ones); a
    LoRA merged into them must not widen them to 8 bits."""
    from edgediff.kernels.quant import quantize_per_channel_int8

    _, c = weights
    q, scale = quantize_per_channel_int8(c, 0, qmax)
    nodes = [helper.make_node("DequantizeLinear", ["conv.weight_quantized", "conv.weight_scale"], ["w"], axis=0),
             helper.make_node("Conv", ["img", "w"], ["z"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 64, 4, 4])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(q, "conv.weight_quantized"),
                           numpy_helper.from_array(scale, "conv.weight_scale")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    d = _deltas({"conv.weight": c.shape}, scale=0.5)
    out = changed_weights(model, None, lambda n, s: d.get(n))
    assert np.abs(out["conv.weight_quantized"]).max() == qmax
    got = out["conv.weight_quantized"].astype(np.float32) * out["conv.weight_scale"].reshape(-1, 1, 1, 1)
    assert np.abs(got - (c + d["conv.weight"])).max() <= np.abs(c + d["conv.weight"]).max() / qmax


def test_a_bound_weight_keeps_its_block_format():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    d = (0.1 * rng.standard_normal((16, 64))).astype(np.float32)
    for fmt in ("q4_0", "q8_0", "f16"):
        f = FORMATS[fmt]
        stored = quantize(w, f) if not f.float else w.astype(np.float16)
        out = changed_weight(Weight("w", f, (16, 64), stored), d)
        assert out.fmt == f and out.file is None
        expected = dequantize(stored, f, (16, 64)) + d
        np.testing.assert_allclose(dequantize(out.data, f, (16, 64)),
                                   dequantize(quantize(expected, f), f, (16, 64)) if not f.float else expected,
                                   atol=1e-2 if f.float else 1e-6)

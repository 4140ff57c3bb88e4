"""Binding weights into a weight-less graph: Linear weights in block formats run in MatMulNBits,
convolutions are dequantized, float weights in a file are read there (cast when stored in
another type), and missing or misshapen tensors are named."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edgediff.errors import PackageError
from edgediff.kernels.bind import Weight, bind, parse_rows_ref, rows_ref, strip_weights
from edgediff.kernels.gguf_blocks import FORMATS, dequantize, quantize

from k_quants import K_QUANTS, k_blocks

RNG = np.random.default_rng(0)
WEIGHTS = {
    "lin.weight": RNG.standard_normal((64, 32)).astype(np.float32),  # Transpose -> MatMul
    "gemm.weight": RNG.standard_normal((16, 64)).astype(np.float32),  # Gemm(transB=1)
    "gemm.bias": RNG.standard_normal(16).astype(np.float32),
    "conv.weight": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
}


def _model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Transpose", ["lin.weight"], ["lin.t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "lin.t"], ["h"]),
        helper.make_node("Gemm", ["h", "gemm.weight", "gemm.bias"], ["y"], transB=1),
        helper.make_node("Conv", ["img", "conv.weight"], ["z"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 32]), helper.make_tensor_value_info("img", 1, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", 1, None), helper.make_tensor_value_info("z", 1, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in WEIGHTS.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, arrays: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if arrays:
        so.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    img = np.random.default_rng(2).standard_normal((1, 3, 5, 5)).astype(np.float32)
    return session.run(None, {"x": x, "img": img})


def _stored(fmt_name: str) -> dict[str, Weight]:
    fmt = FORMATS[fmt_name]
    out = {}
    for name, w in WEIGHTS.items():
        if w.ndim == 1 or w.shape[-1] % fmt.block:
            out[name] = Weight(name, FORMATS["f32"], w.shape, w)
        else:
            out[name] = Weight(name, fmt, w.shape, quantize(w, fmt))
    return out


@pytest.mark.parametrize("fmt", ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1"])
def test_bound_graph_computes_with_the_stored_weights(fmt):
    stored = _stored(fmt)
    weightless = strip_weights(_model(), {k: k for k in WEIGHTS})
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in weightless.graph.initializer)
    bound = bind(weightless, stored.get, "test.gguf")
    kinds = {b.name: b.kind for b in bound.bindings}
    assert kinds["lin.weight"] == kinds["gemm.weight"] == "quantized"
    assert {n.op_type for n in bound.model.graph.node} >= {"MatMulNBits"}
    reference = {k: dequantize(w.data, w.fmt, w.shape) for k, w in stored.items()}
    expected = _run(_with(reference), {})
    for got, want in zip(_run(bound.model, bound.arrays), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    dry = bind(weightless, stored.get, "test.gguf", dry_run=True).bindings
    assert [(b.name, b.kind, b.resident_bytes) for b in dry] == [(b.name, b.kind, b.resident_bytes) for b in bound.bindings]


def _with(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = _model()
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    return model


def test_float_weights_are_read_from_their_file(tmp_path):
    """F16 weights in a file: external data pointing into it, with a Cast to the graph's type."""
    blob = tmp_path / "weights.bin"
    stored, offset, raw = {}, 0, b""
    for name, w in WEIGHTS.items():
        data = w.astype(np.float16)
        stored[name] = Weight(name, FORMATS["f16"], w.shape, data, blob, offset)
        raw += data.tobytes()
        offset += data.nbytes
    blob.write_bytes(raw)
    bound = bind(strip_weights(_model(), {k: k for k in WEIGHTS}), stored.get, str(blob))
    assert bound.folder == tmp_path and not bound.arrays
    assert {b.kind for b in bound.bindings} == {"stored"}
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    session = ort.InferenceSession(bound.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    img = np.random.default_rng(2).standard_normal((1, 3, 5, 5)).astype(np.float32)
    want = _run(_with({k: w.astype(np.float16) for k, w in WEIGHTS.items()}), {})
    for got, ref in zip(session.run(None, {"x": x, "img": img}), want, strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["q8_0", "f16"])
def test_weights_bind_from_rows_of_fused_tensors(tmp_path, fmt):
    """A DiT's q/k/v are rows of one file tensor: a placeholder names the rows (joined in any
    order), bound without requantizing; one slice of a float tensor is read from its file at
    the slice's offset."""
    pad = RNG.standard_normal((8, 32)).astype(np.float32)
    gemm = WEIGHTS["gemm.weight"]
    fused = {"qkv": np.concatenate([pad, WEIGHTS["lin.weight"], pad]), "mod": np.concatenate([gemm[8:], gemm[:8]])}
    names = {"lin.weight": rows_ref([("qkv", 8, 72)]), "gemm.weight": rows_ref([("mod", 8, 16), ("mod", 0, 8)]),
             "gemm.bias": "gemm.bias", "conv.weight": "conv.weight"}
    assert parse_rows_ref(names["gemm.weight"]) == [("mod", 8, 16), ("mod", 0, 8)]
    assert parse_rows_ref("plain.weight") == [("plain.weight", 0, -1)]
    blob, stored, offset = tmp_path / "weights.bin", {}, 0
    with blob.open("wb") as out:
        for name, w in {**fused, "gemm.bias": WEIGHTS["gemm.bias"], "conv.weight": WEIGHTS["conv.weight"]}.items():
            data = quantize(w, FORMATS[fmt]) if fmt != "f16" and w.ndim == 2 else w.astype(np.float16)
            kind = FORMATS[fmt] if fmt != "f16" and w.ndim == 2 else FORMATS["f16"]
            stored[name] = Weight(name, kind, w.shape, data, blob, offset)
            out.write(data.tobytes())
            offset += data.nbytes
    bound = bind(strip_weights(_model(), names), stored.get, str(blob))
    kinds = {b.name: b.kind for b in bound.bindings}
    assert kinds[names["lin.weight"]] == ("quantized" if fmt == "q8_0" else "stored")
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    if bound.arrays:
        so.add_external_initializers(list(bound.arrays),
                                     [ort.OrtValue.ortvalue_from_numpy(a) for a in bound.arrays.values()])
    session = ort.InferenceSession(bound.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    img = np.random.default_rng(2).standard_normal((1, 3, 5, 5)).astype(np.float32)
    direct = {k: dequantize(w.data, w.fmt, w.shape) for k, w in stored.items()}
    want = _run(_with({"lin.weight": direct["qkv"][8:72], "gemm.weight": np.concatenate([direct["mod"][8:],
                       direct["mod"][:8]]), "gemm.bias": direct["gemm.bias"], "conv.weight": direct["conv.weight"]}), {})
    for got, ref in zip(session.run(None, {"x": x, "img": img}), want, strict=True):
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


def test_onnxruntime_copies_the_arrays_handed_to_it():
    """What lets a component drop its repacked arrays once the session exists."""
    stored = _stored("q8_0")
    bound = bind(strip_weights(_model(), {k: k for k in WEIGHTS}), stored.get, "test.gguf")
    so = ort.SessionOptions()
    so.add_external_initializers(list(bound.arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in bound.arrays.values()])
    session = ort.InferenceSession(bound.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.ones((2, 32), np.float32)
    img = np.ones((1, 3, 5, 5), np.float32)
    before = session.run(None, {"x": x, "img": img})
    for array in bound.arrays.values():
        array[...] = 0
    for a, b in zip(session.run(None, {"x": x, "img": img}), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_missing_and_misshapen_tensors_are_named():
    weightless = strip_weights(_model(), {k: k for k in WEIGHTS})
    stored = _stored("q4_0")
    with pytest.raises(PackageError, match=r"model\.gguf: tensor 'conv\.weight' is missing"):
        bind(weightless, lambda n: None if n == "conv.weight" else stored[n], "model.gguf")
    wrong = dict(stored, **{"conv.weight": Weight("conv.weight", FORMATS["f32"], (4, 3, 3, 2),
                                                  np.zeros((4, 3, 3, 2), np.float32))})
    with pytest.raises(PackageError, match=r"'conv\.weight' has shape \[4, 3, 3, 2\] but the graph needs \[4, 3, 3, 3\]"):
        bind(weightless, wrong.get, "model.gguf")


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quants_run_in_matmul_nbits(name):
    """K-quants (stable-diffusion.cpp, ComfyUI-GGUF and llama.cpp files) are repacked per sub-block
    (16 or 32 values a scale), not dequantized: the product is the dequantized weight's."""
    fmt = FORMATS[name]
    rows, cols = 8, 512
    raw = k_blocks(name, rows, cols // fmt.block)
    weight = Weight("w", fmt, (rows, cols), raw)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, cols])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              initializer=[numpy_helper.from_array(np.zeros((rows, cols), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    bound = bind(strip_weights(model, {"w": "w"}), {"w": weight}.get, "k.gguf")
    (binding,) = bound.bindings
    assert binding.kind == "quantized" and binding.resident_bytes == sum(a.nbytes for a in bound.arrays.values())
    (node,) = [n for n in bound.model.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in node.attribute}["block_size"] == fmt.scale_block
    x = np.random.default_rng(4).standard_normal((2, cols)).astype(np.float32)
    np.testing.assert_allclose(_run_outputs(bound, {"x": x}), x @ dequantize(raw, fmt, (rows, cols)).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", *K_QUANTS])
def test_weights_kept_in_blocks_are_gguf_pys_values_bit_for_bit(fmt):
    """A convolution-shaped weight held as its codes (4-bit ones packed as ggml packs them) and
    dequantized as its node runs: exactly the values gguf-py's dequantize gives."""
    shape = (8, 256, 3, 3)
    w = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    raw = k_blocks(fmt, 8, 9) if fmt in K_QUANTS else quantize(w.reshape(8, -1), FORMATS[fmt])
    stored = {"w": Weight("w", FORMATS[fmt], shape, raw)}
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(w, "w")])
    model = strip_weights(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), {"w": "w"})
    bound = bind(model, stored.get, "t.gguf")
    (binding,) = bound.bindings
    held = {k: v.nbytes for k, v in bound.arrays.items()}
    assert binding.kind == "blocks" and binding.resident_bytes == sum(held.values())
    if fmt in ("q4_0", "q4_1"):  # half a byte a weight, as stored
        assert held["w.nibbles"] == w.size // 2
    got = _run_outputs(bound)
    np.testing.assert_array_equal(got, dequantize(raw, FORMATS[fmt], shape))


def _run_outputs(bound, feeds=None) -> np.ndarray:
    so = ort.SessionOptions()
    so.add_external_initializers(list(bound.arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in bound.arrays.values()])
    session = ort.InferenceSession(bound.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds or {})[0]

"""GGUF block formats: unpacking is bit-exact with gguf-py's dequantization, and the MatMulNBits
repacking computes the same product as the dequantized weight."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edgediff.kernels.gguf_blocks import (
    FORMATS,
    WRITABLE,
    can_store,
    dequantize,
    quantize,
    to_matmul_nbits,
    unpack,
)

from k_quants import K_QUANTS, k_blocks

BLOCK_TYPES = [n for n in WRITABLE if FORMATS[n].nbits]


def _weight(n=48, k=128, seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[3, :32] = 0.7  # a flat block: scale 0 for the formats with a minimum
    w[5, 32:64] = 0.0  # an all-zero block
    return w


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_unpack_is_bit_exact_with_gguf_py(name):
    fmt = FORMATS[name]
    raw = quantize(_weight(), fmt)
    assert np.array_equal(unpack(raw, fmt).dequantize(), dequantize(raw, fmt, (48, 128)))


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_matmul_nbits_computes_the_dequantized_product(name):
    fmt = FORMATS[name]
    n, k = 48, 128
    raw = quantize(_weight(n, k), fmt)
    ref = dequantize(raw, fmt, (n, k))
    nb = to_matmul_nbits(raw, fmt)
    inputs = ["x", "b", "s"] + (["z"] if nb.zero_points is not None else [])
    inits = [numpy_helper.from_array(nb.b, "b"), numpy_helper.from_array(nb.scales, "s")]
    if nb.zero_points is not None:
        inits.append(numpy_helper.from_array(nb.zero_points, "z"))
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=nb.bits,
                            block_size=nb.block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [5, k])],
                              [helper.make_tensor_value_info("y", 1, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    if nb.minimum is not None:  # Q5_1: the graph adds the per-block minimum term (kernels.bind)
        y = y + x.reshape(5, -1, nb.block).sum(-1) @ nb.minimum.T
    np.testing.assert_allclose(y, x @ ref.T, atol=1e-4, rtol=1e-5)
    assert nb.bits == fmt.nbits  # 4-bit codes stay 4-bit; 5- and 8-bit codes take 8


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quants_unpack_bit_exact_with_gguf_py_and_repack_into_matmul_nbits(name):
    fmt = FORMATS[name]
    raw = k_blocks(name)
    ref = dequantize(raw, fmt, (48, 512))
    assert np.array_equal(unpack(raw, fmt).dequantize(), ref)
    nb = to_matmul_nbits(raw, fmt)
    assert nb.block == fmt.scale_block and nb.bits == fmt.nbits
    inputs = ["x", "b", "s"] + (["z"] if nb.zero_points is not None else [])
    inits = [numpy_helper.from_array(nb.b, "b"), numpy_helper.from_array(nb.scales, "s")]
    if nb.zero_points is not None:
        inits.append(numpy_helper.from_array(nb.zero_points, "z"))
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=512, N=48, bits=nb.bits,
                            block_size=nb.block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [5, 512])],
                              [helper.make_tensor_value_info("y", 1, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(1).standard_normal((5, 512)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    if nb.minimum is not None:  # Q5_K: the per-block minimum term the graph adds
        y = y + x.reshape(5, -1, nb.block).sum(-1) @ nb.minimum.T
    np.testing.assert_allclose(y, x @ ref.T, atol=1e-4, rtol=1e-4)


def test_only_whole_blocks_are_stored():
    assert can_store(FORMATS["q4_0"], (320, 640)) and not can_store(FORMATS["q4_0"], (320, 320, 3, 3))
    assert can_store(FORMATS["f16"], (320, 320, 3, 3))


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q4_1", "q5_1", "q4_k", "q6_k"])
def test_large_weights_repack_in_row_chunks_to_the_same_arrays(name, monkeypatch):
    from edgediff.kernels import gguf_blocks

    fmt = FORMATS[name]
    raw = k_blocks(name, rows=64, superblocks=2) if fmt.group else quantize(_weight(64, 512), fmt)
    whole = gguf_blocks._to_matmul_nbits(raw, fmt)
    monkeypatch.setattr(gguf_blocks, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(gguf_blocks.os, "cpu_count", lambda: 3)  # uneven chunks
    chunked = to_matmul_nbits(raw, fmt)
    for field in ("b", "scales", "zero_points", "minimum"):
        a, b = getattr(whole, field), getattr(chunked, field)
        assert (a is None and b is None) or np.array_equal(a, b), field

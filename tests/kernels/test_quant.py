"""Quantizer kernels against onnxruntime's own quantizers, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
from onnxruntime.quantization.quant_utils import quantize_data

from edgediff.kernels.quant import (
    pack_nibbles,
    quantize_blocks,
    quantize_per_channel_int8,
    round_half_away,
    unpack_nibbles,
)


def _weights(k: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.01, 2, size=(1, n)).astype(np.float32)
    w[:5, 0] = 0.0  # a block with zeros, and exact halves below
    w[:, 1] = np.float32(0.5) * np.arange(k, dtype=np.float32) / k
    return w


def _mlas(w: np.ndarray, bits: int, block: int, symmetric: bool):
    k, n = w.shape
    blocks = -(-k // block)
    per_byte = 8 // bits
    packed = np.zeros((n, blocks, -(-block // per_byte)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, -(-blocks // per_byte)), np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w), scales, zeros, block, n, k, symmetric)
    return packed, scales, zeros


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [128, 100])
def test_blocks_match_matmulnbits_quantizer(bits, block, symmetric, k):
    w = _weights(k, 24)
    packed, scales, zeros = _mlas(w, bits, block, symmetric)
    ours = quantize_blocks(w.T, bits, block, symmetric)  # blocks run along K for each column
    np.testing.assert_array_equal(ours.scale, scales)
    q = pack_nibbles(ours.q) if bits == 4 else ours.q
    np.testing.assert_array_equal(q, packed)
    if not symmetric:
        zp = ours.zero_point
        if bits == 4:
            zp = pack_nibbles(zp, pad=8)
        np.testing.assert_array_equal(zp, zeros)


def test_block_dequantize_error_is_bounded():
    """Half a step, or one step on the clipped side of a symmetric block (-8..7 is lopsided)."""
    w = _weights(256, 32, seed=3).T
    for symmetric, steps in ((False, 0.5), (True, 1.0)):
        b = quantize_blocks(w, 4, 32, symmetric)
        err = np.abs(b.dequantize() - w).reshape(32, 8, 32)
        assert np.all(err <= np.abs(b.scale)[..., None] * steps * (1 + 1e-6))


@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_int8_matches_onnxruntime(axis, reduce_range):
    """Full range and int8-static's 7-bit weights (onnxruntime's reduce_range: [-64, 64])."""
    w = _weights(64, 48, seed=1)
    q, scale = quantize_per_channel_int8(w, axis=axis, qmax=64 if reduce_range else 127)
    assert np.abs(q).max() == (64 if reduce_range else 127)
    for c in range(w.shape[axis]):
        channel = np.take(w, c, axis=axis)
        _, ref_scale, ref_q = quantize_data(channel.ravel(), TensorProto.INT8, symmetric=True,
                                            reduce_range=reduce_range)
        assert scale[c] == ref_scale
        np.testing.assert_array_equal(np.take(q, c, axis=axis).ravel(), ref_q)


def test_nibbles_round_trip_and_rounding():
    q = np.random.default_rng(0).integers(0, 16, size=(3, 7)).astype(np.uint8)
    assert pack_nibbles(q).shape == (3, 4)
    np.testing.assert_array_equal(unpack_nibbles(pack_nibbles(q), 7), q)
    np.testing.assert_array_equal(round_half_away(np.array([0.5, 1.5, -0.5, -2.5, 0.49999997], np.float32)),
                                  [1, 2, -1, -3, 0])

"""Block and per-channel quantizers over NumPy arrays, vectorized (no loops over blocks).

A weight is quantized in blocks of `block` consecutive values along its last axis (a block
as long as the axis is per-channel quantization). Rounding and scale rules follow the formats'
definitions: onnxruntime's MLAS blockwise quantizer for MatMulNBits (round half away from zero,
asymmetric: scale = (max - min) / qmax, zero point = round(-min / scale); symmetric: scale =
(value of largest magnitude) / -2^(bits-1), zero point 2^(bits-1)), and onnxruntime.quantization's
`quantize_data` for per-channel int8 (round half to even, symmetric range +-127).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero (exact for float32 inputs, done in float64)."""
    x = np.asarray(x, dtype=np.float64)
    return np.trunc(x + np.copysign(0.5, x))


@dataclass(frozen=True)
class Blocks:
    """Quantized blocks: q [..., n_blocks, block] unsigned ints, scale and zero point [..., n_blocks]."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    length: int  # the original last-axis length (before padding to whole blocks)

    def dequantize(self) -> np.ndarray:
        w = (self.q.astype(np.float32) - self.zero_point[..., None]) * self.scale[..., None]
        return w.reshape(*w.shape[:-2], -1)[..., : self.length]


def _as_blocks(w: np.ndarray, block: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    pad = -w.shape[-1] % block
    if pad:
        w = np.concatenate([w, np.zeros((*w.shape[:-1], pad), np.float32)], axis=-1)
    return w.reshape(*w.shape[:-1], -1, block)


def quantize_blocks(w: np.ndarray, bits: int, block: int, symmetric: bool) -> Blocks:
    """MatMulNBits-style block quantization of the last axis (MLAS `BlockwiseQuantizer`).

    Padding values of a last partial block are zeros, as MLAS pads them.
    """
    x = _as_blocks(w, block)
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    lo = np.minimum(x.min(-1), 0.0).astype(np.float32)
    hi = np.maximum(x.max(-1), 0.0).astype(np.float32)
    if symmetric:
        extreme = np.where(np.abs(x.max(-1)) > np.abs(x.min(-1)), x.max(-1), x.min(-1)).astype(np.float32)
        scale = (extreme / np.float32(-mid)).astype(np.float32)
        zero = np.full(scale.shape, mid, np.float32)
    else:
        scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale != 0, np.float32(0) - lo / scale, lo).astype(np.float32)
        zero = np.clip(round_half_away(zp), 0, qmax).astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    v = (x * recip[..., None]).astype(np.float32) + zero[..., None]
    q = np.clip(round_half_away(v.astype(np.float32)), 0, qmax).astype(np.uint8)
    length = int(np.shape(w)[-1])
    flat = q.reshape(*q.shape[:-2], -1)
    flat[..., length:] = 0  # padding past the real values is stored as 0, as MLAS leaves it
    return Blocks(q, scale, zero.astype(np.uint8), bits, length)


def pack_nibbles(q: np.ndarray, pad: int = 0) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, the first in the low nibble (MatMulNBits,
    ONNX INT4/UINT4); an odd count is padded with `pad` (MatMulNBits pads zero points with 8)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.full((*q.shape[:-1], 1), pad, q.dtype)], axis=-1)
    return (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :length]


def quantize_per_channel_int8(w: np.ndarray, axis: int = 0, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel, as onnxruntime.quantization quantizes QDQ weights:
    scale = max|w| / qmax per channel, q = round_half_even(w / scale) in [-qmax, qmax] (qmax 64:
    its reduce_range, 7-bit weights)."""
    w = np.asarray(w, dtype=np.float32)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    absmax = np.abs(moved).max(1).astype(np.float64)
    tiny = np.finfo(np.float32).tiny
    step = 2 * absmax / (2 * qmax)  # onnxruntime's (rmax - rmin) / (qmax - qmin), to the bit
    scale = np.where(step >= tiny, step, 1.0).astype(np.float32)
    q = np.clip(np.round(moved / scale[:, None]), -qmax, qmax).astype(np.int8)
    shape = list(np.moveaxis(w, axis, 0).shape)
    return np.moveaxis(q.reshape(shape), 0, axis), scale

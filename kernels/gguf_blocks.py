"""GGUF block formats (ggml's tensor types) as rows of one table, and their repacking into
onnxruntime's `MatMulNBits` layout straight from the blocks, never through fp32.

A block of `block` weights is stored by ggml as a scale `d` (fp16), sometimes a minimum `m`,
and `bits`-bit codes. Every format read here is affine per block:

    value = (code - offset) * d + m        (m = 0 for the symmetric formats)

`unpack` returns exactly that (codes, d, m): dequantizing it gives gguf-py's values bit for bit
(same operations in the same order, tested). `MatMulNBits` computes (code - zero_point) * scale,
so the symmetric formats map onto it exactly, Q4_1's minimum becomes a float zero point -m/d,
and 8-bit codes with a minimum (Q5_1), which onnxruntime's CPU kernel refuses as a float zero
point, keep the minimum as a separate per-block term the graph adds (kernels.bind).

Block layouts are ggml's (ggml-common.h): Q8_0 = d, 32 x int8; Q4_0 = d, 16 bytes of nibbles
(byte j holds codes j and j+16); Q4_1 = d, m, nibbles; Q5_0 = d, 32 high bits, nibbles;
Q5_1 = d, m, 32 high bits, nibbles. The K-quants are super-blocks of 256 whose sub-blocks of 16
or 32 are each affine with their own scale (6- or 8-bit, times the super-block's d) and, for
Q2_K/Q4_K/Q5_K, minimum (times dmin): `group` is that sub-block, MatMulNBits' block size.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType


@dataclass(frozen=True)
class BlockFormat:
    """One ggml tensor type as edgediff uses it."""

    name: str  # as users write it: --precision q4_0
    ggml: GGMLQuantizationType
    nbits: int  # MatMulNBits bits it repacks into without loss; 0: a float format
    offset: int = 0  # the code that means zero
    has_min: bool = False
    writable: bool = False  # edgediff writes it (gguf-py quantizes it)
    group: int = 0  # values per scale, where it differs from the block (K-quants: 16 or 32 of 256)

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def scale_block(self) -> int:
        """Values sharing one scale (and minimum): MatMulNBits' block size."""
        return self.group or self.block

    @property
    def block_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def float(self) -> bool:
        return self.ggml in (T.F32, T.F16, T.BF16)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("f32", T.F32, 0, writable=True),
        BlockFormat("f16", T.F16, 0, writable=True),
        BlockFormat("bf16", T.BF16, 0),
        BlockFormat("q8_0", T.Q8_0, 8, offset=0, writable=True),
        BlockFormat("q5_0", T.Q5_0, 8, offset=16, writable=True),
        BlockFormat("q5_1", T.Q5_1, 8, has_min=True, writable=True),
        BlockFormat("q4_0", T.Q4_0, 4, offset=8, writable=True),
        BlockFormat("q4_1", T.Q4_1, 4, has_min=True, writable=True),
        # K-quants (stable-diffusion.cpp, ComfyUI-GGUF and llama.cpp files): read, repacked; super-blocks
        # of 256 values whose sub-blocks of 16 or 32 each have a scale (and minimum)
        BlockFormat("q2_k", T.Q2_K, 4, has_min=True, group=16),
        BlockFormat("q3_k", T.Q3_K, 4, offset=4, group=16),
        BlockFormat("q4_k", T.Q4_K, 4, has_min=True, group=32),
        BlockFormat("q5_k", T.Q5_K, 8, has_min=True, group=32),
        BlockFormat("q6_k", T.Q6_K, 8, offset=32, group=16),
    )
}
BY_GGML = {f.ggml: f for f in FORMATS.values()}
WRITABLE = tuple(name for name, f in FORMATS.items() if f.writable)


def format_of(ggml_type: GGMLQuantizationType) -> BlockFormat | None:
    return BY_GGML.get(ggml_type)


def can_store(fmt: BlockFormat, shape: tuple[int, ...]) -> bool:
    """ggml blocks run along the last (torch) axis: it must hold whole blocks."""
    return fmt.float or (len(shape) >= 1 and shape[-1] % fmt.block == 0)


def quantize(array: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """fp32 -> the bytes ggml stores ([rows, bytes per row] for block types), via gguf-py."""
    from gguf import quants

    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), fmt.ggml)


def dequantize(raw: np.ndarray, fmt: BlockFormat, shape: tuple[int, ...]) -> np.ndarray:
    """Stored bytes (or float array) -> fp32 of `shape`, by gguf-py's reference code."""
    from gguf import quants

    if fmt.ggml == T.F32:
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    if fmt.ggml == T.F16:
        return np.asarray(raw).view(np.float16).astype(np.float32).reshape(shape)
    return quants.dequantize(np.asarray(raw).view(np.uint8), fmt.ggml).reshape(shape)


@dataclass(frozen=True)
class Affine:
    """Per-block affine codes: value = (codes - offset) * scale + minimum."""

    codes: np.ndarray  # uint8 [rows, blocks, block]
    scale: np.ndarray  # float32 [rows, blocks]
    offset: int
    minimum: np.ndarray | None  # float32 [rows, blocks] or None

    def dequantize(self) -> np.ndarray:
        """As gguf-py computes it (d * q, then + m): bit-exact with its dequantize."""
        q = self.codes.astype(np.int16) - self.offset
        w = self.scale[..., None] * q.astype(np.float32)
        if self.minimum is not None:
            w = w + self.minimum[..., None]
        return w.reshape(w.shape[0], -1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's nibble order: byte j holds code j (low) and code j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, shifts: tuple[int, ...], mask: int) -> np.ndarray:
    """Fields of `mask` at each shift of every byte: [..., n] -> [..., len(shifts), n]."""
    return (packed[..., None, :] >> np.array(shifts, np.uint8)[:, None]) & np.uint8(mask)


def _scales_6bit(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit minimums. Bytes 0-3 hold scales
    0-3 (low 6 bits) and the top bits of scales 4-7; bytes 4-7 the same for the minimums; bytes
    8-11 the low 4 bits of scale 4+i (low nibble) and minimum 4+i (high nibble)."""
    d, m, rest = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (rest & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (rest >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _unpack_k(b: np.ndarray, fmt: BlockFormat) -> Affine:
    """K-quant super-blocks [rows, n, bytes] -> affine codes per sub-block, in the layouts of
    ggml-common.h (block_q2_K ... block_q6_K). Each row's sub-blocks follow each other."""
    rows, n = b.shape[:2]
    if fmt.ggml in (T.Q4_K, T.Q5_K):  # d, dmin, 12 scale bytes, [32 high bits], 4-bit lows in 64-value halves
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _scales_6bit(b[..., 4:16])
        low = _bits(b[..., -128:].reshape(rows, n, 4, 32), (0, 4), 0x0F).reshape(rows, n, 8, 32)
        if fmt.ggml == T.Q5_K:
            low |= _bits(b[..., 16:48], tuple(range(8)), 1) << 4
        return Affine(low, d[..., None] * sc, 0, -(dmin[..., None] * mn))
    if fmt.ggml == T.Q6_K:  # 4-bit lows, 2-bit highs, 16 int8 scales, d
        low = _bits(b[..., 0:128].reshape(rows, n, 2, 64), (0, 4), 0x0F).reshape(rows, n, 2, 2, 2, 32)
        high = _bits(b[..., 128:192].reshape(rows, n, 2, 32), (0, 2, 4, 6), 0x03)
        codes = (low.reshape(rows, n, 8, 32) | (high.reshape(rows, n, 8, 32) << 4)).reshape(rows, n, 16, 16)
        return Affine(codes, _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8), 32, None)
    if fmt.ggml == T.Q3_K:  # 32 bytes of high bits, 2-bit lows, 12 bytes of 6-bit scales, d
        low = _bits(b[..., 32:96].reshape(rows, n, 2, 32), (0, 2, 4, 6), 0x03).reshape(rows, n, 16, 16)
        high = _bits(b[..., 0:32], tuple(range(8)), 1).reshape(rows, n, 16, 16)
        s = b[..., 96:108]
        lo = _bits(s[..., 0:8], (0, 4), 0x0F).reshape(rows, n, 16)
        hi = _bits(s[..., 8:12], (0, 2, 4, 6), 0x03).reshape(rows, n, 16)
        scale = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
        return Affine(low | (high << 2), _f16(b[..., 108:110])[..., None] * scale, 4, None)
    # Q2_K: 16 bytes of 4-bit scale (low) and minimum (high), 2-bit codes, d, dmin
    codes = _bits(b[..., 16:80].reshape(rows, n, 2, 32), (0, 2, 4, 6), 0x03).reshape(rows, n, 16, 16)
    s = b[..., 0:16]
    return Affine(codes, _f16(b[..., 80:82])[..., None] * (s & 0x0F), 0, -(_f16(b[..., 82:84])[..., None] * (s >> 4)))


def unpack(raw: np.ndarray, fmt: BlockFormat) -> Affine:
    """Stored rows [rows, bytes per row] of a repackable format -> its affine codes."""
    if not fmt.nbits:
        raise ValueError(f"{fmt.name} is not repacked; dequantize it")
    rows = raw.shape[0]
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, -1, fmt.block_bytes)
    if fmt.group:
        a = _unpack_k(b, fmt)
        return Affine(a.codes.reshape(rows, -1, fmt.group), a.scale.astype(np.float32).reshape(rows, -1), a.offset,
                      None if a.minimum is None else a.minimum.astype(np.float32).reshape(rows, -1))
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if fmt.has_min else None
    rest = b[..., 4:] if fmt.has_min else b[..., 2:]
    if fmt.ggml == T.Q8_0:
        codes = (rest.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Affine(codes, d, 128, None)
    if fmt.ggml in (T.Q4_0, T.Q4_1):
        return Affine(_nibbles(rest), d, fmt.offset, m)
    # Q5_0 / Q5_1: 32 high bits (little-endian bit order), then the nibbles
    high = np.unpackbits(rest[..., :4], axis=-1, bitorder="little")
    return Affine(_nibbles(rest[..., 4:]) | (high << 4), d, fmt.offset, m)


@dataclass(frozen=True)
class NBits:
    """One weight in MatMulNBits' layout: B [N, blocks, block*bits/8], scales [N*blocks],
    optional zero points, and the per-block minimum term the graph must add (8-bit codes only)."""

    bits: int
    block: int
    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    minimum: np.ndarray | None  # float32 [N, blocks]: y += (x summed per block) @ minimum.T

    @property
    def nbytes(self) -> int:
        parts = (self.b, self.scales, self.zero_points, self.minimum)
        return sum(p.nbytes for p in parts if p is not None)


def _shuffled_nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's nibble order (byte j: codes j and j+16) -> MatMulNBits' (byte i: codes 2i and 2i+1),
    byte to byte: codes 2i, 2i+1 are the low nibbles of bytes 2i, 2i+1 for i < 8, the high nibbles
    of bytes 2i-16, 2i-15 after. 8x faster than unpacking to codes and packing again."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    return np.concatenate([(even & 0x0F) | (odd << 4), (even >> 4) | (odd & 0xF0)], axis=-1)


PARALLEL_BYTES = 4 << 20  # weights above this are repacked in row chunks, one per core


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="edgediff-repack")


def to_matmul_nbits(raw: np.ndarray, fmt: BlockFormat) -> NBits:
    """A stored [N, K] Linear weight (blocks along K, as ggml stores it) -> MatMulNBits' inputs,
    exact: the same codes and scales, no requantization. Large weights are repacked in row
    chunks on every core (NumPy lets go of the GIL in its loops): the Flux transformer's 6.7 GB
    of Q4_0 in 11 s instead of 19 on 2 cores."""
    workers = os.cpu_count() or 1
    if raw.nbytes > PARALLEL_BYTES and workers > 1 and raw.shape[0] >= 2 * workers:
        parts = list(_pool().map(lambda rows: _to_matmul_nbits(rows, fmt), np.array_split(raw, workers)))
        joined = [None if getattr(parts[0], f) is None else np.concatenate([getattr(q, f) for q in parts])
                  for f in ("b", "scales", "zero_points", "minimum")]
        return NBits(parts[0].bits, parts[0].block, *joined)
    return _to_matmul_nbits(raw, fmt)


def _to_matmul_nbits(raw: np.ndarray, fmt: BlockFormat) -> NBits:
    if fmt.ggml in (T.Q4_0, T.Q8_0):  # the common formats, straight from the bytes
        b = np.asarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, fmt.block_bytes)
        scale = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
        codes = _shuffled_nibbles(b[..., 2:]) if fmt.ggml == T.Q4_0 else b[..., 2:] ^ np.uint8(0x80)  # q + 128
        return NBits(fmt.nbits, fmt.block, np.ascontiguousarray(codes), scale.reshape(-1), None, None)
    a = unpack(raw, fmt)
    n, blocks, block = a.codes.shape
    scale, minimum, codes = a.scale, a.minimum, a.codes
    zero = None
    if fmt.nbits == 8:
        codes = (codes.astype(np.int16) + (128 - a.offset)).astype(np.uint8)  # default zero point 128
        b = codes
    else:
        if minimum is not None:
            # (code - zp) * d = code * d + m with zp = -m / d; a block with d == 0 holds m only:
            # codes 0, scale m, zero point -1 give it exactly.
            flat = scale == 0
            codes = np.where(flat[..., None], 0, codes).astype(np.uint8)
            with np.errstate(divide="ignore", invalid="ignore"):
                zero = np.where(flat, -1.0, -minimum / scale).astype(np.float32)
            scale = np.where(flat, minimum, scale).astype(np.float32)
            minimum = None
            zero = zero.reshape(-1)
        elif a.offset != 8:  # MatMulNBits' default zero point is 8 (Q3_K's codes mean zero at 4)
            codes = (codes + (8 - a.offset)).astype(np.uint8)
        b = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: 2i low, 2i+1 high
    return NBits(fmt.nbits, block, np.ascontiguousarray(b), np.ascontiguousarray(scale.reshape(-1)), zero,
                 None if minimum is None else np.ascontiguousarray(minimum))

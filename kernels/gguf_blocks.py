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
Q5_1 = d, m, 32 high bits, nibbles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType


@dataclass(frozen=True)
class BlockFormat:
    """One ggml tensor type as edgediff uses it."""

    name: str  # as users write it: --precision q4_0
    ggml: GGMLQuantizationType
    nbits: int  # MatMulNBits bits it repacks into without loss; 0 = dequantized at load
    offset: int = 0  # the code that means zero
    has_min: bool = False
    writable: bool = False  # edgediff writes it (gguf-py quantizes it)

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][0]

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
        # K-quants (stable-diffusion.cpp and llama.cpp files): read, dequantized at load
        *(BlockFormat(f"q{b}_k", getattr(T, f"Q{b}_K"), 0) for b in (2, 3, 4, 5, 6)),
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


def unpack(raw: np.ndarray, fmt: BlockFormat) -> Affine:
    """Stored rows [rows, bytes per row] of a repackable format -> its affine codes."""
    if not fmt.nbits:
        raise ValueError(f"{fmt.name} is not repacked; dequantize it")
    rows = raw.shape[0]
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, -1, fmt.block_bytes)
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


def to_matmul_nbits(raw: np.ndarray, fmt: BlockFormat) -> NBits:
    """A stored [N, K] Linear weight (blocks along K, as ggml stores it) -> MatMulNBits' inputs,
    exact: the same codes and scales, no requantization."""
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
        b = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: 2i low, 2i+1 high
    return NBits(fmt.nbits, block, np.ascontiguousarray(b), np.ascontiguousarray(scale.reshape(-1)), zero,
                 None if minimum is None else np.ascontiguousarray(minimum))

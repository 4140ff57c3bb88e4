"""Seeded noise that reproduces torch's CPU generator bit for bit, in NumPy.

`TorchGenerator(seed).randn(shape)` returns what
`torch.randn(shape, generator=torch.Generator().manual_seed(seed))` returns on an x86-64 CPU
(float32), and successive calls continue the same stream, as successive `randn` calls on one
torch generator do. So a seed gives diffusers' (CPU generator) and ComfyUI's starting noise, and
ancestral/SDE samplers draw the same per-step noise diffusers' schedulers draw.

The algorithm follows PyTorch's CPU kernels (pytorch/pytorch, aten/src/ATen/native/cpu/
DistributionTemplates.h `normal_fill_AVX2` and avx_mathfun.h, the Cephes-based float32 log and
sincos by J. Pommier / G. Garberoglio): a Mersenne Twister (MT19937, seeded by init_genrand),
24-bit uniforms, and a Box-Muller transform applied in blocks of 16 (element j pairs with j+8).
Every float32 operation is done in the same order as the vector code, so results are exact.
"""

from __future__ import annotations

import numpy as np

_F = np.float32
_I = np.int32


def _mt19937_state(seed: int) -> np.ndarray:
    """init_genrand: the seeding torch's `manual_seed` (and std::mt19937) use."""
    key = np.empty(624, dtype=np.uint32)
    value = seed & 0xFFFFFFFF
    key[0] = value
    for i in range(1, 624):
        value = (1812433253 * (value ^ (value >> 30)) + i) & 0xFFFFFFFF
        key[i] = value
    return key


def _fma(a, b, c) -> np.ndarray:
    """Fused multiply-add in float32: the compiler contracts the vector code's mul+add pairs."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(_F)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(_I)


def _float(i: np.ndarray) -> np.ndarray:
    return i.astype(_I).view(_F)


def _log_ps(x: np.ndarray) -> np.ndarray:
    """log256_ps from avx_mathfun.h (Cephes logf), op for op. Inputs are in (0, 1]."""
    x = np.maximum(x, _float(np.array(0x00800000)))
    e_int = (_bits(x) >> 23) - 0x7F  # logical and arithmetic shifts agree: x > 0
    x = _float((_bits(x) & ~0x7F800000) | _bits(_F(0.5)))
    e = e_int.astype(_F) + _F(1)
    mask = x < _F(0.707106781186547524)
    tmp = np.where(mask, x, _F(0))
    x = x - _F(1)
    e = e - np.where(mask, _F(1), _F(0))
    x = x + tmp
    z = x * x
    y = _F(7.0376836292e-2)
    for c in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
              -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = _fma(y, x, _F(c))
    y = y * x
    y = _fma(y, z, e * _F(-2.12194440e-4))
    y = y - z * _F(0.5)
    x = x + y
    return _fma(e, _F(0.693359375), x)


def _sincos_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps from avx_mathfun.h (Cephes sinf/cosf), op for op. Inputs are >= 0."""
    sign_sin = _bits(x) & np.int32(-0x80000000)
    x = _float(_bits(x) & 0x7FFFFFFF)
    j = (x * _F(1.27323954473516)).astype(_I)  # truncation, as cvttps
    j = (j + 1) & ~1
    y = j.astype(_F)
    swap_sign_sin = (j & 4) << 29
    poly = (j & 2) == 0
    x = _fma(y, _F(-0.78515625), x)
    x = _fma(y, _F(-2.4187564849853515625e-4), x)
    x = _fma(y, _F(-3.77489497744594108e-8), x)
    sign_cos = (~(j - 2) & 4) << 29
    sign_sin = sign_sin ^ swap_sign_sin
    z = x * x
    yc = _fma(_F(2.443315711809948e-5), z, _F(-1.388731625493765e-3))
    yc = _fma(yc, z, _F(4.166664568298827e-2))
    yc = _fma(yc * z, z, -(z * _F(0.5)))
    yc = yc + _F(1)
    ys = _fma(_F(-1.9515295891e-4), z, _F(8.3321608736e-3))
    ys = _fma(ys, z, _F(-1.6666654611e-1))
    ys = _fma(ys * z, x, x)
    sin = np.where(poly, ys, yc)
    cos = np.where(poly, yc, ys)
    return _float(_bits(sin) ^ sign_sin), _float(_bits(cos) ^ sign_cos)


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """normal_fill_16_AVX2 over rows of 16 uniforms: (n, 16) -> (n, 16) normals."""
    radius = np.sqrt(_F(-2) * _log_ps(_F(1) - u[:, :8]))
    theta = _F(2.0 * np.pi) * u[:, 8:]
    sin, cos = _sincos_ps(theta)
    return np.concatenate([radius * cos, radius * sin], axis=1)


class TorchGenerator:
    """A stateful stream of torch-CPU-compatible random numbers (only what samplers need)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._bitgen = np.random.MT19937()
        self._bitgen.state = {
            "bit_generator": "MT19937",
            "state": {"key": _mt19937_state(self.seed), "pos": 624},
        }
        self._next_double_normal: float | None = None

    def _uint32(self, n: int) -> np.ndarray:
        return self._bitgen.random_raw(n).astype(np.uint32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        return ((self._uint32(n) & np.uint32(0xFFFFFF)).astype(_F)) * _F(2.0**-24)

    def _uniform_f64(self) -> float:
        hi, lo = (int(v) for v in self._uint32(2))
        return float(((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    def _normal_f64(self) -> float:
        """at::normal_distribution<double>, used by torch for tensors of fewer than 16 values."""
        if self._next_double_normal is not None:
            value, self._next_double_normal = self._next_double_normal, None
            return value
        u1 = self._uniform_f64()
        u2 = self._uniform_f64()
        r = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._next_double_normal = float(r * np.sin(theta))
        return float(r * np.cos(theta))

    def randn(self, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """Standard normal float32 array of `shape`, continuing this generator's stream."""
        shape = tuple(int(s) for s in shape)
        size = int(np.prod(shape, dtype=np.int64))
        if size < 16:
            return np.array([self._normal_f64() for _ in range(size)], dtype=_F).reshape(shape)
        data = self._uniform_f32(size)
        full = size // 16 * 16
        data[:full] = _box_muller_16(data[:full].reshape(-1, 16)).reshape(-1)
        if size % 16:
            tail = self._uniform_f32(16)
            data[size - 16 :] = _box_muller_16(tail.reshape(1, 16)).reshape(-1)
        return data.reshape(shape)

"""K-quant test data: gguf-py dequantizes K-quants but cannot write them, so tests draw random
super-blocks (every bit pattern is a valid block once its fp16 scales are finite)."""

from __future__ import annotations

import numpy as np

from edgediff.kernels.gguf_blocks import FORMATS

K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
# where each super-block keeps its fp16 scale (and minimum scale), per ggml-common.h
K_FP16 = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def k_blocks(name: str, rows: int = 48, superblocks: int = 2, seed: int = 0) -> np.ndarray:
    """[rows, superblocks * bytes] of random `name` super-blocks."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, superblocks, fmt.block_bytes), dtype=np.uint8)
    for at in K_FP16[name]:
        raw[..., at:at + 2] = rng.uniform(1e-3, 1e-2, (rows, superblocks)).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)

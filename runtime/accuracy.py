"""MatMulNBits' accuracy level for weights bound from GGUF blocks: 0 computes in fp32, 4 quantizes
the activations to int8 per block and runs integer dot products, which pays where the CPU has
VNNI (measured on a Zen 4 EPYC: 1.5x on a DiT's products) and not where it has only AVX2.

`auto` measures both once on this machine (a DiT-sized product, a few seconds) and keeps the
answer per CPU and onnxruntime version, as `--device auto` does for OpenVINO, and applies level 4
to 4-bit weights only: against the fp32 package's image on the tiny models (q4_0, 4 seeds) level
4 moves PSNR by -0.8 to +0.01 dB (SD3, Flux schnell/dev, SD 1.x, SDXL), where on q8_0 weights,
whose own error is far smaller, it costs 0.9-13 dB (SD3 q8_0: 55.9 -> 42.7 dB). Level 4 also holds
more memory: onnxruntime prepacks the blocks with their scales and block sums (measured 1.5x the
4-bit codes, against 1.0x for level 0)."""

from __future__ import annotations

import os
import time
from functools import cache

import numpy as np

LEVELS = ("auto", "0", "4")
AUTO_ENV = "EDGEDIFF_AUTO_INT8"  # "0": auto stays at level 0 (the tests set it, for machine-independent floors)
FASTER = 1.2  # level 4 must be this much faster to be chosen


def _probe(level: int, threads: int | None):
    """One 4-bit MatMulNBits of a DiT's shape (1024 tokens x 3072 -> 3072, blocks of 32)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k = n = 3072
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    scales = (rng.random(n * k // 32, dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=32, accuracy_level=level)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024, n])],
                              [helper.make_tensor("b", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
                               helper.make_tensor("s", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1024, k)).astype(np.float32)
    return lambda: session.run(None, {"x": x})


def measure(threads: int | None = None) -> tuple[float, float]:
    """Seconds of the probe at level 0 and at level 4 (best of three, alternated)."""
    runs = {level: _probe(level, threads) for level in (0, 4)}
    best = {0: float("inf"), 4: float("inf")}
    for run in runs.values():
        run()  # warm-up
    for _ in range(3):
        for level, run in runs.items():
            start = time.perf_counter()
            run()
            best[level] = min(best[level], time.perf_counter() - start)
    return best[0], best[4]


@cache
def auto_level() -> int:
    """4 where int8 activations measured FASTER-times faster here, else 0."""
    if os.environ.get(AUTO_ENV) == "0":
        return 0
    import onnxruntime

    from edgediff.runtime.graph_cache import cpu_features
    from edgediff.runtime.paths import cache_root, measured_once

    key = {"onnxruntime": onnxruntime.__version__, "cpu": cpu_features()}
    kept = measured_once(cache_root() / "probes" / "matmulnbits.json", key,
                         lambda: dict(zip(("level0_s", "level4_s"), measure(), strict=True)))
    return 4 if kept["level0_s"] >= FASTER * kept["level4_s"] else 0


def resolve(level: str | int) -> int | dict[int, int]:
    """What a `--accuracy-level` value means here: one level for every weight, or for `auto` one
    per repacked bit width (8-bit weights stay at level 0)."""
    from edgediff.errors import UsageError

    if str(level) not in LEVELS:
        raise UsageError(f"--accuracy-level must be one of {', '.join(LEVELS)} (got {level})")
    return {4: auto_level(), 8: 0} if str(level) == "auto" else int(level)

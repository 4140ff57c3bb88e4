"""DeepCache-style reuse of a U-Net's deep features across steps (Ma et al., "DeepCache:
Accelerating Diffusion Models for Free", 2023): neighbouring steps' deep features barely
change, so every `interval`-th evaluation runs the whole U-Net and keeps what enters its last
up layers, and the evaluations between run only the shallow branch (`unet_shallow`: conv_in,
the first down layer, the last up layers) on those kept features."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ModelFn = Callable[[np.ndarray, np.ndarray, dict], np.ndarray]

# whole-U-Net evaluations a generation needs to keep its quality: measured on the embedded
# model's draw score (benchmarks/RESULTS.md, "DeepCache"), 9 or more kept 96-102% of it at 20,
# 30 and 50 steps, 8 kept 83%, 7 77%, 4-5 26-47%
FULL_EVALUATIONS = 9


def advice(steps: int, interval: int) -> str | None:
    """Why `interval` is too long for `steps`, or None."""
    full = -(-steps // interval)
    if interval == 1 or full >= FULL_EVALUATIONS:
        return None
    fix = f"an interval of at most {steps // FULL_EVALUATIONS}" if steps >= 2 * FULL_EVALUATIONS else "no caching"
    return (f"--cache-interval {interval} with {steps} steps runs the whole U-Net only {full} times; below "
            f"{FULL_EVALUATIONS} the embedded model lost much of its image quality (benchmarks/RESULTS.md): "
            f"use more steps or {fix}")


def reusing(full: Callable[[dict], dict], shallow: Callable[[dict], dict], interval: int) -> ModelFn:
    """The denoiser's model function over the two graphs. Each conditioning (the guided double
    batch, or the prompt and the negative prompt run apart) keeps its own features."""
    kept: dict[int, tuple[int, np.ndarray]] = {}

    def run(x: np.ndarray, t: np.ndarray, cond: dict) -> np.ndarray:
        calls, feature = kept.get(id(cond), (0, None))
        feeds = {"sample": x, "timestep": t, **cond}
        if calls % interval == 0:
            out = full(feeds)
            feature, result = out["deep_feature"], out["out_sample"]
        else:
            result = shallow({**feeds, "deep_feature": feature})["out_sample"]
        kept[id(cond)] = (calls + 1, feature)
        return result

    return run

"""DeepCache-style reuse of a U-Net's deep features across steps (Ma et al., "DeepCache:
Accelerating Diffusion Models for Free", 2023): neighbouring steps' deep features barely
change, so every `interval`-th evaluation runs the whole U-Net and keeps what enters its last
up layers, and the evaluations between run only the shallow branch (`unet_shallow`: conv_in,
the first down layer, the last up layers) on those kept features."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ModelFn = Callable[[np.ndarray, np.ndarray, dict], np.ndarray]


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

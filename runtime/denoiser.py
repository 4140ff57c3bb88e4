"""The model boundary: every denoiser model becomes D(x, sigma) -> x0 for the samplers.

eps, v and flow predictions differ only here: input scaling, sigma -> timestep, output -> x0,
and how a clean latent and noise mix at a sigma (`LatentSpace`: x0 + sigma * n for the
discrete-time models seen as variance-exploding, (1 - sigma) x0 + sigma * n for rectified flow),
which the samplers use for their fresh noise. Classifier-free guidance is applied here too, so a
sampler never knows which model or guidance it drives. Formulas: k-diffusion `external.py`
(DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser), Karras et al. 2022 table 1; for flow, Esser et
al. 2024 (SD3) and ComfyUI's `model_sampling.py` (CONST) and `sample_euler_ancestral_RF`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgediff.errors import UsageError
from edgediff.runtime.conditioning import Cond, stack
from edgediff.runtime.schedules import Schedule

# (x_in [B,C,H,W], timestep [B], conditioning by input name, batch B) -> raw model output like x_in
ModelFn = Callable[[np.ndarray, np.ndarray, Cond], np.ndarray]

PREDICTIONS = ("eps", "v", "flow")


@dataclass(frozen=True)
class LatentSpace:
    """Where a sampler moves: x = alpha(sigma) * x0 + sigma * noise, with alpha = 1 for the
    discrete-time models (seen as variance-exploding) and 1 - sigma for rectified flow."""

    flow: bool = False

    def alpha(self, sigma: float) -> float:
        return 1.0 - sigma if self.flow else 1.0

    def mix(self, x0: np.ndarray, sigma: float, noise: np.ndarray) -> np.ndarray:
        return (self.alpha(sigma) * x0 + sigma * noise).astype(np.float32)

    def ancestral_step(self, sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float, float]:
        """Split a step into a deterministic move to sigma_down and fresh noise: the step is
        x_next = scale * x_down + noise_scale * n (k-diffusion `get_ancestral_step`; for flow
        ComfyUI's rectified-flow rule, which keeps x_next's marginal at sigma_next)."""
        if not eta or sigma_next == 0:
            return sigma_next, 1.0, 0.0
        if not self.flow:
            up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
            return math.sqrt(sigma_next**2 - up**2), 1.0, up
        down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        scale = (1 - sigma_next) / (1 - down)
        return down, scale, math.sqrt(max(sigma_next**2 - (down * scale) ** 2, 0.0))


VE, FLOW = LatentSpace(), LatentSpace(flow=True)


def latent_space(prediction: str) -> LatentSpace:
    if prediction not in PREDICTIONS:
        raise UsageError(f"unsupported prediction type '{prediction}' (supported: {', '.join(PREDICTIONS)})")
    return FLOW if prediction == "flow" else VE


def _to_x0(prediction: str, x: np.ndarray, out: np.ndarray, sigma: float) -> np.ndarray:
    if prediction == "eps":
        return x - sigma * out
    if prediction == "v":
        return x / (sigma**2 + 1) - out * (sigma / math.sqrt(sigma**2 + 1))
    return x - sigma * out  # flow: the model predicts the velocity noise - x0


class Denoiser:
    """D(x, sigma) -> x0 of a model and its conditioning; `space` is where its samplers move."""

    def __init__(self, model: ModelFn, ds: Schedule, prediction: str, cond: Cond, uncond: Cond | None = None,
                 guidance: float | np.ndarray = 1.0, split_batch: bool = False):
        """With guidance > 1 and an unconditional conditioning, the model runs on [uncond, cond]
        (one double batch, as diffusers orders it; or two single batches when `split_batch`,
        which halves activation memory) and x0 = x0_u + guidance * (x0_c - x0_u). `guidance` may
        be an array broadcast against x (a video's per-frame ramp); it guides when any is > 1."""
        self.space = latent_space(prediction)
        self.model, self.ds, self.prediction = model, ds, prediction
        self.cond, self.uncond, self.guidance, self.split_batch = cond, uncond, guidance, split_batch
        self.guided = uncond is not None and float(np.max(guidance)) > 1.0
        self.both_cond = stack([uncond, cond]) if self.guided and not split_batch else None  # once, not per step

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        sigma = float(sigma)
        x_in = x if self.space.flow else x / math.sqrt(sigma**2 + 1)
        x_in = x_in.astype(np.float32)
        t = np.full(x.shape[0], self.ds.sigma_to_t(sigma), np.float32)
        if not self.guided:
            return _to_x0(self.prediction, x, self.model(x_in, t, self.cond), sigma).astype(np.float32)
        if self.split_batch:
            out_u = self.model(x_in, t, self.uncond)
            out_c = self.model(x_in, t, self.cond)
        else:
            both = self.model(np.concatenate([x_in, x_in]), np.concatenate([t, t]), self.both_cond)
            out_u, out_c = both[: x.shape[0]], both[x.shape[0]:]
        x0_u = _to_x0(self.prediction, x, out_u, sigma)
        x0_c = _to_x0(self.prediction, x, out_c, sigma)
        return (x0_u + self.guidance * (x0_c - x0_u)).astype(np.float32)


def noisy_start(space: LatentSpace, sigma: float, noise: np.ndarray, latent: np.ndarray | None) -> np.ndarray:
    """The sampler's starting point at `sigma`.

    From pure noise (txt2img): noise of unit variance in the model's own space, i.e. for the
    discrete-time models noise * sqrt(1 + sigma^2) here, as ComfyUI does for a full denoise and
    diffusers' schedulers do; for flow the noise itself (diffusers' flow pipelines start there
    whatever the first sigma). From an image (img2img): the latent mixed with noise at `sigma`.
    """
    if latent is None:
        return noise.astype(np.float32) if space.flow else (noise * math.sqrt(1.0 + sigma**2)).astype(np.float32)
    return space.mix(latent, sigma, noise)

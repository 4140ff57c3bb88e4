"""The model boundary: every denoiser model becomes D(x, sigma) -> x0 for the samplers.

eps, v and flow predictions differ only here (input scaling, sigma -> timestep, output ->
x0, and how noise enters a latent); classifier-free guidance is applied here too, so a
sampler never knows which model or guidance it drives. Formulas: k-diffusion
`external.py` (DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser), Karras et al. 2022 table 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from edgediff.errors import UsageError
from edgediff.runtime.conditioning import Cond, stack
from edgediff.runtime.schedules import DiscreteSchedule

# (x_in [B,C,H,W], timestep [B], conditioning by input name, batch B) -> raw model output like x_in
ModelFn = Callable[[np.ndarray, np.ndarray, Cond], np.ndarray]
Denoiser = Callable[[np.ndarray, float], np.ndarray]

PREDICTIONS = ("eps", "v")


def _to_x0(prediction: str, x: np.ndarray, out: np.ndarray, sigma: float) -> np.ndarray:
    if prediction == "eps":
        return x - sigma * out
    if prediction == "v":
        return x / (sigma**2 + 1) - out * (sigma / math.sqrt(sigma**2 + 1))
    raise UsageError(f"unsupported prediction type '{prediction}' (supported: {', '.join(PREDICTIONS)})")


def make_denoiser(
    model: ModelFn,
    ds: DiscreteSchedule,
    prediction: str,
    cond: Cond,
    uncond: Cond | None = None,
    guidance: float = 1.0,
    split_batch: bool = False,
) -> Denoiser:
    """Wrap a discrete-time model and its conditioning as D(x, sigma) -> x0.

    With guidance > 1 and an unconditional conditioning, the model runs on [uncond, cond] (one
    double batch, as diffusers orders it; or two single batches when `split_batch`, which
    halves activation memory) and x0 = x0_u + guidance * (x0_c - x0_u).
    """
    guided = uncond is not None and guidance > 1.0
    both_cond = stack([uncond, cond]) if guided and not split_batch else None  # once, not per step

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        sigma = float(sigma)
        x_in = (x / math.sqrt(sigma**2 + 1)).astype(np.float32)
        t = np.float32(ds.sigma_to_t(sigma))
        batch = x.shape[0]
        if not guided:
            out = model(x_in, np.full(batch, t, np.float32), cond)
            return _to_x0(prediction, x, out, sigma).astype(np.float32)
        if split_batch:
            out_u = model(x_in, np.full(batch, t, np.float32), uncond)
            out_c = model(x_in, np.full(batch, t, np.float32), cond)
        else:
            both = model(
                np.concatenate([x_in, x_in]),
                np.full(2 * batch, t, np.float32),
                both_cond,
            )
            out_u, out_c = both[:batch], both[batch:]
        x0_u = _to_x0(prediction, x, out_u, sigma)
        x0_c = _to_x0(prediction, x, out_c, sigma)
        return (x0_u + guidance * (x0_c - x0_u)).astype(np.float32)

    return denoise


def noisy_start(sigma: float, noise: np.ndarray, latent: np.ndarray | None) -> np.ndarray:
    """The sampler's starting point at `sigma`.

    From pure noise (txt2img) the latent is noise of unit variance in the model's own
    (variance-preserving) space, i.e. noise * sqrt(1 + sigma^2) here, as ComfyUI does for a full
    denoise and diffusers' schedulers do. From an image (img2img): latent + sigma * noise.
    """
    if latent is None:
        return (noise * math.sqrt(1.0 + sigma**2)).astype(np.float32)
    return (latent + sigma * noise).astype(np.float32)

"""Noise schedules: pure functions that return a descending array of sigmas ending in 0.

Sigmas are in the variance-exploding convention of k-diffusion (x = x0 + sigma * eps); for the
discrete-time models (SD 1.x/2.x/XL) sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edgediff.errors import UsageError


@dataclass(frozen=True)
class DiscreteSchedule:
    """The model's training discretization, read from its scheduler config."""

    sigmas: np.ndarray  # sigma(t) for t = 0 .. T-1, ascending (float64)
    alphas_cumprod: np.ndarray
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> DiscreteSchedule:
        """Betas as diffusers computes them (float32 torch.linspace, float32 cumprod)."""
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "scaled_linear")
        start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float32)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
        elif kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float32)
        elif kind == "squaredcos_cap_v2":
            t = np.arange(n + 1, dtype=np.float64) / n
            alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
        else:
            raise UsageError(f"scheduler config: unknown beta_schedule '{kind}'")
        alphas_cumprod = np.cumprod(np.float32(1) - betas, dtype=np.float32)
        sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float64)
        return cls(
            sigmas=sigmas,
            alphas_cumprod=alphas_cumprod.astype(np.float64),
            timestep_spacing=str(config.get("timestep_spacing") or "leading"),
            steps_offset=int(config.get("steps_offset", 0) or 0),
        )

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """Fractional timestep by interpolation in log-sigma (k-diffusion, diffusers `_sigma_to_t`)."""
        log_sigmas = np.log(self.sigmas)
        log_sigma = math.log(max(sigma, 1e-10))
        low = int(np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2))
        w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
        w = min(max(w, 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma_log(self, t: np.ndarray) -> np.ndarray:
        """sigma at fractional t, interpolating log-sigma (k-diffusion, ComfyUI)."""
        t = np.clip(np.asarray(t, dtype=np.float64), 0, len(self.sigmas) - 1)
        low = np.floor(t).astype(int)
        high = np.ceil(t).astype(int)
        w = t - low
        log_sigmas = np.log(self.sigmas)
        return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def _append_zero(sigmas: np.ndarray) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def spaced_timesteps(ds: DiscreteSchedule, n: int, spacing: str | None = None) -> np.ndarray:
    """Timesteps for `n` steps as diffusers' discrete schedulers space them (Table 2 of
    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed")."""
    spacing = spacing or ds.timestep_spacing
    total = len(ds.sigmas)
    if spacing == "linspace":
        return np.linspace(0, total - 1, n, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        ratio = total // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + ds.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)).astype(np.float64) - 1
    raise UsageError(f"scheduler config: unknown timestep_spacing '{spacing}'")


def normal(ds: DiscreteSchedule, n: int) -> np.ndarray:
    """The model's own discretization: its config's timestep spacing and offset, sigma
    interpolated linearly in t as diffusers' EulerDiscreteScheduler does."""
    t = spaced_timesteps(ds, n)
    return _append_zero(np.interp(t, np.arange(len(ds.sigmas)), ds.sigmas))


def karras(ds: DiscreteSchedule, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: uniform in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = ds.sigma_min ** (1 / rho), ds.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(ds: DiscreteSchedule, n: int) -> np.ndarray:
    """Uniform in log-sigma (k-diffusion `get_sigmas_exponential`)."""
    return _append_zero(np.exp(np.linspace(math.log(ds.sigma_max), math.log(ds.sigma_min), n)))


def sgm_uniform(ds: DiscreteSchedule, n: int) -> np.ndarray:
    """Uniform in t over [t_max, t_min) as SGM/SDXL-Turbo sample (ComfyUI `sgm_uniform`)."""
    t = np.linspace(len(ds.sigmas) - 1, 0, n + 1)[:-1]
    return _append_zero(ds.t_to_sigma_log(t))


def simple(ds: DiscreteSchedule, n: int) -> np.ndarray:
    """Every (T/n)-th training sigma from the top (ComfyUI `simple`)."""
    stride = len(ds.sigmas) / n
    return _append_zero(np.array([ds.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def lcm(ds: DiscreteSchedule, n: int, original_steps: int = 50) -> np.ndarray:
    """Latent Consistency Models' skipping schedule: n of the distillation's `original_steps`
    timesteps (Luo et al. 2023; diffusers LCMScheduler)."""
    total = len(ds.sigmas)
    if n > original_steps:
        raise UsageError(f"the lcm schedule has at most {original_steps} steps (got {n})")
    origin = (np.arange(1, original_steps + 1) * (total // original_steps) - 1)[::-1]
    t = origin[np.floor(np.linspace(0, original_steps, n, endpoint=False)).astype(int)]
    return _append_zero(ds.sigmas[t])


SCHEDULES: dict[str, Callable[[DiscreteSchedule, int], np.ndarray]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "lcm": lcm,
}


def get_sigmas(name: str, ds: DiscreteSchedule, steps: int) -> np.ndarray:
    if name not in SCHEDULES:
        raise UsageError(f"unknown schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")
    if steps < 1:
        raise UsageError(f"steps must be at least 1 (got {steps})")
    return SCHEDULES[name](ds, steps)

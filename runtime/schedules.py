"""Noise schedules: pure functions that return a descending array of sigmas ending in 0.

For the discrete-time models (SD 1.x/2.x/XL) sigmas are in the variance-exploding convention of
k-diffusion (x = x0 + sigma * eps), sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t); for the
rectified-flow models (SD3, Flux) sigma is the flow time in (0, 1] (x = (1 - sigma) x0 + sigma
eps), after the model's flow shift. Each model's training discretization is a `DiscreteSchedule`
or a `FlowSchedule`; the schedules below take either.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from edgediff.errors import PackageError, UsageError


class _SigmaRange:
    sigmas: np.ndarray  # sigma at each training timestep, ascending

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


@dataclass(frozen=True)
class DiscreteSchedule(_SigmaRange):
    """The model's training discretization, read from its scheduler config."""

    sigmas: np.ndarray  # sigma(t) for t = 0 .. T-1, ascending (float64)
    alphas_cumprod: np.ndarray
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> DiscreteSchedule:
        """Betas as diffusers computes them (float32 torch.linspace, float32 cumprod)."""
        if config.get("trained_betas") is None and not {"beta_start", "beta_end"} <= set(config):
            raise PackageError(f"scheduler config {dict(config)!r} has no beta_start/beta_end (nor trained_betas): "
                               "it says nothing of the model's noise schedule; re-convert the model")
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

    def sigma_to_t(self, sigma: float) -> float:
        """Fractional timestep by interpolation in log-sigma (k-diffusion, diffusers `_sigma_to_t`)."""
        log_sigmas = np.log(self.sigmas)
        log_sigma = math.log(max(sigma, 1e-10))
        low = int(np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2))
        w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
        w = min(max(w, 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)

    def normal(self, n: int) -> np.ndarray:
        """The config's timestep spacing and offset, sigma interpolated linearly in t as
        diffusers' EulerDiscreteScheduler does."""
        t = spaced_timesteps(self, n)
        return _append_zero(np.interp(t, np.arange(len(self.sigmas)), self.sigmas))

    def at_size(self, tokens: int) -> DiscreteSchedule:
        return self

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        """sigma at fractional t, interpolating log-sigma (k-diffusion, ComfyUI)."""
        t = np.clip(np.asarray(t, dtype=np.float64), 0, len(self.sigmas) - 1)
        low = np.floor(t).astype(int)
        high = np.ceil(t).astype(int)
        w = t - low
        log_sigmas = np.log(self.sigmas)
        return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


@dataclass(frozen=True)
class FlowSchedule(_SigmaRange):
    """A rectified-flow model's time: sigma = shift(t / T), the model's timestep sigma * T
    (diffusers' FlowMatchEulerDiscreteScheduler). The shift is fixed (SD3: 3.0; Flux schnell:
    none) or, with `dynamic`, exp(mu) / (exp(mu) + 1/sigma - 1) with mu linear in the image's
    token count (Flux dev), so a schedule is drawn `at_size` of the image."""

    shift: float = 1.0
    train_steps: int = 1000
    dynamic: tuple[float, float, int, int] | None = None  # base shift, max shift, base tokens, max tokens
    mu: float | None = None
    # `normal` spaces the unshifted sigmas from 1 to this end: the scheduler's smallest sigma
    # ('min', diffusers' default, SD3) or 1/steps ('last_step', as FluxPipeline passes them)
    normal_end: str = "min"

    @classmethod
    def from_config(cls, config: Mapping[str, object], normal_end: str = "min") -> FlowSchedule:
        dynamic = None
        if config.get("use_dynamic_shifting"):
            dynamic = (float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15)),
                       int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096)))
        return cls(shift=float(config.get("shift", 1.0)), train_steps=int(config.get("num_train_timesteps", 1000)),
                   dynamic=dynamic, normal_end=normal_end)

    def at_size(self, tokens: int) -> FlowSchedule:
        """The schedule for an image of `tokens` denoiser tokens (dynamic shifting's mu)."""
        if self.dynamic is None:
            return self
        base, top, base_len, max_len = self.dynamic
        mu = base + (top - base) / (max_len - base_len) * (tokens - base_len)
        return replace(self, mu=mu)

    def shifted(self, sigma) -> np.ndarray:
        sigma = np.asarray(sigma, dtype=np.float64)
        if self.dynamic is not None:
            if self.mu is None:
                raise UsageError("this model shifts its schedule by image size; draw it at_size(tokens)")
            with np.errstate(divide="ignore"):
                return math.exp(self.mu) / (math.exp(self.mu) + (1 / sigma - 1))
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    @property
    def sigmas(self) -> np.ndarray:
        """sigma at each training timestep, ascending."""
        return self.shifted(np.arange(1, self.train_steps + 1) / self.train_steps)

    def sigma_to_t(self, sigma: float) -> float:
        return sigma * self.train_steps

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        return self.shifted(np.asarray(t, dtype=np.float64) / self.train_steps)

    def normal(self, n: int) -> np.ndarray:
        unshifted_min = self.sigma_min if self.dynamic is None else 1 / self.train_steps
        end = 1 / n if self.normal_end == "last_step" else unshifted_min
        return _append_zero(self.shifted(np.linspace(1.0, end, n)))


@dataclass(frozen=True)
class ContinuousSchedule(_SigmaRange):
    """EDM's continuous sigmas between the config's sigma_min and sigma_max (Stable Video
    Diffusion: 0.002 to 700); the model's timestep is c_noise = ln(sigma) / 4 (Karras et al.
    2022, table 1; diffusers' EulerDiscreteScheduler with timestep_type 'continuous'). Its own
    spacing is Karras's; the schedules that pick training sigmas pick from 1000 spaced evenly in
    log-sigma."""

    low: float = 0.002
    high: float = 700.0

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> ContinuousSchedule:
        return cls(float(config.get("sigma_min") or 0.002), float(config.get("sigma_max") or 700.0))

    @property
    def sigmas(self) -> np.ndarray:
        return np.exp(np.linspace(math.log(self.low), math.log(self.high), 1000))

    @property
    def sigma_min(self) -> float:
        return self.low

    @property
    def sigma_max(self) -> float:
        return self.high

    def sigma_to_t(self, sigma: float) -> float:
        return 0.25 * math.log(max(sigma, 1e-10))

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        return np.exp(4 * np.asarray(t, dtype=np.float64))

    def normal(self, n: int) -> np.ndarray:
        return karras(self, n)

    def at_size(self, tokens: int) -> ContinuousSchedule:
        return self


Schedule = DiscreteSchedule | FlowSchedule | ContinuousSchedule


def model_schedule(config: Mapping[str, object], prediction: str, normal_end: str = "min") -> Schedule:
    """The training discretization of a model with this scheduler config and prediction."""
    if prediction == "flow":
        return FlowSchedule.from_config(config, normal_end)
    if config.get("timestep_type") == "continuous":
        if prediction != "v":
            raise PackageError(f"scheduler config: continuous timesteps with {prediction} prediction; edgediff runs "
                               "them for v-prediction (EDM, Stable Video Diffusion) only")
        return ContinuousSchedule.from_config(config)
    return DiscreteSchedule.from_config(config)


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


def normal(ds: Schedule, n: int) -> np.ndarray:
    """The model's own discretization, as its diffusers scheduler draws it."""
    return ds.normal(n)


def karras(ds: Schedule, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: uniform in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = ds.sigma_min ** (1 / rho), ds.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(ds: Schedule, n: int) -> np.ndarray:
    """Uniform in log-sigma (k-diffusion `get_sigmas_exponential`)."""
    return _append_zero(np.exp(np.linspace(math.log(ds.sigma_max), math.log(ds.sigma_min), n)))


def sgm_uniform(ds: Schedule, n: int) -> np.ndarray:
    """Uniform in t over [t_max, t_min) as SGM/SDXL-Turbo sample (ComfyUI `sgm_uniform`)."""
    t = np.linspace(ds.sigma_to_t(ds.sigma_max), ds.sigma_to_t(ds.sigma_min), n + 1)[:-1]
    return _append_zero(ds.t_to_sigma(t))


def simple(ds: Schedule, n: int) -> np.ndarray:
    """Every (T/n)-th training sigma from the top (ComfyUI `simple`)."""
    stride = len(ds.sigmas) / n
    return _append_zero(np.array([ds.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def beta(ds: Schedule, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Training sigmas at the Beta(0.6, 0.6) quantiles, dense at both ends of the schedule
    (ComfyUI `beta`, after Lee et al. 2024, "Beta Sampling is All You Need"); a timestep drawn
    twice in a row is taken once, as ComfyUI does."""
    top = len(ds.sigmas) - 1
    t = np.rint(np.array([_beta_ppf(q, a, b) for q in 1 - np.linspace(0, 1, n, endpoint=False)]) * top).astype(int)
    t = t[np.r_[True, t[1:] != t[:-1]]]
    return _append_zero(ds.sigmas[t])


def _beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile, by bisection of its distribution function (scipy's
    `beta.ppf` without scipy)."""
    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _beta_cdf(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz), on the side of the mean where it converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _beta_cdf(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1 / (1 - (a + b) * x / (a + 1) or tiny)
    h = d
    for m in range(1, 500):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / (1 + coef * d or tiny)
            c = 1 + coef / c or tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return front * h / a


def lcm(ds: Schedule, n: int, original_steps: int = 50) -> np.ndarray:
    """Latent Consistency Models' skipping schedule: n of the distillation's `original_steps`
    timesteps (Luo et al. 2023; diffusers LCMScheduler)."""
    total = len(ds.sigmas)
    if n > original_steps:
        raise UsageError(f"the lcm schedule has at most {original_steps} steps (got {n})")
    origin = (np.arange(1, original_steps + 1) * (total // original_steps) - 1)[::-1]
    t = origin[np.floor(np.linspace(0, original_steps, n, endpoint=False)).astype(int)]
    return _append_zero(ds.sigmas[t])


SCHEDULES: dict[str, Callable[[Schedule, int], np.ndarray]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "beta": beta,
    "lcm": lcm,
}


# A1111's scheduler names that are not edgediff's spelled another way (None: the model's own)
A1111_ALIASES: dict[str, str | None] = {"uniform": "normal", "automatic": None}


def resolve_schedule(name: str) -> str | None:
    """edgediff's or A1111's spelling of a schedule -> edgediff's ('SGM Uniform' -> 'sgm_uniform',
    'Uniform' -> 'normal'), or None for A1111's 'Automatic' (the model's default)."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    if key in SCHEDULES:
        return key
    if key in A1111_ALIASES:
        return A1111_ALIASES[key]
    near = difflib.get_close_matches(key, [*SCHEDULES, *A1111_ALIASES], n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise UsageError(f"unknown schedule '{name}'; {hint}choose one of: {', '.join(SCHEDULES)} "
                     "(A1111's names also work: 'Karras', 'SGM Uniform')")


def get_sigmas(name: str, ds: Schedule, steps: int) -> np.ndarray:
    if name not in SCHEDULES:
        resolve_schedule(name)  # raises, with what was meant
        raise UsageError(f"unknown schedule '{name}': edgediff calls it '{resolve_schedule(name)}'")
    if steps < 1:
        raise UsageError(f"steps must be at least 1 (got {steps})")
    if isinstance(ds, DiscreteSchedule) and steps > len(ds.sigmas):
        raise UsageError(f"{steps} steps are more than the model's {len(ds.sigmas)} training timesteps "
                         "(the schedule would repeat them); use fewer steps")
    return SCHEDULES[name](ds, steps)

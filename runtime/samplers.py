"""Samplers: pure functions `(model, x, sigmas, rng, callback) -> x` in the k-diffusion style.

`model(x, sigma)` returns the denoised estimate x0; `sigmas` descend and end in 0; `rng` has
`randn(shape)` (a TorchGenerator, so stochastic samplers draw the same noise diffusers'
schedulers draw); `callback(i, x, denoised)` is called once per step. Nothing here knows about
models, prediction types or progress bars: the model's `space` (see denoiser.LatentSpace) says
how a clean latent and noise mix, x = alpha(sigma) x0 + sigma n, and the solvers are written for
any alpha (DPM-Solver's lambda = log(alpha / sigma)); a plain function is variance-exploding.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from edgediff.errors import UsageError
from edgediff.runtime.denoiser import VE, LatentSpace

Model = Callable[[np.ndarray, float], np.ndarray]
Callback = Callable[[int, np.ndarray, np.ndarray], None] | None


def _step_done(callback: Callback, i: int, x: np.ndarray, denoised: np.ndarray) -> None:
    if callback is not None:
        callback(i, x, denoised)


def sample_euler(model: Model, x, sigmas, rng=None, callback: Callback = None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        _step_done(callback, i, x, denoised)
    return x


def _space(model: Model) -> LatentSpace:
    return getattr(model, "space", VE)


def _lambda(space: LatentSpace, sigma: float) -> float:
    """log(alpha / sigma), the solvers' time (-inf at flow's sigma = 1, where alpha is 0)."""
    alpha = space.alpha(sigma)
    return math.log(alpha / sigma) if alpha > 0 else -math.inf


def sample_euler_a(model: Model, x, sigmas, rng, callback: Callback = None, eta: float = 1.0):
    """Ancestral Euler (k-diffusion `sample_euler_ancestral`; diffusers EulerAncestralDiscrete):
    an Euler move to sigma_down, then fresh noise as the model's space mixes it."""
    space = _space(model)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, scale, noise_scale = space.ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = scale * x + rng.randn(x.shape) * noise_scale
        _step_done(callback, i, x, denoised)
    return x


def sample_heun(model: Model, x, sigmas, rng=None, callback: Callback = None):
    """Heun's 2nd-order method (Karras et al. 2022, algorithm 1); Euler on the last step to 0."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1])
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        _step_done(callback, i, x, denoised)
    return x


def sample_ddim(model: Model, x, sigmas, rng=None, callback: Callback = None):
    """DDIM with eta = 0 (Song et al. 2021, eq. 12): x' = alpha' x0 + sigma' eps."""
    space = _space(model)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        eps = (x - space.alpha(sigmas[i]) * denoised) / sigmas[i]
        x = space.alpha(sigmas[i + 1]) * denoised + sigmas[i + 1] * eps
        _step_done(callback, i, x, denoised)
    return x


def sample_dpmpp_2m(model: Model, x, sigmas, rng=None, callback: Callback = None):
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2); first order on the first and last step."""
    space = _space(model)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _lambda(space, sigmas[i + 1]) - _lambda(space, sigmas[i])
            if old_denoised is None:
                d = denoised
            else:
                r = (_lambda(space, sigmas[i]) - _lambda(space, sigmas[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - space.alpha(sigmas[i + 1]) * math.expm1(-h) * d
        old_denoised = denoised
        _step_done(callback, i, x, denoised)
    return x


def sample_dpmpp_2m_sde(model: Model, x, sigmas, rng, callback: Callback = None, eta: float = 1.0):
    """SDE-DPM-Solver++(2M), midpoint variant (Lu et al. 2022; k-diffusion `sample_dpmpp_2m_sde`).

    Noise is drawn from `rng` once per step, as diffusers' DPMSolverMultistepScheduler does with
    algorithm_type="sde-dpmsolver++", instead of k-diffusion's Brownian tree.
    """
    space = _space(model)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _lambda(space, sigmas[i + 1]) - _lambda(space, sigmas[i])
            eta_h = eta * h
            alpha = space.alpha(sigmas[i + 1])
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x - alpha * math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * alpha * math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = rng.randn(x.shape)
                x = x + noise * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old_denoised = denoised
        _step_done(callback, i, x, denoised)
    return x


def _unipc_coefficients(
    hist_lambdas: Sequence[float], lambda_s0: float, h: float, order: int
) -> tuple[list[float], np.ndarray, np.ndarray, float, float]:
    """rks, R, b, h*phi_1 and B(h) of UniPC's bh2 variant (Zhao et al. 2023, algorithm 2)."""
    rks = [(lam - lambda_s0) / h for lam in hist_lambdas]
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = math.expm1(hh)
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return rks, np.array(rows), np.array(b), h_phi_1, b_h


def sample_unipc(model: Model, x, sigmas, rng=None, callback: Callback = None, order: int = 2):
    """UniPC, data-prediction bh2 form with corrector on every step but the last
    (Zhao et al. 2023; diffusers UniPCMultistepScheduler defaults, lower order at the start and
    end). A point where lambda is -inf (flow's sigma = 1) is never a multistep term."""
    space = _space(model)
    n = len(sigmas) - 1
    hist: list[tuple[float, np.ndarray]] = []  # (lambda, x0) of past model evaluations
    last_x, last_order = None, 1
    for i in range(n):
        lam = _lambda(space, sigmas[i])
        denoised = model(x, sigmas[i])
        if i > 0:  # corrector: redo the step sigmas[i-1] -> sigmas[i] with the new x0
            l0, m0 = hist[-1]
            h = lam - l0
            past = hist[-last_order:-1][::-1]
            rks, rows, b, h_phi_1, b_h = _unipc_coefficients([p for p, _ in past], l0, h, last_order)
            rhos = [0.5] if last_order == 1 else list(np.linalg.solve(rows, b))
            x = sigmas[i] / sigmas[i - 1] * last_x - space.alpha(sigmas[i]) * h_phi_1 * m0
            corr = sum(rho * (m - m0) / rk for rho, rk, (_, m) in zip(rhos[:-1], rks, past, strict=False))
            x = x - space.alpha(sigmas[i]) * b_h * (corr + rhos[-1] * (denoised - m0))
        hist.append((lam, denoised))
        hist = hist[-order:]
        finite = sum(1 for p, _ in hist[:-1] if p > -math.inf)
        this_order = min(order, n - i, i + 1, finite + 1)
        last_x, last_order = x, this_order
        if sigmas[i + 1] == 0:
            x = denoised
        else:  # predictor
            h = _lambda(space, sigmas[i + 1]) - lam
            alpha = space.alpha(sigmas[i + 1])
            past = hist[-this_order:-1][::-1]
            rks, rows, b, h_phi_1, b_h = _unipc_coefficients([p for p, _ in past], lam, h, this_order)
            x = sigmas[i + 1] / sigmas[i] * x - alpha * h_phi_1 * denoised
            if past:
                rhos = [0.5] if this_order == 2 else list(np.linalg.solve(rows[:-1, :-1], b[:-1]))
                x = x - alpha * b_h * sum(rho * (m - denoised) / rk
                                          for rho, rk, (_, m) in zip(rhos, rks, past, strict=False))
        x = x.astype(np.float32)
        _step_done(callback, i, x, denoised)
    return x


def sample_lcm(model: Model, x, sigmas, rng, callback: Callback = None):
    """Latent Consistency Model sampling (Luo et al. 2023, algorithm 1): jump to x0, re-noise to
    the next sigma with fresh noise (ComfyUI `sample_lcm`; diffusers LCMScheduler without its
    c_skip/c_out boundary terms, which are < 1e-5 at the timesteps LCM uses)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            x = _space(model).mix(denoised, sigmas[i + 1], rng.randn(x.shape))
        _step_done(callback, i, x, denoised)
    return x


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}

# The names A1111 writes in its "parameters" text (so files read back in other tools).
A1111_NAMES = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC", "lcm": "LCM",
}


def _key(name: str) -> str:
    """A spelling with case, spaces, '_', '-' and a k_ prefix dropped, '++' as 'pp': 'DPM++ 2M',
    'dpm++2m' and 'k_dpmpp_2m' are one key."""
    key = name.strip().lower()
    return re.sub(r"[\s_-]", "", key.removeprefix("k_").replace("++", "pp"))


SPELLINGS = {_key(k): k for k in SAMPLERS} | {_key(v): k for k, v in A1111_NAMES.items()}


def sampler_list() -> str:
    return ", ".join(f"{k} ({A1111_NAMES[k]})" for k in SAMPLERS)


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """edgediff's or A1111's spelling of a sampler -> (edgediff's sampler, the schedule the name
    carries or None): 'euler_a', 'Euler a', 'dpm++2m', 'DPM++ 2M Karras' -> ('dpmpp_2m', 'karras')."""
    from edgediff.runtime.schedules import SCHEDULES

    key = _key(name)
    if key in SPELLINGS:
        return SPELLINGS[key], None
    for schedule in SCHEDULES:  # A1111's older names end in the schedule: "DPM++ 2M Karras"
        tail = _key(schedule)
        if key.endswith(tail) and key[:-len(tail)] in SPELLINGS:
            return SPELLINGS[key[:-len(tail)]], schedule
    near = list(dict.fromkeys(SPELLINGS[k] for k in difflib.get_close_matches(key, SPELLINGS, n=3, cutoff=0.6)))
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise UsageError(f"unknown sampler '{name}'; {hint}choose one of: {sampler_list()} "
                     "(A1111's names also work, with a schedule: 'DPM++ 2M Karras')")


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        resolved, schedule = resolve_sampler(name)  # raises for a name nobody uses
        also = f" with schedule '{schedule}'" if schedule else ""
        raise UsageError(f"unknown sampler '{name}': edgediff calls it '{resolved}'{also}")
    return SAMPLERS[name]

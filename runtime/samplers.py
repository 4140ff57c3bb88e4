"""Samplers: pure functions `(model, x, sigmas, rng, callback) -> x` in the k-diffusion style.

`model(x, sigma)` returns the denoised estimate x0; `sigmas` descend and end in 0; `rng` has
`randn(shape)` (a TorchGenerator, so stochastic samplers draw the same noise diffusers'
schedulers draw); `callback(i, x, denoised)` is called once per step. Nothing here knows about
models, prediction types or progress bars.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from edgediff.errors import UsageError

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


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic move to sigma_down and fresh noise of sigma_up."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def sample_euler_a(model: Model, x, sigmas, rng, callback: Callback = None, eta: float = 1.0):
    """Ancestral Euler (k-diffusion `sample_euler_ancestral`; diffusers EulerAncestralDiscrete)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + rng.randn(x.shape) * sigma_up
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
    """DDIM with eta = 0 (Song et al. 2021, eq. 12), written in sigma space: x' = x0 + sigma' * eps."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        eps = (x - denoised) / sigmas[i]
        x = denoised + sigmas[i + 1] * eps
        _step_done(callback, i, x, denoised)
    return x


def sample_dpmpp_2m(model: Model, x, sigmas, rng=None, callback: Callback = None):
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2); first order on the first and last step."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            if old_denoised is None:
                d = denoised
            else:
                r = math.log(sigmas[i - 1] / sigmas[i]) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
        _step_done(callback, i, x, denoised)
    return x


def sample_dpmpp_2m_sde(model: Model, x, sigmas, rng, callback: Callback = None, eta: float = 1.0):
    """SDE-DPM-Solver++(2M), midpoint variant (Lu et al. 2022; k-diffusion `sample_dpmpp_2m_sde`).

    Noise is drawn from `rng` once per step, as diffusers' DPMSolverMultistepScheduler does with
    algorithm_type="sde-dpmsolver++", instead of k-diffusion's Brownian tree.
    """
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = rng.randn(x.shape)
                x = x + noise * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old_denoised = denoised
        _step_done(callback, i, x, denoised)
    return x


def _unipc_coefficients(
    hist_sigmas: Sequence[float], sigma_s0: float, h: float, order: int
) -> tuple[list[float], np.ndarray, np.ndarray, float, float]:
    """rks, R, b, h*phi_1 and B(h) of UniPC's bh2 variant (Zhao et al. 2023, algorithm 2)."""
    rks = [math.log(sigma_s0 / s) / h for s in hist_sigmas]  # (lambda_si - lambda_s0) / h
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
    end). Written in sigma space, where alpha = 1 and lambda = -log(sigma)."""
    n = len(sigmas) - 1
    hist: list[tuple[float, np.ndarray]] = []  # (sigma, x0) of past model evaluations
    last_x, last_order = None, 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        if i > 0:  # corrector: redo the step sigmas[i-1] -> sigmas[i] with the new x0
            s0, m0 = hist[-1]
            h = math.log(s0 / sigmas[i])
            past = hist[-last_order:-1][::-1]
            rks, rows, b, h_phi_1, b_h = _unipc_coefficients([s for s, _ in past], s0, h, last_order)
            rhos = [0.5] if last_order == 1 else list(np.linalg.solve(rows, b))
            x = sigmas[i] / s0 * last_x - h_phi_1 * m0
            corr = sum(rho * (m - m0) / rk for rho, rk, (_, m) in zip(rhos[:-1], rks, past, strict=False))
            x = x - b_h * (corr + rhos[-1] * (denoised - m0))
        hist.append((sigmas[i], denoised))
        hist = hist[-order:]
        this_order = min(order, n - i, i + 1)
        last_x, last_order = x, this_order
        if sigmas[i + 1] == 0:
            x = denoised
        else:  # predictor
            h = math.log(sigmas[i] / sigmas[i + 1])
            past = hist[-this_order:-1][::-1]
            rks, rows, b, h_phi_1, b_h = _unipc_coefficients([s for s, _ in past], sigmas[i], h, this_order)
            x = sigmas[i + 1] / sigmas[i] * x - h_phi_1 * denoised
            if past:
                rhos = [0.5] if this_order == 2 else list(np.linalg.solve(rows[:-1, :-1], b[:-1]))
                x = x - b_h * sum(rho * (m - denoised) / rk for rho, rk, (_, m) in zip(rhos, rks, past, strict=False))
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
            x = x + sigmas[i + 1] * rng.randn(x.shape)
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


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]

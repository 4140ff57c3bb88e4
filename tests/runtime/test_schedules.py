"""Schedules against diffusers' schedulers and direct NumPy references of their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgediff.errors import UsageError
from edgediff.runtime.schedules import DiscreteSchedule, get_sigmas

CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "num_train_timesteps": 1000, "steps_offset": 1}


def _ds(spacing="leading"):
    return DiscreteSchedule.from_config({**CONFIG, "timestep_spacing": spacing})


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 4, 7, 20, 50])
def test_normal_matches_diffusers_euler(spacing, steps):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**CONFIG, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    np.testing.assert_allclose(get_sigmas("normal", _ds(spacing), steps), ref.sigmas.numpy(), rtol=1e-5)  # float32 betas


@pytest.mark.parametrize("steps", [2, 10, 25])
def test_karras_and_exponential_match_diffusers(steps):
    from diffusers import EulerDiscreteScheduler

    for kind in ("karras", "exponential"):
        ref = EulerDiscreteScheduler(**CONFIG, timestep_spacing="linspace", **{f"use_{kind}_sigmas": True})
        ref.set_timesteps(steps)
        np.testing.assert_allclose(get_sigmas(kind, _ds(), steps), ref.sigmas.numpy(), rtol=2e-5)


def test_sgm_uniform_and_simple_follow_comfyui():
    ds = _ds()
    log_sigmas = np.log(ds.sigmas)
    t = np.linspace(999, 0, 5)[:-1]  # ComfyUI normal_scheduler(sgm=True)
    expected = [math.exp(np.interp(v, np.arange(1000), log_sigmas)) for v in t] + [0.0]
    np.testing.assert_allclose(get_sigmas("sgm_uniform", ds, 4), expected, rtol=1e-12)
    expected = [ds.sigmas[-(1 + int(i * 1000 / 4))] for i in range(4)] + [0.0]  # simple_scheduler
    np.testing.assert_allclose(get_sigmas("simple", ds, 4), expected)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_schedule_matches_diffusers_timesteps(steps):
    from diffusers import LCMScheduler

    ref = LCMScheduler(**CONFIG)
    ref.set_timesteps(steps)
    ds = _ds()
    np.testing.assert_allclose(get_sigmas("lcm", ds, steps)[:-1], ds.sigmas[ref.timesteps.numpy()])


def test_all_schedules_descend_to_zero():
    for name in ("normal", "karras", "exponential", "sgm_uniform", "simple", "lcm"):
        s = get_sigmas(name, _ds(), 9)
        assert s[-1] == 0 and np.all(np.diff(s) < 0), name


def test_sigma_to_t_inverts_the_table():
    ds = _ds()
    for t in (0, 1, 250, 500.5, 998.25, 999):
        sigma = float(ds.t_to_sigma_log(np.array(t)))
        assert ds.sigma_to_t(sigma) == pytest.approx(t, abs=1e-6)


def test_bad_names_and_steps():
    with pytest.raises(UsageError, match="unknown schedule 'fast'"):
        get_sigmas("fast", _ds(), 4)
    with pytest.raises(UsageError, match="at least 1"):
        get_sigmas("normal", _ds(), 0)

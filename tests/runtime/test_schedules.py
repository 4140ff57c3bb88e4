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


@pytest.mark.parametrize(("a", "b", "exact"), [
    (0.5, 0.5, lambda q: math.sin(math.pi * q / 2) ** 2),  # the arcsine distribution
    (1.0, 1.0, lambda q: q),
    (2.0, 1.0, math.sqrt),
    (1.0, 2.0, lambda q: 1 - math.sqrt(1 - q)),
])
def test_beta_quantiles_match_closed_forms(a, b, exact):
    from edgediff.runtime.schedules import _beta_ppf

    for q in (1e-4, 0.05, 0.3, 0.5, 0.61, 0.93, 1 - 1e-4):
        assert _beta_ppf(q, a, b) == pytest.approx(exact(q), abs=1e-12)


def test_beta_schedule_follows_comfyui():
    """ComfyUI beta_scheduler: rint(ppf(1 - i/n) * 999) indexes the sigma table; repeats dropped."""
    from edgediff.runtime.schedules import _beta_ppf

    ds = _ds()
    t = [round(_beta_ppf(1 - i / 10, 0.6, 0.6) * 999) for i in range(10)]
    np.testing.assert_array_equal(get_sigmas("beta", ds, 10), [*ds.sigmas[t], 0.0])
    assert t[0] == 999 and len(get_sigmas("beta", ds, 1000)) < 1001  # repeats at the dense ends go


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_schedule_matches_diffusers_timesteps(steps):
    from diffusers import LCMScheduler

    ref = LCMScheduler(**CONFIG)
    ref.set_timesteps(steps)
    ds = _ds()
    np.testing.assert_allclose(get_sigmas("lcm", ds, steps)[:-1], ds.sigmas[ref.timesteps.numpy()])


def test_all_schedules_descend_to_zero():
    for name in ("normal", "karras", "exponential", "sgm_uniform", "simple", "beta", "lcm"):
        s = get_sigmas(name, _ds(), 9)
        assert s[-1] == 0 and np.all(np.diff(s) < 0), name


def test_sigma_to_t_inverts_the_table():
    ds = _ds()
    for t in (0, 1, 250, 500.5, 998.25, 999):
        sigma = float(ds.t_to_sigma(np.array(t)))
        assert ds.sigma_to_t(sigma) == pytest.approx(t, abs=1e-6)


def test_bad_names_and_steps():
    with pytest.raises(UsageError, match="unknown schedule 'fast'"):
        get_sigmas("fast", _ds(), 4)
    with pytest.raises(UsageError, match="at least 1"):
        get_sigmas("normal", _ds(), 0)


FLOW = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_normal_matches_diffusers_flow_match_euler(steps):
    """SD3's fixed shift (diffusers' default spacing), and Flux dev's shift by image size with
    FluxPipeline's spacing (it passes linspace(1, 1/steps) and mu from the token count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from edgediff.runtime.schedules import FlowSchedule

    ref = FlowMatchEulerDiscreteScheduler(**FLOW)
    ref.set_timesteps(steps)
    ours = get_sigmas("normal", FlowSchedule.from_config(FLOW), steps)
    np.testing.assert_allclose(ours, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)  # float32 in diffusers
    tokens = 64 * 48
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    flux = FlowSchedule.from_config(FLUX_DEV, normal_end="last_step").at_size(tokens)
    np.testing.assert_allclose(get_sigmas("normal", flux, steps), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    assert flux.sigma_to_t(0.5) == 500.0


def test_flow_schedules_descend_from_one_to_zero():
    from edgediff.runtime.schedules import FlowSchedule

    for ds in (FlowSchedule.from_config(FLOW), FlowSchedule(), FlowSchedule.from_config(FLUX_DEV).at_size(1024)):
        for name in ("normal", "karras", "exponential", "sgm_uniform", "simple"):
            s = get_sigmas(name, ds, 9)
            assert s[-1] == 0 and np.all(np.diff(s) < 0) and s[0] <= 1.0, name
        assert get_sigmas("simple", ds, 4)[0] == 1.0


def test_dynamic_shift_needs_the_image_size():
    from edgediff.runtime.schedules import FlowSchedule

    with pytest.raises(UsageError, match="at_size"):
        get_sigmas("normal", FlowSchedule.from_config(FLUX_DEV), 4)


def test_more_steps_than_training_timesteps_are_refused():
    ds = DiscreteSchedule.from_config(CONFIG)
    assert len(get_sigmas("normal", ds, 1000)) == 1001
    with pytest.raises(UsageError, match="2000 steps are more than the model's 1000 training timesteps"):
        get_sigmas("normal", ds, 2000)


def test_a_scheduler_config_without_betas_is_refused():
    from edgediff.errors import PackageError

    with pytest.raises(PackageError, match="no beta_start/beta_end"):
        DiscreteSchedule.from_config({})


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_continuous_edm_schedule_matches_diffusers_svd(steps):
    """Stable Video Diffusion's scheduler: Karras sigmas between its config's 0.002 and 700, and
    c_noise = ln(sigma) / 4 as the model's timestep (EulerDiscreteScheduler, 'continuous')."""
    pytest.importorskip("torch")
    from diffusers import EulerDiscreteScheduler

    from edgediff.runtime.schedules import ContinuousSchedule, model_schedule

    from tiny_models import SVD_SCHEDULER

    ref = EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
    ref.set_timesteps(steps)
    ds = model_schedule(SVD_SCHEDULER, "v")
    assert isinstance(ds, ContinuousSchedule)
    for name in ("normal", "karras"):
        sigmas = get_sigmas(name, ds, steps)
        np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6)
    t = [ds.sigma_to_t(s) for s in get_sigmas("karras", ds, steps)[:-1]]
    np.testing.assert_allclose(t, ref.timesteps.numpy(), rtol=1e-5)
    for name in ("exponential", "sgm_uniform", "simple", "beta"):  # every schedule runs on it
        sigmas = get_sigmas(name, ds, steps)
        assert sigmas[-1] == 0 and np.all(np.diff(sigmas) <= 0) and sigmas[0] <= 700.0 + 1e-6
    with pytest.raises(Exception, match="continuous timesteps with eps"):
        model_schedule(SVD_SCHEDULER, "eps")

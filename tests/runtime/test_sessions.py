"""Providers and component lifetime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgediff.errors import RuntimeFailure, UsageError
from edgediff.runtime import Pipeline
from edgediff.runtime.sessions import providers_for


def test_cpu_and_unknown_devices():
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        providers_for("tpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU is present")
def test_cuda_falls_back_to_cpu_with_a_warning(monkeypatch):
    import warnings

    from edgediff.runtime import sessions

    monkeypatch.setattr(sessions, "_FELL_BACK", set())
    with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        assert providers_for("cuda") == ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not once per component
        assert providers_for("cuda") == ["CPUExecutionProvider"]
    assert providers_for("auto") == ["CPUExecutionProvider"]


def test_components_are_released_after_use(tiny_package, monkeypatch):
    from edgediff.runtime.sessions import Component

    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    pipe.generate("a cat", steps=2, width=64, height=64, seed=0)
    assert pipe._components and all(c._session is None for c in pipe._components.values())
    runs = []  # the U-Net evaluations, counted where onnxruntime is called
    stock = Component.run
    monkeypatch.setattr(Component, "run", lambda self, feeds: runs.append(self.name) or stock(self, feeds))
    kept = Pipeline(tiny_package("sd1"), device="cpu", keep_loaded=True)
    kept.generate("a cat", steps=2, width=64, height=64, seed=0, sampler="euler")  # one evaluation a step
    assert all(c._session is not None for c in kept._components.values())
    assert kept.timings.load > 0 and len(kept.timings.steps) == runs.count("unet") == 2


def test_non_finite_output_names_the_component(tiny_package):
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    unet = pipe.component("unet")
    latent = np.full((1, 4, 8, 8), np.inf, np.float32)
    with pytest.raises(RuntimeFailure, match="the unet component produced NaN or Inf"):
        unet.run({"sample": latent, "timestep": np.ones(1, np.float32),
                  "encoder_hidden_states": np.zeros((1, 77, 64), np.float32),
                  **{i.name: np.zeros((1, i.shape[1], 1, 1), np.float32) for i in unet.session.get_inputs()
                     if "residual" in i.name}})  # no ControlNet


def test_split_guidance_gives_the_same_image(tiny_package):
    from reference import psnr

    args = dict(steps=3, width=64, height=64, seed=4)
    a = Pipeline(tiny_package("sd1"), device="cpu").generate("a cat", "dog", **args)
    b = Pipeline(tiny_package("sd1"), device="cpu", split_guidance=True).generate("a cat", "dog", **args)
    assert psnr(a, b) > 60


def test_an_onnxruntime_failure_names_the_component_and_its_inputs(tiny_package):
    from edgediff.errors import RuntimeFailure
    from edgediff.runtime.package import open_package
    from edgediff.runtime.sessions import SessionOptions

    comp = open_package(tiny_package("sd1")).component("vae_decoder", SessionOptions(device="cpu"))
    with pytest.raises(RuntimeFailure, match=r"vae_decoder component failed in onnxruntime .*latent_sample \[1, 4, 8\]"):
        comp.run({"latent_sample": np.zeros((1, 4, 8), np.float32)})  # a rank the graph does not take


def test_a_silent_cpu_fallback_is_reported_once(monkeypatch):
    from edgediff.runtime import sessions

    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(sessions, "providers_for", lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sessions, "_FELL_BACK", set())
    with pytest.warns(RuntimeWarning, match="asked for CUDAExecutionProvider but onnxruntime runs it on CPUExecutionProvider"):
        sessions._check_fallback(Session(), "cuda", "unet")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sessions._check_fallback(Session(), "cuda", "vae_decoder")  # once

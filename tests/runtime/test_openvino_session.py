"""OpenVINO behind the component interface: the same images as onnxruntime's CPU provider, the
precision contract (a package's precision is what runs; bf16 only when asked for, and only on
CPUs that compute it), and `auto`'s rule (installed, measured faster at f32) held to."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from edgediff.errors import MissingDependencyError, RuntimeFailure, UsageError
from edgediff.runtime import Pipeline, openvino_session, sessions

pytest.importorskip("openvino")  # in the test extra; skipped only where it has no wheel
ARGS = dict(steps=3, width=64, height=64, seed=4)
FLOORS = {"f32": 60.0, "bf16": 40.0}  # dB from onnxruntime's fp32 image, by OpenVINO's precision
HAS_BF16 = "BF16" in openvino_session.capabilities()


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux-schnell"])
def test_images_match_the_cpu_provider(tiny_package, family):
    """An fp32 package runs at f32 on OpenVINO too, on every CPU (BF16 ones included)."""
    from reference import psnr

    cpu = Pipeline(tiny_package(family), device="cpu").generate("a cat", "dog", **ARGS)
    pipe = Pipeline(tiny_package(family), device="openvino")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no component may fall back to onnxruntime
        image = pipe.generate("a cat", "dog", **ARGS)
    assert {c.runtime for c in pipe._components.values()} == {"openvino"}
    assert pipe.device.startswith("cpu openvino ") and pipe.device.endswith(" f32")
    # measured at f32 (AVX2 Zen 2): 89 dB for sd1 and sdxl, identical pixels for flux-schnell
    assert psnr(cpu, image) > FLOORS["f32"]
    assert f"Device: {pipe.device}" in image.info["parameters"]


@pytest.mark.skipif(not HAS_BF16, reason="bf16 runs only on CPUs with native BF16")
def test_bf16_when_asked_for(tiny_package):
    from reference import psnr

    cpu = Pipeline(tiny_package("sd1"), device="cpu").generate("a cat", "dog", **ARGS)
    pipe = Pipeline(tiny_package("sd1"), precision="bf16")
    image = pipe.generate("a cat", "dog", **ARGS)
    assert pipe.device.endswith(" bf16") and "Device: cpu openvino " in image.info["parameters"]
    # measured in bf16 (AVX-512 BF16 Zen 4): 44.1 dB for sd1 (45.0 sdxl, 49.6 flux-schnell)
    assert FLOORS["bf16"] < psnr(cpu, image) < FLOORS["f32"]  # a lower precision, as asked


def test_bf16_is_refused_without_it(tiny_package, monkeypatch):
    monkeypatch.setattr(openvino_session, "capabilities", lambda: ("FP32", "INT8"))
    with pytest.raises(UsageError, match="this CPU has no native bf16 .*leave --precision out"):
        Pipeline(tiny_package("sd1"), precision="bf16")
    with pytest.raises(UsageError, match="bf16 runs on OpenVINO on the CPU, not with --device cpu"):
        Pipeline(tiny_package("sd1"), device="cpu", precision="bf16")
    with pytest.raises(UsageError, match="unknown --precision 'fp8'"):
        Pipeline(tiny_package("sd1"), precision="fp8")


def test_compiled_models_are_kept_in_the_cache(tiny_package):
    Pipeline(tiny_package("sd1"), device="openvino").generate("a cat", **ARGS)
    assert any(p.suffix == ".blob" for p in openvino_session.cache_dir().rglob("*"))


def test_a_gguf_package_runs_on_onnxruntime_with_a_warning(tmp_path, tiny_source):
    from edgediff.convert import convert

    path = tmp_path / "sd1.gguf"
    convert(tiny_source("sd1"), path, precision="q8_0")
    sessions._FELL_BACK.clear()
    with pytest.warns(RuntimeWarning, match="runs on onnxruntime's CPU provider, not OpenVINO: its weights are bound") as said:
        pipe = Pipeline(path, device="openvino")
        pipe.generate("a cat", **ARGS)
    assert len([w for w in said if "not OpenVINO" in str(w.message)]) == 1  # one warning, not one per component
    assert {c.runtime for c in pipe._components.values()} == {"onnxruntime"}


def test_a_failed_run_names_openvino(tiny_package):
    comp = Pipeline(tiny_package("sd1"), device="openvino").component("vae_decoder")
    with pytest.raises(RuntimeFailure, match=r"vae_decoder component failed in openvino .*latent_sample \[1, 4, 8\]"):
        comp.run({"latent_sample": np.zeros((1, 4, 8), np.float32)})


def test_missing_openvino_says_how_to_install(tiny_package, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgediff\[openvino\]'"):
        Pipeline(tiny_package("sd1"), device="openvino")


def test_the_probe_times_both_runtimes():
    ort_s, ov_s = openvino_session.measure(threads=1)
    assert ort_s > 0 and ov_s > 0


def test_auto_takes_openvino_only_when_measured_faster():
    prefer = openvino_session.prefer
    assert prefer(1.3, 1.0)
    assert not prefer(1.2, 1.0)  # below FASTER: not worth a second runtime
    assert not prefer(None, 1.0)


@pytest.fixture
def probe(monkeypatch):
    """auto's decision with OpenVINO's capabilities and the probe's timings under the test's control."""
    calls = []
    state = {"caps": ("FP32", "INT8"), "times": (2.0, 1.0)}
    monkeypatch.setattr(openvino_session, "capabilities", lambda: state["caps"])
    monkeypatch.setattr(openvino_session, "measure", lambda threads=None: calls.append(1) or state["times"])
    monkeypatch.delenv(openvino_session.AUTO_ENV, raising=False)  # conftest keeps auto off OpenVINO
    openvino_session.auto_picks.cache_clear()
    yield state, calls
    openvino_session.auto_picks.cache_clear()


def test_auto_on_openvino_runs_the_package_precision(probe, tiny_package):
    """On a BF16 CPU where OpenVINO measures faster, `auto` takes it at f32 for an fp32 package:
    the image is onnxruntime's (bf16 measured 45 dB from it; f32 89 dB)."""
    from reference import psnr

    state, calls = probe
    state["caps"] = ("FP32", "INT8", "BF16")
    openvino_session._probe_file().unlink(missing_ok=True)
    cpu = Pipeline(tiny_package("sd1"), device="cpu").generate("a cat", "dog", **ARGS)
    pipe = Pipeline(tiny_package("sd1"))
    image = pipe.generate("a cat", "dog", **ARGS)
    assert {c.runtime for c in pipe._components.values()} == {"openvino"} and pipe.device.endswith(" f32")
    assert psnr(cpu, image) > FLOORS["f32"]


def test_auto_can_be_kept_on_onnxruntime(probe, monkeypatch):
    state, calls = probe
    state["caps"] = ("FP32", "INT8", "BF16")
    monkeypatch.setenv(openvino_session.AUTO_ENV, "0")
    assert not sessions.uses_openvino("auto") and calls == []


def test_auto_measures_once_per_cpu_and_versions(probe, monkeypatch):
    from edgediff.runtime import graph_cache

    state, calls = probe
    openvino_session._probe_file().unlink(missing_ok=True)
    assert sessions.uses_openvino("auto") and len(calls) == 1
    openvino_session.auto_picks.cache_clear()
    state["times"] = (1.0, 1.0)  # not measured again: the kept result decides
    assert sessions.uses_openvino("auto") and len(calls) == 1
    openvino_session.auto_picks.cache_clear()
    monkeypatch.setattr(graph_cache, "cpu_features", lambda: "another cpu")
    assert not sessions.uses_openvino("auto") and len(calls) == 2  # measured again, no faster
    assert not sessions.uses_openvino("cpu")


def test_a_rewritten_file_is_compiled_again(tmp_path):
    """OpenVINO's own cache would run the old compiled model for a file rewritten in place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = tmp_path / "m.onnx"

    def run(scale: float) -> float:
        weight = numpy_helper.from_array(np.full((4, 4), scale, np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        session = openvino_session.Session(path, 1, openvino_session.compiled_cache(path))
        return float(session.run(["y"], {"x": np.ones((1, 4), np.float32)})[0][0, 0])

    assert run(1.0) == 4.0
    assert any(p.suffix == ".blob" for p in openvino_session.compiled_cache(path).iterdir())  # kept
    assert run(2.0) == 8.0

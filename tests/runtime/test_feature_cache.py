"""DeepCache-style feature reuse: the shallow branch on the full run's own features gives the
full output; reuse every N evaluations stays within a stated floor of the uncached image; the
schedule of full and shallow runs is the one asked for."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest

from edgediff.convert import convert
from edgediff.errors import UsageError
from edgediff.runtime import Pipeline
from edgediff.runtime.feature_cache import reusing

from reference import NEGATIVE, PROMPT, psnr


@pytest.fixture(scope="module")
def deep(tiny_source, tmp_path_factory):
    def get(name):
        out = tmp_path_factory.mktemp(f"deep-{name}") / name
        convert(tiny_source(name), out, deep_cache=True)
        return out
    return get


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_the_shallow_branch_on_fresh_features_is_the_whole_unet(deep, tiny_package, name):
    """Fed the deep features of the same input, the shallow graph computes exactly what the
    whole U-Net does; and the whole U-Net's output is the plain package's."""
    pkg = deep(name)
    full = ort.InferenceSession(str(pkg / "unet" / "model.onnx"))
    shallow = ort.InferenceSession(str(pkg / "unet_shallow" / "model.onnx"))
    plain = ort.InferenceSession(str(tiny_package(name) / "unet" / "model.onnx"))
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in plain.get_inputs():
        shape = [2 if d == "batch" else 9 if d in ("height", "width") else 77 if d == "sequence" else d
                 for d in arg.shape]
        if "residual" in arg.name:  # a ControlNet's residuals: none here (zeros, broadcast)
            feeds[arg.name] = np.zeros((1, shape[1], 1, 1), np.float32)
            continue
        feeds[arg.name] = (rng.random(shape) * 900 if arg.name == "timestep" else rng.standard_normal(shape)).astype(np.float32)
    out, feature = full.run(["out_sample", "deep_feature"], feeds)
    np.testing.assert_allclose(out, plain.run(None, feeds)[0], atol=1e-5)
    takes = {arg.name for arg in shallow.get_inputs()}  # SDXL's outer layers take no text
    again = shallow.run(None, {k: v for k, v in {**feeds, "deep_feature": feature}.items() if k in takes})[0]
    np.testing.assert_allclose(again, out, atol=1e-4, rtol=1e-4)
    # the shallow graph holds a small part of the weights
    size = lambda p: sum(f.stat().st_size for f in p.iterdir())  # noqa: E731
    assert size(pkg / "unet_shallow") < 0.5 * size(pkg / "unet")


def test_full_runs_every_interval_per_conditioning():
    calls = []

    def full(feeds):
        calls.append(("full", feeds["sample"].shape[0]))
        return {"out_sample": feeds["sample"], "deep_feature": feeds["sample"] * 2}

    def shallow(feeds):
        calls.append(("shallow", feeds["sample"].shape[0]))
        assert np.array_equal(feeds["deep_feature"], kept[-1])
        return {"out_sample": feeds["sample"]}

    kept = []
    run = reusing(lambda f: kept.append(f["sample"] * 2) or full(f), shallow, 3)
    cond, uncond = {}, {}
    for _ in range(5):  # two conditionings run apart, as --split-guidance does
        run(np.zeros((1, 1)), np.zeros(1), uncond)
        run(np.zeros((1, 1)), np.zeros(1), cond)
    kinds = [k for k, _ in calls]
    assert kinds[0::2] == kinds[1::2] == ["full", "shallow", "shallow", "full", "shallow"]


@pytest.mark.parametrize(("name", "sampler"), [("sd1", "dpmpp_2m"), ("sd1", "euler_a"), ("sdxl", "euler")])
def test_reuse_stays_close_to_the_uncached_image(deep, name, sampler):
    pipe = Pipeline(deep(name), device="cpu")
    args = dict(steps=10, guidance=7.5, sampler=sampler, seed=5, width=64, height=64)
    whole = pipe.generate(PROMPT, NEGATIVE, **args)
    reused = pipe.generate(PROMPT, NEGATIVE, **args, cache_interval=3)
    split = Pipeline(deep(name), device="cpu", split_guidance=True).generate(PROMPT, NEGATIVE, **args, cache_interval=3)
    assert "Cache interval: 3" in reused.info["parameters"]
    value = psnr(whole, reused)
    assert 33 < value < float("inf"), value  # the shallow branch ran, and kept the image: measured 39.0-41.4 dB
    assert psnr(reused, split) > 60  # each conditioning kept its own features (measured: identical)


def test_reuse_needs_the_shallow_branch(tiny_package, tiny_source, tmp_path):
    with pytest.raises(UsageError, match="has no shallow U-Net branch; convert it with deep_cache"):
        Pipeline(tiny_package("sd1"), device="cpu").generate("a cat", steps=2, width=64, height=64, cache_interval=2)
    with pytest.raises(UsageError, match="cache_interval must be at least 1"):
        Pipeline(tiny_package("sd1"), device="cpu").generate("a cat", steps=2, width=64, height=64, cache_interval=0)
    with pytest.raises(UsageError, match="FLUX.* has a transformer: convert it without --deep-cache"):
        convert(tiny_source("flux-schnell"), tmp_path / "f", deep_cache=True)
    with pytest.raises(UsageError, match="--deep-cache writes an ONNX package"):
        convert(tiny_source("sd1"), tmp_path / "g.gguf", deep_cache=True)


@pytest.mark.parametrize("precision", ["int4", "int8-static"])
def test_the_shallow_branch_gets_the_unets_precision(tiny_source, tmp_path, precision):
    """Its weights are stored as the U-Net's (read back from the graphs); int8-static calibrates
    it on its own inputs; reuse on the quantized package stays near its uncached image."""
    from reference import stored_types

    pkg = tmp_path / "pkg"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = convert(tiny_source("sd1"), pkg, precision=precision, deep_cache=True)
    assert not [w for w in caught if "--cache-interval" in str(w.message)]  # calibration's interval is its own
    assert manifest.components["unet_shallow"].precision == manifest.components["unet"].precision
    unet, shallow = stored_types(pkg, "unet"), stored_types(pkg, "unet_shallow")
    assert shallow and all(shallow[name] == unet[name] for name in shallow)
    assert {"INT4"} <= set(shallow.values()) if precision == "int4" else {"INT8"} <= set(shallow.values())
    pipe = Pipeline(pkg, device="cpu")
    args = dict(steps=8, guidance=7.5, sampler="euler", seed=5, width=64, height=64)
    assert 30 < psnr(pipe.generate(PROMPT, NEGATIVE, **args),
                     pipe.generate(PROMPT, NEGATIVE, **args, cache_interval=2)) < float("inf")


def test_too_few_whole_evaluations_are_warned_about(deep):
    from edgediff.runtime.feature_cache import advice

    assert advice(50, 5) is None and advice(20, 2) is None and advice(4, 1) is None
    assert "only 7 times" in advice(20, 3) and "an interval of at most 2" in advice(20, 3)
    assert "no caching" in advice(6, 3)
    with pytest.warns(UserWarning, match="--cache-interval 2 with 4 steps runs the whole U-Net only 2 times"):
        Pipeline(deep("sd1"), device="cpu").generate(PROMPT, steps=4, width=64, height=64, cache_interval=2)

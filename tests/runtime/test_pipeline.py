"""Pipeline checks that need two packages: a refiner must read its base's latent space."""

from __future__ import annotations

import dataclasses

import pytest

from edgediff.errors import UsageError
from edgediff.runtime import Pipeline


def test_refiner_with_other_latent_channels_is_refused(tiny_package):
    base, refiner = Pipeline(tiny_package("sdxl")), Pipeline(tiny_package("sdxl-refiner"))
    refiner.package.manifest = dataclasses.replace(refiner.manifest, latent_channels=16)
    with pytest.raises(UsageError, match="16 latent channels.*their latent spaces differ"):
        base.generate("x", steps=4, width=64, height=64, refiner=refiner)


def test_dit_sizes_and_the_t5_window(tiny_package):
    """SD3's transformer takes 2x2 latent patches: sides are multiples of 16. A prompt longer
    than T5's window is cut with a warning, as the reference pipelines do."""
    pipe = Pipeline(tiny_package("sd3"), device="cpu")
    with pytest.raises(UsageError, match="multiple of 16 for sd3"):
        pipe.generate("a cat", width=72, height=64, steps=1)
    with pytest.warns(UserWarning, match="longer than the T5 window of 256 tokens; cut: '.*zebra"):
        pipe.generate("a cat " * 150 + "zebra", width=32, height=32, steps=1)



def test_flux_schnell_takes_no_guidance(tiny_package):
    """schnell is distilled without guidance: a --guidance is said to be ignored, and the image is
    the one without it (no negative prompt is run)."""
    pipe = Pipeline(tiny_package("flux-schnell"), device="cpu")
    args = dict(steps=2, width=32, height=32, seed=5)
    plain = pipe.generate("a cat", **args)
    with pytest.warns(UserWarning, match="flux is distilled to run without guidance: guidance 4.0 is ignored"):
        guided = pipe.generate("a cat", "a dog", guidance=4.0, **args)
    assert list(plain.getdata()) == list(guided.getdata())


def test_every_image_says_what_ran_it(tiny_package):
    """`pipe.device` is the device, runtime and precision that ran the denoiser; the PNG's
    parameters carry it beside edgediff's version."""
    import onnxruntime

    from edgediff import __version__

    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    assert pipe.device == f"cpu onnxruntime {onnxruntime.__version__} fp32"  # before the first image
    image = pipe.generate("a cat", steps=2, width=64, height=64, seed=1)
    assert f"Version: edgediff {__version__}, Device: cpu onnxruntime {onnxruntime.__version__} fp32" in (
        image.info["parameters"])


def test_an_interrupted_image_says_the_steps_that_ran(tiny_package):
    seen = []
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    image = pipe.generate("a cat", steps=6, width=64, height=64, seed=1, interrupt=lambda: len(seen) >= 2,
                          on_step=lambda step, denoised: seen.append((step, denoised.shape)))
    assert seen == [(1, (1, 4, 8, 8)), (2, (1, 4, 8, 8))]  # on_step sees each step's denoised latent
    assert "Steps: 2, " in image.info["parameters"] and "Interrupted: after 2 of 6 steps" in image.info["parameters"]
    # img2img at strength 0.5 runs the last 3 of 6 steps: stopped after 1 of them, A1111 counts 4
    image = pipe.generate("a cat", steps=6, width=64, height=64, seed=1, init_image=image, strength=0.5,
                          interrupt=lambda: True)
    assert "Steps: 4, " in image.info["parameters"] and "after 1 of 3 steps" in image.info["parameters"]

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
    with pytest.warns(UserWarning, match="flux is distilled to run without guidance: --guidance 4.0 is ignored"):
        guided = pipe.generate("a cat", "a dog", guidance=4.0, **args)
    assert list(plain.getdata()) == list(guided.getdata())

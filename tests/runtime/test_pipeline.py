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

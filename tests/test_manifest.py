"""A damaged manifest is one PackageError naming the field, never a traceback later."""

from __future__ import annotations

import json
import re

import pytest

from edgediff.errors import PackageError
from edgediff.manifest import Manifest


def _good(tiny_package) -> dict:
    return json.loads((tiny_package("sd1") / "edgediff.json").read_text())


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: [m], "not an edgediff manifest"),
    (lambda m: {**m, "latent_channels": "four"}, "'latent_channels' must be an integer"),
    (lambda m: {**m, "latent_channels": True}, "'latent_channels' must be an integer"),
    (lambda m: {**m, "latent_scale": "0.18"}, "'latent_scale' must be a number"),
    (lambda m: {**m, "defaults": {}}, "defaults.steps is None"),
    (lambda m: {**m, "defaults": {**m["defaults"], "sampler": "warp"}}, "unknown sampler"),
    (lambda m: {**m, "prediction": "x0"}, "'prediction' is 'x0'"),
    (lambda m: {**m, "vae_downscale": 0}, "'vae_downscale' is 0"),
    (lambda m: {**m, "denoiser": "transformer"}, "the denoiser 'transformer' is not among the components"),
    (lambda m: {**m, "components": []}, "'components' must be a table"),
    (lambda m: {**m, "components": {**m["components"], "unet": {**m["components"]["unet"], "file": "../../etc/hostname"}}},
     "names the file '../../etc/hostname', outside the package"),
    (lambda m: {**m, "components": {**m["components"], "unet": {**m["components"]["unet"], "file": "/etc/hostname"}}},
     "outside the package"),
    (lambda m: {**m, "components": {**m["components"], "unet": {**m["components"]["unet"], "bytes": 1.5}}},
     "'components.unet.bytes' must be an integer"),
    (lambda m: {**m, "text_encoders": [{"component": "text_encoder"}]}, "lacks 'tokenizer'"),
    (lambda m: {**m, "colour": "blue"}, "unknown key 'colour'"),
    (lambda m: {k: v for k, v in m.items() if k != "family"}, "lacks 'family'"),
])
def test_damaged_manifests(tiny_package, change, message):
    with pytest.raises(PackageError, match=re.escape(message)):
        Manifest.parse(json.dumps(change(_good(tiny_package))), "edgediff.json")


def test_a_good_manifest_reads_back_equal(tiny_package):
    m = Manifest.read(tiny_package("sd1"))
    assert Manifest.parse(m.to_json(), "again") == m
    # and what it writes is the file it read, field for field (json's reader, not ours)
    assert json.loads(m.to_json()) == _good(tiny_package)

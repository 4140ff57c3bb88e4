"""The embedded default model: it loads, says how it was trained, and draws what it is asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgediff.benchmarks.quality import draw_score
from edgediff.convert import BUILTIN, DEFAULT_MODEL
from edgediff.convert import builtin_package as convert_default
from edgediff.manifest import Manifest

# The bars. Measured 2026-11-22 (50 images, AMD EPYC AVX2): fp32 94%, fp16 94%,
# int8-weights 94%, int8-static 90%, int4 92%.
DRAW_FLOOR = 0.90  # for the fp32 package
KEEP = 0.95  # the share of fp32's score every other precision keeps


def test_shipped_weights_load_and_record_their_recipe(default_package):
    """The manifest against the shipped folder: the recipe file as it is, the image size the
    U-Net's latent size and the VAE's downscaling give."""
    import json

    import edgediff

    shipped = BUILTIN / DEFAULT_MODEL
    m = Manifest.read(default_package)
    unet, vae = (json.loads((shipped / c / "config.json").read_text()) for c in ("unet", "vae"))
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    recipe = json.loads((shipped / "recipe.json").read_text())
    assert m.family == "sd1" and m.defaults["width"] == m.defaults["height"] == side == recipe["image_size"] == 64
    assert m.source["recipe"] == recipe
    assert recipe["script"] == "benchmarks/train_tiny.py" and recipe["seed"] == 0
    assert (Path(edgediff.__file__).parent / recipe["script"]).is_file()  # the script it names is shipped


def test_default_package_is_converted_once(default_package):
    stamp = (default_package / "edgediff.json").stat().st_mtime_ns
    assert convert_default() == default_package
    assert (default_package / "edgediff.json").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def score(tmp_path_factory):
    """score(precision) -> draw score of the embedded model converted at that precision."""
    from edgediff.convert import convert

    scores: dict[str, float] = {}

    def get(precision: str) -> float:
        if precision not in scores:
            out = tmp_path_factory.mktemp("builtin") / precision
            convert(BUILTIN / DEFAULT_MODEL, out, precision=precision)
            scores[precision] = draw_score(out)
        return scores[precision]
    return get


def test_default_model_draws_what_it_is_asked(score):
    assert score("fp32") >= DRAW_FLOOR


@pytest.mark.parametrize("precision", ["fp16", "int8-weights", "int8-static", "int4"])
def test_quantized_model_still_draws(score, precision):
    assert score(precision) >= KEEP * score("fp32")

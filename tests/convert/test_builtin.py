"""The embedded default model: it loads, says how it was trained, and draws what it is asked."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.benchmarks import shapes
from edgediff.convert import BUILTIN, DEFAULT_MODEL
from edgediff.convert import default_package as convert_default
from edgediff.manifest import Manifest
from edgediff.runtime import Pipeline

DRAW_FLOOR = 0.90  # the bar for the fp32 package
pytestmark = pytest.mark.skipif(not (BUILTIN / DEFAULT_MODEL / "recipe.json").is_file(),
                                reason="transitional: the shipped model is still the random stand-in")


def evaluation_prompts(n: int = 50, seed: int = 2024) -> list[tuple[str, int, shapes.Sample]]:
    """Varied (caption, seed, truth) triples, with wordings from the training templates."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        _, truth = shapes.sample(rng)
        out.append((truth.caption, 1000 + i, truth))
    return out


def draw_score(package, **kwargs) -> float:
    pipe = Pipeline(package, device="cpu", low_memory=False)
    hits = [shapes.check(pipe.generate(caption, seed=seed, **kwargs)).matches(truth)
            for caption, seed, truth in evaluation_prompts()]
    return sum(hits) / len(hits)


def test_shipped_weights_load_and_record_their_recipe(default_package):
    m = Manifest.read(default_package)
    assert m.family == "sd1" and m.defaults["width"] == m.defaults["height"] == 64
    recipe = m.source["recipe"]
    assert recipe["script"] == "benchmarks/train_tiny.py" and recipe["seed"] == 0


def test_default_package_is_converted_once(default_package):
    stamp = (default_package / "edgediff.json").stat().st_mtime_ns
    assert convert_default() == default_package
    assert (default_package / "edgediff.json").stat().st_mtime_ns == stamp


def test_default_model_draws_what_it_is_asked(default_package):
    assert draw_score(default_package) >= DRAW_FLOOR

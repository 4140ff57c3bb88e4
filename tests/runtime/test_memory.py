"""Memory plans: what a run needs is estimated before anything loads; with a budget the plan
gives up speed for memory in a fixed order until it fits, or the run is refused with the
estimate; --keep-loaded's cost shows in the estimate."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import UsageError
from edgediff.runtime import memory
from edgediff.runtime.package import open_package
from edgediff.runtime.pipeline import Pipeline

ARGS = dict(width=512, height=512, guided=True, level={4: 4, 8: 0}, vae_tile=0, split_guidance=False,
            img2img=False, keep_loaded=False)


@pytest.fixture(scope="module")
def gguf(tiny_source, tmp_path_factory):
    from edgediff.convert import convert

    path = tmp_path_factory.mktemp("mem") / "sd1-q4_0.gguf"
    convert(tiny_source("sd1"), path, precision="q4_0")
    return path


def test_weights_are_counted_from_the_bindings_and_level_4_holds_more(gguf):
    package = open_package(gguf)
    level0, level4 = memory._weights(package, 0), memory._weights(package, 4)
    unet = package.residency()["unet"]
    assert level0["unet"] == sum(b.resident_bytes for b in unet)
    quantized = sum(b.resident_bytes for b in unet if b.kind == "quantized")
    assert quantized > 0 and level4["unet"] == pytest.approx(level0["unet"] + (memory.LEVEL4 - 1) * quantized)


def test_the_plan_gives_up_speed_in_order_until_the_budget_fits(gguf):
    package = open_package(gguf)
    asked = memory.plan(package, budget=None, **ARGS)
    assert (asked.accuracy_level, asked.vae_tile, asked.split_guidance) == ({4: 4, 8: 0}, 0, False)
    seen = []
    for budget in np.linspace(asked.need, 0.2 * memory.GB, 60):
        try:
            p = memory.plan(package, budget=budget, **ARGS)
        except UsageError:
            break
        assert p.need <= budget
        key = (p.accuracy_level == {4: 0, 8: 0}, p.vae_tile, p.split_guidance)
        if key not in seen:
            seen.append(key)
    # each step keeps the ones before: fp32 activations, 256-pixel tiles, then half batches
    assert seen[0] == (False, 0, False) and seen[-1][0] and seen[-1][1] in (256, 512)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
    with pytest.raises(UsageError, match=r"needs an estimated [0-9.]+ GB even in its lowest-memory plan") as err:
        memory.plan(package, budget=0.1 * memory.GB, **ARGS)
    assert "memory_budget 0.1 GB" in str(err.value) and "denoiser" in str(err.value)


def test_keeping_components_loaded_adds_their_weights(gguf):
    package = open_package(gguf)
    released = memory.stages(package, **{**ARGS, "keep_loaded": False})
    kept = memory.stages(package, **{**ARGS, "keep_loaded": True})
    weights = memory._weights(package, ARGS["level"])
    assert kept["denoiser"] == pytest.approx(released["denoiser"] + weights["text_encoder"])
    assert kept["VAE decode"] == pytest.approx(released["VAE decode"] + weights["text_encoder"] + weights["unet"])


def test_a_run_over_its_budget_is_refused_before_anything_loads(gguf):
    pipe = Pipeline(gguf, device="cpu", memory_budget=0.05)
    with pytest.raises(UsageError, match="memory_budget 0.05 GB"):
        pipe.generate("a red circle", steps=2, seed=1)
    assert pipe._components == {}  # nothing opened
    with pytest.raises(UsageError, match="memory_budget must be a positive"):
        Pipeline(gguf, device="cpu", memory_budget=0)


def test_a_budget_that_needs_tiles_gets_them_and_says_so(gguf):
    package = open_package(gguf)
    args = {**ARGS, "width": 1024, "height": 1024, "level": 0}
    whole = memory.plan(package, budget=None, **args)
    tiled = memory.stages(package, **{**args, "vae_tile": 512})
    budget = (max(tiled.values()) + whole.need) / 2  # fits only with tiles
    pipe = Pipeline(gguf, device="cpu", memory_budget=budget / memory.GB, accuracy_level=0)
    with pytest.warns(RuntimeWarning, match="the VAE in 512-pixel tiles"):
        image = pipe.generate("a red circle", steps=1, seed=1, width=1024, height=1024)
    assert pipe.plan.vae_tile == 512 and image.size == (1024, 1024)


def test_the_command_line_says_the_estimate_and_refuses_over_budget(gguf, tmp_path, capsys):
    from edgediff.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "-m", str(gguf), "-p", "a red circle", "--steps", "1", "-o", str(out),
                 "--keep-loaded"]) == 0
    printed = capsys.readouterr().out
    assert "memory: estimated " in printed and "keeping every component loaded adds an estimated" in printed
    out.unlink()
    assert main(["generate", "-m", str(gguf), "-p", "a red circle", "-o", str(out), "--memory-budget", "0.01"]) == 2
    assert "needs an estimated" in capsys.readouterr().err and not out.exists()

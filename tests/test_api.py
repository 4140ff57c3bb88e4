"""edgediff from Python: `edgediff.Pipeline` opens what `generate --model` opens, lists of prompts
give lists of images, and messages name the Python arguments (the CLI's name its flags)."""

from __future__ import annotations

import numpy as np
import pytest

import edgediff
from edgediff.errors import PackageError, UsageError
from edgediff.runtime import Pipeline as PackagePipeline

ARGS = dict(steps=2, width=64, height=64)


def test_builtin_and_default_models_open_from_python(default_package):
    pipe = edgediff.Pipeline("builtin:tiny-sd1", device="cpu", keep_loaded=True)
    assert pipe.package.root == default_package and pipe.keep_loaded
    assert edgediff.Pipeline(device="cpu").package.root == default_package  # None: the embedded default
    with pytest.raises(UsageError, match="unknown builtin model 'nope'"):
        edgediff.Pipeline("builtin:nope")
    with pytest.raises(PackageError, match=r"builtin:tiny-sd1: .*edgediff.Pipeline"):
        PackagePipeline("builtin:tiny-sd1")  # the runtime alone opens packages, and says where to go


def test_a_list_of_prompts_gives_a_list_of_images(tiny_package):
    pipe = PackagePipeline(tiny_package("sd1"), device="cpu")
    images = pipe.generate(["a cat", "a dog"], "blurry", seed=7, **ARGS)
    assert [im.info["seed"] for im in images] == [7, 8]  # counting up, as A1111's batches
    alone = pipe.generate("a dog", "blurry", seed=8, **ARGS)
    assert np.array_equal(np.asarray(images[1]), np.asarray(alone))
    pairs = pipe.generate(["a cat", "a dog"], ["blurry", "dark"], seed=7, **ARGS)
    assert "Negative prompt: dark" in pairs[1].info["parameters"]
    with pytest.raises(UsageError, match=r"a list of prompts \(got 2\) pairs with one negative prompt or a list of as many \(got 3\)"):
        pipe.generate(["a", "b"], ["x", "y", "z"], **ARGS)
    with pytest.raises(UsageError, match="negative_prompt: a list of negative prompts goes with a list of prompts"):
        pipe.generate("a", ["x"], **ARGS)


def test_messages_name_python_arguments_in_python_and_flags_on_the_command_line(tiny_package, tmp_path, capsys):
    from edgediff.cli import main

    pipe = PackagePipeline(tiny_package("sd1"), device="cpu")
    with pytest.raises(UsageError, match=r"^init_image nope.png: no such file"):
        pipe.generate("a cat", init_image="nope.png", **ARGS)
    with pytest.raises(UsageError, match=r"^strength must be in \(0, 1\]"):
        pipe.generate("a cat", init_image=pipe.generate("a cat", **ARGS), strength=2, **ARGS)
    assert main(["generate", "-m", str(tiny_package("sd1")), "-p", "a cat", "--init-image", "nope.png",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "--init-image nope.png: no such file" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"^threads must be at least 1"):  # back in Python after the CLI
        PackagePipeline(tiny_package("sd1"), threads=0)


def test_python_takes_a1111_sampler_names_too(tiny_package):
    pipe = PackagePipeline(tiny_package("sd1"), device="cpu")
    image = pipe.generate("a cat", sampler="DPM++ 2M Karras", seed=3, **ARGS)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in image.info["parameters"]
    same = pipe.generate("a cat", sampler="dpmpp_2m", schedule="karras", seed=3, **ARGS)
    assert np.array_equal(np.asarray(image), np.asarray(same))
    with pytest.raises(UsageError, match="did you mean"):
        pipe.generate("a cat", sampler="dpm++2mm", **ARGS)

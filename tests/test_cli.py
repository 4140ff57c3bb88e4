"""The command line: the main jobs work, and every bad input gets one clear line, the right exit
code (2 usage, 1 failure), no traceback, and no partial output."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgediff.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_generate_writes_png_with_parameters(tiny_package, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, _ = run(capsys, "generate", "--model", str(tiny_package("sd1")), "--prompt", "a cat",
                          "--negative-prompt", "dog", "--steps", "3", "--width", "64", "--height", "64",
                          "--seed", "42", "--sampler", "euler_a", "--output", str(out), "--device", "cpu",
                          "--threads", "1")
    assert code == 0 and f"wrote {out}" in stdout and "s/step" in stdout
    assert "ran: onnxruntime " in stdout and "CPUExecutionProvider: text_encoder fp32, unet fp32, vae_decoder fp32" in stdout
    with Image.open(out) as img:
        params = img.text["parameters"]
    assert params.startswith("a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler a")
    assert "Seed: 42, Size: 64x64" in params and list(tmp_path.iterdir()) == [out]


def test_img2img_from_the_command_line(tiny_package, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (70, 60), (200, 30, 30)).save(init)
    out = tmp_path / "out.png"
    code, stdout, _ = run(capsys, "generate", "-m", str(tiny_package("sd1")), "-p", "x", "--steps", "4",
                          "--init-image", str(init), "--strength", "0.5", "-o", str(out))
    assert code == 0
    with Image.open(out) as img:
        assert img.size == (64, 56)  # the init image's size, down to a multiple of 8
        assert "Denoising strength: 0.5" in img.text["parameters"]


def test_inspect_package_and_source(tiny_package, tiny_source, capsys):
    code, out, _ = run(capsys, "inspect", str(tiny_package("sd1")))
    assert code == 0 and "family: sd1" in out and "unet" in out and "fp32" in out
    code, out, _ = run(capsys, "inspect", str(tiny_source("sd1")))
    assert code == 0 and "family: sd1 (Stable Diffusion 1.x; diffusers names)" in out


def test_a_seed_in_the_prompt_is_just_text(tiny_package, tmp_path, capsys, monkeypatch):
    """The CLI reads the seed it used, never parses it back out of the parameters text."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, *_generate(tiny_package, "--prompt", "Seed: hello, world", "--seed", "77"))
    assert code == 0 and "seed 77" in out and (tmp_path / "edgediff-77.png").is_file()


def test_inspect_into_a_closed_pipe(tiny_package):
    """`edgediff inspect PKG | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    done = subprocess.run(f"{sys.executable} -P -m edgediff.cli inspect {tiny_package('sd1')} | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("edgediff package") and "Traceback" not in done.stderr


def test_lora_from_the_command_line(tiny_package, tiny_source, tmp_path, capsys):
    """inspect tells what a LoRA file is; generate applies it (flag or prompt tag) and records it."""
    import json

    from reference import diffusers_pipeline
    from tiny_loras import write_lora

    lora = write_lora(diffusers_pipeline(tiny_source("sd1")), tmp_path / "style.safetensors", "locon")
    import hashlib

    from safetensors import safe_open

    with safe_open(str(lora), "np") as f:  # the file's own layers, counted here
        downs = {k.removesuffix(".lora_down.weight"): f.get_slice(k).get_shape()
                 for k in f.keys() if k.endswith(".lora_down.weight")}  # noqa: SIM118 (safe_open is not iterable)
    unet = [k for k in downs if k.startswith("lora_unet_")]
    text = [k for k in downs if k.startswith("lora_te_")]
    convolutions = sum(len(shape) == 4 for shape in downs.values())
    (rank,) = {shape[0] for shape in downs.values()}
    data = lora.read_bytes()
    digest = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]  # A1111's
    code, out, _ = run(capsys, "inspect", str(lora))
    assert code == 0 and "format: LyCORIS LoCon" in out and f"rank {rank}" in out and rank == 4
    assert f"{len(downs)} layers" in out and f"A1111 hash {digest}" in out
    assert f"{convolutions} lora convolution" in out and convolutions == 21
    code, out, _ = run(capsys, "inspect", str(lora), "--json")
    assert json.loads(out)["components"] == {"denoiser": len(unet), "text_encoder": len(text)} == {
        "denoiser": 61, "text_encoder": 18}
    assert len(unet) + len(text) == len(downs)
    images = []
    for extra in (["--lora", f"{lora}:0.8"], ["--lora-dir", str(tmp_path), "--prompt", "a cat <lora:style:0.8>"]):
        out_png = tmp_path / f"{len(images)}.png"
        code, _, _ = run(capsys, *_generate(tiny_package, "--seed", "3", "--output", str(out_png), *extra))
        assert code == 0
        with Image.open(out_png) as img:
            images.append(np.asarray(img.convert("RGB")))
            assert 'Lora hashes: "style: ' in img.text["parameters"]
    assert np.array_equal(*images)


def test_gguf_from_the_command_line(tiny_source, tmp_path, capsys):
    """convert to GGUF, inspect it (types and how weights are held), generate from it."""
    import json

    model = tmp_path / "m.gguf"
    code, out, _ = run(capsys, "convert", str(tiny_source("sd1")), "-o", str(model), "--precision", "q8_0")
    assert code == 0 and f"wrote {model}" in out
    code, out, _ = run(capsys, "inspect", str(model))
    assert code == 0 and "(written by edgediff)" in out and "q8_0" in out and "bits/weight" in out
    assert "run quantized (MatMulNBits)" in out and "in memory with --weights expanded" in out
    code, out, _ = run(capsys, "inspect", str(model), "--json")
    report = json.loads(out)
    assert report["family"] == "sd1" and report["types"]["q8_0"]["bits_per_weight"] == 8.5  # 34 bytes a block of 32
    import gguf

    tensors = gguf.GGUFReader(model).tensors  # the counts as gguf-py reads the file
    for kind, row in report["types"].items():
        of_kind = [t for t in tensors if t.tensor_type.name.lower() == kind]
        assert (row["tensors"], row["values"], row["bytes"]) == (
            len(of_kind), sum(int(t.n_elements) for t in of_kind), sum(int(t.n_bytes) for t in of_kind)), kind
    unet_q8 = [t for t in tensors if t.name.startswith("model.diffusion_model.") and t.tensor_type.name == "Q8_0"]
    assert report["resident"]["compact"]["unet"]["kinds"]["quantized"]["tensors"] == len(unet_q8) > 0
    png = tmp_path / "m.png"
    code, out, _ = run(capsys, "generate", "-m", str(model), "-p", "a cat", "--steps", "2", "-o", str(png),
                       "--weights", "expanded", "--accuracy-level", "4")
    assert code == 0 and png.is_file()
    assert "ran: onnxruntime " in out
    assert re.search(r"unet [a-z0-9_+]*q8_0[a-z0-9_+]* in MatMulNBits \(int8 activations, accuracy level 4\)", out)
    code, _, err = run(capsys, "convert", str(tiny_source("sd1")), "-o", str(tmp_path / "x.gguf"),
                       "--precision", "int4")
    assert code == 2 and "unknown GGUF precision 'int4'" in err


def _generate(tiny_package, *extra):
    return ("generate", "--model", str(tiny_package("sd1")), "--prompt", "a cat", "--steps", "2",
            "--width", "64", "--height", "64", *extra)


@pytest.mark.parametrize(("extra", "message"), [
    (("--width", "65"), "--width must be a positive multiple of 8 for sd1 (got 65)"),
    (("--height", "0"), "--height must be a positive multiple of 8 for sd1 (got 0)"),
    (("--steps", "0"), "steps must be at least 1 (got 0)"),
    (("--sampler", "fastest"), "unknown sampler 'fastest'; choose one of: euler (Euler), euler_a (Euler a)"),
    (("--schedule", "linear"), "unknown schedule 'linear'"),
    (("--init-image", "IMG", "--strength", "0"), "--strength must be in (0, 1] (got 0.0)"),
    (("--init-image", "IMG", "--strength", "1.5"), "--strength must be in (0, 1] (got 1.5)"),
    (("--init-image", "BAD"), "not a readable image"),
    (("--init-image", "NOFILE"), "nofile.png: no such file"),
    (("--output", "MISSING/out.png"), "the folder"),
    (("--clip-skip", "0"), "--clip-skip must be at least 1"),
    (("--threads", "0"), "--threads must be at least 1"),
    (("--device", "tpu"), "invalid choice: 'tpu'"),
    (("--steps", "many"), "invalid int value: 'many'"),
    (("--lora", "NOFILE"), "nofile.png: no such file"),
    (("--guidance", "nan"), "--guidance must be a finite number >= 0 (got nan)"),
    (("--steps", "2000"), "2000 steps are more than the model's"),
    (("--output", "DIR"), "is a folder; name the image file"),
    (("--lora", "NOFILE:nan"), "not a finite number"),
    (("--prompt", "a cat <lora:style>"), "--lora-dir"),
])
def test_generate_usage_errors(tiny_package, tmp_path, capsys, extra, message):
    good = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    (tmp_path / "folder").mkdir()
    subst = {"IMG": str(good), "BAD": str(bad), "NOFILE": str(tmp_path / "nofile.png"), "DIR": str(tmp_path / "folder"),
             "MISSING/out.png": str(tmp_path / "missing" / "out.png")}
    before = sorted(tmp_path.iterdir())
    code, _, err = run(capsys, *_generate(tiny_package, *(subst.get(a, a) for a in extra)))
    assert code == 2
    assert message in err
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_missing_model_is_a_failure(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "none"), "--prompt", "x")
    assert code == 1 and "none: no such package folder" in err


def test_convert_errors(tmp_path, capsys):
    code, _, err = run(capsys, "convert", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o"))
    assert code == 1 and "missing.safetensors: no such file or folder" in err
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    code, _, err = run(capsys, "convert", str(ckpt), "-o", str(tmp_path / "o"))
    assert code == 1 and "pickle-based" in err and "--allow-pickle" in err
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    code, _, err = run(capsys, "convert", str(trunc), "-o", str(tmp_path / "o"))
    assert code == 1 and "t.safetensors" in err
    code, _, err = run(capsys, "convert", str(trunc), "-o", str(tmp_path / "no" / "o"))
    assert code == 1 and not (tmp_path / "no").exists()  # parents it made are removed again
    code, _, err = run(capsys, "convert", str(trunc), "-o", str(trunc / "o"))
    assert code == 2 and "is a file, not a folder" in err
    code, _, err = run(capsys, "convert", str(trunc), "-o", str(tmp_path / "o"), "--precision", "int3")
    assert code == 2 and "unknown precision 'int3'" in err
    assert not (tmp_path / "o").exists()


def test_unknown_architecture_from_the_command_line(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer.0.weight": np.zeros((2, 2), np.float32)}, str(path))
    code, _, err = run(capsys, "convert", str(path), "-o", str(tmp_path / "o"))
    assert code == 1 and "not a known model architecture" in err and "--family" in err


def test_console_script_exit_codes_without_traceback(tmp_path):
    """The installed `edgediff` entry point, as a user runs it."""
    cmd = [sys.executable, "-P", "-m", "edgediff.cli", "generate", "--model", str(tmp_path), "--prompt", "x"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1 and "not an edgediff package" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-P", "-m", "edgediff.cli", "generate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "one of the arguments --prompt/-p --prompt-file is required" in proc.stderr


def test_sdxl_base_and_refiner_from_the_command_line(tiny_package, tmp_path, capsys):
    out = tmp_path / "xl.png"
    code, stdout, _ = run(capsys, "generate", "-m", str(tiny_package("sdxl")), "--refiner",
                          str(tiny_package("sdxl-refiner")), "--refiner-start", "0.7", "-p", "a cat",
                          "--steps", "5", "--width", "64", "--height", "64", "--original-size", "512", "512",
                          "--crop", "0", "8", "--aesthetic-score", "7", "-o", str(out))
    assert code == 0 and f"wrote {out}" in stdout
    with Image.open(out) as img:
        assert "Refiner: sdxl-refiner, Refiner switch at: 0.7" in img.text["parameters"]


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("sdxl-refiner", (), "is a refiner (sdxl-refiner): it finishes an image, it does not start one"),
    ("sd1", ("--refiner", "REFINER"), "their latent spaces differ"),
    ("sdxl", ("--refiner", "REFINER", "--refiner-start", "1"), "--refiner-start must be in (0, 1) (got 1.0)"),
    ("sdxl", ("--refiner", "REFINER", "--refiner-start", "0.0001"), "leaves the base no step"),
    ("sdxl", ("--refiner", "REFINER", "--refiner-start", "0.9999"), "leaves the refiner no step"),
    ("sdxl", ("--original-size", "0", "64"), "--original-size must be two positive integers"),
    ("sdxl", ("--target-size", "64"), "expected 2 arguments"),
    ("sdxl", ("--crop", "-8", "0"), "--crop must be two integers >= 0"),
])
def test_sdxl_usage_errors(tiny_package, tmp_path, capsys, model, extra, message):
    extra = [str(tiny_package("sdxl-refiner")) if a == "REFINER" else a for a in extra]
    code, _, err = run(capsys, "generate", "-m", str(tiny_package(model)), "-p", "x", "--steps", "4",
                       "--width", "64", "--height", "64", "-o", str(tmp_path / "x.png"), *extra)
    assert code == 2 and message in err
    assert list(tmp_path.iterdir()) == []


# Issue 31: a CLI that guides.


def _no_loading(monkeypatch):
    """Opening any component fails the test: what is refused must be refused before loading."""
    from edgediff.runtime.pipeline import Pipeline

    def component(self, name):
        raise AssertionError(f"{name} was opened")

    monkeypatch.setattr(Pipeline, "component", component)


def test_a_size_that_cannot_fit_is_refused_before_loading(tiny_package, tmp_path, capsys, monkeypatch):
    from edgediff.runtime import memory

    monkeypatch.setattr(memory, "available", lambda: 16 * memory.GB)
    _no_loading(monkeypatch)
    code, _, err = run(capsys, "generate", "-m", str(tiny_package("sd1")), "-p", "x", "--width", "100000",
                       "--height", "100000", "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert "at 100000x100000 needs an estimated" in err and "this machine has 16.0 GB available" in err
    assert "too little for denoiser and VAE decode" in err and "--force" in err
    assert list(tmp_path.iterdir()) == []


def test_force_runs_what_the_estimate_refuses(tiny_package, tmp_path, capsys, monkeypatch):
    from edgediff.runtime import memory

    monkeypatch.setattr(memory, "available", lambda: 0.1e9)  # less than the process itself
    argv = _generate(tiny_package, "-o", str(tmp_path / "x.png"))
    code, _, err = run(capsys, *argv)
    assert code == 2 and "this machine has 0.1 GB available" in err and not (tmp_path / "x.png").exists()
    code, _, err = run(capsys, *argv, "--force")
    assert code == 0 and (tmp_path / "x.png").is_file()
    assert err.count("it may not fit") == 1  # the pipeline's own warning, once


@pytest.mark.parametrize(("names", "written"), [
    (("--sampler", "DPM++ 2M Karras"), "Sampler: DPM++ 2M, Schedule type: Karras"),
    (("--sampler", "Euler a"), "Sampler: Euler a, "),
    (("--sampler", "dpm++2m", "--schedule", "SGM Uniform"), "Sampler: DPM++ 2M, Schedule type: SGM Uniform"),
    (("--sampler", "DPM++ 2M", "--schedule", "exponential"), "Sampler: DPM++ 2M, Schedule type: Exponential"),
    (("--sampler", "k_euler"), "Sampler: Euler, "),
])
def test_sampler_and_schedule_in_a1111_spellings(tiny_package, tmp_path, capsys, names, written):
    out = tmp_path / "x.png"
    code, _, _ = run(capsys, *_generate(tiny_package, *names, "-o", str(out)))
    assert code == 0
    with Image.open(out) as img:
        assert written in img.text["parameters"]


@pytest.mark.parametrize(("extra", "message"), [
    (("--sampler", "dpmpp2"), "unknown sampler 'dpmpp2'; did you mean dpmpp_2m or dpmpp_2m_sde?"),
    (("--sampler", "eulr a"), "did you mean euler_a"),
    (("--schedule", "karas"), "unknown schedule 'karas'; did you mean karras?"),
    (("--sampler", "DPM++ 2M Karas"), "did you mean dpmpp_2m"),
])
def test_unknown_names_say_what_was_meant(tiny_package, tmp_path, capsys, extra, message):
    code, _, err = run(capsys, *_generate(tiny_package, *extra, "-o", str(tmp_path / "x.png")))
    assert code == 2 and message in err and list(tmp_path.iterdir()) == []


def test_prompt_file_and_batch_count(tiny_package, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red circle\n\n{"prompt": "a blue square", "negative_prompt": "green", "seed": 100, '
                       '"steps": 3, "width": 72, "cfg_scale": 5, "sampler_name": "Euler a", "scheduler": "Karras"}\n')
    out = tmp_path / "shape.png"
    code, stdout, _ = run(capsys, "generate", "-m", str(tiny_package("sd1")), "--steps", "2", "--width", "64",
                          "--height", "64", "--prompt-file", str(prompts), "--seed", "7", "--batch-count", "2",
                          "-o", str(out))
    assert code == 0
    names = [f"shape-{n:05d}.png" for n in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "prompts.txt"])
    params = []
    for name in names:
        with Image.open(tmp_path / name) as img:
            params.append(img.text["parameters"])
    assert params[0].startswith("a red circle\nSteps: 2, Sampler: ") and "Seed: 7, Size: 64x64" in params[0]
    assert "Seed: 8, " in params[1]  # A1111's batch count: the seed counts up
    assert params[2].startswith("a blue square\nNegative prompt: green\nSteps: 3, Sampler: Euler a, "
                                "Schedule type: Karras, CFG scale: 5.0, Seed: 100, Size: 72x64")
    assert "Seed: 101, " in params[3]
    assert [f"seed {s}" in stdout for s in (7, 8, 100, 101)] == [True] * 4


def test_batch_count_without_output_names_files_as_a1111(tiny_package, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run(capsys, *_generate(tiny_package, "--seed", "5", "--batch-count", "2"))
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["edgediff-00000-5.png", "edgediff-00001-6.png"]


@pytest.mark.parametrize(("lines", "extra", "message"), [
    (None, (), "--prompt-file MISSING: no such file"),
    ("\n\n", (), "no prompts in it"),
    ('{"prompt": "x", "seed": "one"}', (), "line 1: 'seed' must be int (got 'one')"),
    ('a\n{"prompt": "x", "styles": []}', (), "line 2: unknown field 'styles' (known: prompt,"),
    ('{"prompt": "x",', (), "line 1: not valid JSON"),
    ('{"negative_prompt": "x"}', (), "line 1: no 'prompt' field"),
    ('{"prompt": "x", "sampler": "eulr"}', (), "line 1: unknown sampler 'eulr'; did you mean euler"),
    ('{"prompt": "x", "guidance": true}', (), "'guidance' must be float (got True)"),
    ("x", ("--batch-count", "0"), "--batch-count must be at least 1 (got 0)"),
    ("x", ("--prompt", "y"), "argument --prompt/-p: not allowed with argument --prompt-file"),
])
def test_prompt_file_mistakes(tiny_package, tmp_path, capsys, lines, extra, message):
    path = tmp_path / "prompts.txt"
    if lines is not None:
        path.write_text(lines)
    argv = ["generate", "-m", str(tiny_package("sd1")), "--steps", "2", "--prompt-file", str(path), *extra,
            "-o", str(tmp_path / "x.png")]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message.replace("MISSING", str(path)) in err
    assert not (tmp_path / "x.png").exists()


def test_at_file_as_prompt_is_refused_with_the_option_to_use(tiny_package, tmp_path, capsys):
    code, _, err = run(capsys, *_generate(tiny_package, "-p", "@prompts.txt", "-o", str(tmp_path / "x.png")))
    assert code == 2 and "--prompt @prompts.txt: to read prompts from a file, give --prompt-file prompts.txt" in err
    code, _, _ = run(capsys, *_generate(tiny_package, "-p", "@someone's style, a cat", "-o", str(tmp_path / "x.png")))
    assert code == 0  # '@' inside a prompt of several words is text


def test_generate_help_lists_defaults_samplers_and_schedules(capsys):
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for option in ("--steps", "--sampler", "--schedule", "--seed", "--width", "--height", "--guidance"):
        assert re.search(rf"{option} \S+\s+\S", out), option  # each has help text
    assert "default: the model's" in out and "default: random" in out
    assert "dpmpp_2m (DPM++ 2M)" in out and "euler_a (Euler a)" in out
    assert "schedules: normal, karras, exponential, sgm_uniform" in out
    assert re.search(r"sd1 +20 steps, dpmpp_2m karras, guidance 7.5, 512x512", out)


def test_every_option_of_every_command_has_help():
    from edgediff.cli import _parser

    parser = _parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"edgediff {name} {action.option_strings or action.dest}"


def test_bench_lists_scenarios_and_tools(capsys):
    code, out, _ = run(capsys, "bench", "--list")
    assert code == 0
    assert re.search(r"^tiny +builtin:tiny-sd1 +The embedded tiny model", out, re.M)
    assert re.search(r"^sd15-512 +synthetic:sd15 ", out, re.M) and re.search(r"^quality +PSNR/SSIM", out, re.M)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "\n  sd15-512\n" in out and "\n  synthetic_dit " in out
    code, _, err = run(capsys, "bench")
    assert code == 2 and "`edgediff bench --list` lists the scenarios and tools" in err


@pytest.mark.parametrize("tool", ["quality", "synthetic-dit", "vae_memory", "graph_build", "train_tiny"])
def test_bench_tools_have_help(capsys, tool):
    with pytest.raises(SystemExit) as done:
        main(["bench", tool, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: edgediff bench {tool.replace('-', '_')}")


@pytest.mark.parametrize(("argv", "code", "message"), [
    (("load", "NOPE"), 1, "NOPE: no such package folder or .gguf file"),
    (("vae_memory", "NOPE"), 1, "NOPE: no such package folder or .gguf file"),
    (("loras", "NOPE", "NOPE"), 1, "NOPE: no such package folder or .gguf file"),
    (("quality", "nope"), 2, "nope: no such scenario file (built-in scenarios: "),
    (("profile",), 2, "the following arguments are required: package"),
])
def test_bench_tool_mistakes_are_messages(tmp_path, capsys, argv, code, message):
    nope = str(tmp_path / "nope")
    done = None
    try:
        done = main(["bench", *(nope if a == "NOPE" else a for a in argv)])
    except SystemExit as exit_:  # argparse's own, as the tool's parser reports it
        done = exit_.code
    err = capsys.readouterr().err
    assert done == code and message.replace("NOPE", nope) in err and "Traceback" not in err


def test_bench_tools_run_from_the_checkout_root():
    """The console script, where a user who cloned the repository stands: the root's kernels/
    folder does not shadow the `kernels` package, and a tool's argument mistake is a message."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = Path(sys.executable).with_name("edgediff")
    if not script.exists():
        script = Path(shutil.which("edgediff") or "missing")
    if not script.exists():
        pytest.skip("no edgediff console script installed")
    done = subprocess.run([str(script), "bench", "synthetic_dit"], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "the following arguments are required: architecture, output" in done.stderr
    done = subprocess.run([str(script), "bench", "synthetic_dit", "flux-dev", "x.gguf"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'flux-dev'" in done.stderr


@pytest.mark.parametrize(("name", "fmt"), [("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP"), ("x.png", "PNG")])
def test_output_format_from_the_extension(tiny_package, tmp_path, capsys, name, fmt):
    from edgediff.runtime.image import read_parameters

    out = tmp_path / name
    code, _, _ = run(capsys, *_generate(tiny_package, "--seed", "9", "-o", str(out)))
    assert code == 0 and list(tmp_path.iterdir()) == [out]
    with Image.open(out) as img:
        assert img.format == fmt
        assert read_parameters(img).startswith("a cat\nSteps: 2, Sampler: ")
        assert "Seed: 9, Size: 64x64" in read_parameters(img)


def test_an_unknown_output_extension_is_refused(tiny_package, tmp_path, capsys):
    gif = tmp_path / "x.gif"
    code, _, err = run(capsys, *_generate(tiny_package, "-o", str(gif)))
    assert code == 2 and f"--output {gif}: cannot tell the image type from '.gif'" in err
    assert ".png, .jpg, .jpeg, .webp" in err and list(tmp_path.iterdir()) == []


def test_inspect_builtin_and_cache_mistakes(capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", "builtin:tiny-sd1")
    assert code == 0 and "family: sd1 (Stable Diffusion 1.x; diffusers names)" in out
    code, _, err = run(capsys, "inspect", "builtin:nope")
    assert code == 2 and "unknown builtin model 'nope' (available: tiny-sd1" in err
    code, _, err = run(capsys, "cache", str(tmp_path / "nonexistent"))
    assert code == 2 and "nonexistent: no such package or model file" in err


def test_a_warning_prints_once_per_run(tiny_package, tmp_path, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to warn about")
    code, _, err = run(capsys, *_generate(tiny_package, "--device", "cuda", "-o", str(tmp_path / "x.png")))
    assert code == 0 and err.count("CUDA was requested") == 1


def test_progress_rate_is_the_steps_own_time():
    """s/step is the mean of the pipeline's step times: loading before the first step is not in it."""
    import io

    from edgediff.cli import ProgressBar

    times: list[float] = []
    stream = io.StringIO()
    bar = ProgressBar("sampling", lambda: times, stream)
    bar(0, 2)
    times.append(0.25)
    bar(1, 2)
    times.append(0.75)
    bar(2, 2)
    assert stream.getvalue().splitlines() == ["sampling [........................] 0/2 ",
                                              "sampling [############............] 1/2 0.25 s/step",
                                              "sampling [########################] 2/2 0.50 s/step"]


def test_preview_file_shows_the_image_while_it_samples(tiny_package, tmp_path, capsys):
    from PIL import Image

    from edgediff.runtime.image import read_parameters

    preview = tmp_path / "live.webp"
    code, _, err = run(capsys, "generate", "-m", str(tiny_package("sd1")), "-p", "a cat", "--steps", "3",
                       "--width", "64", "--height", "64", "--preview", str(preview), "-o", str(tmp_path / "x.png"))
    assert code == 0, err
    shown = Image.open(preview)
    assert shown.size == (64, 64) and read_parameters(shown) == "Step: 3"  # the last step's
    code, _, err = run(capsys, "generate", "-m", str(tiny_package("sd1")), "-p", "a cat", "--preview",
                       str(tmp_path / "live.bmp"), "-o", str(tmp_path / "y.png"))
    assert code == 2 and "--preview" in err and ".bmp" in err


def _video(tiny_package, tmp_path, *extra):
    init = tmp_path / "init.png"
    if not init.exists():
        Image.new("RGB", (96, 64), (200, 60, 30)).save(init)
    return ("generate", "--model", str(tiny_package("svd")), "--init-image", str(init), "--width", "96",
            "--height", "64", "--steps", "2", "--seed", "3", "--device", "cpu", *extra)


@pytest.mark.parametrize(("name", "fmt"), [("clip.webp", "WEBP"), ("clip.gif", "GIF")])
def test_video_to_an_animated_file(tiny_package, tmp_path, capsys, name, fmt):
    from edgediff.runtime.image import read_parameters

    out = tmp_path / name
    code, stdout, err = run(capsys, *_video(tiny_package, tmp_path, "--frames", "4", "--fps", "10",
                                            "--motion-bucket", "100", "--noise-aug", "0.05", "--min-guidance",
                                            "1.5", "--decode-chunk", "2", "-o", str(out)))
    assert code == 0, err
    assert f"wrote {out} (4 frames, 96x64, 10 fps, seed 3)" in stdout
    assert "device: cpu onnxruntime" in stdout and "ran: onnxruntime" in stdout and "time: load" in stdout
    with Image.open(out) as img:
        assert img.format == fmt and img.n_frames == 4 and img.size == (96, 64)
        params = read_parameters(img)
        img.seek(1)
        img.load()
        assert img.info["duration"] == 100
    assert params.startswith("\nSteps: 2, Sampler: Euler") and "Seed: 3, Size: 96x64" in params  # no prompt
    assert "Min CFG scale: 1.5" in params and "Frames: 4, FPS: 10, Motion bucket id: 100" in params
    assert "Noise aug strength: 0.05, Decode chunk: 2" in params
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["init.png", name])


def test_video_frames_dir_and_default_name(tiny_package, tmp_path, capsys, monkeypatch):
    from edgediff.runtime.image import read_parameters

    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(capsys, *_video(tiny_package, tmp_path, "--frames", "3", "--frames-dir", "shots/a"))
    assert code == 0, err
    shots = tmp_path / "shots" / "a"  # created, and alone: no animated file without --output
    assert sorted(p.name for p in shots.iterdir()) == [f"edgediff-3_{n:03d}.png" for n in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.png", "shots"]
    assert "wrote 3 frames to shots/a (edgediff-3_000.png ... edgediff-3_002.png; 96x64, seed 3)" in stdout
    with Image.open(shots / "edgediff-3_001.png") as img:
        assert img.size == (96, 64) and "Frames: 3, FPS: 7" in read_parameters(img)
    code, stdout, err = run(capsys, *_video(tiny_package, tmp_path, "--frames", "2", "--frames-dir", "more",
                                            "-o", "clip.gif"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "more").iterdir()) == ["clip_000.png", "clip_001.png"]
    with Image.open(tmp_path / "clip.gif") as img:
        assert img.n_frames == 2
    code, stdout, err = run(capsys, *_video(tiny_package, tmp_path, "--frames", "2"))
    assert code == 0 and (tmp_path / "edgediff-3.webp").is_file(), err  # the default name


@pytest.mark.parametrize(("extra", "message"), [
    (("-p", "a cat"), "takes no text: leave the prompt and negative prompt out"),
    (("-n", "blurry"), "takes no text"),
    (("NO-INIT",), "makes a video from an image: give --init-image"),
    (("-o", "x.png"), "--output x.png: a video is written as animated .webp or .gif, not '.png'; for one PNG a "
                      "frame give --frames-dir DIR"),
    (("-o", "x.mp4"), "not '.mp4'"),
    (("--batch-count", "2"), "--batch-count: not for image-to-video models; svd (svd) makes a video"),
    (("--prompt-file", "PROMPTS"), "--prompt-file: not for image-to-video models"),
    (("--hires-scale", "2", "--mask", "INIT"), "--mask, --hires-scale: not for image-to-video models"),
    (("--controlnet", "CN", "--control-image", "INIT"), "--controlnet, --control-image: not for image-to-video"),
    (("--frames", "0"), "--frames must be at least 1 (got 0)"),
    (("--fps", "0"), "--fps must be at least 1 (got 0)"),
    (("--motion-bucket", "-1"), "--motion-bucket-id must be at least 0 (got -1.0)"),
    (("--frames-dir", "INIT"), "is a file; name a folder"),
])
def test_video_usage_errors(tiny_package, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)  # a case that ran would write its default edgediff-3.webp here
    args = list(_video(tiny_package, tmp_path))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    if "NO-INIT" in extra:
        at = args.index("--init-image")
        del args[at:at + 2]
        extra = ()
    subst = {"PROMPTS": str(tmp_path / "prompts.txt"), "INIT": str(tmp_path / "init.png"), "CN": str(tmp_path)}
    before = sorted(tmp_path.iterdir())
    code, _, err = run(capsys, *args, *(subst.get(a, a) for a in extra))
    assert code == 2 and message in err, err
    assert sorted(tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize(("extra", "message"), [
    (("--frames", "4", "--motion-bucket", "9"), "--frames, --motion-bucket-id: options of image-to-video models; "
                                                 "sd1 (sd1) makes images"),
    (("--noise-aug", "0.1"), "--noise-aug-strength: options of image-to-video models"),
    (("--frames-dir", "shots"), "--frames-dir: an option of image-to-video models; sd1 (sd1) makes images"),
])
def test_video_options_on_an_image_model_are_errors(tiny_package, tmp_path, capsys, extra, message):
    code, _, err = run(capsys, *_generate(tiny_package, "-o", str(tmp_path / "x.png"), *extra))
    assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []

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
    (("--sampler", "fastest"), "unknown sampler 'fastest'; choose one of: euler"),
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
    (("--output", "DIR"), "is a folder; name the PNG file"),
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
    assert proc.returncode == 2 and "the following arguments are required" in proc.stderr


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

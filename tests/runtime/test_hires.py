"""Hires fix (runtime.hires), A1111's two-pass text to image: the first pass, the upscale, then
image to image at the larger size with the same seed, against diffusers run the same way; the
latent upscalers against torch's interpolate (what A1111 calls); sizes and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgediff.cli import main
from edgediff.errors import UsageError
from edgediff.runtime import Pipeline, hires

from reference import NEGATIVE, PROMPT, diffusers_pipeline, diffusers_scheduler, psnr

HIRES_PSNR = 40.0  # dB, the floor; measured 88 dB and up (a few pixels 1 apart)
SIZE, STEPS, HR_STEPS, STRENGTH = 64, 6, 4, 0.5


def test_latent_upscalers_are_torchs_interpolate():
    """A1111's latent upscalers are torch.nn.functional.interpolate's modes: the same numbers,
    up and down, at whole and fractional scales."""
    import torch

    x = np.random.default_rng(0).standard_normal((1, 4, 8, 6)).astype(np.float32)
    for name, (mode, antialias) in hires.LATENT_MODES.items():
        for height, width in ((16, 12), (13, 17), (8, 6), (5, 4)):
            want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(height, width), mode=mode,
                                                   antialias=antialias).numpy()
            got = hires.interpolate(x, height, width, mode, antialias)
            assert np.abs(got - want).max() < 1e-5, (name, height, width)


def test_target_sizes_are_a1111s():
    t = hires.target(64, 48, 2.0, 0, 0)
    assert (t.upscale, t.size, t.fields) == ((128, 96), (128, 96), {"Hires upscale": "2"})
    t = hires.target(64, 48, 1.5, 0, 0)  # int(64 * 1.5) x int(48 * 1.5), the latent floor of that
    assert (t.upscale, t.size) == ((96, 72), (96, 72))
    t = hires.target(64, 48, None, 100, 0)  # the other side in proportion
    assert (t.upscale, t.size, t.fields) == ((100, 75), (96, 72), {"Hires resize": "100x0"})
    t = hires.target(64, 48, None, 0, 96)
    assert (t.upscale, t.size) == ((128, 96), (128, 96))
    # both: covered, then the latent cropped to it, centred
    t = hires.target(64, 48, None, 128, 128)
    assert (t.upscale, t.latent, t.top, t.left, t.size) == ((170, 128), (16, 16), 0, 2, (128, 128))
    t = hires.target(64, 48, 2.0, 0, 0, down=8, patch=2)  # a DiT's latent comes in patches of 2
    assert t.size == (128, 96)
    assert hires.second_pass_steps(4, 0.5) == (8, 4) and hires.second_pass_steps(10, 1.0) == (10, 0)


_PIPES: dict = {}


def _diffusers_hires(folder, ours: Pipeline, upscaler: str) -> Image.Image:
    """A1111's definition with diffusers: text to image, the upscale, then image to image at a
    schedule of hires_steps / strength steps, of which the last hires_steps run (same seed)."""
    import torch

    if folder not in _PIPES:  # loaded once per model for the cases that share it
        _PIPES[folder] = diffusers_pipeline(folder), diffusers_pipeline(folder, img2img=True)
    t2i, i2i = _PIPES[folder]
    for pipe in (t2i, i2i):
        pipe.scheduler, _ = diffusers_scheduler("euler", "normal", pipe.scheduler.config, ours.schedule)
    args = dict(negative_prompt=NEGATIVE, guidance_scale=7.5)
    first = dict(num_inference_steps=STEPS, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(1234))
    if upscaler in hires.LATENT_MODES:
        latents = t2i(PROMPT, **args, **first, output_type="latent").images
        mode, antialias = hires.LATENT_MODES[upscaler]
        image = torch.nn.functional.interpolate(latents, size=(2 * SIZE // 8, 2 * SIZE // 8), mode=mode,
                                                antialias=antialias)
    else:
        pixels = t2i(PROMPT, **args, **first, output_type="np").images[0]
        low = Image.fromarray((255.0 * np.clip(pixels, 0, 1)).astype(np.uint8))  # truncated, as A1111
        image = low.resize((2 * SIZE, 2 * SIZE), Image.Resampling.LANCZOS)
    total, _ = hires.second_pass_steps(HR_STEPS, STRENGTH)
    return i2i(PROMPT, **args, image=image, strength=STRENGTH, num_inference_steps=total,
               generator=torch.Generator().manual_seed(1234)).images[0]


@pytest.mark.parametrize(("name", "upscaler"), [("sd1", "Lanczos"), ("sd1", "Latent"), ("sdxl", "Lanczos")])
def test_hires_fix_matches_diffusers(tiny_source, tiny_package, name, upscaler):
    ours = Pipeline(tiny_package(name), device="cpu")
    image = ours.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, sampler="euler", schedule="normal", seed=1234,
                          width=SIZE, height=SIZE, hires_scale=2, hires_upscaler=upscaler, hires_steps=HR_STEPS,
                          hires_strength=STRENGTH)
    assert image.size == (2 * SIZE, 2 * SIZE)
    params = image.info["parameters"]
    assert (f"Steps: {STEPS}," in params and "Size: 64x64" in params and f"Denoising strength: {STRENGTH}" in params
            and f"Hires upscale: 2, Hires steps: {HR_STEPS}, Hires upscaler: {upscaler}," in params)
    ref = _diffusers_hires(tiny_source(name), ours, upscaler)
    assert psnr(ref, image) >= HIRES_PSNR
    if upscaler == "Lanczos":  # the first pass alone, scaled up, is another image
        low = ours.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, sampler="euler", schedule="normal",
                            seed=1234, width=SIZE, height=SIZE)
        assert psnr(low.resize(image.size, Image.Resampling.LANCZOS), image) < HIRES_PSNR


def test_hires_fix_with_an_esrgan_file_and_sizes(tiny_package, tmp_path):
    """A model upscaler runs as A1111 runs it (the model toward the scale, then Lanczos to the
    size); hires_width/height set the second size."""
    from safetensors.numpy import save_file

    from edgediff.runtime import upscale

    from tiny_upscalers import tiny

    _, state = tiny("compact", 2)
    path = tmp_path / "2x_tiny.safetensors"
    save_file(state, path)
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    args = dict(steps=3, seed=9, width=SIZE, height=SIZE)
    image = pipe.generate(PROMPT, hires_upscaler=path, hires_width=96, **args)
    assert image.size == (96, 96)
    params = image.info["parameters"]
    assert "Hires resize: 96x0" in params and "Hires upscaler: 2x_tiny," in params and "Hires steps" not in params
    assert "Denoising strength: 0.7" in params
    # the loaded model is taken as it is too, with the same result
    again = pipe.generate(PROMPT, hires_upscaler=upscale.load_upscaler(path), hires_width=96, **args)
    assert np.array_equal(np.asarray(again), np.asarray(image))
    lanczos = pipe.generate(PROMPT, hires_upscaler="lanczos", hires_width=96, **args)
    assert "Hires upscaler: Lanczos," in lanczos.info["parameters"]
    assert not np.array_equal(np.asarray(lanczos), np.asarray(image))
    # covering 96x64 from 64x64: 96x96, its latent cropped to 12x8, centred
    wide = pipe.generate(PROMPT, hires_width=96, hires_height=64, **args)
    assert wide.size == (96, 64) and "Hires resize: 96x64, Hires upscaler: Latent," in wide.info["parameters"]


def test_hires_bad_input(tiny_package, tmp_path):
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    args = dict(steps=2, seed=1, width=SIZE, height=SIZE)
    with pytest.raises(UsageError, match="hires_upscaler 'Bicubic': not an upscaler; give one of 'Latent'"):
        pipe.generate(PROMPT, hires_scale=2, hires_upscaler="Bicubic", **args)
    not_a_model = tmp_path / "junk.pth"
    not_a_model.write_bytes(b"junk")
    with pytest.raises(UsageError, match="hires_upscaler: .*junk.pth"):
        pipe.generate(PROMPT, hires_scale=2, hires_upscaler=not_a_model, **args)
    with pytest.raises(UsageError, match=r"hires_strength must be in \(0, 1\]"):
        pipe.generate(PROMPT, hires_scale=2, hires_strength=0, **args)
    with pytest.raises(UsageError, match="hires_scale must be a positive number"):
        pipe.generate(PROMPT, hires_scale=-1, **args)
    with pytest.raises(UsageError, match="hires_steps must be a whole number"):
        pipe.generate(PROMPT, hires_scale=2, hires_steps=-3, **args)
    with pytest.raises(UsageError, match="does not take init_image"):
        pipe.generate(PROMPT, hires_scale=2, init_image=Image.new("RGB", (SIZE, SIZE)), **args)
    with pytest.raises(UsageError, match="too small"):
        pipe.generate(PROMPT, hires_scale=0.05, **args)


def test_cli_hires_fix(tiny_package, tmp_path, capsys):
    out = tmp_path / "big.png"
    assert main(["generate", "--model", str(tiny_package("sd1")), "--prompt", "a cat", "--steps", "3", "--seed", "5",
                 "--width", "64", "--height", "64", "--hires-scale", "1.5", "--hires-upscaler", "Latent (bicubic)",
                 "--hires-steps", "2", "--hires-strength", "0.6", "--device", "cpu", "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (96, 96)
        params = image.text["parameters"]
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic)" in params
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_package("sd1")), "--prompt", "a cat", "--steps", "2",
                 "--hires-scale", "2", "--hires-upscaler", "Sharp", "--device", "cpu"]) == 2
    assert "--hires-upscaler 'Sharp': not an upscaler" in capsys.readouterr().err


def test_hires_progress_and_interrupt(tiny_package):
    """Progress counts both passes; stopped in the second pass, the image is the larger one so far;
    stopped in the first, the first pass's (A1111 skips the second)."""
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    args = dict(steps=4, seed=2, width=SIZE, height=SIZE, hires_scale=2, hires_steps=3)
    seen = []
    pipe.generate(PROMPT, progress=lambda done, total: seen.append((done, total)), **args)
    assert seen[0] == (0, 7) and seen[-1] == (7, 7)
    late = pipe.generate(PROMPT, interrupt=lambda: len(pipe.timings.steps) == 5, **args)
    assert late.size == (2 * SIZE, 2 * SIZE)
    assert "Steps: 4," in late.info["parameters"] and "Interrupted: after 1 of 3 hires steps" in late.info["parameters"]
    early = pipe.generate(PROMPT, interrupt=lambda: len(pipe.timings.steps) == 2, **args)
    assert early.size == (SIZE, SIZE) and "Interrupted: after 2 of 4 steps" in early.info["parameters"]

"""Inpainting (runtime.inpaint): the same image as diffusers' StableDiffusionInpaintPipeline and
StableDiffusionXLInpaintPipeline inside the mask, with an inpainting model (9-channel U-Net) and a
regular one, the original's pixels outside it, A1111's mask handling, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from edgediff.cli import main
from edgediff.errors import UsageError
from edgediff.runtime import Pipeline, inpaint

from reference import NEGATIVE, PROMPT, diffusers_scheduler, psnr

INSIDE_PSNR = 40.0  # dB inside the mask, the floor; measured: identical (inf)
SIZE = 64
STEPS = 6


def _init(width: int = SIZE, height: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 4, y * 4, ((x - 32) ** 2 + (y - 32) ** 2 < 300) * 255], -1)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _mask(width: int = SIZE, height: int = SIZE, box=(8, 16, 40, 48)) -> Image.Image:
    """White in `box` (x1, y1, x2, y2): on the latent grid, so every way of shrinking it agrees."""
    values = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    values[y1:y2, x1:x2] = 255
    return Image.fromarray(values)


def _diffusers_inpaint(folder, ours: Pipeline, sampler: str, xl: bool, **kw) -> Image.Image:
    """diffusers' inpaint pipeline from the folder's parts (its from_pretrained would take the tiny
    model_index.json, which has no diffusers version, for a legacy inpainting checkpoint)."""
    import diffusers
    import torch

    base_cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    base = base_cls.from_pretrained(folder, **extra)
    if xl:
        pipe = diffusers.StableDiffusionXLInpaintPipeline(**base.components, requires_aesthetics_score=False)
    else:
        pipe = diffusers.StableDiffusionInpaintPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler, extra = diffusers_scheduler(sampler, "normal", pipe.scheduler.config, ours.schedule)
    steps = {"num_inference_steps": STEPS}
    if "timesteps" in extra:
        steps = {"timesteps": [int(t) for t in extra["timesteps"](STEPS)]}
    return pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(1234), **steps, **kw).images[0]


@pytest.mark.parametrize(("name", "sampler"), [("sd1-inpaint", "euler"), ("sd1", "euler"), ("sd1", "dpmpp_2m"),
                                               ("sdxl-inpaint", "euler")])
def test_inpainting_matches_diffusers(tiny_source, tiny_package, name, sampler):
    """Inside the mask diffusers' image (an inpainting model given the mask and the masked image's
    latent; a regular one keeping the original latent, noised, outside the mask at every step);
    outside it the original's pixels, as A1111 composites them."""
    ours = Pipeline(tiny_package(name), device="cpu")
    assert ours._inpainting_model() == name.endswith("inpaint")
    init, mask = _init(), _mask()
    image = ours.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, sampler=sampler, schedule="normal", seed=1234,
                          init_image=init, mask=mask, mask_blur=0, strength=0.75)
    ref = _diffusers_inpaint(tiny_source(name), ours, sampler, name.startswith("sdxl"), image=init, mask_image=mask,
                             strength=0.75)
    inside = np.asarray(mask) > 0
    got = np.asarray(image)
    assert psnr(got[inside], np.asarray(ref)[inside]) >= INSIDE_PSNR
    assert np.array_equal(got[~inside], np.asarray(init)[~inside])
    plain = np.asarray(ours.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, sampler=sampler, schedule="normal",
                                     seed=1234, init_image=init, strength=0.75))
    assert psnr(got[inside], plain[inside]) < INSIDE_PSNR  # the mask changed what was drawn


def test_mask_handling_is_a1111s():
    # an RGBA mask with transparency: its alpha, thresholded at 128; any other: its grey levels
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 200))
    rgba.putpixel((2, 0), (255, 255, 255, 100))
    assert list(inpaint.binary_mask(rgba).getdata()) == [0, 255, 0, 0]
    assert list(inpaint.binary_mask(Image.new("RGB", (2, 1), (128, 128, 128))).getdata()) == [128, 128]
    # the blur: cv2's Gaussian of 2 * int(2.5 sigma + 0.5) + 1 taps, along x then y
    dot = np.zeros((31, 31), np.uint8)
    dot[15, 15] = 255
    taps = inpaint._gaussian_taps(2.0)
    assert len(taps) == 11 and abs(taps.sum() - 1) < 1e-12
    blurred = np.asarray(inpaint.blur_mask(Image.fromarray(dot), 2.0), np.float64)
    want = np.zeros((31, 31))
    want[10:21, 10:21] = 255 * np.outer(taps, taps)
    assert np.abs(blurred - want).max() <= 1
    # the crop: the mask's box, padded, grown to the processing size's ratio (masking.py's example:
    # a 128x32 mask drawn for 512x512 becomes 128x128), kept inside the image
    region = inpaint.crop_region(_mask(512, 512, (100, 200, 228, 232)), 0)
    assert region == (100, 200, 228, 232)
    assert inpaint.expand_crop_region(region, 512, 512, 512, 512) == (100, 152, 228, 280)
    assert inpaint.expand_crop_region((0, 0, 40, 10), 64, 64, 64, 64) == (0, 0, 40, 40)
    assert inpaint.crop_region(_mask(64, 64, (8, 8, 16, 16)), 12) == (0, 0, 28, 28)
    assert inpaint.crop_region(Image.new("L", (8, 8)), 4) is None
    # the latent mask: Pillow's bicubic, rounded; on the latent grid it is the nearest pixel's
    job = inpaint.prepare(_init(), _mask(), SIZE, SIZE, blur=0)
    small = job.latent_mask(8, 8)
    assert np.array_equal(small, inpaint.nearest(job.condition_mask(), 8, 8))
    assert small.sum() == 4 * 4


def test_only_masked_draws_the_box_and_pastes_it_back(tiny_package):
    """inpaint_full_res: the box around the mask (plus padding, grown to 1:1) drawn at 64x64 and
    scaled back into the original, whose size the result keeps; the rest is the original's."""
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    init = _init(100, 90)
    mask = _mask(100, 90, (60, 30, 76, 46))
    image = pipe.generate(PROMPT, steps=4, seed=7, init_image=init, mask=mask, mask_blur=0, inpaint_full_res=True,
                          inpaint_full_res_padding=8, width=SIZE, height=SIZE)
    assert image.size == (100, 90)
    params = image.info["parameters"]
    assert "Size: 64x64" in params and "Inpaint area: Only masked, Masked area padding: 8" in params
    got, orig, inside = np.asarray(image), np.asarray(init), np.asarray(mask) > 0
    assert np.array_equal(got[~inside], orig[~inside])
    assert not np.array_equal(got[inside], orig[inside])
    # the box and its scale: as drawing the crop itself at 64x64, then scaling it back (compared
    # away from the mask's edge, where the two composite differently)
    box = inpaint.expand_crop_region(inpaint.crop_region(mask, 8), SIZE, SIZE, 100, 90)
    assert box == (52, 22, 84, 54)
    lanczos = Image.Resampling.LANCZOS
    crop = pipe.generate(PROMPT, steps=4, seed=7, init_image=init.crop(box).resize((SIZE, SIZE), lanczos),
                         mask=mask.crop(box).resize((SIZE, SIZE), lanczos), mask_blur=0)
    back = np.asarray(crop.resize((32, 32), lanczos))
    assert psnr(got[33:43, 63:73], back[11:21, 11:21]) >= INSIDE_PSNR


def test_fill_blur_invert_and_mask_size(tiny_package):
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    init, mask = _init(), _mask()
    args = dict(steps=4, seed=3, init_image=init, strength=0.5)
    base = pipe.generate(PROMPT, mask=mask, mask_blur=0, **args)
    assert "Mask" not in base.info["parameters"] and "Masked content" not in base.info["parameters"]
    inside = np.asarray(mask) > 0
    # what the masked area starts from: each fill its own image, the outside untouched
    seen = [np.asarray(base)]
    for fill, name in ((0, "fill"), (2, "latent noise"), (3, "latent nothing")):
        image = pipe.generate(PROMPT, mask=mask, mask_blur=0, inpainting_fill=fill, **args)
        assert f"Masked content: {name}" in image.info["parameters"]
        got = np.asarray(image)
        assert np.array_equal(got[~inside], np.asarray(init)[~inside])
        assert all(psnr(got[inside], other[inside]) < INSIDE_PSNR for other in seen)
        seen.append(got)
    # inverted: as the inverted mask
    inverted = pipe.generate(PROMPT, mask=ImageOps.invert(mask), inpainting_mask_invert=True, mask_blur=0, **args)
    assert "Mask mode: Inpaint not masked" in inverted.info["parameters"]
    assert np.array_equal(np.asarray(inverted), np.asarray(base))
    # blurred: the original beyond the blur's reach (2 * int(2.5 * 4 + 0.5) + 1 = 21 taps)
    blurred = np.asarray(pipe.generate(PROMPT, mask=mask, mask_blur=4, **args))
    far = np.ones((SIZE, SIZE), bool)
    far[16 - 10:48 + 10, 0:40 + 10] = False
    assert np.array_equal(blurred[far], np.asarray(init)[far])
    assert not np.array_equal(blurred, np.asarray(base))
    # a mask of another size is resized to the image's (Lanczos, as A1111), and the text says so
    half = mask.resize((32, 32), Image.Resampling.NEAREST)
    small = pipe.generate(PROMPT, mask=half, mask_blur=0, **args)
    assert "Mask resized: 32x32 to 64x64" in small.info["parameters"]
    resized = pipe.generate(PROMPT, mask=half.resize((SIZE, SIZE), Image.Resampling.LANCZOS), mask_blur=0, **args)
    assert np.array_equal(np.asarray(small), np.asarray(resized))


def test_bad_masks(tiny_package, tmp_path):
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    init = _init()
    args = dict(steps=2, seed=1, init_image=init)
    junk = tmp_path / "mask.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(UsageError, match=r"^mask .*mask.png: not a readable image"):
        pipe.generate(PROMPT, mask=junk, **args)
    with pytest.raises(UsageError, match=r"^mask .*absent.png: no such file"):
        pipe.generate(PROMPT, mask=tmp_path / "absent.png", **args)
    with pytest.raises(UsageError, match="mask needs init_image"):
        pipe.generate(PROMPT, mask=_mask(), steps=2)
    with pytest.raises(UsageError, match="inpainting_fill must be one of 0 .fill., 1 .original."):
        pipe.generate(PROMPT, mask=_mask(), inpainting_fill=4, **args)
    with pytest.raises(UsageError, match="mask_blur must be a number of pixels"):
        pipe.generate(PROMPT, mask=_mask(), mask_blur=-1, **args)
    with pytest.raises(UsageError, match="inpaint_full_res_padding must be"):
        pipe.generate(PROMPT, mask=_mask(), inpaint_full_res_padding=-2, **args)
    with pytest.warns(UserWarning, match="the mask is empty"):  # A1111 then draws the whole image
        image = pipe.generate(PROMPT, mask=Image.new("L", init.size), inpaint_full_res=True, width=SIZE, height=SIZE,
                              **args)
    assert np.array_equal(np.asarray(image), np.asarray(pipe.generate(PROMPT, width=SIZE, height=SIZE, **args)))


def test_cli_inpainting(tiny_package, tmp_path, capsys):
    init, mask, out = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "out.png"
    _init().save(init)
    _mask().save(mask)
    common = ["generate", "--model", str(tiny_package("sd1")), "--prompt", "a cat", "--steps", "3", "--seed", "5",
              "--init-image", str(init), "--device", "cpu"]
    assert main([*common, "--mask", str(mask), "--mask-blur", "0", "--inpainting-fill", "2", "--invert-mask",
                 "--output", str(out)]) == 0
    with Image.open(out) as image:
        params = image.text["parameters"]
        got = np.asarray(image.convert("RGB"))
    assert "Mask mode: Inpaint not masked" in params and "Masked content: latent noise" in params
    keep = np.asarray(Image.open(mask)) > 0  # inverted: the white part is kept
    assert np.array_equal(got[keep], np.asarray(_init())[keep])
    capsys.readouterr()
    (tmp_path / "bad.png").write_text("no")
    assert main([*common, "--mask", str(tmp_path / "bad.png")]) == 2
    assert "--mask " in capsys.readouterr().err

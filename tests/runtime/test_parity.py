"""Images from edgediff packages match diffusers' on the same weights, seed, prompt and
scheduler, in fp32 (txt2img and img2img)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgediff.runtime import Pipeline

from reference import NEGATIVE, PROMPT, diffusers_pipeline, diffusers_scheduler, psnr

FP32_PSNR = 45.0  # dB, the floor; measured values are 60 dB and up (most are 80+)
SIZE = 64
STEPS = 6

CASES = [
    ("sd1", "euler", "normal"),
    ("sd1", "euler_a", "normal"),
    ("sd1", "heun", "normal"),
    ("sd1", "ddim", "normal"),
    ("sd1", "dpmpp_2m", "normal"),
    ("sd1", "dpmpp_2m", "karras"),
    ("sd1", "dpmpp_2m_sde", "normal"),
    ("sd1", "unipc", "normal"),
    ("sd1", "lcm", "lcm"),
    ("sd1-deep", "euler", "karras"),
    ("sd1-deep", "dpmpp_2m", "karras"),
    ("sd2-v", "euler", "normal"),
    ("sd2-v", "dpmpp_2m", "karras"),
    # SDXL: two text encoders side by side, the pooled vector and the size time ids
    ("sdxl", "euler", "normal"),
    ("sdxl", "euler_a", "normal"),
    ("sdxl", "dpmpp_2m", "karras"),
    ("sdxl", "heun", "normal"),
    ("sdxl-wide", "euler", "normal"),
    ("sdxl-wide", "dpmpp_2m", "karras"),
    ("sdxl-wide", "ddim", "normal"),
    # SD3: three text encoders (CLIP features, then T5 tokens), rectified flow with shift 3
    ("sd3", "euler", "normal"),
    ("sd3", "heun", "normal"),
    ("sd35", "euler", "normal"),
    # Flux: CLIP pooled + T5 context, packed 2x2 patches, no CFG; dev embeds the guidance and
    # shifts its schedule by the image's size
    ("flux-schnell", "euler", "normal"),
    ("flux-dev", "euler", "normal"),
]

_pipes: dict = {}


def _reference(source, name: str, sampler: str, schedule: str, ours: Pipeline, img2img=False, **kw):
    key = (name, img2img)
    if key not in _pipes:
        _pipes[key] = diffusers_pipeline(source, img2img=img2img)
    pipe = _pipes[key]
    base = pipe.scheduler.config
    pipe.scheduler, extra = diffusers_scheduler(sampler, schedule, base, ours.schedule)
    import torch

    steps = {"num_inference_steps": STEPS}
    if "timesteps" in extra:
        steps = {"timesteps": [int(t) for t in extra["timesteps"](STEPS)]}
    prompts = {} if "prompt_embeds" in kw or "prompt" in kw else {"prompt": PROMPT, "negative_prompt": NEGATIVE}
    image = pipe(**prompts, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(1234), **steps, **kw).images[0]
    pipe.scheduler = pipe.scheduler.__class__.from_config(base)
    return image


@pytest.mark.parametrize(("name", "sampler", "schedule"), CASES)
def test_txt2img_matches_diffusers(tiny_source, tiny_package, name, sampler, schedule):
    ours = Pipeline(tiny_package(name), device="cpu")
    image = ours.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, sampler=sampler,
                          schedule=schedule, seed=1234, width=SIZE, height=SIZE)
    ref = _reference(tiny_source(name), name, sampler, schedule, ours, width=SIZE, height=SIZE)
    assert psnr(ref, image) >= FP32_PSNR


def _init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    arr = np.stack([x * 4, y * 4, ((x - 32) ** 2 + (y - 32) ** 2 < 300) * 255], -1)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_img2img_matches_diffusers(tiny_source, tiny_package, sampler):
    ours = Pipeline(tiny_package("sd1"), device="cpu")
    init = _init_image()
    image = ours.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, sampler=sampler, schedule="normal",
                          seed=1234, init_image=init, strength=0.6)
    ref = _reference(tiny_source("sd1"), "sd1", sampler, "normal", ours, img2img=True, image=init, strength=0.6)
    assert psnr(ref, image) >= FP32_PSNR


@pytest.mark.parametrize(("name", "sampler"), [("sd3", "euler"), ("sd35", "heun"), ("flux-dev", "euler")])
def test_dit_img2img_matches_diffusers(tiny_source, tiny_package, name, sampler):
    """Flow img2img: the image's latent mixed with noise at the first kept sigma, as diffusers'
    StableDiffusion3Img2ImgPipeline and FluxImg2ImgPipeline start."""
    ours = Pipeline(tiny_package(name), device="cpu")
    init = _init_image()
    image = ours.generate(PROMPT, None if name.startswith("flux") else NEGATIVE, steps=STEPS, guidance=7.5,
                          sampler=sampler, seed=1234, init_image=init, strength=0.6)
    kw = {"prompt": PROMPT} if name.startswith("flux") else {}
    ref = _reference(tiny_source(name), name, sampler, "normal", ours, img2img=True, image=init, strength=0.6,
                     width=SIZE, height=SIZE, **kw)
    assert psnr(ref, image) >= FP32_PSNR


def _clip_skip_embeds(pipe, prompt: str, skip: int):
    """diffusers' clip_skip computation (StableDiffusionPipeline.encode_prompt): hidden state
    skip + 1 from the end, then the final layer norm. Done here because diffusers 0.42 reaches
    for `text_encoder.text_model`, which transformers 5 removed."""
    import torch

    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        return pipe.text_encoder.final_layer_norm(out.hidden_states[-(skip + 1)])


def test_clip_skip_matches_diffusers(tiny_source, tiny_package):
    """A1111's clip skip 2 is diffusers' clip_skip=1 (one layer before the last)."""
    ours = Pipeline(tiny_package("sd1"), device="cpu")
    image = ours.generate(PROMPT, NEGATIVE, steps=STEPS, sampler="euler", schedule="normal",
                          seed=1234, width=SIZE, height=SIZE, clip_skip=2)
    pipe = diffusers_pipeline(tiny_source("sd1"))
    embeds = {"prompt_embeds": _clip_skip_embeds(pipe, PROMPT, 1),
              "negative_prompt_embeds": _clip_skip_embeds(pipe, NEGATIVE, 1)}
    ref = _reference(tiny_source("sd1"), "sd1", "euler", "normal", ours, width=SIZE, height=SIZE, **embeds)
    plain = ours.generate(PROMPT, NEGATIVE, steps=STEPS, sampler="euler", schedule="normal",
                          seed=1234, width=SIZE, height=SIZE)
    assert psnr(ref, image) >= FP32_PSNR
    assert psnr(plain, image) < 40  # the layer really changed



def test_sdxl_size_conditioning_and_empty_negative_match_diffusers(tiny_source, tiny_package):
    """SDXL's empty negative prompt is zeros (force_zeros_for_empty_prompt), and the original
    size and crop reach the UNet."""
    from edgediff.runtime.conditioning import SizeConditioning

    ours = Pipeline(tiny_package("sdxl"), device="cpu")
    size = SizeConditioning(original_size=(256, 192), crop=(16, 8))
    image = ours.generate(PROMPT, "", steps=STEPS, guidance=7.5, sampler="euler", schedule="normal",
                          seed=1234, width=SIZE, height=SIZE, size_conditioning=size)
    ref = _reference(tiny_source("sdxl"), "sdxl", "euler", "normal", ours, width=SIZE, height=SIZE,
                     prompt=PROMPT, negative_prompt=None, original_size=(256, 192),
                     crops_coords_top_left=(16, 8))
    plain = ours.generate(PROMPT, "", steps=STEPS, guidance=7.5, sampler="euler", schedule="normal",
                          seed=1234, width=SIZE, height=SIZE)
    assert psnr(ref, image) >= FP32_PSNR
    assert psnr(plain, ref) < FP32_PSNR  # without the size conditioning the parity would fail


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_refiner_img2img_matches_diffusers(tiny_source, tiny_package, sampler):
    """The refiner alone: image to image with the aesthetic score in its time ids."""
    ours = Pipeline(tiny_package("sdxl-refiner"), device="cpu")
    init = _init_image()
    image = ours.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, sampler=sampler, schedule="normal",
                          seed=1234, init_image=init, strength=0.6)
    ref = _reference(tiny_source("sdxl-refiner"), "sdxl-refiner", sampler, "normal", ours, img2img=True,
                     image=init, strength=0.6)
    assert psnr(ref, image) >= FP32_PSNR


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpmpp_2m"])
def test_sdxl_base_to_refiner_matches_diffusers(tiny_source, tiny_package, sampler):
    """The base to 0.8 of the schedule, the refiner on the rest, as diffusers' denoising_end /
    denoising_start hand-off runs them (one generator, a fresh scheduler for the refiner)."""
    import torch

    base, refiner = Pipeline(tiny_package("sdxl"), device="cpu"), Pipeline(tiny_package("sdxl-refiner"), device="cpu")
    steps = 10
    image = base.generate(PROMPT, NEGATIVE, steps=steps, guidance=7.5, sampler=sampler, schedule="normal",
                          seed=1234, width=SIZE, height=SIZE, refiner=refiner, refiner_start=0.8)
    pipes = [diffusers_pipeline(tiny_source(n), img2img=n.endswith("refiner")) for n in ("sdxl", "sdxl-refiner")]
    for pipe in pipes:
        pipe.scheduler, extra = diffusers_scheduler(sampler, "normal", pipe.scheduler.config, base.schedule)
    timing = {"num_inference_steps": steps}
    if "timesteps" in extra:
        timing = {"timesteps": [int(t) for t in extra["timesteps"](steps)]}
    generator = torch.Generator().manual_seed(1234)
    latents = pipes[0](PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, width=SIZE, height=SIZE,
                       denoising_end=0.8, output_type="latent", generator=generator, **timing).images
    ref = pipes[1](PROMPT, negative_prompt=NEGATIVE, image=latents, guidance_scale=7.5, denoising_start=0.8,
                   generator=generator, **timing).images[0]
    base_only = base.generate(PROMPT, NEGATIVE, steps=steps, guidance=7.5, sampler=sampler, schedule="normal",
                              seed=1234, width=SIZE, height=SIZE)
    assert psnr(ref, image) >= FP32_PSNR
    assert psnr(base_only, ref) < FP32_PSNR  # the refiner really ran


def test_lcm_guidance_embedding_matches_diffusers(tiny_source, tiny_package):
    """An LCM-distilled UNet takes the guidance scale as an embedding (`timestep_cond`), with no
    negative prompt run, as LatentConsistencyModelPipeline does."""
    import torch

    ours = Pipeline(tiny_package("sd1-lcm"), device="cpu")
    assert ours.manifest.defaults["sampler"] == "lcm" and ours.manifest.defaults["steps"] == 4
    image = ours.generate(PROMPT, NEGATIVE, guidance=8.0, seed=1234, width=SIZE, height=SIZE)
    pipe = diffusers_pipeline(tiny_source("sd1-lcm"))
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=8.0, width=SIZE, height=SIZE,
               generator=torch.Generator().manual_seed(1234)).images[0]
    other = ours.generate(PROMPT, NEGATIVE, guidance=2.0, seed=1234, width=SIZE, height=SIZE)
    assert psnr(ref, image) >= FP32_PSNR
    assert psnr(other, ref) < psnr(ref, image) - 10  # the guidance really enters the model


def test_sdxl_turbo_defaults_match_diffusers(tiny_source, tiny_package):
    """A Turbo model's scheduler config (euler ancestral, trailing spacing) gives its defaults:
    one step, guidance off, as SDXL-Turbo is run with diffusers."""
    import torch

    ours = Pipeline(tiny_package("sdxl-turbo"), device="cpu")
    d = ours.manifest.defaults
    assert (d["sampler"], d["steps"], d["guidance"]) == ("euler_a", 1, 0.0)
    for steps in (1, 4):
        image = ours.generate(PROMPT, steps=steps, seed=1234, width=SIZE, height=SIZE)
        pipe = diffusers_pipeline(tiny_source("sdxl-turbo"))
        ref = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=SIZE, height=SIZE,
                   generator=torch.Generator().manual_seed(1234)).images[0]
        assert psnr(ref, image) >= FP32_PSNR

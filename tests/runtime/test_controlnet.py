"""ControlNets against diffusers' StableDiffusionControlNetPipeline on tiny seeded models: one
and several at once, with strengths and guidance windows, from a diffusers folder, from a single
file in LDM's names and from a converted package; the canny preprocessor; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgediff import Pipeline  # takes ControlNet folders and files, as the CLI does
from edgediff.errors import UsageError
from edgediff.runtime.controlnet import ControlNetUnit, canny

from reference import NEGATIVE, PROMPT, diffusers_scheduler, psnr
from tiny_models import build_tiny_controlnet

FLOOR = 40.0  # dB, the issue's
SIZE, STEPS = 64, 6


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two tiny SD 1.x ControlNets (diffusers folders, random zero convolutions) and an SDXL one."""
    root = tmp_path_factory.mktemp("controlnets")
    return {"a": build_tiny_controlnet(root / "a", "sd1", seed=1), "b": build_tiny_controlnet(root / "b", "sd1", seed=2),
            "xl": build_tiny_controlnet(root / "xl", "sdxl", seed=3)}


def _image(seed: int) -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    arr = np.stack([(x * (4 + seed)) % 256, (y * 3 + 40 * seed) % 256, ((x - 20 - seed * 9) ** 2 + (y - 30) ** 2 < 200) * 255], -1)
    return Image.fromarray(arr.astype(np.uint8))


_pipes: dict = {}


def _diffusers(source, folders, images, scales, starts, ends, ours):
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    key = tuple(map(str, folders))
    if key not in _pipes:
        models = [ControlNetModel.from_pretrained(f) for f in folders]
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            source, controlnet=models if len(models) > 1 else models[0], safety_checker=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        _pipes[key] = pipe
    pipe = _pipes[key]
    pipe.scheduler, _ = diffusers_scheduler("euler", "normal", pipe.scheduler.config, ours.schedule)
    one = len(folders) == 1
    return pipe(PROMPT, negative_prompt=NEGATIVE, image=images[0] if one else images, num_inference_steps=STEPS,
                guidance_scale=7.5, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(1234),
                controlnet_conditioning_scale=scales[0] if one else list(scales),
                control_guidance_start=starts[0] if one else list(starts), control_guidance_end=ends[0] if one else list(ends),
                ).images[0]


def _ours(pipe, units):
    return pipe.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, sampler="euler", schedule="normal", seed=1234,
                         width=SIZE, height=SIZE, controlnets=units)


@pytest.mark.parametrize(("which", "scales", "starts", "ends"), [
    (("a",), (0.8,), (0.0,), (1.0,)),
    (("a",), (2.0,), (0.1,), (0.8,)),  # a guidance window: off for the first and the last two steps
    (("a", "b"), (0.7, 0.5), (0.0, 0.34), (0.8, 1.0)),  # two at once, each with its own window
])
def test_controlnet_matches_diffusers(tiny_source, tiny_package, nets, which, scales, starts, ends):
    ours = Pipeline(tiny_package("sd1"), device="cpu")
    images = [_image(k) for k in range(len(which))]
    units = [ControlNetUnit(nets[w], im, s, a, b) for w, im, s, a, b in zip(which, images, scales, starts, ends,
                                                                             strict=True)]
    image = _ours(ours, units)
    ref = _diffusers(tiny_source("sd1"), [nets[w] for w in which], images, scales, starts, ends, ours)
    plain = _ours(ours, None)
    assert psnr(ref, image) >= FLOOR
    assert psnr(plain, image) < FLOOR - 5  # the ControlNet changes the image, far beyond the parity's error


def _ldm_file(folder, path):
    """The diffusers ControlNet saved as lllyasviel's single files are: LDM names under
    `control_model.`, fp16."""
    import json

    from safetensors.numpy import load_file, save_file

    from edgediff.kernels.ldm_names import controlnet_name

    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    save_file({controlnet_name(k, config): v.astype(np.float16) for k, v in weights.items()}, str(path))
    return path


def test_single_file_and_package_give_the_folders_image(tiny_package, nets, tmp_path):
    from edgediff.convert import convert

    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    image = _image(0)
    folder = _ours(pipe, [ControlNetUnit(nets["a"], image, 0.9)])
    single = _ours(pipe, [ControlNetUnit(_ldm_file(nets["a"], tmp_path / "cn.safetensors"), image, 0.9)])
    assert psnr(folder, single) >= FLOOR  # the file holds the weights in fp16
    manifest = convert(nets["a"], tmp_path / "cn")
    assert manifest.role == "controlnet" and manifest.family == "sd1" and list(manifest.components) == ["controlnet"]
    packaged = _ours(pipe, [ControlNetUnit(tmp_path / "cn", image, 0.9)])
    assert np.array_equal(np.asarray(packaged), np.asarray(folder))


def test_sdxl_controlnet_matches_diffusers(tiny_source, tiny_package, nets):
    """SDXL's ControlNet (its own time ids and pooled text) against StableDiffusionXLControlNetPipeline."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    ours = Pipeline(tiny_package("sdxl"), device="cpu")
    image = _image(2)
    got = _ours(ours, [ControlNetUnit(nets["xl"], image, 0.9, 0.0, 0.8)])
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_source("sdxl"),
                                                               controlnet=ControlNetModel.from_pretrained(nets["xl"]))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler, _ = diffusers_scheduler("euler", "normal", pipe.scheduler.config, ours.schedule)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=image, num_inference_steps=STEPS, guidance_scale=7.5,
               width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(1234), controlnet_conditioning_scale=0.9,
               control_guidance_start=0.0, control_guidance_end=0.8).images[0]
    assert psnr(ref, got) >= FLOOR
    assert psnr(_ours(ours, None), got) < FLOOR - 5


def test_sdxl_controlnet_single_file(tiny_source, tiny_package, tmp_path):
    """An SDXL ControlNet as lllyasviel-style single files are (LDM names, fp16, time ids 256 wide
    as every released one): the folder's image."""
    folder = build_tiny_controlnet(tmp_path / "xl256", "sdxl", seed=4, time_id_dim=256)
    ours = Pipeline(tiny_package("sdxl"), device="cpu")
    image = _image(1)
    from_folder = _ours(ours, [ControlNetUnit(folder, image, 0.9)])
    single = _ours(ours, [ControlNetUnit(_ldm_file(folder, tmp_path / "xl.safetensors"), image, 0.9)])
    assert psnr(from_folder, single) >= FLOOR  # the file holds the weights in fp16
    assert psnr(_ours(ours, None), single) < FLOOR - 5


def test_bad_input(tiny_package, nets, tmp_path):
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    with pytest.raises(UsageError, match=r"ControlNet for sdxl cannot steer .*sd1"):
        _ours(pipe, [ControlNetUnit(nets["xl"], _image(0))])
    bad = tmp_path / "control.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(UsageError, match="controlnets.*image .*not a readable image"):
        _ours(pipe, [ControlNetUnit(nets["a"], bad)])
    with pytest.raises(UsageError, match="controlnets.*no such file"):
        _ours(pipe, [ControlNetUnit(tmp_path / "missing.safetensors", _image(0))])
    with pytest.raises(UsageError, match="start <= end"):
        _ours(pipe, [ControlNetUnit(nets["a"], _image(0), 1.0, 0.8, 0.2)])


def test_canny_finds_a_squares_edges():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[8:24, 8:24] = 200
    edges = np.asarray(canny(Image.fromarray(arr)))[..., 0] > 0
    assert edges[8:24, 7:9].any(axis=1).all() and edges[8:24, 23:25].any(axis=1).all()  # the left and right sides
    assert not edges[12:20, 12:20].any() and not edges[:5].any()  # nothing inside or far away
    assert set(np.unique(np.asarray(canny(Image.fromarray(arr))))) <= {0, 255}


def test_command_line(tiny_package, nets, tmp_path, capsys):
    from edgediff.cli import main

    control = tmp_path / "control.png"
    _image(0).save(control)
    common = ["generate", "--model", str(tiny_package("sd1")), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
              "--steps", str(STEPS), "--sampler", "euler", "--schedule", "normal", "--seed", "1234",
              "--width", str(SIZE), "--height", str(SIZE), "--guidance", "7.5"]
    out = tmp_path / "cli.png"
    assert main([*common, "--controlnet", f"{nets['a']}:0.8", "--control-image", str(control), "--control-start",
                 "0.1", "--control-end", "0.8", "--output", str(out)]) == 0
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    want = _ours(pipe, [ControlNetUnit(nets["a"], _image(0), 0.8, 0.1, 0.8)])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    assert main([*common, "--controlnet", str(nets["a"]), "--output", str(out)]) == 2
    assert "give them in pairs" in capsys.readouterr().err
    assert main([*common, "--controlnet", str(nets["xl"]), "--control-image", str(control),
                 "--output", str(out)]) == 2
    assert "--controlnet" in capsys.readouterr().err


def test_canny_preprocessor_runs(tiny_package, nets):
    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    edges = _ours(pipe, [ControlNetUnit(nets["a"], _image(0), 1.0, preprocessor="canny")])
    given = _ours(pipe, [ControlNetUnit(nets["a"], canny(_image(0)), 1.0)])
    assert np.array_equal(np.asarray(edges), np.asarray(given))


def test_controlnet_precisions(tiny_package, nets, tmp_path):
    """A ControlNet converts at the low-bit precisions (int8 meaning int8-weights: int8-static would
    need a base model's runs to calibrate on) and still steers the image."""
    from edgediff.convert import convert

    pipe = Pipeline(tiny_package("sd1"), device="cpu")
    image = _image(0)
    fp32 = _ours(pipe, [ControlNetUnit(nets["a"], image, 0.9)])
    for precision, floor in (("int8", 55.0), ("int4", 39.0)):  # measured 60.7 and 44.6 dB
        manifest = convert(nets["a"], tmp_path / precision, precision=precision)
        assert manifest.components["controlnet"].precision == ("int8-weights" if precision == "int8" else precision)
        assert psnr(fp32, _ours(pipe, [ControlNetUnit(tmp_path / precision, image, 0.9)])) >= floor, precision
    with pytest.raises(UsageError, match="no model to calibrate int8-static on"):
        convert(nets["a"], tmp_path / "static", precision="int8-static")


def test_controlnet_as_a_gguf_package(tiny_package, nets, tmp_path):
    """A ControlNet written as a GGUF package (its graph and its tensors, q8_0) steers as the
    folder does; the package opens as a ControlNet in the runtime without the converter."""
    from edgediff.convert import convert
    from edgediff.runtime import Pipeline as PackagePipeline

    manifest = convert(nets["a"], tmp_path / "cn.gguf", fmt="gguf", precision="q8_0")
    assert manifest.role == "controlnet" and manifest.family == "sd1"
    image = _image(0)
    folder = _ours(Pipeline(tiny_package("sd1"), device="cpu"), [ControlNetUnit(nets["a"], image, 0.9)])
    packaged = _ours(PackagePipeline(tiny_package("sd1"), device="cpu"), [ControlNetUnit(tmp_path / "cn.gguf", image, 0.9)])
    assert psnr(folder, packaged) >= 60  # q8_0 blocks: measured 66.8 dB

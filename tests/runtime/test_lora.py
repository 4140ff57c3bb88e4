"""LoRA files applied at load: images match diffusers' `load_lora_weights` + `fuse_lora` on the
same tiny model, for each format, strength and stack; bad LoRA input is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgediff.errors import EdgediffError, SourceError, UsageError
from edgediff.runtime import Pipeline
from edgediff.runtime.lora import Layer, LoraRequest, prompt_loras, read_lora

from reference import NEGATIVE, PROMPT, diffusers_pipeline, diffusers_scheduler, psnr
from tiny_loras import modules, write_lora

FP32_PSNR = 45.0
SIZE, STEPS = 64, 4
ARGS = dict(steps=STEPS, guidance=7.5, sampler="euler", schedule="normal", seed=1234, width=SIZE, height=SIZE)


def a1111_hash(path) -> str:
    """The short hash A1111 writes in `Lora hashes`: sha256 of a safetensors file after its
    header (the 'addnet' hash), first 12 hex digits; computed here from the file."""
    import hashlib
    from pathlib import Path

    data = Path(path).read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def _diffusers(source, ours: Pipeline, loras):
    """diffusers' image with each (file, strength) fused in turn (fusing adds the changes)."""
    import torch

    pipe = diffusers_pipeline(source)
    pipe.scheduler, _ = diffusers_scheduler("euler", "normal", pipe.scheduler.config, ours.schedule)
    for path, strength in loras:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=strength)
        pipe.unload_lora_weights()
    prompt = {"prompt": PROMPT, "negative_prompt": NEGATIVE}
    return pipe(**prompt, num_inference_steps=STEPS, guidance_scale=7.5, width=SIZE, height=SIZE,
                generator=torch.Generator().manual_seed(1234)).images[0]


@pytest.fixture(scope="module")
def sd1_reference(tiny_source):
    return diffusers_pipeline(tiny_source("sd1"))


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("fmt", ["kohya", "peft", "locon"])
def test_lora_matches_diffusers(tiny_source, tiny_package, sd1_reference, tmp_path, fmt, strength):
    lora = write_lora(sd1_reference, tmp_path / f"{fmt}.safetensors", fmt)
    ours = Pipeline(tiny_package("sd1"), device="cpu", loras=[f"{lora}:{strength}"])
    image = ours.generate(PROMPT, NEGATIVE, **ARGS)
    ref = _diffusers(tiny_source("sd1"), ours, [(lora, strength)])
    plain = Pipeline(tiny_package("sd1"), device="cpu").generate(PROMPT, NEGATIVE, **ARGS)
    assert psnr(ref, plain) < 40  # the LoRA changes the picture, so a LoRA left out would fail
    assert psnr(ref, image) >= FP32_PSNR
    assert f'Lora hashes: "{fmt}: {a1111_hash(lora)}"' in image.info["parameters"]


def test_two_loras_stack(tiny_source, tiny_package, sd1_reference, tmp_path):
    a = write_lora(sd1_reference, tmp_path / "a.safetensors", "kohya", seed=1)
    b = write_lora(sd1_reference, tmp_path / "b.safetensors", "locon", seed=2, rank=2)
    ours = Pipeline(tiny_package("sd1"), device="cpu", loras=[f"{a}:0.7", f"{b}:0.5"])
    ref = _diffusers(tiny_source("sd1"), ours, [(a, 0.7), (b, 0.5)])
    assert psnr(ref, ours.generate(PROMPT, NEGATIVE, **ARGS)) >= FP32_PSNR


@pytest.mark.parametrize(("fmt", "strength"), [("kohya-ldm", 1.0), ("peft", 0.5)])
def test_sdxl_lora_matches_diffusers(tiny_source, tiny_package, tmp_path, fmt, strength):
    """kohya's SDXL files name U-Net modules as the original release does (input_blocks_4_1_...)
    and number both text encoders (lora_te1_, lora_te2_); diffusers' own name both encoders."""
    import json

    source = tiny_source("sdxl")
    pipe = diffusers_pipeline(source)
    config = json.loads((source / "unet" / "config.json").read_text())
    lora = write_lora(pipe, tmp_path / "xl.safetensors", fmt, ldm_config=config,
                      components=("unet", "text_encoder", "text_encoder_2"))
    assert read_lora(lora).family() == "sdxl"
    ours = Pipeline(tiny_package("sdxl"), device="cpu", loras=[f"{lora}:{strength}"])
    ref = _diffusers(source, ours, [(lora, strength)])
    assert psnr(ref, ours.generate(PROMPT, NEGATIVE, **ARGS)) >= FP32_PSNR


def test_diffusers_lora_without_prefixes(tiny_package, sd1_reference, tmp_path):
    """A denoiser's diffusers LoRA saved without `unet.` is the same LoRA."""
    from safetensors.numpy import load_file

    with_prefix = write_lora(sd1_reference, tmp_path / "a.safetensors", "peft", components=("unet",))
    bare = tmp_path / "b.safetensors"
    save_file({k.removeprefix("unet."): v for k, v in load_file(str(with_prefix)).items()}, str(bare))
    images = [Pipeline(tiny_package("sd1"), device="cpu", loras=[p]).generate(PROMPT, NEGATIVE, **ARGS)
              for p in (with_prefix, bare)]
    assert psnr(*images) == float("inf")


def test_prompt_tag_is_the_same_as_the_flag(tiny_package, sd1_reference, tmp_path):
    lora = write_lora(sd1_reference, tmp_path / "style.safetensors", "kohya")
    flag = Pipeline(tiny_package("sd1"), device="cpu", loras=[f"{lora}:0.6"]).generate(PROMPT, NEGATIVE, **ARGS)
    tagged = Pipeline(tiny_package("sd1"), device="cpu", lora_dir=tmp_path)
    image = tagged.generate(f"{PROMPT} <lora:style:0.6>", NEGATIVE, **ARGS)
    assert psnr(flag, image) == float("inf")
    text = image.info["parameters"]
    assert text.startswith(f"{PROMPT} <lora:style:0.6>")  # A1111 keeps the tag in the prompt line
    assert f'Lora hashes: "style: {a1111_hash(lora)}"' in text
    # the next prompt without the tag runs the model as it is again
    again = tagged.generate(PROMPT, NEGATIVE, **ARGS)
    assert psnr(again, Pipeline(tiny_package("sd1"), device="cpu").generate(PROMPT, NEGATIVE, **ARGS)) == float("inf")


# how far below the package's own distance from fp32 its picture with a LoRA may fall: the branch
# keeps the quantized weights as they are; requantizing rounds the LoRA's change again
FLOORS = {"branch": 1.5, "merge": 4.0}


@pytest.mark.parametrize("mode", ["branch", "merge"])
@pytest.mark.parametrize("precision", ["int8", "int4", "gguf-q8_0", "gguf-q4_0"])
def test_quantized_packages_take_a_lora(tiny_source, tiny_package, sd1_reference, tmp_path, precision, mode):
    """On a quantized package the LoRA's picture stays about as close to the fp32 one as the
    package's own picture is to fp32's without it (the precision's floor)."""
    from edgediff.convert import convert

    kind = precision.removeprefix("gguf-")
    package = tmp_path / ("p.gguf" if precision.startswith("gguf") else "p")
    convert(tiny_source("sd1"), package, precision=kind)
    lora = write_lora(sd1_reference, tmp_path / "l.safetensors", "locon")
    fp32 = Pipeline(tiny_package("sd1"), device="cpu", loras=[lora]).generate(PROMPT, NEGATIVE, **ARGS)
    quantized = Pipeline(package, device="cpu", loras=[lora], lora_mode=mode).generate(PROMPT, NEGATIVE, **ARGS)
    plain = Pipeline(package, device="cpu").generate(PROMPT, NEGATIVE, **ARGS)
    floor = psnr(Pipeline(tiny_package("sd1"), device="cpu").generate(PROMPT, NEGATIVE, **ARGS), plain)
    assert psnr(fp32, quantized) >= floor - FLOORS[mode]
    # and the LoRA did change it, towards fp32's picture with it (int8-static merged: 26.3 against
    # 24.3 dB without it; the other cases 2.5-31 dB closer)
    assert psnr(quantized, plain) < 35 and psnr(fp32, quantized) > psnr(fp32, plain) + 1.5


def test_loha_and_lokr_match_peft():
    """LyCORIS LoHa and LoKr layers change a weight as PEFT's own LoHa/LoKr layers do."""
    import torch
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 32)

    roles = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
             "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2", "lokr_w2_a": "k2a",
             "lokr_w2_b": "k2b"}
    rng = np.random.default_rng(0)
    for config in (LoHaConfig(r=4, alpha=2, target_modules=["lin"]), LoKrConfig(r=2, alpha=3, target_modules=["lin"])):
        layer = get_peft_model(Net(), config).base_model.model.lin
        tensors = {"alpha": np.array(config.alpha, np.float32)}
        for part, role in roles.items():
            params = getattr(layer, part, None)
            if params is None or "default" not in params:
                continue
            value = torch.from_numpy(rng.standard_normal(tuple(params["default"].shape)).astype(np.float32))
            with torch.no_grad():
                params["default"].copy_(value)
            tensors[role] = value.numpy()
        expected = layer.get_delta_weight("default").detach().numpy()
        ours = Layer("lora_unet_lin", "denoiser", "lin", tensors)
        assert ours.kind == ("loha" if isinstance(config, LoHaConfig) else "lokr")
        np.testing.assert_allclose(ours.delta(expected.shape), expected, rtol=1e-4, atol=1e-5)


# -- bad input ------------------------------------------------------------------------------

def test_a_file_that_is_not_a_lora(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)}, str(path))
    with pytest.raises(SourceError, match="not a LoRA file"):
        read_lora(path)


def test_mismatched_ranks(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float32),
               "lora_unet_x.lora_up.weight": np.zeros((8, 2), np.float32)}, str(path))
    with pytest.raises(SourceError, match="mismatched ranks"):
        read_lora(path)


def test_lora_for_another_family_is_refused(tiny_source, tiny_package, tmp_path):
    import json

    source = tiny_source("sdxl")
    config = json.loads((source / "unet" / "config.json").read_text())
    lora = write_lora(diffusers_pipeline(source), tmp_path / "xl.safetensors", "kohya-ldm", ldm_config=config,
                      components=("unet", "text_encoder", "text_encoder_2"))
    with pytest.raises(UsageError, match="it is for sdxl models .* the model is sd1"):
        Pipeline(tiny_package("sd1"), device="cpu", loras=[lora])


def test_unmatched_layers_are_reported(tiny_package, sd1_reference, tmp_path):
    from safetensors.numpy import load_file

    path = write_lora(sd1_reference, tmp_path / "l.safetensors", "kohya")
    tensors = load_file(str(path))
    tensors["lora_unet_no_such_block.lora_down.weight"] = np.zeros((4, 8), np.float32)
    tensors["lora_unet_no_such_block.lora_up.weight"] = np.zeros((8, 4), np.float32)
    save_file(tensors, str(path))
    with pytest.warns(RuntimeWarning, match="1 of its .* layers match no weight .*lora_unet_no_such_block"):
        Pipeline(tiny_package("sd1"), device="cpu", loras=[path])


@pytest.mark.parametrize("spec", ["x.safetensors:nan", "x.safetensors:inf"])
def test_strength_must_be_finite(tmp_path, spec):
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="not a finite number"):
        LoraRequest.parse(str(tmp_path / spec))


def test_prompt_tags_bad_input(tmp_path):
    with pytest.raises(UsageError, match="no missing.safetensors in"):
        prompt_loras("a cat <lora:missing:0.5>", tmp_path)
    with pytest.raises(UsageError, match="--lora-dir"):
        prompt_loras("a cat <lora:style>", None)
    with pytest.raises(UsageError, match="is not a number"):
        prompt_loras("a cat <lora:style:strong>", tmp_path)
    with pytest.raises(UsageError, match="without folders"):
        prompt_loras("a cat <lora:../../etc/passwd>", tmp_path)


def test_dora_and_pickles_are_refused(tmp_path):
    path = tmp_path / "dora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float32),
               "lora_unet_x.lora_up.weight": np.zeros((8, 4), np.float32),
               "lora_unet_x.dora_scale": np.zeros((1, 8), np.float32)}, str(path))
    with pytest.raises(SourceError, match="DoRA"):
        read_lora(path)
    (tmp_path / "old.pt").write_bytes(b"\x80\x02")
    with pytest.raises(UsageError, match="only .safetensors"):
        read_lora(tmp_path / "old.pt")
    assert issubclass(UsageError, EdgediffError)


def test_flux_lora_in_bfl_and_diffusers_names(tiny_source, tiny_package, tmp_path):
    """A Flux LoRA in BFL's names (kohya: one change for the fused q/k/v) on a GGUF package (which
    stores the fused tensors) draws what its diffusers-named twin (the change split into to_q,
    to_k, to_v) draws on the ONNX package, and that matches diffusers' fused LoRA."""
    import json

    from safetensors.numpy import save_file

    from edgediff.convert import convert
    from edgediff.kernels.dit_names import flux_pieces

    source = tiny_source("flux-dev")
    pipe = diffusers_pipeline(source)
    linear = modules(pipe, "transformer")
    fused: dict[str, list[tuple[str, int, int]]] = {}
    for dst, parts in flux_pieces(json.loads((source / "transformer" / "config.json").read_text())).items():
        if len(parts) == 1 and dst.removesuffix(".weight") in linear:
            name, start, end = parts[0]
            fused.setdefault(name.removesuffix(".weight"), []).append((dst.removesuffix(".weight"), start, end))
    rng = np.random.default_rng(0)
    bfl, peft = {}, {}
    for module, parts in fused.items():
        shapes = [linear[dst] for dst, _, _ in parts]
        rows = sum(s[0] for s in shapes)
        down = (0.3 * rng.standard_normal((4, shapes[0][1])) / np.sqrt(shapes[0][1])).astype(np.float32)
        up = (1.5 * rng.standard_normal((rows, 4))).astype(np.float32)
        key = "lora_unet_" + module.replace(".", "_")
        bfl.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": np.array(4.0, np.float32)})
        for dst, start, end in parts:
            rows_of = up if end == -1 else up[start:end]
            peft.update({f"transformer.{dst}.lora_A.weight": down, f"transformer.{dst}.lora_B.weight": np.ascontiguousarray(rows_of)})
    assert any(len(p) == 3 for p in fused.values())  # fused q/k/v among them
    save_file(bfl, str(tmp_path / "bfl.safetensors"))
    save_file(peft, str(tmp_path / "diffusers.safetensors"))
    gguf = tmp_path / "flux.gguf"
    convert(source, gguf, precision="fp32")
    ours = Pipeline(tiny_package("flux-dev"), device="cpu", loras=[tmp_path / "diffusers.safetensors"])
    image = ours.generate(PROMPT, NEGATIVE, **ARGS)
    from_bfl = Pipeline(gguf, device="cpu", loras=[tmp_path / "bfl.safetensors"]).generate(PROMPT, NEGATIVE, **ARGS)
    plain = Pipeline(tiny_package("flux-dev"), device="cpu").generate(PROMPT, NEGATIVE, **ARGS)
    ref = _diffusers(source, ours, [(tmp_path / "diffusers.safetensors", 1.0)])
    assert psnr(ref, plain) < 40
    assert psnr(ref, image) >= FP32_PSNR
    assert psnr(image, from_bfl) >= FP32_PSNR
    # the ONNX package (diffusers' names) takes the BFL-named LoRA too: its rows of qkv reach to_q, to_k, to_v
    onnx_bfl = Pipeline(tiny_package("flux-dev"), device="cpu", loras=[tmp_path / "bfl.safetensors"])
    assert psnr(image, onnx_bfl.generate(PROMPT, NEGATIVE, **ARGS)) >= FP32_PSNR
    # BFL's own files, run as they are (graphs built in BFL's names) or converted to an ONNX
    # package (the names kept in the graph's metadata): both LoRAs change their rows
    from edgediff.convert.adopt import adopted_package

    from ldm_checkpoint import write_flux_files

    files = write_flux_files(source, tmp_path / "files")
    parts = dict(text_encoders=[files["clip_l"], files["t5xxl"]], vae=files["ae"])
    adopted = adopted_package(files["flux"], **parts)
    convert(files["flux"], tmp_path / "bfl-onnx", precision="fp32", **parts)
    for package in (adopted, tmp_path / "bfl-onnx"):
        for lora in ("diffusers", "bfl"):
            got = Pipeline(package, device="cpu", loras=[tmp_path / f"{lora}.safetensors"]).generate(PROMPT, NEGATIVE, **ARGS)
            assert psnr(image, got) >= FP32_PSNR, (package, lora)


@pytest.mark.parametrize(("name", "fmt"), [("sd1", "kohya"), ("sd1", "peft"), ("sdxl", "kohya-ldm")])
def test_lora_on_a_single_file_run_as_it_is(tiny_source, tiny_package, tmp_path, name, fmt):
    """A single-file checkpoint's graphs are built in its own names (LDM; SDXL's second encoder
    OpenCLIP's, q/k/v fused): a LoRA in diffusers', kohya's or LDM names changes the same
    weights there as on the diffusers package, the fused ones by rows."""
    import json

    from edgediff.convert.adopt import adopted_package

    from ldm_checkpoint import write_ldm_checkpoint

    source = tiny_source(name)
    config = json.loads((source / "unet" / "config.json").read_text())
    components = ("unet", "text_encoder", "text_encoder_2") if name == "sdxl" else ("unet", "text_encoder")
    lora = write_lora(diffusers_pipeline(source), tmp_path / "l.safetensors", fmt, ldm_config=config,
                      components=components)
    single = adopted_package(write_ldm_checkpoint(source, tmp_path / f"{name}.safetensors"))
    ours = Pipeline(single, device="cpu", loras=[lora]).generate(PROMPT, NEGATIVE, **ARGS)
    package = Pipeline(tiny_package(name), device="cpu", loras=[lora]).generate(PROMPT, NEGATIVE, **ARGS)
    plain = Pipeline(single, device="cpu").generate(PROMPT, NEGATIVE, **ARGS)
    assert psnr(package, plain) < 40
    assert psnr(package, ours) >= FP32_PSNR

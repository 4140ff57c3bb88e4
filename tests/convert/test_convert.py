"""Conversion: each ONNX component matches its torch module; a single-file checkpoint and the
diffusers folder of the same weights give the same package output; failures leave nothing."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from edgediff.convert import convert
from edgediff.errors import SourceError, UsageError
from edgediff.runtime import Pipeline
from edgediff.runtime.safetensors_file import read_safetensors_header

from ldm_checkpoint import write_flux_files, write_ldm_checkpoint, write_sd3_file
from reference import psnr
from tiny_models import build_tiny


@pytest.mark.parametrize("name", ["sd1", "sd1-deep", "sd2-v"])
def test_components_match_torch(tiny_source, tiny_package, name):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src, pkg = tiny_source(name), tiny_package(name)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(src / "unet")
    session = ort.InferenceSession(str(pkg / "unet" / "model.onnx"))
    dim = unet.config.cross_attention_dim
    for h, w in ((8, 8), (9, 11), (16, 12)):  # sizes that are not multiples of 2**levels too
        x, t, c = torch.randn(2, 4, h, w), torch.tensor([999.0, 10.5]), torch.randn(2, 154, dim)
        with torch.no_grad():
            ref = unet(x, t, c).sample.numpy()
        zeros = {i.name: np.zeros((1, i.shape[1], 1, 1), np.float32) for i in session.get_inputs()
                 if "residual" in i.name}  # no ControlNet: its residual inputs are zeros
        out = session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy(),
                                 **zeros})[0]
        np.testing.assert_allclose(out, ref, atol=1e-4)

    vae = AutoencoderKL.from_pretrained(src / "vae")
    z = torch.randn(1, 4, 8, 6)
    with torch.no_grad():
        ref = vae.decode(z).sample.numpy()
        img = torch.rand(1, 3, 64, 48) * 2 - 1
        moments = vae.quant_conv(vae.encoder(img)).numpy()
    out = ort.InferenceSession(str(pkg / "vae_decoder" / "model.onnx")).run(None, {"latent_sample": z.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-4)
    out = ort.InferenceSession(str(pkg / "vae_encoder" / "model.onnx")).run(None, {"sample": img.numpy()})[0]
    np.testing.assert_allclose(out, moments, atol=1e-4)

    te = CLIPTextModel.from_pretrained(src / "text_encoder")
    ids = torch.randint(0, 49406, (2, 77))
    ids[:, 0], ids[:, 9] = 49406, 49407
    with torch.no_grad():
        ref = te(ids, output_hidden_states=True)
    out = ort.InferenceSession(str(pkg / "text_encoder" / "model.onnx")).run(None, {"input_ids": ids.numpy()})
    np.testing.assert_allclose(out[0][-1], ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(out[1], ref.pooler_output.numpy(), atol=1e-4)
    assert out[0].shape[0] == te.config.num_hidden_layers


@pytest.mark.parametrize("component", ["unet", "vae_decoder", "vae_encoder"])
def test_attention_is_one_fused_node(tiny_package, component):
    """No queries x keys score matrix in the graph: every attention is a MultiHeadAttention."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(tiny_package("sd1") / component / "model.onnx")).graph.node]
    assert "MultiHeadAttention" in ops
    assert "Softmax" not in ops


def test_manifest_describes_the_package(tiny_source, tiny_package):
    """Each field against what it describes: the source's configs, the files on disk (their
    sizes and digests measured here), the graphs' stored types, diffusers' scheduler defaults."""
    import hashlib

    import diffusers

    from reference import stored_types

    src, pkg = tiny_source("sd2-v"), tiny_package("sd2-v")
    m = json.loads((pkg / "edgediff.json").read_text())
    src_scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    assert m["family"] == "sd2" and m["prediction"] == "v" and src_scheduler["prediction_type"] == "v_prediction"
    pad = json.loads((src / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"]
    assert m["text_encoders"][0]["pad_token"] == pad == "!"  # OpenCLIP's, as the source's tokenizer says
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, entry in m["components"].items():
        files = [pkg / entry["file"], *(pkg / f for f in entry.get("data_files", ()))]
        assert entry["bytes"] == sum(f.stat().st_size for f in files) > 0, name
        assert entry["sha256"] == hashlib.sha256((pkg / entry["file"]).read_bytes()).hexdigest(), name
        assert entry["precision"] == "fp32" and set(stored_types(pkg, name).values()) == {"FLOAT"}, name
    sched = json.loads((pkg / "scheduler" / "scheduler_config.json").read_text())
    default = getattr(diffusers, src_scheduler["_class_name"]).from_config(src_scheduler).config
    assert sched["timestep_spacing"] == default["timestep_spacing"] == "leading"  # PNDM's own default, written out


def test_single_file_checkpoint_gives_the_same_image(tiny_source, tiny_package, tmp_path):
    """EMA weights are chosen (the plain copies are perturbed, so using them would show) and
    training-only keys are dropped."""
    ckpt = write_ldm_checkpoint(tiny_source("sd1"), tmp_path / "tiny.safetensors", ema_noise=0.05)
    out = tmp_path / "from-single"
    manifest = convert(ckpt, out)
    assert manifest.family == "sd1" and manifest.source["layout"] == "ldm"
    from safetensors import safe_open

    with safe_open(str(ckpt), "np") as f:  # what the file holds besides the three models' weights
        extra = [k for k in f.keys()  # noqa: SIM118 (safe_open is not iterable)
                 if not k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))]
    assert any(k.startswith("model_ema.") for k in extra) and "alphas_cumprod" in extra
    assert manifest.source["ema"] is True and manifest.source["dropped_keys"] == len(extra)
    args = dict(steps=5, seed=11, width=64, height=64, sampler="dpmpp_2m", schedule="karras")
    a = Pipeline(out, device="cpu").generate("a blue square", "red", **args)
    b = Pipeline(tiny_package("sd1"), device="cpu").generate("a blue square", "red", **args)
    assert psnr(a, b) >= 45.0


def test_failed_conversion_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    import edgediff.convert.build as build

    def broken(model, path, read):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
        raise SourceError("simulated failure half way")

    monkeypatch.setattr(build, "write_graph", broken)
    with pytest.raises(SourceError, match="simulated"):
        convert(tiny_source("sd1"), tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_replaced_without_overwrite(tiny_source, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        convert(tiny_source("sd1"), out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["sd35", "flux-dev"])
def test_dit_attention_is_one_node(tiny_package, name):
    """Every attention of the MMDiT/Flux blocks (joint, single, SD3.5's second) is one
    MultiHeadAttention node (flash attention in onnxruntime), none a Softmax over a score matrix."""
    import collections

    import onnx

    graph = onnx.load(str(tiny_package(name) / "transformer" / "model.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops["Softmax"] == 0 and ops["MultiHeadAttention"] == 3


def test_a_truncated_transformer_file_says_what_is_missing(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": np.zeros((6, 2), np.float16)}, str(path))
    with pytest.raises(SourceError, match="not a Flux transformer.*img_in.weight"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_large_graphs_keep_weights_beside_them(tiny_source, tiny_package, tmp_path, monkeypatch):
    """Graphs over protobuf's 2 GiB limit are saved with external data (forced here)."""
    import os
    import stat

    import edgediff.convert.build as build

    monkeypatch.setattr(build, "EXTERNAL_DATA_LIMIT", 0)
    out = tmp_path / "external"
    manifest = convert(tiny_source("sd1"), out)
    unet = manifest.components["unet"]
    assert unet.data_files == ("unet/model.onnx_data",)
    data = out / "unet" / "model.onnx_data"
    assert unet.bytes == (out / unet.file).stat().st_size + data.stat().st_size
    assert stat.S_IMODE(data.stat().st_mode) == 0o666 & ~_umask(os)
    args = dict(steps=3, seed=2, width=64, height=64)
    a = Pipeline(out, device="cpu").generate("a cat", **args)
    b = Pipeline(tiny_package("sd1"), device="cpu").generate("a cat", **args)
    assert psnr(a, b) == float("inf")


def _umask(os) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_sdxl_single_file_gives_the_same_image(tiny_source, tiny_package, tmp_path, name):
    """The SGM layout: `conditioner.embedders.N.*`, the second text encoder in OpenCLIP's names
    with q, k and v fused, `label_emb` for the added conditioning."""
    ckpt = write_ldm_checkpoint(tiny_source(name), tmp_path / f"{name}.safetensors", family=name)
    keys = set(read_safetensors_header(ckpt)[0])
    assert any(".attn.in_proj_weight" in k for k in keys) and "model.diffusion_model.label_emb.0.0.weight" in keys
    out = tmp_path / "from-single"
    manifest = convert(ckpt, out)
    assert manifest.family == name and manifest.source["layout"] == "ldm"
    args = dict(steps=5, seed=11, width=64, height=64, sampler="euler", schedule="normal")
    if name == "sdxl-refiner":
        args.update(init_image=Image.new("RGB", (64, 64), (200, 40, 40)), strength=0.5)
    a = Pipeline(out, device="cpu").generate("a blue square", "red", **args)
    b = Pipeline(tiny_package(name), device="cpu").generate("a blue square", "red", **args)
    assert psnr(a, b) >= 45.0


def test_sd2_single_file_heads_the_shapes_cannot_say(tiny_source, tmp_path):
    """SD 2.x single files (OpenCLIP's text encoder, fused q/k/v) are built in their own names; a
    U-Net's heads are not in its shapes, and SD 2.x's are 64 wide: the tiny model's 16-wide heads
    are refused clearly, before any output."""
    ckpt = write_ldm_checkpoint(tiny_source("sd2-v"), tmp_path / "sd2.safetensors")
    with pytest.raises(SourceError, match="input_blocks.1.1: a transformer 32 wide cannot have 64-wide heads"):
        convert(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _other_sdxl_vae(tmp_path):
    """A second tiny SDXL VAE in the forms users have it: a diffusers folder whose config says it
    is safe in fp16 (as SDXL's fp16-fix VAE's does), the same weights in diffusers' names in one
    file, and in LDM's names in one bare file."""
    from safetensors.torch import save_file

    from edgediff.benchmarks.single_file import to_ldm_state_dict

    other = build_tiny(tmp_path / "other", "sdxl", seed=1)
    config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    ldm = {k.removeprefix("first_stage_model."): v.contiguous()
           for k, v in to_ldm_state_dict(other).items() if k.startswith("first_stage_model.")}
    save_file(ldm, tmp_path / "vae-ldm.safetensors")
    return {"folder": other / "vae", "diffusers-file": other / "vae" / "diffusion_pytorch_model.safetensors",
            "ldm-file": tmp_path / "vae-ldm.safetensors"}


@pytest.mark.parametrize(("main", "form", "vae_precision"), [
    ("folder", "folder", "fp16"), ("folder", "ldm-file", "fp32"), ("folder", "diffusers-file", "fp32"),
    ("single-file", "folder", "fp16")])
def test_vae_swap(tiny_source, tmp_path, main, form, vae_precision):
    """`--vae` replaces the model's VAE whatever form either is in. SDXL's own VAE overflows in
    fp16, so an fp16 package keeps the VAE fp32 unless the given one's config says it is safe."""
    import torch
    from diffusers import AutoencoderKL

    vaes = _other_sdxl_vae(tmp_path)
    source = tiny_source("sdxl")
    if main == "single-file":
        source = write_ldm_checkpoint(source, tmp_path / "xl.safetensors")
    from reference import stored_types

    manifest = convert(source, tmp_path / "pkg", precision="fp16", vae=vaes[form])
    assert manifest.components["vae_decoder"].precision == vae_precision
    assert manifest.components["unet"].precision == "fp16"
    stored = {"fp16": "FLOAT16", "fp32": "FLOAT"}  # read back from the graphs
    assert set(stored_types(tmp_path / "pkg", "vae_decoder").values()) == {stored[vae_precision]}
    assert set(stored_types(tmp_path / "pkg", "unet").values()) == {"FLOAT16"}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoencoderKL.from_pretrained(vaes["folder"]).decode(z).sample.numpy()
    session = ort.InferenceSession(str(tmp_path / "pkg" / "vae_decoder" / "model.onnx"))
    dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    out = session.run(None, {"latent_sample": z.numpy().astype(dtype)})[0].astype(np.float32)
    error = np.abs(out - ref).max() / np.abs(ref).max()
    assert error < (1e-2 if vae_precision == "fp16" else 1e-5)


@pytest.mark.parametrize(("main", "form"), [("folder", "diffusers-file"), ("single-file", "folder"),
                                            ("single-file", "ldm-file")])
def test_vae_swap_into_gguf(tiny_source, tmp_path, main, form):
    """A VAE given apart goes into a GGUF package under LDM's names (what stable-diffusion.cpp
    reads) and draws what the ONNX package with it draws."""
    vaes = _other_sdxl_vae(tmp_path)
    source = tiny_source("sdxl")
    if main == "single-file":
        source = write_ldm_checkpoint(source, tmp_path / "xl.safetensors")
    convert(source, tmp_path / "pkg", vae=vaes[form])
    convert(source, tmp_path / "pkg.gguf", precision="f32", vae=vaes[form])
    import gguf

    assert "first_stage_model.decoder.conv_in.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "pkg.gguf").tensors}
    args = dict(steps=3, seed=2, width=64, height=64)
    images = [Pipeline(p, device="cpu").generate("a blue square", **args) for p in (tmp_path / "pkg", tmp_path / "pkg.gguf")]
    assert psnr(*images) >= 60


def test_vae_swap_errors(tiny_source, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="must be a diffusers VAE"):
        convert(tiny_source("sdxl"), tmp_path / "a", vae=tmp_path / "empty")
    with pytest.raises(SourceError, match="no VAE weights"):
        convert(tiny_source("sdxl"), tmp_path / "b", vae=tiny_source("sdxl") / "unet" / "diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_t5_encoder_matches_transformers(tiny_source, tiny_package):
    """T5's graph gives transformers' last hidden state (its final norm applied) for any ids."""
    import torch
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(tiny_source("sd3") / "text_encoder_3")
    session = ort.InferenceSession(str(tiny_package("sd3") / "text_encoder_3" / "model.onnx"))
    ids = torch.randint(0, 32100, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).last_hidden_state.numpy()
    out = session.run(None, {"input_ids": ids.numpy()})[0]
    assert out.shape == (1, *ref.shape)
    np.testing.assert_allclose(out[0], ref, atol=1e-4)


def test_fp16_keeps_t5_in_fp32(tiny_source, tiny_package, tmp_path):
    """T5's activations overflow fp16 (NaN text embeddings), so one 16-bit name leaves it fp32;
    the CLIPs and the transformer still convert."""
    from reference import stored_types

    manifest = convert(tiny_source("sd3"), tmp_path / "pkg", precision="fp16")
    precisions = {k: v.precision for k, v in manifest.components.items()}
    assert precisions["text_encoder_3"] == "fp32"
    assert precisions["transformer"] == precisions["text_encoder_2"] == precisions["vae_decoder"] == "fp16"
    stored = {c: set(stored_types(tmp_path / "pkg", c).values()) for c in precisions}  # read back
    assert stored["text_encoder_3"] == {"FLOAT"}
    assert stored["transformer"] == stored["text_encoder_2"] == stored["vae_decoder"] == {"FLOAT16"}
    args = dict(steps=4, width=64, height=64, seed=3)
    ref = Pipeline(tiny_package("sd3"), device="cpu").generate("a red cube", "", **args)
    assert psnr(ref, Pipeline(tmp_path / "pkg", device="cpu").generate("a red cube", "", **args)) > 40


@pytest.mark.parametrize("name", ["flux-schnell", "flux-dev"])
def test_flux_files_match_the_folder(tiny_source, tiny_package, tmp_path, name):
    """A Flux transformer in BFL's names (fused q/k/v) with separate clip_l, t5xxl and ae files
    gives the diffusers folder's image; schnell and dev are told apart by the weights."""
    files = write_flux_files(tiny_source(name), tmp_path / "files")
    manifest = convert(files["flux"], tmp_path / "pkg", text_encoders=[files["clip_l"], files["t5xxl"]],
                       vae=files["ae"])
    assert manifest.conditioning.guidance_input == (name == "flux-dev")
    args = dict(steps=3, width=48, height=64, seed=7)
    ref = Pipeline(tiny_package(name), device="cpu").generate("a red cube", **args)
    assert psnr(ref, Pipeline(tmp_path / "pkg", device="cpu").generate("a red cube", **args)) == float("inf")


def test_flux_files_bad_input(tiny_source, tmp_path):
    files = write_flux_files(tiny_source("flux-schnell"), tmp_path / "files")
    with pytest.raises(SourceError, match="no text_encoder, text_encoder_2, VAE weights.*--text-encoder CLIP_L"):
        convert(files["flux"], tmp_path / "a")
    with pytest.raises(UsageError, match="holds no vae, text_encoder_2.*--vae FILE and --text-encoder FILE"):
        convert(files["flux"], tmp_path / "b", text_encoders=[files["clip_l"]])
    with pytest.raises(SourceError, match="not a T5 encoder"):
        convert(files["flux"], tmp_path / "c", text_encoders=[files["clip_l"], files["clip_l"]], vae=files["ae"])
    assert not any((tmp_path / n).exists() for n in "abc")


def test_flux_files_run_as_they_are(tiny_source, tiny_package, tmp_path):
    """The same files run without converting: graphs bind rows of the fused q/k/v tensors."""
    from edgediff.convert.adopt import adopted_package

    files = write_flux_files(tiny_source("flux-dev"), tmp_path / "files")
    package = adopted_package(files["flux"], text_encoders=[files["clip_l"], files["t5xxl"]], vae=files["ae"])
    args = dict(steps=3, width=48, height=64, seed=7)
    ref = Pipeline(tiny_package("flux-dev"), device="cpu").generate("a red cube", **args)
    assert psnr(ref, Pipeline(package, device="cpu").generate("a red cube", **args)) == float("inf")


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_sd3_single_file_matches_the_folder(tiny_source, tiny_package, tmp_path, name):
    """An SD3/SD3.5 single file (MMDiT in Stability's names, text_encoders.clip_l/clip_g/t5xxl,
    the VAE) gives the diffusers folder's image."""
    path = write_sd3_file(tiny_source(name), tmp_path / f"{name}.safetensors")
    manifest = convert(path, tmp_path / "pkg")
    assert manifest.family == "sd3" and manifest.source["layout"] == "ldm"
    args = dict(steps=3, width=48, height=64, seed=7)
    ref = Pipeline(tiny_package(name), device="cpu").generate("a red cube", "blurry", **args)
    assert psnr(ref, Pipeline(tmp_path / "pkg", device="cpu").generate("a red cube", "blurry", **args)) == float("inf")


def _edited_checkpoint(tiny_source, tmp_path, edit) -> object:
    """The tiny SD 1.x model as a single file, with `edit(tensors)` applied."""
    from safetensors.numpy import load_file, save_file

    path = write_ldm_checkpoint(tiny_source("sd1"), tmp_path / "sd1.safetensors")
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return path


def test_files_that_do_not_fit_are_refused_before_any_output(tiny_source, tmp_path):
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    norm = "model.diffusion_model.input_blocks.1.0.in_layers.0."

    def variant(t):  # 5 input channels: neither a latent (4) nor an inpainting model's (9)
        t[conv_in] = np.concatenate([t[conv_in], t[conv_in][:, :1]], axis=1)

    def pruned(t):
        for k in ("weight", "bias"):
            t[norm + k] = t[norm + k][:-3]

    for edit, message in ((variant, "takes 5 input channels .* a variant edgediff does not run"),
                          (pruned, "weights do not fit one architecture.*in_layers.*size mismatch")):
        path = _edited_checkpoint(tiny_source, tmp_path, edit)
        with pytest.raises(SourceError, match=message):
            convert(path, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_forced_family_must_fit_the_file(tiny_source, tmp_path):
    path = write_ldm_checkpoint(tiny_source("sdxl"), tmp_path / "xl.safetensors")
    with pytest.raises(SourceError, match="--family sd1 does not fit this file: its tensors are sdxl's"):
        convert(path, tmp_path / "out", family="sd1")
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_with_the_flag_converts_like_its_safetensors(tiny_source, tmp_path):
    """A `.ckpt` (read with torch.load(weights_only=True), only with the flag) is built as its
    safetensors twin is: the same graphs and weights, the same image; to GGUF too."""
    import torch
    from safetensors.torch import load_file

    single = write_ldm_checkpoint(tiny_source("sd1"), tmp_path / "sd1.safetensors")
    ckpt = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": load_file(str(single))}, ckpt)
    with pytest.raises(SourceError, match="pickle-based.*--allow-pickle"):
        convert(ckpt, tmp_path / "refused")
    args = dict(steps=3, seed=4, width=64, height=64)
    want = Pipeline(convert(single, tmp_path / "a") and tmp_path / "a", device="cpu").generate("a blue square", **args)
    for out in (tmp_path / "b", tmp_path / "b.gguf"):
        manifest = convert(ckpt, out, allow_pickle=True, **({"precision": "f32"} if out.suffix else {}))
        assert manifest.source["kind"] == "checkpoint"
        assert psnr(Pipeline(out, device="cpu").generate("a blue square", **args), want) == float("inf")

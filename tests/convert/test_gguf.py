"""GGUF packages: written with stable-diffusion.cpp's names and gguf-py's quantization (bit for
bit), read back by gguf-py, run by binding the blocks into onnxruntime; files from
stable-diffusion.cpp and ComfyUI-GGUF run through the same door; damaged files are named."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from edgediff.benchmarks.single_file import to_ldm_state_dict
from edgediff.convert import convert
from edgediff.convert.adopt import adopted_package
from edgediff.errors import EdgediffError, PackageError, SourceError, UsageError
from edgediff.kernels.gguf_blocks import FORMATS, WRITABLE
from edgediff.runtime import Pipeline

from reference import psnr

TYPES = [t for t in WRITABLE if t != "f32"]
# Mean PSNR (dB) over 3 seeds against the fp32 ONNX package of the tiny "sd1" model, measured
# 2026-12-03 (/tmp script, same settings as below): f16 65.5, q8_0 58.2, q5_1 48.2, q5_0 48.7,
# q4_1 42.0, q4_0 42.3. Floors leave ~5 dB.
FLOORS = {"f16": 60.0, "q8_0": 53.0, "q5_1": 43.0, "q5_0": 43.0, "q4_1": 37.0, "q4_0": 37.0}
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def packages(tiny_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {t: convert(tiny_source("sd1"), root / f"sd1-{t}.gguf", precision=t) and root / f"sd1-{t}.gguf"
            for t in WRITABLE}


def _images(model, seeds=(0, 1, 2), **kw):
    pipe = Pipeline(model, device="cpu", keep_loaded=True, **kw)
    return [pipe.generate(PROMPT, "blurry", steps=8, seed=s, width=64, height=64) for s in seeds]


def test_gguf_py_reads_the_names_types_and_metadata(packages):
    reader = gguf.GGUFReader(packages["q4_0"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    unet, vae, text = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
    assert {n.split(".")[0] for n in types} == {"model", "first_stage_model", "cond_stage_model"}
    assert types[unet + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"] == "Q4_0"  # Linear
    assert types[unet + "input_blocks.1.0.in_layers.2.weight"] == "F16"  # 3x3 conv: rows of 3 values
    assert types[unet + "input_blocks.1.0.in_layers.2.bias"] == "F32"  # 1-D: kept by the policy
    assert types[unet + "time_embed.0.weight"] == "F16"  # an embedding: kept, at 16 bits
    assert types[text + "encoder.layers.0.self_attn.q_proj.weight"] == "Q4_0"
    assert types[vae + "decoder.conv_in.weight"] == "F32"  # a single low-bit name leaves the VAE at f32
    attn = next(t for t in reader.tensors if t.name == vae + "decoder.mid.attn_1.q.weight")
    assert len(attn.shape) == 4  # LDM's 1x1 convolution, as stable-diffusion.cpp expects
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "sd1"
    manifest = json.loads(bytes(reader.fields["edgediff.manifest"].parts[-1]).decode())
    assert manifest["family"] == "sd1" and manifest["components"]["unet"]["precision"] == "q4_0"
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        graph = base64.b64decode(bytes(reader.fields[f"edgediff.graph.{component}"].parts[-1]))
        import onnx

        model = onnx.load_model_from_string(graph)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if t.dims and t.data_type == 1)
    assert "edgediff.tokenizer.tokenizer.vocab.json" in reader.fields


@pytest.mark.parametrize("kind", TYPES)
def test_tensors_are_gguf_py_quantizations_of_the_weights(tiny_source, packages, kind):
    """Every tensor is what gguf-py's quantize gives for the source weight, byte for byte."""
    source = {k: v.float().numpy() for k, v in to_ldm_state_dict(tiny_source("sd1")).items()}
    reader = gguf.GGUFReader(packages[kind])
    checked = 0
    for t in reader.tensors:
        fmt = FORMATS[t.tensor_type.name.lower()]
        expected = gguf.quants.quantize(source[t.name], fmt.ggml) if not fmt.float else source[t.name].astype(
            np.float16 if fmt.name == "f16" else np.float32)
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                              np.ascontiguousarray(expected).reshape(-1).view(np.uint8)), t.name
        checked += 1
    assert checked == len(source)  # every weight, none merged or dropped


def test_f32_gguf_gives_the_onnx_package_image(tiny_package, packages):
    for a, b in zip(_images(packages["f32"]), _images(tiny_package("sd1")), strict=True):
        assert psnr(a, b) == float("inf")


@pytest.mark.parametrize("kind", TYPES)
def test_image_quality_floor(tiny_package, packages, kind):
    reference = _images(tiny_package("sd1"))
    got = _images(packages[kind])
    assert np.mean([psnr(a, b) for a, b in zip(reference, got, strict=True)]) >= FLOORS[kind]


def test_expanded_weights_match_compact(packages):
    compact = _images(packages["q8_0"], seeds=(0,))
    expanded = _images(packages["q8_0"], seeds=(0,), weights="expanded")
    assert psnr(compact[0], expanded[0]) >= 60


def test_bound_components_say_how_weights_are_held(packages):
    pipe = Pipeline(packages["q4_0"], device="cpu", keep_loaded=True)
    pipe.generate(PROMPT, steps=1, seed=0, width=64, height=64)
    bindings = pipe.component("unet").bindings
    kinds = {(b.stored, b.kind) for b in bindings}
    assert ("q4_0", "quantized") in kinds and ("f16", "stored") in kinds and ("f32", "stored") in kinds
    # what each binding says it holds is what the file stores, as gguf-py reads it; every U-Net tensor bound
    stored = {t.name: (t.tensor_type.name.lower(), int(t.n_elements)) for t in gguf.GGUFReader(packages["q4_0"]).tensors}
    assert {b.name: (b.stored, b.weights) for b in bindings} == {
        k: v for k, v in stored.items() if k.startswith("model.diffusion_model.")}


def test_quantized_convolutions_run_from_their_blocks(tiny_package, tmp_path):
    """--quantize-convolutions: conv weights in Q4_0 as ComfyUI-GGUF lays them out; the runtime
    keeps their codes and dequantizes each as it runs (or once, expanded): the same image."""
    path = tmp_path / "convs.gguf"
    source = json.loads((tiny_package("sd1") / "edgediff.json").read_text())["source"]["path"]
    convert(source, path, precision="q4_0", quantize_convolutions=True)
    reader = gguf.GGUFReader(path)
    conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert next(t for t in reader.tensors if t.name == conv).tensor_type.name == "Q4_0"
    orig = reader.fields["comfy.gguf.orig_shape." + conv]
    assert [int(orig.parts[i][0]) for i in orig.data] == [32, 32, 3, 3]
    pipe = Pipeline(path, device="cpu", keep_loaded=True)
    compact = pipe.generate(PROMPT, "blurry", steps=8, seed=0, width=64, height=64)
    assert ("q4_0", "blocks") in {(b.stored, b.kind) for b in pipe.component("unet").bindings}
    expanded = _images(path, seeds=(0,), weights="expanded")[0]
    assert psnr(compact, expanded) >= 60
    # measured as in FLOORS: 39.3 dB mean over 3 seeds with quantized convolutions (q8_0: 57.0)
    assert psnr(compact, _images(tiny_package("sd1"), seeds=(0,))[0]) >= 34


# -- files edgediff did not write -----------------------------------------------------------

def _rewrite(src, dst, *, keep_keys=True, only=None, rename=None, reshape=False, arch=None, kv=None):
    """Copy a GGUF file's tensors (raw) into a new file: without our metadata (as
    stable-diffusion.cpp writes), or denoiser-only with bare names and ComfyUI-GGUF's reshapes."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), arch if arch is not None else "")
    if keep_keys:
        for key, field in reader.fields.items():
            if key.startswith("edgediff.") and not key.startswith("GGUF."):
                value = (kv or {}).get(key) or bytes(field.parts[-1]).decode()
                writer.add_string(key, value)
    for t in reader.tensors:
        if only and not t.name.startswith(only):
            continue
        name = rename(t.name) if rename else t.name
        data = np.asarray(t.data)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if reshape and len(shape) > 1 and np.prod(shape) % 256 == 0 and shape[-1] % 256 and np.prod(shape) >= 512:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
            data = data.reshape(-1, 256) if data.dtype != np.uint8 else data.reshape(-1, data.size * 256 // int(np.prod(shape)))
        if t.tensor_type.name in ("F32", "F16"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _write_q8_0(path, arch: str, tensors: dict, keep=lambda name: False) -> None:
    """A GGUF file as llama.cpp-family tools write one: matrices whose rows hold whole blocks in
    Q8_0 (unless `keep(name)`), the rest as they are."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, array in tensors.items():
        if array.ndim == 2 and array.shape[1] % 32 == 0 and not keep(name):
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_stable_diffusion_cpp_style_file_gives_the_package_image(packages, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    plain = _rewrite(packages["q8_0"], tmp_path / "sdcpp.gguf", keep_keys=False)
    assert not [k for k in gguf.GGUFReader(plain).fields if not k.startswith("GGUF.")]  # no metadata at all
    with pytest.raises(PackageError, match="without edgediff's metadata"):
        Pipeline(plain)
    direct = adopted_package(plain)
    want = _images(packages["q8_0"], seeds=(0,))[0]
    got = _images(direct, seeds=(0,))[0]
    assert psnr(got, want) >= 60
    assert "Model: sdcpp," in got.info["parameters"]  # the file's name, not the cache folder's
    assert adopted_package(plain) == direct  # cached
    monkeypatch.chdir(tmp_path)  # a file named relative to where the user stands
    assert psnr(_images(adopted_package(Path("sdcpp.gguf")), seeds=(0,))[0], want) >= 60
    converted = convert(plain, tmp_path / "package.gguf")
    assert converted.components["unet"].precision == "q8_0"  # kept as stored, not requantized
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "package.gguf").tensors}
    assert types == {t.name: t.tensor_type for t in gguf.GGUFReader(plain).tensors}
    assert psnr(_images(tmp_path / "package.gguf", seeds=(0,))[0], want) >= 60


def test_comfyui_style_denoiser_with_a_base_gives_the_package_image(packages, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    unet = "model.diffusion_model."
    comfy = _rewrite(packages["q4_0"], tmp_path / "comfy.gguf", keep_keys=False, only=unet, arch="sd1",
                     rename=lambda n: n.removeprefix(unet), reshape=True)
    reader = gguf.GGUFReader(comfy)
    assert any(k.startswith("comfy.gguf.orig_shape.") for k in reader.fields)
    assert not any(t.name.startswith(unet) for t in reader.tensors)
    with pytest.raises(UsageError, match="holds only the denoiser.*--base"):
        adopted_package(comfy)
    base = _rewrite(packages["q4_0"], tmp_path / "base.gguf", keep_keys=False)
    want = _images(packages["q4_0"], seeds=(0,))[0]
    assert psnr(_images(adopted_package(comfy, base=base), seeds=(0,))[0], want) >= 60
    convert(comfy, tmp_path / "adopted.gguf", base=base)
    assert psnr(_images(tmp_path / "adopted.gguf", seeds=(0,))[0], want) >= 60


def test_separate_vae_and_text_encoder_files(tiny_source, packages, tmp_path, monkeypatch):
    """As users download them: a VAE file with bare LDM names, a text encoder in transformers'
    names; the same image as the one checkpoint that holds both."""
    from safetensors.numpy import save_file

    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    unet = "model.diffusion_model."
    comfy = _rewrite(packages["q4_0"], tmp_path / "comfy.gguf", keep_keys=False, only=unet, arch="sd1",
                     rename=lambda n: n.removeprefix(unet))
    state = {k: v.float().numpy() for k, v in to_ldm_state_dict(tiny_source("sd1")).items()}
    save_file(state, str(tmp_path / "base.safetensors"))
    save_file({k.removeprefix("first_stage_model."): v for k, v in state.items() if k.startswith("first_stage_model.")},
              str(tmp_path / "vae.safetensors"))
    save_file({k.removeprefix("cond_stage_model.transformer."): v for k, v in state.items()
               if k.startswith("cond_stage_model.transformer.")}, str(tmp_path / "clip_l.safetensors"))
    with_base = _images(adopted_package(comfy, base=tmp_path / "base.safetensors"), seeds=(0,))[0]
    separate = adopted_package(comfy, vae=tmp_path / "vae.safetensors", text_encoders=[tmp_path / "clip_l.safetensors"])
    assert psnr(_images(separate, seeds=(0,))[0], with_base) == float("inf")


def test_gguf_source_converts_to_onnx_by_dequantizing(packages, tmp_path):
    plain = _rewrite(packages["q8_0"], tmp_path / "sdcpp.gguf", keep_keys=False)
    convert(plain, tmp_path / "onnx", fmt="onnx")
    assert psnr(_images(tmp_path / "onnx", seeds=(0,))[0], _images(packages["q8_0"], seeds=(0,))[0]) >= 50


# -- damaged files ---------------------------------------------------------------------------

def _tensor_info_offset(path, name: str) -> int:
    """Byte offset of the tensor-info record of `name` (its name's first byte)."""
    data = path.read_bytes()
    needle = struct.pack("<Q", len(name)) + name.encode()
    return data.index(needle) + 8


def _patch(path, at: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "sd1")
    writer.add_tensor("a.weight", np.ones((4, 32), np.float32))
    writer.add_tensor("b.weight", np.ones((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _open(path):
    from edgediff.runtime.gguf_file import GGUFFile

    return GGUFFile(path)


def test_wrong_magic(small):
    _patch(small, 0, b"GGUX")
    with pytest.raises(SourceError, match=r"small\.gguf: not a GGUF file \(it starts with b'GGUX'"):
        _open(small)


def test_truncated_file_names_the_tensor(small):
    small.write_bytes(small.read_bytes()[:-100])
    with pytest.raises(SourceError, match=r"small\.gguf: tensor 'b\.weight' data runs from byte \d+ to \d+, past the end"):
        _open(small)


def test_offset_past_the_end_names_the_tensor(small):
    at = _tensor_info_offset(small, "a.weight") + len("a.weight") + 4 + 2 * 8 + 4
    _patch(small, at, struct.pack("<Q", 10**9))
    with pytest.raises(SourceError, match=r"tensor 'a\.weight' data runs from byte \d+ to \d+, past the end"):
        _open(small)


def test_unknown_type_names_the_tensor(small):
    at = _tensor_info_offset(small, "b.weight") + len("b.weight") + 4 + 2 * 8
    _patch(small, at, struct.pack("<I", 99))
    with pytest.raises(SourceError, match=r"tensor 'b\.weight' has unknown type number 99"):
        _open(small)


def test_duplicated_tensor_names(small):
    _patch(small, _tensor_info_offset(small, "b.weight"), b"a")
    with pytest.raises(SourceError, match=r"tensor 'a\.weight' appears twice"):
        _open(small)


def test_unsupported_type_is_named_when_used(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "sd1")
    qtype = gguf.GGMLQuantizationType.TQ1_0
    writer.add_tensor("t.weight", gguf.quants.quantize(np.ones((4, 256), np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SourceError, match=r"tensor 't\.weight' is stored as TQ1_0, a type edgediff cannot read"):
        _open(path).weight("t.weight")


def test_stored_graph_that_is_not_onnx(packages, tmp_path):
    bad = _rewrite(packages["q4_0"], tmp_path / "bad.gguf", arch="sd1",
                   kv={"edgediff.graph.text_encoder": base64.b64encode(b"not a graph").decode()})
    with pytest.raises(PackageError, match=r"bad\.gguf \(edgediff\.graph\.text_encoder\): the stored graph is not a valid ONNX model"):
        Pipeline(bad).generate(PROMPT, steps=1, width=64, height=64)


def test_tensor_of_another_shape(packages, tmp_path):
    name = "model.diffusion_model.out.2.weight"
    reader = gguf.GGUFReader(packages["q4_0"])
    writer = gguf.GGUFWriter(str(tmp_path / "shape.gguf"), "sd1")
    for key, field in reader.fields.items():
        if key.startswith("edgediff."):
            writer.add_string(key, bytes(field.parts[-1]).decode())
    for t in reader.tensors:
        data = np.zeros((4, 32, 3, 2), np.float16) if t.name == name else np.asarray(t.data)
        if t.tensor_type.name in ("F32", "F16"):
            writer.add_tensor(t.name, data)
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PackageError, match=r"shape\.gguf: tensor 'model\.diffusion_model\.out\.2\.weight' has shape \[4, 32, 3, 2\] but the graph needs \[4, 32, 3, 3\]"):
        Pipeline(tmp_path / "shape.gguf").generate(PROMPT, steps=1, width=64, height=64)


def test_failed_conversion_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    import edgediff.convert.gguf as writer

    calls = []

    def failing(array, fmt):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        return gguf.quants.quantize(array, fmt.ggml)

    monkeypatch.setattr(writer, "quantize", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(tiny_source("sd1"), tmp_path / "out" / "model.gguf", precision="q4_0")
    assert not (tmp_path / "out").exists()


def test_usage_errors_come_before_any_work(tiny_source, tmp_path):
    with pytest.raises(UsageError, match="unknown GGUF precision 'q3_0'"):
        convert(tiny_source("sd1"), tmp_path / "m.gguf", precision="q3_0")
    with pytest.raises(UsageError, match="a GGUF package is one file; name it NAME.gguf"):
        convert(tiny_source("sd1"), tmp_path / "m", fmt="gguf")
    with pytest.raises(EdgediffError, match="unknown precision 'q4_0'"):
        convert(tiny_source("sd1"), tmp_path / "m", precision="q4_0")


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_sdxl_gguf(tiny_source, tiny_package, tmp_path, kind):
    """SDXL writes and runs as SD 1.x does: both text encoders under stable-diffusion.cpp's
    names, the added conditioning (`label_emb`) with the UNet."""
    path = convert(tiny_source("sdxl"), tmp_path / "xl.gguf", precision=kind) and tmp_path / "xl.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["model.diffusion_model.label_emb.0.0.weight"] == ("F32" if kind == "f32" else "F16")  # an embedding
    assert types["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] == kind.upper()
    assert types["cond_stage_model.1.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] == kind.upper()
    if kind == "f32":  # OpenCLIP's projection as stable-diffusion.cpp reads it: its name, x @ P
        stored = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
        projection = load_file(tiny_source("sdxl") / "text_encoder_2" / "model.safetensors")["text_projection.weight"]
        np.testing.assert_array_equal(stored["cond_stage_model.1.transformer.text_model.text_projection"],
                                      projection.numpy().T)
    args = dict(steps=6, width=64, height=64)
    reference = [Pipeline(tiny_package("sdxl"), device="cpu").generate(PROMPT, "blurry", seed=s, **args) for s in (0, 1)]
    got = [Pipeline(path, device="cpu").generate(PROMPT, "blurry", seed=s, **args) for s in (0, 1)]
    quality = np.mean([psnr(a, b) for a, b in zip(reference, got, strict=True)])
    assert quality == float("inf") if kind == "f32" else quality >= FLOORS[kind]


@pytest.mark.parametrize(("name", "kind", "fused"), [
    ("sd35", "f32", "joint_blocks.0.x_block.attn2.qkv.weight"),
    ("flux-dev", "f32", "single_blocks.0.linear1.weight"),
    ("flux-schnell", "q8_0", "double_blocks.0.img_attn.qkv.weight"),
])
def test_dit_gguf_in_the_original_names(tiny_source, tiny_package, tmp_path, name, kind, fused):
    """A DiT package as GGUF holds the transformer as its original release does (fused q/k/v,
    BFL's or Stability's names, as stable-diffusion.cpp reads it), T5 under its text_encoders
    name; the graphs bind rows of the fused tensors and draw the fp32 package's image."""
    from safetensors.torch import load_file

    from ldm_checkpoint import write_flux_files, write_sd3_file

    path = tmp_path / "m.gguf"
    convert(tiny_source(name), path, precision=kind)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert stored["model.diffusion_model." + fused].tensor_type.name == kind.upper()
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight" in stored
    if kind == "f32":  # the very tensors of the original layout
        original = (write_flux_files(tiny_source(name), tmp_path / "files")["flux"] if name.startswith("flux")
                    else write_sd3_file(tiny_source(name), tmp_path / "sd3.safetensors"))
        for key, tensor in load_file(original).items():
            if key.startswith("model.diffusion_model.") or name.startswith("flux"):
                key = key if key.startswith("model.diffusion_model.") or not name.startswith("flux") else (
                    "model.diffusion_model." + key)
                data = stored[key].data
                np.testing.assert_array_equal(data.reshape(tensor.shape), tensor.numpy(), err_msg=key)
    args = dict(steps=3, width=48, height=64, seed=7)
    ref = Pipeline(tiny_package(name), device="cpu").generate("a red cube", **args)
    got = Pipeline(path, device="cpu").generate("a red cube", **args)
    assert psnr(ref, got) == float("inf") if kind == "f32" else psnr(ref, got) >= FLOORS[kind]


def test_folders_stream_into_gguf(tiny_source, tmp_path, monkeypatch):
    """A diffusers folder becomes a GGUF file without an fp32 package in between: graphs are
    built without weights and each tensor is read from the folder as it is written."""
    import edgediff.convert.build as build

    built = []
    stock = build.write_graph

    def graph_only(model, path, read):
        built.append(read is not None)
        return stock(model, path, read)

    monkeypatch.setattr(build, "write_graph", graph_only)
    convert(tiny_source("sdxl"), tmp_path / "xl.gguf", precision="q8_0")
    assert built and not any(built)


@pytest.mark.parametrize("name", ["flux-dev", "sd35"])
def test_dit_files_stream_into_the_folders_gguf(tiny_source, tmp_path, monkeypatch, name):
    """A DiT's single files convert to GGUF tensor by tensor (never a whole model in memory) and
    give the very file its diffusers folder gives."""
    from ldm_checkpoint import write_flux_files, write_sd3_file

    if name.startswith("flux"):
        files = write_flux_files(tiny_source(name), tmp_path / "files")
        main, others = files["flux"], dict(text_encoders=[files["clip_l"], files["t5xxl"]], vae=files["ae"])
    else:
        main, others = write_sd3_file(tiny_source(name), tmp_path / "sd3.safetensors"), {}
    convert(tiny_source(name), tmp_path / "folder.gguf", precision="q4_0")

    import edgediff.convert.build as build

    stock = build.write_graph

    def graph_only(model, path, read):  # no fp32 package on the way
        assert read is None, "weights were written as fp32"
        return stock(model, path, read)

    monkeypatch.setattr(build, "write_graph", graph_only)
    convert(main, tmp_path / "files.gguf", precision="q4_0", **others)

    def tensors(path):
        return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}

    folder, files = tensors(tmp_path / "folder.gguf"), tensors(tmp_path / "files.gguf")
    assert folder.keys() == files.keys()
    assert [k for k in folder if folder[k] != files[k]] == []


def test_comfyui_gguf_flux_converts(tiny_source, tiny_package, tmp_path):
    """A ComfyUI-GGUF Flux transformer (BFL's names, no prefix, Q8_0 matrices) with its clip_l,
    t5xxl and ae files converts to a package that draws the fp32 model's image."""
    from safetensors.torch import load_file

    from edgediff.convert.adopt import adopted_package

    from ldm_checkpoint import write_flux_files

    files = write_flux_files(tiny_source("flux-dev"), tmp_path / "files")
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    _write_q8_0(path, "flux", {name: tensor.numpy() for name, tensor in load_file(files["flux"]).items()})
    others = dict(text_encoders=[files["clip_l"], files["t5xxl"]], vae=files["ae"])
    manifest = convert(path, tmp_path / "pkg", **others)
    assert manifest.family == "flux" and manifest.conditioning.guidance_input
    args = dict(steps=3, width=48, height=64, seed=7)
    ref = Pipeline(tiny_package("flux-dev"), device="cpu").generate("a red cube", **args)
    assert psnr(ref, Pipeline(tmp_path / "pkg", device="cpu").generate("a red cube", **args)) >= FLOORS["q8_0"]
    # run as it is: Q8_0 rows of the fused q/k/v bound to MatMulNBits, as converting does not
    direct = Pipeline(adopted_package(path, **others), device="cpu")
    assert {b.kind for b in direct.package.residency()["transformer"] if b.stored == "q8_0"} == {"quantized"}
    assert psnr(ref, direct.generate("a red cube", **args)) >= FLOORS["q8_0"]


def test_sdxl_gguf_in_stable_diffusion_cpps_names_runs(tiny_source, tiny_package, tmp_path, monkeypatch):
    """An SDXL GGUF as stable-diffusion.cpp names it (`cond_stage_model.transformer.*` and
    `cond_stage_model.1.transformer.*` in transformers' names, no metadata) runs as it is and
    draws the folder's image."""
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    ours = tmp_path / "xl.gguf"
    convert(tiny_source("sdxl"), ours, precision="f32")
    plain = _rewrite(ours, tmp_path / "sdxl-sdcpp.gguf", keep_keys=False)
    names = {t.name for t in gguf.GGUFReader(plain).tensors}
    assert any(n.startswith("cond_stage_model.1.transformer.text_model.") for n in names)
    args = dict(steps=3, width=64, height=64, seed=5)
    want = Pipeline(tiny_package("sdxl"), device="cpu").generate("a red cube", "blurry", **args)
    got = Pipeline(adopted_package(plain), device="cpu").generate("a red cube", "blurry", **args)
    assert psnr(got, want) >= 60


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_llama_cpp_t5_gguf_as_the_text_encoder(tiny_source, tiny_package, tmp_path, monkeypatch, kind):
    """A T5 encoder as llama.cpp writes it (`enc.blk.N.attn_q.weight`, `token_embd.weight`; here
    written with gguf-py from the tiny model's T5) given with --text-encoder draws what the T5 in
    transformers' names draws."""
    from safetensors.numpy import load_file

    from edgediff.kernels.graphs.t5 import llama_cpp_names

    from ldm_checkpoint import write_flux_files

    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    files = write_flux_files(tiny_source("flux-schnell"), tmp_path / "files")
    rename = llama_cpp_names()
    t5 = tmp_path / f"t5-encoder-{kind}.gguf"
    tensors = {rename(name.removeprefix("text_encoders.t5xxl.transformer.")): array.astype(np.float32)
               for name, array in load_file(str(files["t5xxl"])).items()}
    _write_q8_0(t5, "t5encoder", tensors, keep=lambda name: kind == "F32" or "token_embd" in name)
    assert "enc.blk.0.attn_q.weight" in {t.name for t in gguf.GGUFReader(t5).tensors}
    args = dict(steps=2, width=48, height=64, seed=7)
    images = [Pipeline(adopted_package(files["flux"], text_encoders=[files["clip_l"], encoder], vae=files["ae"]),
                       device="cpu").generate("a red cube", **args) for encoder in (files["t5xxl"], t5)]
    assert psnr(*images) == float("inf") if kind == "F32" else psnr(*images) >= FLOORS["q8_0"]

"""Precisions: each converts and generates; image quality against fp32 stays above a floor;
fp16 overflow is reported with the component's name; int4 is small on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgediff.convert import convert
from edgediff.convert.precision import PrecisionError, parse_precision
from edgediff.errors import UsageError
from edgediff.runtime import Pipeline

from reference import psnr

# Mean PSNR (dB) over 4 seeds against the fp32 package of the tiny "sd1" model. Measured on
# 2026-11-22: fp16 62.8, int8-weights 57.6, int8-static 28.1, int4 40.0; floors leave ~5 dB.
FLOORS = {"fp16": 55.0, "int8-weights": 50.0, "int8-static": 22.0, "int4": 34.0}
COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


@pytest.fixture(scope="module")
def quantized(tiny_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("precisions")
    return {p: convert(tiny_source("sd1"), root / p, precision=p) and root / p for p in FLOORS}


def _images(package):
    pipe = Pipeline(package, device="cpu", low_memory=False)
    return [pipe.generate("a red circle on a blue background", "blurry", steps=8, seed=s,
                          width=64, height=64) for s in range(4)]


@pytest.mark.parametrize("precision", list(FLOORS))
def test_precision_quality_floor(tiny_package, quantized, precision):
    reference = _images(tiny_package("sd1"))
    got = _images(quantized[precision])
    assert np.mean([psnr(a, b) for a, b in zip(reference, got, strict=True)]) >= FLOORS[precision]


def test_manifest_records_each_component(quantized):
    m = json.loads((quantized["int4"] / "edgediff.json").read_text())["components"]
    assert m["unet"]["precision"] == "int4" and m["text_encoder"]["precision"] == "int4"
    assert m["vae_decoder"]["precision"] == "fp32"  # the VAE stays fp32 under a single low-bit name
    assert m["unet"]["notes"]["matmul_nbits"] > 0 and m["unet"]["notes"]["conv_dequantize"] > 0
    assert "dequantized" in m["unet"]["notes"]["conv_weights_in_memory"] or "fp32" in m["unet"]["notes"]["conv_weights_in_memory"]
    static = json.loads((quantized["int8-static"] / "edgediff.json").read_text())["components"]["unet"]
    assert static["notes"]["calibration_runs"] == 60  # 6 prompts x 10 steps


# Bits per converted weight, scales and zero points included: the payload plus an fp32 scale
# and a zero point per block of 32 (MatMulNBits and DequantizeLinear take fp32 scales here).
CLAIMED_BITS = {"int4": (4, 4 + 32 / 32 + 4 / 32), "int8-weights": (8, 8 + 32 / 32 + 8 / 32),
                "int8-static": (8, 8 + 32 / 32 + 8 / 32)}


@pytest.mark.parametrize("precision", list(CLAIMED_BITS))
def test_weights_are_stored_at_the_bits_claimed(quantized, precision):
    m = json.loads((quantized[precision] / "edgediff.json").read_text())["components"]["unet"]
    low, high = CLAIMED_BITS[precision]
    assert low < m["notes"]["bits_per_quantized_weight"] <= high
    assert m["notes"]["weights_quantized"] > 5 * m["notes"]["weights_kept"]  # the policy keeps few


def test_low_bit_graphs_use_compact_ops(quantized):
    import onnx

    ops = {n.op_type for n in onnx.load(str(quantized["int4"] / "unet" / "model.onnx")).graph.node}
    assert {"MatMulNBits", "DequantizeLinear"} <= ops
    ops = {n.op_type for n in onnx.load(str(quantized["int8-static"] / "unet" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_fp16_overflow_names_the_component(tiny_source, tmp_path):
    """A VAE weight scaled past fp16's range: conversion stops with the component and weight
    named (onnxruntime's converter would clip it silently), and leaves nothing behind; at run
    time a non-finite output stops the run with the component named (test_sessions.py)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_source("sd1"), src)
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"] * 1e8  # beyond 65504
    save_file(state, str(weights))
    with pytest.raises(PrecisionError, match="vae_decoder: weight 'vae.decoder.conv_out.weight' reaches"):
        convert(src, tmp_path / "pkg", precision="fp16")
    assert not (tmp_path / "pkg").exists()
    fine = convert(src, tmp_path / "pkg", precision="text_encoder=fp16,unet=fp16")  # what it suggests
    assert fine.components["vae_decoder"].precision == "fp32"


def test_rules_override_the_policy(tiny_source, tmp_path):
    m = convert(tiny_source("sd1"), tmp_path / "p", precision="unet=int4", rules=[r"attentions=keep", r"resnets=keep"])
    assert m.components["unet"].notes["matmul_nbits"] == 0  # every MatMul weight is in an attention block
    assert m.components["text_encoder"].precision == "fp32"


def test_precision_spec_parsing():
    assert parse_precision("int4", COMPONENTS) == {"text_encoder": "int4", "unet": "int4",
                                                   "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert parse_precision("unet=int8,vae=fp16", COMPONENTS) == {
        "text_encoder": "fp32", "unet": "int8-weights", "vae_decoder": "fp16", "vae_encoder": "fp16"}
    assert set(parse_precision("fp16", COMPONENTS).values()) == {"fp16"}
    with pytest.raises(UsageError, match="unknown precision 'int3'"):
        parse_precision("int3", COMPONENTS)
    with pytest.raises(UsageError, match="COMPONENT=PRECISION"):
        parse_precision("transformer=int8", COMPONENTS)


# Mean PSNR (dB) over 2 seeds against the fp32 package of the tiny "sdxl" model. Measured on
# 2026-12-03: fp16 62.3 (UNet and text encoders; the VAE stays fp32), int8-weights 58.0,
# int8-static 32.5, int4 40.3.
XL_FLOORS = {"fp16": 55.0, "int8-weights": 50.0, "int8-static": 22.0, "int4": 34.0}


@pytest.mark.parametrize("precision", list(XL_FLOORS))
def test_sdxl_precision_quality_floor(tiny_source, tiny_package, tmp_path, precision):
    """Every precision converts SDXL as it does SD 1.x (int8-static calibrates on SDXL's own
    conditioning); the VAE stays fp32 under a single low-bit name."""
    manifest = convert(tiny_source("sdxl"), tmp_path / "xl", precision=precision)
    assert manifest.components["vae_decoder"].precision == "fp32"  # SDXL's stock VAE overflows in fp16
    args = dict(steps=8, width=64, height=64)
    reference = [Pipeline(tiny_package("sdxl")).generate("a red circle", "blurry", seed=s, **args) for s in (0, 1)]
    got = [Pipeline(tmp_path / "xl").generate("a red circle", "blurry", seed=s, **args) for s in (0, 1)]
    quality = np.mean([psnr(a, b) for a, b in zip(reference, got, strict=True)])
    assert quality >= XL_FLOORS[precision]


def test_sdxl_vae_that_needs_no_upcast_goes_fp16(tiny_source, tmp_path):
    """The fp16-fix SDXL VAE says `force_upcast: false` in its config: safe in 16 bits."""
    import shutil

    source = shutil.copytree(tiny_source("sdxl"), tmp_path / "src")
    config = json.loads((source / "vae" / "config.json").read_text())
    (source / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    manifest = convert(source, tmp_path / "xl", precision="fp16")
    assert manifest.components["vae_decoder"].precision == "fp16"


@pytest.mark.parametrize("precision", ["int4", "int8-weights"])
def test_weight_passes_over_external_data_give_the_same_package(tiny_source, quantized, tmp_path, monkeypatch,
                                                                precision):
    """Over a graph whose weights are in a data file (every full-size UNet), the weight-only
    passes read one weight at a time and copy the kept ones across: the same image as in memory."""
    import edgediff.convert.export as export

    monkeypatch.setattr(export, "EXTERNAL_DATA_LIMIT", 0)
    manifest = convert(tiny_source("sd1"), tmp_path / "ext", precision=precision)
    assert manifest.components["unet"].data_files == ("unet/model.onnx_data",)
    assert not list((tmp_path / "ext" / "unet").glob("*.new"))
    for a, b in zip(_images(tmp_path / "ext")[:2], _images(quantized[precision])[:2], strict=True):
        assert psnr(a, b) == float("inf")


def _bits(package, component="unet") -> dict[str, int]:
    """Each quantized weight of a component's graph and its bits, read back from the graph."""
    import onnx

    model = onnx.load(str(package / component / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            out[node.input[1]] = next(a.i for a in node.attribute if a.name == "bits")
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            out[node.input[0]] = {onnx.TensorProto.INT8: 8, onnx.TensorProto.INT4: 4}[inits[node.input[0]].data_type]
    return out


def test_a_rule_gives_its_weight_that_precision(tiny_source, tmp_path):
    """Whatever the component's precision: int8 weights inside an int4 U-Net, int4 ones inside an
    fp32 text encoder (read back from the graphs)."""
    m = convert(tiny_source("sd1"), tmp_path / "p", precision="unet=int4",
                rules=[r"conv_in=int8", r"attn1\.to_q=int8", r"text_model.*q_proj=int4|encoder.*q_proj=int4"])
    bits = _bits(tmp_path / "p")
    assert bits["unet.conv_in.weight_Q8"] == 8  # kept in float by default; the rule quantizes it
    to_q = {k: v for k, v in bits.items() if "attn1.to_q" in k}
    assert to_q and set(to_q.values()) == {8}
    assert {v for k, v in bits.items() if "attn2.to_q" in k} == {4}
    text = _bits(tmp_path / "p", "text_encoder")
    assert text and all("q_proj" in k for k in text) and set(text.values()) == {4}
    assert m.components["text_encoder"].precision == "fp32" and m.components["text_encoder"].notes["matmul_nbits"] > 0


@pytest.mark.parametrize(("kw", "error", "message"), [
    (dict(precision="int4", rules=["attn=int3"]), UsageError, "unknown precision 'int3' for ONNX packages"),
    (dict(precision="q4_0", rules=["attn=int8"], fmt="gguf"), UsageError, "unknown precision 'int8' for GGUF"),
    (dict(precision="unet=fp16", rules=["conv_in=int8"]), PrecisionError, "does not apply to an fp16 component"),
])
def test_rules_that_cannot_hold(tiny_source, tmp_path, kw, error, message):
    fmt = kw.pop("fmt", "onnx")
    out = tmp_path / ("p.gguf" if fmt == "gguf" else "p")
    with pytest.raises(error, match=message):
        convert(tiny_source("sd1"), out, **kw)
    assert not out.exists()


def test_a_gguf_rule_sets_the_stored_type(tiny_source, tmp_path):
    import gguf

    convert(tiny_source("sd1"), tmp_path / "p.gguf", precision="q4_0", rules=[r"attn1\.to_q=q8_0"])
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "p.gguf").tensors}
    to_q = {k: v for k, v in types.items() if "attn1.to_q" in k}
    assert to_q and set(to_q.values()) == {"Q8_0"} and "Q4_0" in types.values()

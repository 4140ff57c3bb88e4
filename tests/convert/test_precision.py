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

from reference import onnx_graph as _graph
from reference import psnr
from reference import stored_types as _stored_types

# Mean PSNR (dB) over 4 seeds against the fp32 package of the tiny "sd1" model. Measured on
# 2026-11-22: fp16 62.8, int8-weights 57.6, int4 40.0; int8-static 34.6 on 2026-12-03 (28.1 with
# 8-bit weights and its shortcut convolutions quantized); floors leave ~5 dB.
FLOORS = {"fp16": 55.0, "int8-weights": 50.0, "int8-static": 29.0, "int4": 34.0}
COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


# The inputs the calibration copies read while each precision was converted, per graph input
# names (filled by the `quantized` fixture; an independent count of the calibration runs).
CALIBRATION_FEEDS: dict[str, dict[tuple[str, ...], list[dict]]] = {}


def _unet_feeds(precision: str) -> list[dict]:
    """The U-Net copy's inputs (text, latent, timestep, and zeros for a ControlNet's residuals)."""
    return next(f for names, f in CALIBRATION_FEEDS[precision].items() if {"sample", "encoder_hidden_states"} <= set(names))


@pytest.fixture(scope="module")
def quantized(tiny_source, tmp_path_factory):
    from edgediff.runtime.sessions import Component

    root = tmp_path_factory.mktemp("precisions")
    stock = Component.run
    packages = {}
    for p in FLOORS:
        fed = CALIBRATION_FEEDS.setdefault(p, {})

        def counting(self, feeds, _fed=fed):
            if self.seen is not None:  # a calibration copy
                _fed.setdefault(tuple(sorted(feeds)), []).append(dict(feeds))
            return stock(self, feeds)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Component, "run", counting)
            packages[p] = convert(tiny_source("sd1"), root / p, precision=p) and root / p
    return packages


def _measured_storage(package, component="unet") -> tuple[int, int, int]:
    """(weights stored quantized, the bytes they take with their scales and zero points as
    serialized in the graph, weights kept as they were), measured from the graph file."""
    from onnx import numpy_helper

    inits = {t.name: t for t in _graph(package, component, external=True).graph.initializer}

    def size(t) -> int:  # what the file holds for it (INT4: two codes a byte)
        return len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes

    counted, quantized, stored = set(), 0, 0
    for node in _graph(package, component).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            count, parts = attrs["K"] * attrs["N"], node.input[1:4]
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and len(inits[node.input[0]].dims) > 1:
            count, parts = int(np.prod(inits[node.input[0]].dims)), node.input[:3]
        else:
            continue
        quantized += count
        for part in parts:
            if part in inits and part not in counted:
                counted.add(part)
                stored += size(inits[part])
    kept = sum(int(np.prod(t.dims)) for name, t in inits.items() if name not in counted)
    return quantized, stored, kept


def _images(package):
    pipe = Pipeline(package, device="cpu", keep_loaded=True)
    return [pipe.generate("a red circle on a blue background", "blurry", steps=8, seed=s,
                          width=64, height=64) for s in range(4)]


@pytest.mark.parametrize("precision", list(FLOORS))
def test_precision_quality_floor(tiny_package, quantized, precision):
    reference = _images(tiny_package("sd1"))
    got = _images(quantized[precision])
    assert np.mean([psnr(a, b) for a, b in zip(reference, got, strict=True)]) >= FLOORS[precision]


def test_manifest_records_each_component(quantized):
    """What the manifest says of each component is what its graph stores (read back)."""
    import collections

    import onnx

    m = json.loads((quantized["int4"] / "edgediff.json").read_text())["components"]
    for component in ("unet", "text_encoder"):
        assert "INT4" in _stored_types(quantized["int4"], component).values(), component
        assert m[component]["precision"] == "int4"
    # the VAE stays fp32 under a single low-bit name: every weight float, no quantized node
    assert set(_stored_types(quantized["int4"], "vae_decoder").values()) == {"FLOAT"}
    assert not {n.op_type for n in _graph(quantized["int4"], "vae_decoder").graph.node} & {
        "MatMulNBits", "DequantizeLinear", "QuantizeLinear"}
    assert m["vae_decoder"]["precision"] == "fp32"
    unet = _graph(quantized["int4"])
    made_by = {out: node for node in unet.graph.node for out in node.output}
    inits = {t.name: t for t in unet.graph.initializer}
    int4_convs = [n for n in unet.graph.node if n.op_type == "Conv" and n.input[1] in made_by
                  and made_by[n.input[1]].op_type == "DequantizeLinear"
                  and inits[made_by[n.input[1]].input[0]].data_type == onnx.TensorProto.INT4]
    ops = collections.Counter(n.op_type for n in unet.graph.node)
    assert m["unet"]["notes"]["matmul_nbits"] == ops["MatMulNBits"] > 0
    assert m["unet"]["notes"]["conv_dequantize"] == len(int4_convs) > 0
    # int4 convolutions run in fp32: a DequantizeLinear feeds each, and no integer Conv exists
    assert not ops["ConvInteger"] and not ops["QLinearConv"]
    # int8-static calibrates on 6 prompts x 10 steps: its U-Net copy read 60 inputs, at 10
    # timesteps and 6 conditionings
    fed = _unet_feeds("int8-static")
    assert len(fed) == 60 and len({f["sample"].tobytes() for f in fed}) == 60
    assert len({f["timestep"].tobytes() for f in fed}) == 10
    assert len({f["encoder_hidden_states"].tobytes() for f in fed}) == 6
    static = json.loads((quantized["int8-static"] / "edgediff.json").read_text())["components"]["unet"]
    assert static["notes"]["calibration_runs"] == len(fed)


# Bits per converted weight, scales and zero points included: the payload plus an fp32 scale
# and a zero point per block of 32 (MatMulNBits and DequantizeLinear take fp32 scales here).
CLAIMED_BITS = {"int4": (4, 4 + 32 / 32 + 4 / 32), "int8-weights": (8, 8 + 32 / 32 + 8 / 32),
                "int8-static": (8, 8 + 32 / 32 + 8 / 32)}


@pytest.mark.parametrize("precision", list(CLAIMED_BITS))
def test_weights_are_stored_at_the_bits_claimed(tiny_package, quantized, precision):
    """Measured from the graph as serialized: the bytes of each quantized weight's codes,
    scales and zero points over its values; every weight of the fp32 U-Net is accounted for."""
    quantized_weights, stored, kept = _measured_storage(quantized[precision])
    bits = 8 * stored / quantized_weights
    low, high = CLAIMED_BITS[precision]
    assert low < bits <= high
    assert quantized_weights > 5 * kept  # the policy keeps few
    fp32_weights = sum(int(np.prod(t.dims)) for t in _graph(tiny_package("sd1")).graph.initializer)
    # none lost or doubled (a static graph adds activation scales and zero points)
    assert fp32_weights <= quantized_weights + kept <= fp32_weights * 1.01
    m = json.loads((quantized[precision] / "edgediff.json").read_text())["components"]["unet"]
    assert m["notes"]["bits_per_quantized_weight"] == pytest.approx(bits, abs=1e-3)  # what it claims
    assert (m["notes"]["weights_quantized"], m["notes"]["weights_kept"]) == (quantized_weights, kept)


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
    # read back: the VAE's weights stay float32, the big one unclipped; the others are float16
    assert set(_stored_types(tmp_path / "pkg", "vae_decoder").values()) == {"FLOAT"}
    from onnx import numpy_helper

    stored = {t.name: t for t in _graph(tmp_path / "pkg", "vae_decoder").graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(stored["vae.decoder.conv_out.weight"]),
                                  state["decoder.conv_out.weight"].numpy())
    for component in ("unet", "text_encoder"):
        assert set(_stored_types(tmp_path / "pkg", component).values()) == {"FLOAT16"}, component


def test_rules_override_the_policy(tiny_source, tmp_path):
    convert(tiny_source("sd1"), tmp_path / "p", precision="unet=int4", rules=[r"attentions=keep", r"resnets=keep"])
    types = _stored_types(tmp_path / "p")  # read back from the graph
    assert {t for name, t in types.items() if "attentions" in name or "resnets" in name} == {"FLOAT"}
    # every MatMul weight is in an attention block: none is left for MatMulNBits
    assert "MatMulNBits" not in {n.op_type for n in _graph(tmp_path / "p").graph.node}
    # the rest still follow the policy: the resampling convolutions are int4
    assert {t for name, t in types.items() if "samplers" in name} == {"INT4"}
    assert set(_stored_types(tmp_path / "p", "text_encoder").values()) == {"FLOAT"}


def test_precision_spec_parsing():
    assert parse_precision("int4", COMPONENTS) == {"text_encoder": "int4", "unet": "int4",
                                                   "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert parse_precision("unet=int8,vae=fp16", COMPONENTS) == {
        "text_encoder": "fp32", "unet": "int8-static", "vae_decoder": "fp16", "vae_encoder": "fp16"}
    assert set(parse_precision("fp16", COMPONENTS).values()) == {"fp16"}
    with pytest.raises(UsageError, match="unknown precision 'int3'"):
        parse_precision("int3", COMPONENTS)
    with pytest.raises(UsageError, match="COMPONENT=PRECISION"):
        parse_precision("transformer=int8", COMPONENTS)


# Mean PSNR (dB) over 2 seeds against the fp32 package of the tiny "sdxl" model. Measured on
# 2026-12-03: fp16 62.3 (UNet and text encoders; the VAE stays fp32), int8-weights 58.0,
# int8-static 39.5 (32.5 before its 7-bit weights and float layers), int4 40.3.
XL_FLOORS = {"fp16": 55.0, "int8-weights": 50.0, "int8-static": 34.0, "int4": 34.0}


@pytest.mark.parametrize("precision", list(XL_FLOORS))
def test_sdxl_precision_quality_floor(tiny_source, tiny_package, tmp_path, precision):
    """Every precision converts SDXL as it does SD 1.x (int8-static calibrates on SDXL's own
    conditioning); the VAE stays fp32 under a single low-bit name."""
    manifest = convert(tiny_source("sdxl"), tmp_path / "xl", precision=precision)
    assert manifest.components["vae_decoder"].precision == "fp32"  # SDXL's stock VAE overflows in fp16
    assert set(_stored_types(tmp_path / "xl", "vae_decoder").values()) == {"FLOAT"}  # read back
    stored = {"fp16": "FLOAT16", "int8-weights": "INT8", "int8-static": "INT8", "int4": "INT4"}[precision]
    assert stored in _stored_types(tmp_path / "xl").values()  # the U-Net did convert
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
    assert set(_stored_types(tmp_path / "xl", "vae_decoder").values()) == {"FLOAT16"}  # read back


@pytest.mark.parametrize("precision", ["int4", "int8-weights"])
def test_weight_passes_over_external_data_give_the_same_package(tiny_source, quantized, tmp_path, monkeypatch,
                                                                precision):
    """Over a graph whose weights are in a data file (every full-size UNet), the weight-only
    passes read one weight at a time and copy the kept ones across: the same image as in memory."""
    import edgediff.convert.build as build

    monkeypatch.setattr(build, "EXTERNAL_DATA_LIMIT", 0)
    import onnx

    manifest = convert(tiny_source("sd1"), tmp_path / "ext", precision=precision)
    assert manifest.components["unet"].data_files == ("unet/model.onnx_data",)
    assert not list((tmp_path / "ext" / "unet").glob("*.new"))
    locations = {e.value for t in _graph(tmp_path / "ext").graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx_data"}  # the graph reads its weights from the file named
    assert _stored_types(tmp_path / "ext") == _stored_types(quantized[precision])  # the same types, weight by weight
    for a, b in zip(_images(tmp_path / "ext")[:2], _images(quantized[precision])[:2], strict=True):
        assert psnr(a, b) == float("inf")


def test_a_rule_gives_its_weight_that_precision(tiny_source, tmp_path):
    """Whatever the component's precision: int8 weights inside an int4 U-Net, int4 ones inside an
    fp32 text encoder (read back from the graphs)."""
    m = convert(tiny_source("sd1"), tmp_path / "p", precision="unet=int4",
                rules=[r"conv_in=int8", r"attn1\.to_q=int8", r"text_model.*q_proj=int4|encoder.*q_proj=int4"])
    types = _stored_types(tmp_path / "p")
    assert types["unet.conv_in.weight"] == "INT8"  # kept in float by default; the rule quantizes it
    to_q = {k: v for k, v in types.items() if "attn1.to_q" in k}
    assert to_q and set(to_q.values()) == {"INT8"}
    # the others the policy's: int4, or float where it keeps small ones (the 32-wide blocks)
    assert types["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight"] == "INT4"
    assert {v for k, v in types.items() if "attn2.to_q" in k} == {"INT4", "FLOAT"}
    assert types["unet.conv_out.weight"] == "FLOAT"  # no rule names it: the policy keeps it
    text = _stored_types(tmp_path / "p", "text_encoder")
    q_proj = {k: v for k, v in text.items() if "q_proj" in k}
    assert q_proj and set(q_proj.values()) == {"INT4"}
    assert {v for k, v in text.items() if "q_proj" not in k} == {"FLOAT"}  # the component stays fp32
    nbits = [n for n in _graph(tmp_path / "p", "text_encoder").graph.node if n.op_type == "MatMulNBits"]
    assert m.components["text_encoder"].precision == "fp32"
    assert m.components["text_encoder"].notes["matmul_nbits"] == len(nbits) == len(q_proj)


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


def _int8_weight_codes(path) -> np.ndarray:
    """Every quantized weight code of a static int8 graph (the constants behind DequantizeLinear
    nodes with more than one dimension), read back with onnx."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    codes = [numpy_helper.to_array(inits[n.input[0]]).ravel() for n in model.graph.node
             if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) > 1]
    return np.concatenate(codes)


def test_static_int8_weights_cannot_saturate_avx2(tiny_package, quantized, tmp_path):
    """int8-static stores 7-bit weights (|code| <= 64): two u8 x s8 products summed in int16 by
    AVX2's VPMADDUBSW stay below 32767, which full-range weights overflow. Quantizing the same
    graph with full-range weights (from the same ranges, saved and read back) shows the check
    can fail."""
    from edgediff.convert.int8_static import Ranges, calibrate_feeds
    from edgediff.convert.precision import StaticInt8, chooser, static_int8

    codes = _int8_weight_codes(quantized["int8-static"] / "unet" / "model.onnx")
    assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= 64
    feeds = _unet_feeds("int8-static")
    source = tiny_package("sd1") / "unet" / "model.onnx"
    choose = chooser("unet", "int8-static")
    ranges = calibrate_feeds(source, choose, feeds)
    assert ranges.runs == len(feeds)
    wide = static_int8(source, tmp_path / "wide.onnx", choose, ranges, StaticInt8(reduce_range=False))
    assert wide["calibration_runs"] == len(feeds)
    assert np.abs(_int8_weight_codes(tmp_path / "wide.onnx").astype(int)).max() > 64
    ranges.save(tmp_path / "ranges.json")
    static_int8(source, tmp_path / "read" / "model.onnx", choose, Ranges.load(tmp_path / "ranges.json"))
    static_int8(source, tmp_path / "kept" / "model.onnx", choose, ranges)
    for name in ("model.onnx", "model.onnx_data"):
        assert (tmp_path / "read" / name).read_bytes() == (tmp_path / "kept" / name).read_bytes()


def test_static_int8_keeps_its_float_layers(quantized):
    """The shortcut convolutions stay float32 (read back from the graph), and the time
    projections (Gemm nodes, never quantized); the resnets' convolutions are int8; a user's rule
    still wins."""
    import re

    types = _stored_types(quantized["int8-static"])
    kept = {n: t for n, t in types.items() if re.search(r"conv_shortcut|time_emb_proj", n)}
    assert any("conv_shortcut" in n for n in kept) and any("time_emb_proj" in n for n in kept)
    assert set(kept.values()) == {"FLOAT"}
    others = {n: t for n, t in types.items() if re.search(r"resnets\.\d+\.conv[12]", n)}
    assert [n for n, t in others.items() if t != "INT8"] == []
    from edgediff.convert.precision import chooser
    from edgediff.kernels.policy import Rule

    shortcut = ("down_blocks.1.resnets.0.conv_shortcut.weight", (64, 32, 1, 1))
    assert chooser("unet", "int8-static")(*shortcut) == 0
    assert chooser("unet", "int8-static", [Rule("conv_shortcut", "int8")])(*shortcut) == 8
    assert chooser("unet", "int8-weights")(*shortcut) == 8  # only static activations need it float

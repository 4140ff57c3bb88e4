"""Precision passes over a package's exported ONNX graphs (fp32 in, the asked precision out).

- fp16: onnxruntime's float16 converter with its default list of ops kept in fp32; IO stays
  fp32 (its node/op block lists break graphs whose blocked nodes take initializers, as every
  norm does here, so the policy's rules do not apply to fp16). For CUDA, whose fp16 norm and
  softmax kernels accumulate in fp32; the runtime stops with the component's name on NaN/Inf.
- int8-weights: weight-only int8; MatMul weights in MatMulNBits (8 bits, blocks of 32),
  Conv weights per output channel behind DequantizeLinear.
- int8-static: weights and activations (QDQ), per-channel 7-bit weights, activation ranges
  calibrated on the model's own sampling runs, written one weight at a time with onnxruntime's
  arithmetic (convert.int8_static); the layers in STATIC_FLOAT stay float (its comment says why).
- int4: weight-only, blocks of 32 with zero points; MatMul in MatMulNBits (kept compact in
  memory), Conv behind blocked int4 DequantizeLinear (compact on disk only: onnxruntime has no
  int4 convolution, it dequantizes the weight when the Conv runs; the manifest says so).
Which weights are converted is decided by kernels.policy (1-D, small, norms, embeddings, first
and last convolution stay high precision; user rules first).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgediff.errors import EdgediffError, PackageError, UsageError, require
from edgediff.kernels import graph
from edgediff.kernels.policy import KEEP, Rule, precision_for

PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int8-weights", "int4")
# int8 = int8-static since it met issue 16's targets on a CPU with VNNI (Zen 4): 34 dB from fp32's
# image on the full-size SD 1.5 architecture at 512x512, 98% of fp32's draw score, a guided step at
# 0.51x fp32's; on AVX2 without VNNI it runs at fp32's speed in 40% less memory. int8-weights
# (50 dB) is slower than fp32 on both (benchmarks/RESULTS.md).
INT8_DEFAULT = "int8-static"
BLOCK = 32
# Layers int8-static keeps float (after the user's rules), as NVIDIA's diffusers int8 recipe does:
# the 1x1 shortcut convolutions on the residual path. On the full-size SD 1.5 U-Net they cost 8 dB
# of the image quantized, 2% of the arithmetic float (benchmarks/int8.py, RESULTS.md). And, as the
# recipe does, the resnets' time projections (`time_emb_proj`, LDM's `emb_layers`: one row of
# activations each, nothing to gain). Attention's products are inside MultiHeadAttention, and
# only Conv and MatMul are quantized.
STATIC_FLOAT = (Rule(r"conv_shortcut", "fp32"), Rule(r"time_emb_proj|emb_layers", "fp32"))
# Components that a single precision name applies to; the VAE stays fp32 under int8/int4
# (its convolutions have no fast low-bit kernel on the CPU provider).
LOW_BIT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")


class PrecisionError(EdgediffError):
    """A component cannot be represented at the precision asked for."""


@dataclass(frozen=True)
class Applied:
    precision: str
    notes: dict[str, object]


def parse_precision(spec: str, components: Sequence[str], fmt: str = "onnx",
                    keep_full: Collection[str] = ()) -> dict[str, str]:
    """'int8' or 'unet=int8,vae_decoder=fp16' -> {component: precision} for every component.
    With fmt 'gguf' the names are ggml types (f32, f16, q8_0, q5_0, q5_1, q4_0, q4_1).
    A single 16-bit name leaves the components in `keep_full` at full precision (SDXL's VAE and
    T5 overflow in fp16: black images, NaN text); naming one explicitly still converts it."""
    check = _check if fmt == "onnx" else _check_gguf
    full = "fp32" if fmt == "onnx" else "f32"
    spec = spec.strip()
    if "=" not in spec:
        name = check(spec, "--precision")
        if name in ("fp32", "fp16", "f32", "f16"):
            return {c: (full if c in keep_full else name) for c in components}
        return {c: (name if c in LOW_BIT_COMPONENTS else full) for c in components}
    result = dict.fromkeys(components, full)
    for part in spec.split(","):
        component, sep, value = part.partition("=")
        aliases = {"vae": ("vae_decoder", "vae_encoder")}
        targets = aliases.get(component.strip(), (component.strip(),))
        if not sep or any(t not in components for t in targets):
            raise UsageError(
                f"--precision '{part}': expected COMPONENT=PRECISION with a component among "
                f"{', '.join(components)} (or vae)"
            )
        for target in targets:
            result[target] = check(value.strip(), f"--precision {component}")
    return result


def _check(name: str, where: str) -> str:
    if name not in PRECISIONS:
        raise UsageError(f"{where}: unknown precision '{name}'; choose one of: {', '.join(PRECISIONS)}")
    return INT8_DEFAULT if name == "int8" else name


def _check_gguf(name: str, where: str) -> str:
    from edgediff.convert.gguf import gguf_format

    try:
        return gguf_format(name).name
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def chooser(component: str, precision: str, rules: Sequence[Rule] = (),
            static_float: Sequence[Rule] = STATIC_FLOAT) -> Callable[[str, tuple[int, ...]], int]:
    """The bits each weight of `component` is stored in at `precision` (0: it stays float); a
    rule's precision wins over the component's where the graph can hold it, else it is refused
    with the reason. int8-static keeps `static_float` float after the user's rules."""
    kind = {"int8-weights": "int8", "int8-static": "int8"}.get(precision, precision)
    if precision == "int8-static":
        rules = (*rules, *static_float)

    def choose(name: str, shape: tuple[int, ...]) -> int:
        chosen = precision_for(name, shape, kind, rules)
        if chosen in (KEEP, "fp32"):
            return 0
        bits = {"int8": 8, "int8-weights": 8, "int4": 4}.get(chosen)
        if bits is None or precision == "int8-static" and bits != 8:
            raise PrecisionError(f"{component}: a rule gives '{name}' {chosen}, which an {precision} component "
                                 f"cannot hold (it stores weights as {'int8 or fp32' if precision == 'int8-static' else 'int4, int8 or fp32'}); "
                                 "convert that component to another precision or change the rule")
        return bits

    return choose


def apply_precision(
    path: Path,
    component: str,
    precision: str,
    rules: Sequence[Rule] = (),
    calibration: Callable[[], object] | None = None,
) -> Applied:
    """Rewrite the graph at `path` in place to `precision` (an fp32 component too where a rule
    gives some of its weights int8 or int4)."""
    if precision == "fp32" and not rules:
        return Applied("fp32", {})
    onnx = require("onnx", "convert", "Converting precision")
    # weight-only passes read each weight from the data file as they reach it (a full-size SDXL
    # UNet loaded whole, then rewritten, does not fit 24 GB)
    weight_only = precision in ("fp32", "int8-weights", "int4")
    # weight-only passes and int8-static read each weight from the data file as they reach it
    lazy = precision == "int8-static" or weight_only and path.with_name(path.name + "_data").exists()
    model = onnx.load(str(path), load_external_data=not lazy)
    base = path.parent if lazy else None

    choose = chooser(component, precision, rules)

    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        if any(re.search(r.pattern, t.name) for r in rules for t in model.graph.initializer):
            raise PrecisionError(f"{component}: --rule does not apply to an fp16 component (onnxruntime's fp16 "
                                 "converter keeps its own list of ops in fp32); drop the rule, or convert this "
                                 "component to int8/int4 where rules choose each weight's precision")

        _check_fp16_range(model, component)
        model = convert_float_to_float16(_with_shapes(path), keep_io_types=True, disable_shape_infer=True)
        notes = {"io": "fp32", "fp32_ops": "onnxruntime's float16.DEFAULT_OP_BLOCK_LIST"}
    elif weight_only:
        bits = 8 if precision == "int8-weights" else 4  # fp32: only the rules' weights, at their bits
        spill = path.name + "_transposed" if lazy else None  # the folded weights, until saved
        graph.fold_weight_transposes(model, base, spill)
        matmuls = graph.matmul_to_nbits(model, bits, BLOCK, choose, base=base)
        convs = graph.conv_weights_to_dq(model, bits, choose, BLOCK, base=base)
        notes = {"matmul_nbits": matmuls, "conv_dequantize": convs, "block": BLOCK,
                 "conv_weights_in_memory": "fp32 while the Conv runs (no low-bit Conv kernel)",
                 **_storage(model)}
    elif precision == "int8-static":
        return Applied(precision, static_int8(path, path, choose, calibration))
    else:
        raise UsageError(f"unknown precision '{precision}'")
    if precision == "fp32" and not (notes["matmul_nbits"] or notes["conv_dequantize"]):
        if lazy:
            (path.parent / spill).unlink(missing_ok=True)
        return Applied("fp32", {})  # no rule matched: the graph stays as exported
    save_model(model, path, base)
    if lazy:
        (path.parent / spill).unlink(missing_ok=True)
    return Applied(precision, notes)


FP16_MAX = 65504.0


def _check_fp16_range(model, component: str) -> None:
    """fp16 cannot hold a weight beyond 65504; onnxruntime's converter would clip it silently."""
    import numpy as np
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.data_type == 1:  # float
            peak = float(np.abs(numpy_helper.to_array(t)).max(initial=0.0))
            if not peak <= FP16_MAX:
                raise PrecisionError(
                    f"{component}: weight '{t.name}' reaches {peak:.3g}, beyond fp16's {FP16_MAX:.0f}; "
                    f"keep this component at fp32 (e.g. --precision {component}=fp32)"
                )


def _with_shapes(path: Path):
    """The graph with inferred value types: the fp16 converter needs them to leave integer and
    shape computations alone, and only the file-based inference handles graphs over 2 GB."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        inferred = Path(scratch) / path.name
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def save_model(model, path: Path, base: Path | None = None) -> list[Path]:
    """Save, with weights beside the graph in `NAME_data` when protobuf cannot hold them (or when
    some are still external: those are copied from their file under `base`, a block at a time)."""
    import onnx

    from edgediff.convert.build import EXTERNAL_DATA_LIMIT

    inits = model.graph.initializer
    data = path.parent / (path.name + "_data")
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in inits)
    if not external and sum(t.ByteSize() for t in inits) <= EXTERNAL_DATA_LIMIT:
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(path))
        return [path]
    fresh = data.with_name(data.name + ".new")
    with fresh.open("wb") as out:
        for t in inits:
            offset = out.tell()
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                _copy_range(Path(base or path.parent) / info["location"], int(info.get("offset", 0)),
                            int(info["length"]), out)
            elif t.ByteSize() >= 1024:
                out.write(t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes())
            else:
                continue
            graph.point_to(t, data.name, offset, out.tell() - offset)
    onnx.save_model(model, str(path))
    fresh.replace(data)
    return [path, data]


def _copy_range(src: Path, offset: int, length: int, out, chunk: int = 1 << 26) -> None:
    with src.open("rb") as fh:
        fh.seek(offset)
        while length > 0:
            block = fh.read(min(chunk, length))
            if not block:
                raise PackageError(f"{src}: ends before the weight at offset {offset} ({length} bytes missing)")
            out.write(block)
            length -= len(block)


@dataclass(frozen=True)
class StaticInt8:
    """How int8-static quantizes; benchmarks/int8.py measures each choice (benchmarks/RESULTS.md)."""

    # 7-bit weights: AVX2 without VNNI multiplies u8 x s8 pairs with VPMADDUBSW, whose int16 sums
    # saturate at full-range weights (3-4 dB of the U-Net's output, measured)
    reduce_range: bool = True
    # activation ranges: "minmax" over every calibration input, or "mean" of each input's min and
    # max (rare high-noise outliers are clipped instead of stretching the range for every step)
    ranges: str = "minmax"


def static_int8(path: Path, out: Path, choose, ranges, options: StaticInt8 = StaticInt8()) -> dict[str, object]:
    """Quantize the fp32 graph at `path` (weights and activations, QDQ) into `out` (which may be
    `path`), one weight at a time (convert.int8_static); `ranges` (int8_static.Ranges, or what
    returns them) are its activations' over calibration runs."""
    import onnx

    from edgediff.convert import int8_static

    model = onnx.load(str(path), load_external_data=False)
    found = int8_static.targets(model, choose)
    chosen = {t.node.name for t in found}
    excluded = sum(1 for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.name not in chosen)
    ranges = ranges() if callable(ranges) else ranges
    if ranges is None or not ranges.runs:
        raise UsageError("int8-static needs activation ranges from calibration runs of the model")
    int8_static.write(model, path.parent, out, found, options.reduce_range, ranges)
    return {"calibration_runs": ranges.runs, "excluded_nodes": excluded,
            "activations": f"uint8 ({'MinMax' if ranges.kind == 'minmax' else 'mean of per-input min/max'} "
                           "over the model's own sampling runs, read with int8 weights)",
            "weights": f"int8 per channel{', 7-bit range' if options.reduce_range else ''}",
            **_storage(onnx.load(str(out), load_external_data=False))}


def _storage(model) -> dict[str, object]:
    """What the size should add up to: weights converted, their bits each with scales and zero
    points, and weights kept (the policy's exceptions) at their own precision."""
    w = graph.weight_storage(model)
    bits = 8 * w["quantized_bytes"] / w["quantized_weights"] if w["quantized_weights"] else 0.0
    return {"weights_quantized": w["quantized_weights"], "bits_per_quantized_weight": round(bits, 3),
            "weights_kept": w["kept_weights"], "kept_bytes": w["kept_bytes"]}

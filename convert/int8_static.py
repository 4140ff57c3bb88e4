"""int8-static (QDQ: int8 weights, uint8 activations) made in bounded memory.

onnxruntime's `quantize_static` holds the fp32 model whole twice over, the graph it rewrites and
the session it calibrates with, after edgediff's own fp32 sampling runs recorded the inputs with
every component loaded: converting the full-size SDXL U-Net was OOM-killed at 23.7 GB on a 24 GB
machine. Here:
- the activation ranges are read in the sampling runs themselves, from a copy of each component
  whose weights are int8 (MatMuls in MatMulNBits, convolutions behind DequantizeLinear; its
  activations are the fp32 model's to within the int8 weights' error) with ReduceMin/ReduceMax
  outputs on every tensor to quantize;
- the QDQ graph is written one weight at a time from the fp32 file, with onnxruntime's own
  arithmetic: per-channel symmetric weights (7-bit with `reduce_range`), asymmetric uint8
  activations, int32 biases at input scale x weight scale, weight scales raised where a bias
  would overflow int32, one Q/DQ pair per tensor shared by all its consumers (what
  `quantize_static` writes, checked against it in tests/convert/test_int8_static.py).
onnxruntime fuses the result at load (QLinearConv, QLinearMatMul, MatMulIntegerToFloat).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgediff.kernels import graph

Choose = Callable[[str, tuple[int, ...]], int | bool]
MIN, MAX = "_edgediff_min", "_edgediff_max"  # suffixes of the calibration copy's range outputs
BLOCK = 32  # the calibration copy's MatMulNBits blocks


@dataclass(frozen=True)
class Target:
    """A Conv or MatMul quantized: its weight (`transposed`: stored [N, K] behind a Transpose, as
    built graphs keep linear layers), its bias, and the weight's per-channel axis."""

    node: onnx.NodeProto
    weight: str
    transposed: bool
    bias: str | None
    axis: int


def targets(model: onnx.ModelProto, choose: Choose) -> list[Target]:
    """The Conv and MatMul nodes whose weight (an initializer) `choose` gives 8 bits."""
    inits = {t.name: t for t in model.graph.initializer}
    made_by = {out: n for n in model.graph.node for out in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul") or len(node.input) < 2:
            continue
        name, transposed = node.input[1], False
        maker = made_by.get(name)
        if (node.op_type == "MatMul" and maker is not None and maker.op_type == "Transpose"
                and maker.input[0] in inits and len(inits[maker.input[0]].dims) == 2
                and next((list(a.ints) for a in maker.attribute if a.name == "perm"), [1, 0]) == [1, 0]):
            name, transposed = maker.input[0], True
        if name not in inits:
            continue
        dims = tuple(inits[name].dims)
        if not choose(graph.weight_name(name), dims):
            continue
        bias = node.input[2] if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in inits else None
        out.append(Target(node, name, transposed, bias, 0 if node.op_type == "Conv" else 1))
    return out


def activations(found: Iterable[Target]) -> list[str]:
    """The tensors whose ranges are needed: every quantized node's input and output."""
    names: dict[str, None] = {}
    for t in found:
        names.setdefault(t.node.input[0])
        names.setdefault(t.node.output[0])
    return list(names)


@dataclass
class Ranges:
    """Activation ranges over calibration runs: the extremes of all ("minmax"), or the mean of
    each run's minimum and maximum ("mean"), as onnxruntime's MinMax calibrator gives them."""

    kind: str = "minmax"
    lows: dict[str, list[float]] = field(default_factory=dict)
    highs: dict[str, list[float]] = field(default_factory=dict)
    runs: int = 0

    def see(self, outputs: Mapping[str, np.ndarray]) -> None:
        """One run's outputs of a calibration copy (its range outputs, among the others)."""
        seen = False
        for key, value in outputs.items():
            for suffix, into in ((MIN, self.lows), (MAX, self.highs)):
                if key.endswith(suffix):
                    into.setdefault(key[: -len(suffix)], []).append(float(np.asarray(value).reshape(-1)[0]))
                    seen = True
        self.runs += seen

    def of(self, name: str) -> tuple[float, float]:
        lows, highs = self.lows[name], self.highs[name]
        if self.kind == "mean":
            return float(np.mean(lows)), float(np.mean(highs))
        return min(lows), max(highs)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"kind": self.kind, "runs": self.runs, "lows": self.lows, "highs": self.highs}))

    @classmethod
    def load(cls, path: Path) -> Ranges:
        data = json.loads(Path(path).read_text())
        return cls(data["kind"], data["lows"], data["highs"], data["runs"])


def observing(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Add each tensor's minimum and maximum as graph outputs (what calibration reads)."""
    for name in names:
        for op, suffix in (("ReduceMin", MIN), ("ReduceMax", MAX)):
            model.graph.node.append(helper.make_node(op, [name], [name + suffix], keepdims=0,
                                                     name=name + suffix))
            model.graph.output.append(helper.make_tensor_value_info(name + suffix, TensorProto.FLOAT, []))


def activation_params(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (zero point, scale) of a range: onnxruntime's compute_scale_zp."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    zero, scale = compute_scale_zp(np.array(low, np.float32), np.array(high, np.float32),
                                   np.array(0, np.uint8), np.array(255, np.uint8))
    return np.asarray(zero, np.uint8), np.asarray(scale, np.float32)


def weight_scales(w: np.ndarray, axis: int, reduce_range: bool) -> np.ndarray:
    """Per-channel symmetric int8 scales (onnxruntime's per channel, vectorized): absmax over
    the channel mapped to 64 (7-bit, `reduce_range`) or 127."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.maximum(np.abs(np.minimum(w.min(axis=other), 0)), np.abs(np.maximum(w.max(axis=other), 0)))
    q = 128.0 if reduce_range else 254.0  # (qmax - qmin) of [-64, 64] or [-127, 127]
    scale = (2.0 * absmax.astype(np.float64) / q).astype(np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)


def bias_safe(scales: np.ndarray, bias: np.ndarray, input_scale: np.ndarray) -> np.ndarray:
    """Weight scales raised where input scale x weight scale would put the bias outside int32
    (onnxruntime's _adjust_weight_scale_for_int32_bias)."""
    qrange = np.float64(np.iinfo(np.int32).max) - np.float64(np.iinfo(np.int32).min + 1)
    smallest = 1.0001 * (2.0 * np.abs(bias.astype(np.float64))) / qrange
    candidate = np.float64(input_scale) * scales.astype(np.float64)
    low = (candidate < smallest) & (candidate > 0)
    return np.where(low, (scales.astype(np.float64) * np.where(low, smallest / np.where(low, candidate, 1), 1))
                    .astype(np.float32), scales)


def quantize_codes(w: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip((w.astype(np.float32) / scales.reshape(shape)).round(), -128, 127).astype(np.int8)


def write(model: onnx.ModelProto, base: Path, out: Path, found: list[Target], reduce_range: bool = True,
          ranges: Ranges | None = None, observe: Iterable[str] = ()) -> dict[str, int]:
    """Write `model` (fp32, its weights external under `base` or inline) to `out` with the
    `found` weights int8, reading and writing one weight at a time. With `ranges`, the weights go
    behind DequantizeLinear, every tensor of `activations(found)` gets a Q/DQ pair and Conv biases
    int32 (the int8-static graph); without, activations stay float and MatMuls become 8-bit
    MatMulNBits (the calibration copy, which `observe`s tensors' ranges)."""
    from edgediff.convert.precision import save_model

    inits = {t.name: t for t in model.graph.initializer}
    scratch = Path(base) / f".{out.name}.int8-{os.getpid()}"  # the new weights, until save_model copies them
    new: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()
    counts = {"quantized_nodes": len(found), "activation_pairs": 0}

    def add(array: np.ndarray, name: str, sink) -> str:
        new.append(graph.external_tensor(array, name, sink, scratch.name) if array.nbytes >= 1024
                   else numpy_helper.from_array(array, name))
        return name

    params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if ranges is not None:
        for name in activations(found):
            params[name] = activation_params(*ranges.of(name))
    try:
        with scratch.open("wb") as sink:
            for name, (zero, scale) in params.items():
                add(scale, name + "_scale", sink)
                add(zero, name + "_zero_point", sink)
            for t in found:
                if t.weight in dropped:
                    raise graph_error_shared(t.weight)
                w = graph.read_array(inits[t.weight], base).astype(np.float32)
                if t.transposed:  # [N, K] behind a Transpose: MatMul's [K, N]
                    w = np.ascontiguousarray(w.T)
                dropped.add(t.weight)
                if ranges is None and t.node.op_type == "MatMul":  # the calibration copy: MatMulNBits,
                    # which onnxruntime repacks and maps (DequantizeLinear -> MatMul it fuses into one,
                    # keeping the int8 original beside the repack)
                    _nbits(t.node, w, lambda a, n: add(a, n, sink))
                    continue
                scales = weight_scales(w, t.axis, reduce_range)
                bias = graph.read_array(inits[t.bias], base).astype(np.float32) if t.bias and ranges else None
                if bias is not None:
                    scales = bias_safe(scales, bias, params[t.node.input[0]][1])
                # a transposed weight's name says so (as folding it first named it): LoRA patches
                # read its layout from the name (kernels.graph.weight_name)
                q = t.weight + (graph.TRANSPOSED if t.transposed else "") + "_quantized"
                add(quantize_codes(w, scales, t.axis), q, sink)
                add(scales, q + "_scale", sink)
                add(np.zeros(scales.shape, np.int8), q + "_zero_point", sink)
                nodes.append(helper.make_node("DequantizeLinear", [q, q + "_scale", q + "_zero_point"],
                                              [q + "_dequantized"], axis=t.axis, name=q + "_dq"))
                t.node.input[1] = q + "_dequantized"
                if bias is not None:
                    b = t.bias + "_quantized"
                    bias_scale = (params[t.node.input[0]][1] * scales).astype(np.float32)
                    codes = np.clip((bias.astype(np.float64) / bias_scale.astype(np.float64)).round(),
                                    np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
                    add(codes, b, sink)
                    add(bias_scale, b + "_scale", sink)
                    add(np.zeros(codes.shape, np.int32), b + "_zero_point", sink)
                    nodes.append(helper.make_node("DequantizeLinear", [b, b + "_scale", b + "_zero_point"],
                                                  [b + "_dequantized"], axis=0, name=b + "_dq"))
                    t.node.input[2] = b + "_dequantized"
                    dropped.add(t.bias)
        # a quantized MatMul no longer reads its Transpose (whose fp32 weight is then dropped)
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        live = [n for n in model.graph.node if not (n.op_type == "Transpose" and n.output[0] not in read)]
        del model.graph.node[:]
        model.graph.node.extend(live)
        nodes += _activation_pairs(model, params)
        counts["activation_pairs"] = len(params)
        observing(model, observe)
        graph.ensure_domain(model, "com.microsoft", 1)
        used = {i for n in model.graph.node for i in n.input} | {i for n in nodes for i in n.input}
        kept = [t for t in model.graph.initializer if t.name not in dropped or t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept + new)
        _sorted(model, nodes)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, out, base)
    finally:
        with contextlib.suppress(OSError):
            scratch.unlink()
    return counts


def _nbits(node: onnx.NodeProto, w: np.ndarray, add: Callable[[np.ndarray, str], str]) -> None:
    """Turn MatMul(A, W [K, N]) into MatMulNBits with W at 8 bits in blocks of 32."""
    k, n = w.shape
    name = node.name + "_nbits"
    inputs = [add(numpy_helper.to_array(t), t.name)
              for t in graph.nbits_tensors(np.ascontiguousarray(w.T), name, 8, BLOCK)]
    node.CopyFrom(helper.make_node("MatMulNBits", [node.input[0], *inputs], list(node.output), name=name,
                                   domain="com.microsoft", K=k, N=n, bits=8, block_size=BLOCK))


def _activation_pairs(model: onnx.ModelProto, params: Mapping) -> list[onnx.NodeProto]:
    """QuantizeLinear -> DequantizeLinear on each tensor, every consumer reading the DQ output
    (a graph output keeps its name: the producer's output is renamed instead)."""
    outputs = {o.name for o in model.graph.output}
    nodes = []
    for name in params:
        q_in, dq_out = name, name + "_dequantized"
        if name in outputs:
            q_in, dq_out = name + "_to_quantize", name
            for n in model.graph.node:
                for i, o in enumerate(n.output):
                    if o == name:
                        n.output[i] = q_in
        else:
            for n in model.graph.node:
                for i, x in enumerate(n.input):
                    if x == name:
                        n.input[i] = dq_out
        nodes.append(helper.make_node("QuantizeLinear", [q_in, name + "_scale", name + "_zero_point"],
                                      [name + "_quantized"], name=name + "_q"))
        nodes.append(helper.make_node("DequantizeLinear", [name + "_quantized", name + "_scale", name + "_zero_point"],
                                      [dq_out], name=name + "_dq"))
    return nodes


def _sorted(model: onnx.ModelProto, extra: list[onnx.NodeProto]) -> None:
    """The graph's nodes and `extra` in an order where each node follows what it reads."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending = list(extra) + list(model.graph.node)
    waiting: dict[str, list[int]] = {}
    missing = []
    for k, n in enumerate(pending):
        need = {i for i in n.input if i not in available}
        missing.append(len(need))
        for i in need:
            waiting.setdefault(i, []).append(k)
    ready = [k for k, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)  # the earliest first: the graph keeps its order where it can
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(pending[k])
        for o in pending[k].output:
            for j in waiting.pop(o, ()):
                missing[j] -= 1
                if missing[j] == 0:
                    heapq.heappush(ready, j)
    if len(order) != len(pending):
        raise graph_error(len(pending) - len(order))
    del model.graph.node[:]
    model.graph.node.extend(order)


def graph_error(count: int) -> Exception:
    from edgediff.errors import PackageError

    return PackageError(f"int8-static: {count} nodes read tensors nothing makes; the graph is damaged")


def graph_error_shared(weight: str) -> Exception:
    from edgediff.errors import PackageError

    return PackageError(f"int8-static: the weight '{weight}' feeds two quantized layers, which this writer "
                        "does not share; convert it at int8-weights")


def calibrate(root: Path, manifest, chooses: Mapping[str, Choose], kind: str = "minmax",
              progress: Callable[[str], None] | None = None) -> dict[str, Ranges]:
    """Each component's activation ranges over sampling runs of the built-in prompts, at every
    timestep of a 10-step schedule (ranges change with the timestep), read from copies whose
    weights are int8: one component in memory at a time, at a quarter of its fp32 weights."""
    import tempfile
    import warnings

    from edgediff.convert import CALIBRATION_PROMPTS
    from edgediff.runtime import Pipeline

    ranges = {name: Ranges(kind) for name in chooses}
    with tempfile.TemporaryDirectory(dir=root, prefix=".calibration-") as scratch:
        # the package is still being written: nothing to keep in the optimized-graph cache
        pipe = Pipeline(root, device="cpu", graph_cache=False)
        for name, choose in chooses.items():
            path = root / manifest.components[name].file
            model = onnx.load(str(path), load_external_data=False)
            found = targets(model, choose)
            copy = Path(scratch) / name / "model.onnx"
            write(model, path.parent, copy, found, reduce_range=False, observe=activations(found))
            pipe.use_graph(name, copy, seen=ranges[name].see)
        size = min(int(manifest.defaults["width"]), 256)
        reuse = "unet_shallow" in manifest.components  # its shallow branch sees every other step
        with warnings.catch_warnings():  # the advice on the interval is for users' images, not calibration
            warnings.filterwarnings("ignore", message="--cache-interval", category=UserWarning)
            for i, prompt in enumerate(CALIBRATION_PROMPTS):
                if progress:
                    progress(f"calibrating: run {i + 1}/{len(CALIBRATION_PROMPTS)} at {size}x{size}")
                pipe.generate(prompt, "blurry, low quality", steps=10, sampler="euler", schedule="normal",
                              seed=i, width=size, height=size, cache_interval=2 if reuse else 1)
        for comp in pipe._components.values():
            comp.release()
    return ranges


def calibrate_feeds(path: Path, choose: Choose, feeds: Iterable[Mapping[str, np.ndarray]],
                    kind: str = "minmax") -> Ranges:
    """A component's activation ranges over inputs recorded elsewhere (benchmarks, tests), read
    from its int8-weight copy as `calibrate` reads them."""
    import tempfile

    from edgediff.runtime.sessions import Component, SessionOptions

    ranges = Ranges(kind)
    model = onnx.load(str(path), load_external_data=False)
    found = targets(model, choose)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".calibration-") as scratch:
        copy = Path(scratch) / "model.onnx"
        write(model, path.parent, copy, found, reduce_range=False, observe=activations(found))
        comp = Component("calibration", copy, SessionOptions(device="cpu", graph_cache=False), seen=ranges.see)
        for feed in feeds:
            comp.run(dict(feed))
        comp.release()
    return ranges

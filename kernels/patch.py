"""Changing weights where a graph stores them (a LoRA merged at load), in the form they are stored.

A weight is found under every form the converters write: a float initializer in torch layout,
or transposed (`.transposed`, a MatMul's [K, N]); MatMulNBits' blocks (int4, int8-weights);
DequantizeLinear's codes (int4 convolutions, int8 per channel, int8-static's QDQ). Each changed
weight is read, dequantized, changed in fp32 and written back in the same form with the
converters' own quantizers, under the same initializer names, so the graph is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgediff.kernels.gguf_blocks import FORMATS, can_store, dequantize, quantize
from edgediff.kernels.graph import (
    TRANSPOSED,
    conv_dq_tensors,
    nbits_tensors,
    nbits_weight,
    read_array,
    weight_name,
)
from edgediff.kernels.quant import quantize_per_channel_int8

Delta = Callable[[str, tuple[int, ...]], "np.ndarray | None"]  # (state-dict name, torch shape) -> change
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def changed_weights(model: onnx.ModelProto, base: Path | None, delta: Delta) -> dict[str, np.ndarray | TensorProto]:
    """The initializers that replace those of `model` once `delta` is added to its weights, by
    name: arrays, or tensors where NumPy has no type for them (int4)."""
    inits = {t.name: t for t in model.graph.initializer}

    def read(name: str) -> np.ndarray | None:
        return read_array(inits[name], base) if name in inits else None

    out: dict[str, np.ndarray | TensorProto] = {}
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] in inits:
            a = _attrs(node)
            n, k, bits, block = a["N"], a["K"], a.get("bits", 4), a["block_size"]
            name = node.input[1]
            done.add(name)
            d = delta(weight_name(name), (n, k))
            if d is None:
                continue
            zp = read(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            w = nbits_weight(read(name), read(node.input[2]), zp, n, k, bits, block) + d
            tensors = nbits_tensors(w, name, bits, block, symmetric=zp is None)
            out.update({original: numpy_helper.to_array(t) for t, original in zip(tensors, node.input[1:], strict=False)})
        elif (node.op_type == "DequantizeLinear" and node.input[0] in inits
              and len(inits[node.input[0]].dims) > 1):
            name = node.input[0]
            done.add(name)
            transposed = TRANSPOSED in name
            q = read(name).astype(np.float32)
            shape = q.shape[::-1] if transposed else q.shape
            d = delta(weight_name(name), tuple(shape))
            if d is None:
                continue
            a = _attrs(node)
            zp = read(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            w = _dequantize(q, read(node.input[1]), zp, a.get("axis", 1), a.get("block_size", 0))
            w = w + (d.T if transposed else d)
            out.update({t.name: t if t.data_type in (TensorProto.INT4, TensorProto.UINT4) else numpy_helper.to_array(t)
                        for t in _requantized(w, q, node, inits, a)})
    for t in inits.values():
        if t.name in done or t.data_type not in _FLOATS or len(t.dims) < 2:
            continue
        transposed = t.name.endswith(TRANSPOSED)
        shape = tuple(t.dims)[::-1] if transposed else tuple(t.dims)
        d = delta(weight_name(t.name), shape)
        if d is None:
            continue
        w = read_array(t, base)
        out[t.name] = (w.astype(np.float32) + (d.T if transposed else d)).astype(w.dtype)
    return out


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """DequantizeLinear's arithmetic: per tensor, per channel along `axis`, or in blocks along it."""
    axis %= q.ndim
    zp = np.zeros_like(scale) if zp is None else zp.astype(np.float32)
    if block:
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        zp = np.repeat(zp, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    elif scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def _requantized(w: np.ndarray, q: np.ndarray, node: onnx.NodeProto, inits: dict, a: dict) -> list[TensorProto]:
    """`w` in the DequantizeLinear form the converters wrote (`q`: the codes it replaces): int4 in
    blocks (convolutions) or symmetric int8 per channel (int8 convolutions, int8-static's weights)."""
    name, scale_name = node.input[0], node.input[1]
    if inits[name].data_type == TensorProto.INT4:
        tensors, _ = conv_dq_tensors(w, name, 4, a["block_size"])
    elif inits[name].data_type == TensorProto.INT8 and not a.get("block_size"):
        # int8-static's 7-bit weights stay 7-bit (AVX2's VPMADDUBSW saturates full-range ones)
        qmax = 64 if np.abs(q).max() <= 64 else 127
        q, scale = quantize_per_channel_int8(w, a.get("axis", 1) % w.ndim, qmax)
        tensors = [numpy_helper.from_array(q, name), numpy_helper.from_array(scale, scale_name)]
    else:
        raise ValueError(f"'{name}': a DequantizeLinear form edgediff does not write "
                         f"({TensorProto.DataType.Name(inits[name].data_type)})")
    tensors[1].name = scale_name
    return tensors


def changed_weight(w, d: np.ndarray):
    """A bound weight (kernels.bind.Weight) with `d` added, kept in its file format where gguf-py
    can write that format again (K-quants it cannot: those become Q8_0)."""
    from dataclasses import replace

    values = dequantize(w.data, w.fmt, w.shape) + d.reshape(w.shape)
    fmt = w.fmt
    if fmt.float:
        fmt = FORMATS["f32"] if fmt.name == "bf16" else fmt
        data = values.astype(np.float16 if fmt.name == "f16" else np.float32)
    else:
        try:
            data = quantize(values, fmt)
        except NotImplementedError:
            fmt = FORMATS["q8_0"] if can_store(FORMATS["q8_0"], w.shape) else FORMATS["f32"]
            data = quantize(values, fmt) if not fmt.float else values.astype(np.float32)
    return replace(w, fmt=fmt, data=data, file=None, offset=0)


# (name, the weight's output rows) -> (up [out, r], down [r, in(, kh, kw)])
Factors = Callable[[str, "int | None"], "tuple[np.ndarray, np.ndarray] | None"]
_WEIGHT_ONLY = {"Transpose", "DequantizeLinear", "Cast", "Reshape"}


def quantized_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Initializers the graph holds in a quantized form -> their state-dict names: MatMulNBits'
    blocks and DequantizeLinear's codes."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] in inits:
            out[node.input[1]] = weight_name(node.input[1])
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            out[node.input[0]] = weight_name(node.input[0])
    return out


def add_branches(model: onnx.ModelProto, weights: dict[str, str], factors: Factors) -> set[str]:
    """A low-rank side branch beside each layer whose weight (initializer -> state-dict name in
    `weights`) `factors` names: y = layer(x) + (x @ down^T) @ up^T, as two MatMuls (Linear) or a
    k x k and a 1 x 1 Conv (convolutions), the weight itself left as it is stored. Returns the
    state-dict names given a branch."""
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    rows = {t.name: int(t.dims[0]) for t in model.graph.initializer if t.dims}
    after: dict[int, list[onnx.NodeProto]] = {}
    new, done = [], set()
    for init, state in weights.items():
        f = factors(state, rows.get(init))
        if f is None:
            continue
        up, down = f
        sites, frontier = [], [init]
        while frontier:  # through the nodes that only reshape or dequantize the weight
            held = frontier.pop()
            for node in uses.get(held, []):
                if node.op_type in _WEIGHT_ONLY and node.input[0] == held:
                    frontier.append(node.output[0])
                elif node.op_type in ("MatMul", "MatMulNBits", "Conv") and node.input[1] == held:
                    sites.append(node)
        for i, node in enumerate(sites):
            if node.op_type == "Conv" and _attrs(node).get("group", 1) != 1:
                continue
            p = f"{state}.lora{i}"
            x, y = node.input[0], node.output[0]
            node.output[0] = y + ".base"
            if node.op_type == "Conv":
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
                         if a.name not in ("group", "kernel_shape")}
                d = down if down.ndim == 4 else down.reshape(*down.shape, 1, 1)
                new += [numpy_helper.from_array(np.ascontiguousarray(d, np.float32), p + ".down"),
                        numpy_helper.from_array(np.ascontiguousarray(up[:, :, None, None], np.float32), p + ".up")]
                nodes = [helper.make_node("Conv", [x, p + ".down"], [p + ".mid"], **attrs),
                         helper.make_node("Conv", [p + ".mid", p + ".up"], [p + ".out"])]
            else:
                d = down.reshape(down.shape[0], -1)
                new += [numpy_helper.from_array(np.ascontiguousarray(d.T, np.float32), p + ".down"),
                        numpy_helper.from_array(np.ascontiguousarray(up.T, np.float32), p + ".up")]
                nodes = [helper.make_node("MatMul", [x, p + ".down"], [p + ".mid"]),
                         helper.make_node("MatMul", [p + ".mid", p + ".up"], [p + ".out"])]
            nodes.append(helper.make_node("Add", [y + ".base", p + ".out"], [y], name=p + ".add"))
            after[id(node)] = nodes
            done.add(state)
    if after:
        nodes = [n for node in model.graph.node for n in (node, *after.get(id(node), ()))]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(new)
    return done

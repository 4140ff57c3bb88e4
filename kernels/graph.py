"""ONNX graph rewrites for weight quantization: fold weight transposes, MatMul -> MatMulNBits,
and Conv weights behind a (blocked) DequantizeLinear.

Each pass takes `choose(name, shape) -> bool`, the caller's precision policy, so which weights
are rewritten is decided in one place (kernels.policy)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgediff.kernels.quant import pack_nibbles, quantize_blocks, unpack_nibbles

Choose = Callable[[str, tuple[int, ...]], "bool | int"]  # True: the pass's bits; an int: these bits; 0/False: keep
TRANSPOSED = ".transposed"  # suffix of a folded weight; the rest is its state-dict name


def weight_name(initializer: str) -> str:
    """The state-dict name behind an initializer the passes created."""
    for suffix in ("_quantized", "_Q4", "_Q8", TRANSPOSED):
        initializer = initializer.removesuffix(suffix)
    return initializer


def read_array(t: onnx.TensorProto, base: Path | None = None) -> np.ndarray:
    """A weight's values. One kept in an external data file is read from there without loading
    it into the graph (onnx's own reader would), so a pass over a 10 GB graph holds one weight
    at a time."""
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):  # two values a byte, the first low
        packed = np.fromfile(Path(base or ".") / info["location"], dtype=np.uint8, count=-(-count // 2),
                             offset=int(info.get("offset", 0)))
        values = unpack_nibbles(packed, count).astype(np.int8)
        if t.data_type == TensorProto.INT4:
            values = np.where(values > 7, values - 16, values).astype(np.int8)
        return values.reshape(tuple(t.dims))
    values = np.fromfile(Path(base or ".") / info["location"], dtype=helper.tensor_dtype_to_np_dtype(t.data_type),
                         count=count, offset=int(info.get("offset", 0)))
    return values.reshape(tuple(t.dims))


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _consumers(model: onnx.ModelProto) -> dict[str, int]:
    count: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            count[name] = count.get(name, 0) + 1
    return count


def _replace_initializers(model: onnx.ModelProto, drop: set[str], add: list[onnx.TensorProto]) -> None:
    keep = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + add)


def point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` read `length` bytes of the file `location` from `offset`, dropping any
    values it held inline."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def external_tensor(array: np.ndarray, name: str, out, location: str) -> onnx.TensorProto:
    """`array` appended to the open file `out` (named `location`), as an external initializer."""
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    offset = out.tell()
    out.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    point_to(tensor, location, offset, array.nbytes)
    return tensor


def fold_weight_transposes(model: onnx.ModelProto, base: Path | None = None, spill: str | None = None) -> int:
    """Transpose(W) of a 2-D initializer becomes the initializer W^T (named W + '.transposed'),
    so MatMul sees a constant weight, as exporters with constant folding write it. With `spill`
    (a file name under `base`) the transposed weights go there instead of into memory. Returns
    the number of weights folded."""
    inits = _initializers(model)
    uses = _consumers(model)
    folded, new, drop, kept_nodes = {}, [], set(), []
    out = (Path(base) / spill).open("wb") if spill else None
    for node in model.graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        src = node.input[0] if node.input else None
        if (node.op_type == "Transpose" and src in inits and len(inits[src].dims) == 2
                and perm in (None, [1, 0])):
            array = read_array(inits[src], base).T
            name = src + TRANSPOSED
            if name not in folded.values():
                new.append(external_tensor(array, name, out, spill) if out else
                           numpy_helper.from_array(array.copy(), name))
            folded[node.output[0]] = name
            if uses.get(src, 0) == 1:
                drop.add(src)
            continue
        kept_nodes.append(node)
    for node in kept_nodes:
        for i, name in enumerate(node.input):
            if name in folded:
                node.input[i] = folded[name]
    if out:
        out.close()
    del model.graph.node[:]
    model.graph.node.extend(kept_nodes)
    _replace_initializers(model, drop, new)
    return len(folded)


def matmul_to_nbits(model: onnx.ModelProto, bits: int, block: int, choose: Choose,
                    symmetric: bool = False, accuracy_level: int = 0, base: Path | None = None) -> int:
    """MatMul(A, W[K, N] initializer) -> com.microsoft MatMulNBits with W quantized in blocks of
    `block` along K (the layout and rounding of onnxruntime's MatMulNBitsQuantizer)."""
    inits = _initializers(model)
    uses = _consumers(model)
    drop, new, count = set(), [], 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w_init = inits[node.input[1]]
        chosen = choose(weight_name(w_init.name), tuple(w_init.dims)) if len(w_init.dims) == 2 else 0
        if not chosen:
            continue
        b = bits if chosen is True else int(chosen)
        w = read_array(w_init, base).astype(np.float32)
        k, n = w.shape
        name = w_init.name + f"_Q{b}"
        tensors = nbits_tensors(w.T, name, b, block, symmetric)
        inputs = [node.input[0], *(t.name for t in tensors)]
        new += tensors
        attrs = {"K": k, "N": n, "bits": b, "block_size": block}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        replacement = helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name + "_nbits",
                                       domain="com.microsoft", **attrs)
        node.CopyFrom(replacement)
        if uses.get(w_init.name, 0) == 1:
            drop.add(w_init.name)
        count += 1
    _replace_initializers(model, drop, new)
    ensure_domain(model, "com.microsoft", 1)
    return count


def nbits_tensors(w: np.ndarray, name: str, bits: int, block: int, symmetric: bool = False) -> list[TensorProto]:
    """A weight [N, K] (torch layout) as MatMulNBits' B, scales and (asymmetric) zero points."""
    q = quantize_blocks(w, bits, block, symmetric)  # [N, blocks, block]
    data = pack_nibbles(q.q) if bits == 4 else q.q
    tensors = [numpy_helper.from_array(np.ascontiguousarray(data), name),
               numpy_helper.from_array(q.scale.reshape(-1).astype(np.float32), name + "_scales")]
    if not symmetric:
        zp = pack_nibbles(q.zero_point, pad=8) if bits == 4 else q.zero_point
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(zp).reshape(-1), name + "_zero_points"))
    return tensors


def nbits_weight(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, n: int, k: int,
                 bits: int, block: int) -> np.ndarray:
    """MatMulNBits' B back to the fp32 weight [N, K] (zero point 2^(bits-1) when none is given)."""
    blocks = -(-k // block)
    q = unpack_nibbles(data, 2 * data.shape[-1]) if bits == 4 else data
    q = q.reshape(n, blocks, block).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    else:
        zp = (unpack_nibbles(zero_points.reshape(n, -1), blocks) if bits == 4 else zero_points.reshape(n, blocks))
    w = (q - np.asarray(zp, np.float32)[..., None]) * scales.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :k]


def conv_dq_tensors(w: np.ndarray, name: str, bits: int, block: int = 32) -> tuple[list[TensorProto], dict]:
    """A Conv weight [O, I, *kernel] (2-D or 3-D) quantized for DequantizeLinear: int8 per output
    channel, or int4 in blocks of `block` input channels; the tensors and the node's attributes."""
    if bits == 8:
        absmax = np.abs(w.reshape(w.shape[0], -1)).max(1).astype(np.float64)
        scale = np.where(absmax > 0, absmax / 127, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
        return [numpy_helper.from_array(q, name), numpy_helper.from_array(scale, name + "_scale")], {"axis": 0}
    o, i, *kernel = w.shape
    b = min(block, i)
    last = (0, *range(2, w.ndim), 1)  # blocks along input channels
    back = (0, w.ndim - 1, *range(1, w.ndim - 1))
    blocks = quantize_blocks(w.transpose(last), 4, b, symmetric=True)
    signed = (blocks.q.reshape(o, *kernel, -1)[..., :i].astype(np.int16) - 8).astype(np.int8)
    q = signed.transpose(back)
    scale = blocks.scale.reshape(o, *kernel, -1).transpose(back).astype(np.float32)
    packed = pack_nibbles((q.reshape(-1) & 0x0F).astype(np.uint8)[None])[0]
    return [helper.make_tensor(name, TensorProto.INT4, list(q.shape), packed.tobytes(), raw=True),
            numpy_helper.from_array(np.ascontiguousarray(scale), name + "_scale")], {"axis": 1, "block_size": b}


def conv_weights_to_dq(model: onnx.ModelProto, bits: int, choose: Choose, block: int = 32,
                       base: Path | None = None) -> int:
    """Conv weights stored quantized behind DequantizeLinear: int8 per output channel, or int4 in
    blocks of `block` input channels (ONNX opset 21 blocked quantization). onnxruntime has no
    low-bit convolution kernel: the weight is small on disk and dequantized when the Conv runs."""
    inits = _initializers(model)
    uses = _consumers(model)
    drop, new, dq_nodes, count, int4 = set(), [], [], 0, False
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w_init = inits[node.input[1]]
        chosen = choose(weight_name(w_init.name), tuple(w_init.dims))
        if not chosen:
            continue
        b = bits if chosen is True else int(chosen)
        name = w_init.name + f"_Q{b}"
        tensors, attrs = conv_dq_tensors(read_array(w_init, base).astype(np.float32), name, b, block)
        int4 |= b == 4
        new += tensors
        out = name + "_dequantized"
        dq_nodes.append(helper.make_node("DequantizeLinear", [name, name + "_scale"], [out],
                                         name=node.name + "_dq", **attrs))
        node.input[1] = out
        if uses.get(w_init.name, 0) == 1:
            drop.add(w_init.name)
        count += 1
    _replace_initializers(model, drop, new)
    nodes = dq_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if int4:
        ensure_domain(model, "", 21)
    return count


def ensure_domain(model: onnx.ModelProto, domain: str, version: int) -> None:
    """The model imports `domain` at `version` or later (a contrib op or a newer ONNX op added)."""
    for opset in model.opset_import:
        if opset.domain == domain:
            opset.version = max(opset.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


_BITS = {TensorProto.FLOAT: 32, TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16, TensorProto.DOUBLE: 64,
         TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4,
         TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8}


def _stored_bytes(t: onnx.TensorProto) -> int:
    return -(-int(np.prod(t.dims, dtype=np.int64)) * _BITS.get(t.data_type, 32) // 8)


def weight_storage(model: onnx.ModelProto) -> dict[str, int]:
    """How the weights are stored: the quantized ones (payload, scales and zero points) and the
    rest at their own precision. A package's size should add up to this, give or take the graph."""
    inits = _initializers(model)
    counted: set[str] = set()
    quantized = quantized_bytes = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            quantized += attrs["K"] * attrs["N"]
            parts = node.input[1:4]
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and len(inits[node.input[0]].dims) > 1:
            quantized += int(np.prod(inits[node.input[0]].dims, dtype=np.int64))
            parts = node.input[:3]
        else:
            continue
        for name in parts:
            if name in inits and name not in counted:
                counted.add(name)
                quantized_bytes += _stored_bytes(inits[name])
    kept = [t for name, t in inits.items() if name not in counted]
    return {"quantized_weights": quantized, "quantized_bytes": quantized_bytes,
            "kept_weights": sum(int(np.prod(t.dims, dtype=np.int64)) for t in kept),
            "kept_bytes": sum(_stored_bytes(t) for t in kept)}

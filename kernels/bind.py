"""Weight-less graphs and the binding of weights into them when a session opens.

A component can be stored as an ONNX graph whose weight initializers carry no data (their
`external_data` location is `PLACEHOLDER`, their name the weight's name in its file) plus a
weight source: a GGUF file's tensors, a safetensors file. `bind` turns the pair into what
onnxruntime runs: a Linear weight stored in a ggml block format becomes a `MatMulNBits` node fed
with the same codes and scales (repacked, never requantized); a float weight lying in its file
as the graph reads it is external data pointing into that file; any other weight becomes an array
made once (repacked codes, dequantized blocks). Where those arrays go is the caller's `Sink`:
kept in memory for `SessionOptions.add_external_initializers` (which copies them), or written to
a file that onnxruntime maps (runtime.weight_cache), so that every weight reaches onnxruntime
once and stays a mapping of a file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgediff.errors import PackageError
from edgediff.kernels.gguf_blocks import BlockFormat, dequantize, to_matmul_nbits, unpack

PLACEHOLDER = "edgediff:bound"  # external-data location of an initializer bound at session time
GRAPH_NAME = "edgediff:name"  # external-data key of a placeholder's state-dict name
PARTS = "edgediff:parts"  # external-data key of the layers a fused placeholder holds (for LoRAs)
LORA_NAMES = "edgediff:lora_names"  # a filled graph's metadata: what its placeholders' keys said
_ROWS = re.compile(r"^(.+)\[(\d+):(\d+)\]$")
CAST = ".as_graph_type"  # suffix of a weight cast from its stored float type
_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
_STORED_TYPES = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Weight:
    """A tensor as its file stores it: `data` is a float array for float formats, or the stored
    bytes [rows, bytes per row] of a block format. `shape` is the logical (torch-order) shape.
    `file` and `offset` say where its bytes lie, when onnxruntime may read them there itself."""

    name: str
    fmt: BlockFormat
    shape: tuple[int, ...]
    data: np.ndarray
    file: Path | None = None
    offset: int = 0


@dataclass(frozen=True)
class Binding:
    """How one weight is held while the graph runs."""

    name: str
    stored: str  # its format in the file
    # 'quantized': a low-bit kernel runs it (MatMulNBits); 'blocks': held as block codes, dequantized
    # as its node runs; 'stored': as in the file; 'expanded': dequantized to fp32 at load
    kind: str
    weights: int
    resident_bytes: int


@dataclass
class Bound:
    model: onnx.ModelProto
    arrays: dict[str, np.ndarray]  # handed to onnxruntime, which copies them
    bindings: list[Binding]
    folder: Path | None = None  # external data locations are relative to this folder
    files: tuple[Path, ...] = ()  # the files external data points into


Arrays = Callable[[], dict[str, np.ndarray]]


class Sink:
    """Where the arrays `bind` makes go. `put(group, make, keep)` returns, per array name, the
    initializer the graph gets for it; `make()` gives the arrays (called only when needed).
    This one keeps them in memory (`Bound.arrays`); runtime.weight_cache writes them to a file
    onnxruntime maps. `keep=False` marks arrays that hold a LoRA's change: never cached."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, group: str, make: Arrays, keep: bool = True) -> dict[str, TensorProto]:
        made = make()
        self.arrays.update(made)
        return {n: placeholder(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in made.items()}


def external(name: str, data_type: int, dims, path: Path, offset: int, length: int) -> TensorProto:
    """An initializer whose data onnxruntime reads from `path` (absolute until `bind` makes every
    location relative to one folder holding them all, as onnxruntime requires)."""
    t = TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(int(d) for d in dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(path)), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _relocate(inits: list[TensorProto], where: str) -> tuple[Path | None, tuple[Path, ...]]:
    """Make every external location relative to the deepest folder holding all of them (the
    source file's and the repack cache's): onnxruntime reads external data only from below one
    folder, and refuses symbolic links out of it."""
    refs = [(t, e) for t in inits if t.data_location == TensorProto.EXTERNAL and not is_placeholder(t)
            for e in t.external_data if e.key == "location" and os.path.isabs(e.value)]
    if not refs:
        return None, ()
    files = tuple(sorted({Path(e.value) for _, e in refs}))
    try:
        base = os.path.commonpath([os.path.dirname(e.value) for _, e in refs])
    except ValueError as exc:  # another drive (Windows)
        raise PackageError(f"{where}: its weights and their repack cache lie on different drives; set "
                           "EDGEDIFF_CACHE to a folder on the model's drive") from exc
    for _, e in refs:
        e.value = os.path.relpath(e.value, base)
    return Path(base), files


def rows_ref(pieces: Sequence[tuple[str, int, int]]) -> str:
    """The placeholder name of a weight cut from rows of file tensors: 'NAME[a:b]+NAME[c:d]'
    (a DiT's q, k and v from one fused tensor); a whole tensor (end -1, alone) is its plain name."""
    if len(pieces) == 1 and pieces[0][2] == -1:
        return pieces[0][0]
    if any(end == -1 for _, _, end in pieces):
        raise ValueError(f"a whole tensor cannot be one of several pieces: {pieces}")
    return "+".join(f"{name}[{start}:{end}]" for name, start, end in pieces)


def parse_rows_ref(ref: str) -> list[tuple[str, int, int]]:
    """The inverse of `rows_ref`."""
    pieces = [_ROWS.match(part) for part in ref.split("+")] if ref.endswith("]") else [None]
    if not all(pieces):
        return [(ref, 0, -1)]
    return [(m.group(1), int(m.group(2)), int(m.group(3))) for m in pieces]


def resolve(ref: str, lookup: Callable[[str], Weight | None]) -> Weight | None:
    """The weight a placeholder names: a file tensor, or rows of file tensors joined. Rows of a
    block format are whole blocks (blocks run along a row), so slicing never requantizes; one
    slice keeps pointing into its file, joined slices are copied."""
    pieces = parse_rows_ref(ref)
    if pieces[0][2] == -1:
        return lookup(ref)
    parts = []
    for name, start, end in pieces:
        w = lookup(name)
        if w is None or not start < end <= w.shape[0]:
            return None
        data = np.asarray(w.data).reshape(w.shape[0], -1)
        parts.append(replace(w, name=ref, shape=(end - start, *w.shape[1:]), data=data[start:end],
                             offset=w.offset + start * data[0].nbytes))
    if len(parts) == 1:
        return parts[0]
    if len({(p.fmt, p.shape[1:]) for p in parts}) > 1:
        return None
    return replace(parts[0], shape=(sum(p.shape[0] for p in parts), *parts[0].shape[1:]),
                   data=np.concatenate([p.data for p in parts]), file=None, offset=0)


def placeholder(name: str, data_type: int, dims, graph_name: str = "") -> TensorProto:
    """An initializer without data, bound at session time to the file tensor `name`.
    `graph_name` is the weight's state-dict name (what a LoRA names it), when it differs."""
    t = TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(int(d) for d in dims)
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=PLACEHOLDER)
    if graph_name and graph_name != name:
        t.external_data.add(key=GRAPH_NAME, value=graph_name)
    return t


Parts = Sequence[tuple[str, "tuple[int, int] | None", "tuple[int, int] | None"]]


def name_for_loras(t: TensorProto, alias: str = "", parts: Parts = ()) -> None:
    """Record what a LoRA calls a placeholder's weight: `alias`, the layer's state-dict name when
    it differs from the file's; and the `parts` it holds of other layers: (layer weight, its rows
    or None for all, the rows of this weight it is or None for all)."""
    if alias and alias != t.name:
        t.external_data.add(key=GRAPH_NAME, value=alias)
    if parts:
        t.external_data.add(key=PARTS, value=";".join(
            f"{name}{f'[{r[0]}:{r[1]}]' if r else ''}@{f'{at[0]}:{at[1]}' if at else ''}" for name, r, at in parts))


def _parts(value: str) -> list[tuple[str, tuple[int, int] | None, tuple[int, int] | None]]:
    out = []
    for part in filter(None, value.split(";")):
        ref, _, at = part.rpartition("@")
        (name, start, end), = parse_rows_ref(ref)
        out.append((name, None if end == -1 else (start, end), tuple(int(x) for x in at.split(":")) if at else None))
    return out


def lora_parts(t: TensorProto) -> list[tuple[str, tuple[int, int] | None, tuple[int, int] | None]]:
    """The inverse of `name_for_loras`' `parts`."""
    return _parts(next((e.value for e in t.external_data if e.key == PARTS), ""))


def graph_name(t: TensorProto) -> str:
    """The state-dict name of a placeholder's weight (packages written before it was kept: the
    file tensor's name)."""
    return next((e.value for e in t.external_data if e.key == GRAPH_NAME), t.name)


def keep_lora_names(model: onnx.ModelProto) -> None:
    """Copy what LoRAs call each placeholder's weight into the graph's metadata, where it outlives
    the placeholders being filled with their data (ONNX packages)."""
    kept = {t.name: keys for t in model.graph.initializer if is_placeholder(t)
            and (keys := {e.key: e.value for e in t.external_data if e.key in (GRAPH_NAME, PARTS)})}
    if kept:
        model.metadata_props.add(key=LORA_NAMES, value=json.dumps(kept))


def lora_names(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, list]]:
    """A graph's weights as LoRAs name them: (state-dict name -> initializer, state-dict name ->
    the layers it holds parts of), from its placeholders or, once they are filled, its metadata."""
    from edgediff.kernels.graph import weight_name

    kept = json.loads(next((p.value for p in model.metadata_props if p.key == LORA_NAMES), "{}"))
    names, parts = {}, {}
    for t in model.graph.initializer:
        if is_placeholder(t):
            name, held = graph_name(t), lora_parts(t)
        else:
            keys = kept.get(weight_name(t.name), {})
            name, held = keys.get(GRAPH_NAME, weight_name(t.name)), _parts(keys.get(PARTS, ""))
        names[name] = t.name
        if held:
            parts[name] = held
    return names, parts


def is_placeholder(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == PLACEHOLDER for e in t.external_data)


def strip_weights(model: onnx.ModelProto, names: Mapping[str, str],
                  transposed: Collection[str] = ()) -> onnx.ModelProto:
    """The graph without the data of the initializers named in `names` (graph name -> the
    weight's name in its file), each renamed to its file name. Other initializers (constants the
    exporter made) keep their data. A 2-D weight in `transposed` is stored transposed in its file
    and is transposed back by a node in the graph."""
    rename = {}
    inits = []
    turns = []
    for t in model.graph.initializer:
        if t.name in transposed:
            inits.append(placeholder(names[t.name], t.data_type, t.dims[::-1]))
            turns.append(helper.make_node("Transpose", [names[t.name]], [t.name], name=f"{t.name}/stored_transposed"))
        elif t.name in names:
            rename[t.name] = names[t.name]
            inits.append(placeholder(names[t.name], t.data_type, t.dims, graph_name=t.name))
        else:
            inits.append(t)
    stripped = onnx.ModelProto()
    _copy_without_initializers(model, stripped)
    stripped.graph.initializer.extend(inits)
    if turns:
        nodes = list(stripped.graph.node)
        del stripped.graph.node[:]
        stripped.graph.node.extend(turns + nodes)
    for node in stripped.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return stripped


def _copy_without_initializers(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Copy a model but not its (possibly gigabytes of) initializer data."""
    inits = list(model.graph.initializer)
    del model.graph.initializer[:]
    try:
        out.CopyFrom(model)
    finally:
        model.graph.initializer.extend(inits)


def weight_names(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if is_placeholder(t)]


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    return uses


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _linear_uses(name: str, uses: dict[str, list[onnx.NodeProto]]) -> list[onnx.NodeProto] | None:
    """The nodes that use weight `name` [N, K] as a Linear layer (x @ W.T): Transpose -> MatMul,
    or Gemm(transB=1); None if any use is something else."""
    found = []
    for node in uses.get(name, []):
        if node.op_type == "Transpose" and _attr(node, "perm", [1, 0]) in ([1, 0], (1, 0)):
            after = uses.get(node.output[0], [])
            if not after or any(n.op_type != "MatMul" or n.input[1] != node.output[0] for n in after):
                return None
            found += [node, *after]
        elif (node.op_type == "Gemm" and node.input[1] == name and _attr(node, "transB", 0) == 1
              and _attr(node, "transA", 0) == 0 and _attr(node, "alpha", 1.0) == 1.0
              and _attr(node, "beta", 1.0) == 1.0):
            found.append(node)
        else:
            return None
    return found or None


def _nbits_arrays(base: str, nb) -> dict[str, np.ndarray]:
    """MatMulNBits' inputs for one weight, named as the rewritten graph names them."""
    arrays = {base: nb.b, base + ".scales": nb.scales}
    if nb.zero_points is not None:
        arrays[base + ".zero_points"] = nb.zero_points
    if nb.minimum is not None:
        arrays[base + ".minimum"] = np.ascontiguousarray(nb.minimum.T)  # [blocks, N]
    return arrays


def _rewrite_linear(base: str, nodes: list[onnx.NodeProto], n: int, k: int, fmt: BlockFormat, parts: Collection[str],
                    replaced: dict[str, list[onnx.NodeProto]], accuracy_level: int = 0) -> None:
    """Replace x @ W.T by MatMulNBits over the repacked blocks (`parts`: the names of its inputs,
    plus the per-block minimum term when the format has one that onnxruntime cannot take as a
    zero point)."""
    inputs = [base, base + ".scales", *([base + ".zero_points"] if base + ".zero_points" in parts else [])]
    minimum = base + ".minimum" in parts
    for node in nodes:
        new_nodes = replaced.setdefault(node.output[0], [])
        if node.op_type == "Transpose":
            continue
        out = node.output[0]
        y = out if node.op_type == "MatMul" and not minimum else out + ".nbits"
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *inputs], [y], name=(node.name or out) + ".nbits",
            domain="com.microsoft", K=k, N=n, bits=fmt.nbits, block_size=fmt.scale_block,
            **({"accuracy_level": accuracy_level} if accuracy_level else {})))
        if minimum:
            z = _minimum_term(node.input[0], base, k // fmt.scale_block, fmt.scale_block, y, new_nodes)
            y2 = out if node.op_type == "MatMul" else out + ".min"
            new_nodes.append(helper.make_node("Add", [y, z], [y2]))
            y = y2
        if node.op_type == "Gemm":
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            new_nodes.append(helper.make_node("Add", [y, bias], [out]) if bias
                             else helper.make_node("Identity", [y], [out]))


def _minimum_term(x: str, base: str, blocks: int, block: int, like: str,
                  nodes: list[onnx.NodeProto]) -> str:
    """(x summed over each block of the reduced axis) @ minimum, shaped like `like`."""
    p = f"{like}.mterm"
    nodes += [
        helper.make_node("Constant", [], [p + ".shape"], value=helper.make_tensor(
            p + ".shape", TensorProto.INT64, [3], [-1, blocks, block])),
        helper.make_node("Reshape", [x, p + ".shape"], [p + ".blocks"]),
        helper.make_node("Constant", [], [p + ".axes"], value=helper.make_tensor(
            p + ".axes", TensorProto.INT64, [1], [2])),
        helper.make_node("ReduceSum", [p + ".blocks", p + ".axes"], [p + ".sums"], keepdims=0),
        helper.make_node("MatMul", [p + ".sums", base + ".minimum"], [p + ".flat"]),
        helper.make_node("Shape", [like], [p + ".like"]),
        helper.make_node("Reshape", [p + ".flat", p + ".like"], [p]),
    ]
    return p


def bind(model: onnx.ModelProto, lookup: Callable[[str], Weight | None], where: str,
         dry_run: bool = False, expand: bool = False, accuracy_level: int | Mapping[int, int] = 0, delta=None,
         sink: Sink | None = None) -> Bound:
    """The runnable graph and what its placeholders stand for. `lookup(name)` gives the stored
    weight (None: missing, an error naming the file and tensor).

    Float weights lying in a file as they are become external data pointing into it
    (onnxruntime memory-maps them); when stored in another float type than the graph's, a Cast
    follows them, which onnxruntime either folds at load (expanded) or runs each time (compact:
    the weight stays as stored). With `dry_run` only the bindings are computed (what `edgediff
    inspect` reports), nothing is repacked.

    Other weights in block formats (convolutions, for which onnxruntime has no low-bit kernel)
    are kept as 8-bit codes and scales and dequantized as their node runs, or, with `expand`,
    dequantized to fp32 once here. `accuracy_level` is MatMulNBits' (4: int8 activations), for
    all weights or per repacked bit width ({4: 4, 8: 0}).
    `delta(name, shape)` (a LoRA; kernels.patch.Delta) changes weights on the way in. Arrays made
    here go to `sink` (default: kept in memory, `Bound.arrays`)."""
    sink = sink if sink is not None else Sink()
    uses = _consumers(model)
    bindings: list[Binding] = []
    replaced: dict[str, list[onnx.NodeProto]] = {}  # node (by its output) -> what takes its place
    casts: list[onnx.NodeProto] = []  # nodes that only read weights: they go first
    inits = []
    for t in model.graph.initializer:
        if not is_placeholder(t):
            inits.append(t)
            continue
        w = resolve(t.name, lookup)
        dims = tuple(int(d) for d in t.dims)
        check_shape(w, t.name, dims, where)
        keep = True
        if delta is not None and not dry_run and (d := delta(graph_name(t), dims)) is not None:
            from edgediff.kernels.patch import changed_weight

            w, keep = changed_weight(w, d), False
        count = math.prod(dims)
        linear = _linear_uses(t.name, uses) if w.fmt.nbits and len(dims) == 2 else None
        if linear and tuple(w.shape) == dims and dims[1] % w.fmt.block == 0:
            bindings.append(Binding(t.name, w.fmt.name, "quantized", count, nbits_bytes(w.fmt, *dims)))
            if dry_run:
                continue
            base = f"{t.name}.nbits{w.fmt.nbits}"
            parts = sink.put(t.name, lambda w=w, base=base, dims=dims: _nbits_arrays(
                base, to_matmul_nbits(np.asarray(w.data).reshape(dims[0], -1), w.fmt)), keep)
            level = accuracy_level.get(w.fmt.nbits, 0) if isinstance(accuracy_level, Mapping) else accuracy_level
            _rewrite_linear(base, linear, dims[0], dims[1], w.fmt, parts, replaced, level)
            inits += parts.values()
            continue
        if (w.fmt.nbits and not expand and t.data_type == TensorProto.FLOAT and len(dims) > 1
                and math.prod(dims[1:]) % w.fmt.block == 0):
            code_bits = 4 if w.fmt.nbits == 4 and not w.fmt.group else 8  # see _code_arrays
            per_run = count * code_bits // 8 + 4 * (count // w.fmt.scale_block) * (2 if w.fmt.has_min else 1)
            bindings.append(Binding(t.name, w.fmt.name, "blocks", count, per_run))
            if dry_run:
                continue
            parts = sink.put(t.name, lambda w=w, name=t.name, dims=dims: _code_arrays(
                name, np.asarray(w.data).reshape(dims[0], -1), w.fmt), keep)
            _dequantize_per_run(t.name, dims, parts, w.fmt, casts)
            inits += parts.values()
            continue
        dtype = _FLOAT_TYPES.get(t.data_type)
        if dtype is None:
            raise PackageError(f"{where}: tensor '{t.name}' is bound to a graph input of type "
                               f"{TensorProto.DataType.Name(t.data_type)}; only float weights can be bound")
        stored = _STORED_TYPES.get(w.fmt.name)
        if w.file is not None and stored is not None:
            inits.append(external(t.name, stored, dims, Path(w.file).resolve(), w.offset, count * w.fmt.block_bytes))
            held = Binding(t.name, w.fmt.name, "stored", count, count * w.fmt.block_bytes)
            if stored != t.data_type:
                casts.append(helper.make_node("Cast", [t.name], [t.name + CAST], to=t.data_type,
                                              name=t.name + CAST))
                if expand:  # onnxruntime folds the cast when it loads the graph
                    held = Binding(t.name, w.fmt.name, "expanded", count, count * np.dtype(dtype).itemsize)
            bindings.append(held)
            continue
        kind = "stored" if w.fmt.float and np.asarray(w.data).dtype == dtype else "expanded"
        bindings.append(Binding(t.name, w.fmt.name, kind, count, count * np.dtype(dtype).itemsize))
        if dry_run:
            continue
        parts = sink.put(t.name, lambda w=w, kind=kind, dtype=dtype, name=t.name, dims=dims: {name: (
            np.asarray(w.data).reshape(dims) if kind == "stored"
            else dequantize(w.data, w.fmt, dims).astype(dtype, copy=False))}, keep)
        inits += parts.values()
    folder, files = (None, ()) if dry_run else _relocate(inits, where)
    out = onnx.ModelProto()
    _copy_without_initializers(model, out)
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    if replaced or casts:  # in place of the nodes they replace, so the order stays topological
        cast = {c.input[0] for c in casts if c.op_type == "Cast"}
        nodes = [new for node in model.graph.node for new in replaced.get(node.output[0], [node])]
        for node in nodes:
            for i, name in enumerate(node.input):
                if name in cast:
                    node.input[i] = name + CAST
        del out.graph.node[:]
        out.graph.node.extend(casts + nodes)
        if replaced and not any(o.domain == "com.microsoft" for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return Bound(out, sink.arrays, bindings, folder, files)


def _code_arrays(name: str, raw: np.ndarray, fmt: BlockFormat) -> dict[str, np.ndarray]:
    """A block-format weight as its scales (and minimum) and its codes, for `_dequantize_per_run`:
    Q4_0/Q4_1's 4-bit codes as ggml packs them (byte j: codes j and j + 16 of its block; unpacked
    as the node runs), others as 8-bit codes (signed for the symmetric formats)."""
    a = unpack(raw, fmt)
    arrays = {name + ".scale": np.ascontiguousarray(a.scale[..., None])}
    if fmt.nbits == 4 and not fmt.group:
        b = np.asarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, fmt.block_bytes)
        arrays[name + ".nibbles"] = np.ascontiguousarray(b[..., fmt.block_bytes - fmt.block // 2:])
    else:
        codes = a.codes if a.minimum is not None else (a.codes.astype(np.int16) - a.offset).astype(np.int8)
        arrays[name + ".codes"] = np.ascontiguousarray(codes)
    if a.minimum is not None:
        arrays[name + ".minimum"] = np.ascontiguousarray(a.minimum[..., None])
    return arrays


def _dequantize_per_run(name: str, dims: tuple[int, ...], parts: Collection[str], fmt: BlockFormat,
                        nodes: list[onnx.NodeProto]) -> None:
    """A weight kept as its blocks' codes and scales (`_code_arrays`), turned into fp32 each time
    its node runs (onnxruntime has no low-bit convolution): the memory of the codes, not of fp32.
    Cast and Mul rather than a blocked DequantizeLinear (the same arithmetic): 2.8 against 3.7 s
    per SD 1.5 UNet evaluation at 256x256 with CFG batch 2 here (medians of 6 warm runs, twice).
    4-bit codes are split from their bytes first (BitwiseAnd, BitShift), then offset as gguf-py
    does, so the weight is its dequantized value bit for bit."""
    codes = name + ".codes"
    if name + ".nibbles" in parts:
        nodes += [
            helper.make_node("Constant", [], [name + ".four"], value=helper.make_tensor(name + ".four", TensorProto.UINT8, [], [4])),
            helper.make_node("Constant", [], [name + ".low"], value=helper.make_tensor(name + ".low", TensorProto.UINT8, [], [15])),
            helper.make_node("BitwiseAnd", [name + ".nibbles", name + ".low"], [name + ".lo"]),
            helper.make_node("BitShift", [name + ".nibbles", name + ".four"], [name + ".hi"], direction="RIGHT"),
            helper.make_node("Concat", [name + ".lo", name + ".hi"], [codes], axis=-1),
        ]
    nodes.append(helper.make_node("Cast", [codes], [name + ".codes_f32"], to=TensorProto.FLOAT))
    values = name + ".codes_f32"
    if name + ".nibbles" in parts and not fmt.has_min:  # the symmetric code offset, as gguf-py subtracts it
        nodes += [helper.make_node("Constant", [], [name + ".offset"], value=helper.make_tensor(
                      name + ".offset", TensorProto.FLOAT, [], [float(fmt.offset)])),
                  helper.make_node("Sub", [values, name + ".offset"], [values + ".centered"])]
        values += ".centered"
    nodes.append(helper.make_node("Mul", [values, name + ".scale"], [name + ".blocks"]))
    blocks = name + ".blocks"
    if name + ".minimum" in parts:
        nodes.append(helper.make_node("Add", [blocks, name + ".minimum"], [blocks + ".shifted"]))
        blocks += ".shifted"
    nodes.append(helper.make_node("Constant", [], [name + ".dims"], value=helper.make_tensor(
        name + ".dims", TensorProto.INT64, [len(dims)], list(dims))))
    nodes.append(helper.make_node("Reshape", [blocks, name + ".dims"], [name]))


def nbits_bytes(fmt: BlockFormat, n: int, k: int) -> int:
    """Bytes MatMulNBits holds for an [N, K] weight repacked from `fmt`: codes, fp32 scales, and
    zero points or the per-block minimum where the format has one."""
    blocks = n * (k // fmt.scale_block)
    extra = 4 * blocks if fmt.has_min else 0
    return n * k * fmt.nbits // 8 + 4 * blocks + extra


def check_shape(w: Weight | None, name: str, dims: tuple[int, ...], where: str) -> None:
    """The stored tensor exists and holds what the graph needs (LDM's [C, C, 1, 1] for a [C, C]
    Linear is the same weight)."""
    if w is None:
        raise PackageError(f"{where}: tensor '{name}' is missing; the graph needs it. The file is "
                           "incomplete or for another model")
    if math.prod(w.shape) != math.prod(dims) or _squeezed(w.shape) != _squeezed(dims):
        raise PackageError(f"{where}: tensor '{name}' has shape {list(w.shape)} but the graph needs "
                           f"{list(dims)}; the file is for another architecture")


def _squeezed(shape) -> tuple[int, ...]:
    """A shape without its size-1 axes: LDM files store 1x1 attention convolutions as [C, C, 1, 1]
    where the graph has the Linear [C, C]."""
    return tuple(d for d in shape if d != 1)

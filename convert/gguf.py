"""Writing a package as one GGUF file: every component's weights under the tensor names
stable-diffusion.cpp uses (LDM/SGM names), in the ggml type the precision policy gives each,
and in `edgediff.*` metadata the manifest, scheduler config, tokenizer files and each
component's weight-less ONNX graph (base64), so `edgediff generate --model file.gguf` needs
nothing else and stable-diffusion.cpp reads the same file.

Tensors are streamed: their sizes are known from shape and type, so the header is written
first and each tensor is quantized (gguf-py) and written in turn.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.errors import UsageError
from edgediff.kernels.bind import Weight
from edgediff.kernels.gguf_blocks import FORMATS, BlockFormat, can_store, dequantize, quantize
from edgediff.kernels.policy import SMALL, Rule, precision_for
from edgediff.manifest import Manifest
from edgediff.runtime.gguf_file import ORIG_SHAPE
from edgediff.runtime.package import GGUF_GRAPH, GGUF_MANIFEST, GGUF_SCHEDULER, GGUF_TOKENIZER
from edgediff.runtime.tokenizer import TOKENIZER_FILES

ALIASES = {"fp32": "f32", "fp16": "f16"}


def gguf_format(name: str) -> BlockFormat:
    name = ALIASES.get(name, name)
    if name not in FORMATS or not FORMATS[name].writable:
        writable = ", ".join(n for n, f in FORMATS.items() if f.writable)
        raise UsageError(f"unknown GGUF precision '{name}'; choose one of: {writable}")
    return FORMATS[name]


def stored_format(name: str, shape: tuple[int, ...], fmt: BlockFormat, rules: Sequence[Rule],
                  reshape: bool = False) -> BlockFormat:
    """The ggml type a weight is written in: the component's, unless the policy keeps it (1-D and
    small tensors in F32, larger ones in F16) or its rows cannot hold whole blocks: 3x3 and 1x1
    convolutions, whose last axis is the kernel width, stay F16 as stable-diffusion.cpp keeps them,
    or with `reshape` are stored as rows of one output channel each (see `written_shape`)."""
    choice = precision_for(name, shape, fmt.name, rules)
    if choice in FORMATS and FORMATS[choice].writable:
        chosen = FORMATS[choice]
    elif len(shape) <= 1 or math.prod(shape) <= SMALL or fmt.name == "f32":
        return FORMATS["f32"]
    else:
        chosen = FORMATS["f16"] if fmt.name != "f32" else fmt
    if can_store(chosen, shape) or (reshape and can_store(chosen, written_shape(shape))):
        return chosen
    return FORMATS["f16"]


def written_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A convolution weight [O, I, kh, kw] as the 2-D [O, I*kh*kw] its blocks run along, with
    the true shape in `comfy.gguf.orig_shape.NAME` (ComfyUI-GGUF's convention)."""
    return (shape[0], math.prod(shape[1:])) if len(shape) > 2 else tuple(shape)


@dataclass(frozen=True)
class _Planned:
    component: str
    name: str  # in the file
    shape: tuple[int, ...]  # as written
    fmt: BlockFormat
    # where its rows come from: (graph initializer, its first row, first row here, rows; -1: all)
    sources: tuple[tuple[str, int, int, int], ...] = ()
    true_shape: tuple[int, ...] | None = None  # ComfyUI-GGUF's reshaped tensors: the real shape


def _file_tensors(inits, name_of: Callable[[str], str]) -> dict[str, tuple[tuple[int, ...], list]]:
    """File tensor name -> (its shape, its sources as in `_Planned`), from the graph's float
    initializers [(name, dims)]: a weight named by rows (`rows_ref`) is a slice of a fused tensor,
    which the slices that name it must cover exactly once."""
    from edgediff.kernels.bind import parse_rows_ref

    out: dict[str, tuple[tuple[int, ...], list]] = {}
    for graph_name, dims in inits:
        pieces = parse_rows_ref(name_of(graph_name))
        if pieces[0][2] == -1:
            if pieces[0][0] in out:
                raise UsageError(f"two weights map to the tensor name '{pieces[0][0]}' ({graph_name} and another)")
            out[pieces[0][0]] = (dims, [(graph_name, 0, 0, -1)])
            continue
        row = 0
        for name, start, end in pieces:
            sources = out.get(name, ((), []))[1]
            sources.append((graph_name, row, start, end - start))
            row += end - start
            out[name] = ((max(s[2] + s[3] for s in sources), *dims[1:]), sources)
    for name, (_, sources) in out.items():
        spans = sorted((s[2], s[2] + s[3]) for s in sources)
        if len(sources) > 1 and (any(s[3] == -1 for s in sources) or any(
                a[1] != b[0] for a, b in zip([(0, 0), *spans], spans, strict=False))):
            raise UsageError(f"the weights cut from '{name}' do not cover its rows exactly once")
    return out


def write_gguf(package: Path, manifest: Manifest, output: Path, names: Mapping[str, Callable[[str], str]], *,
               formats: Mapping[str, BlockFormat] | None = None, rules: Sequence[Rule] = (),
               shapes: Callable[[str, tuple[int, ...]], tuple[int, ...]] = lambda name, shape: shape,
               stored: Callable[[str, str], Weight | None] | None = None, reshape: bool = False,
               weights: Callable[[str], Mapping[str, np.ndarray]] | None = None,
               progress: Callable[[str], None] | None = None) -> Manifest:
    """Write the fp32 ONNX package in `package` as one GGUF file at `output`.

    `names[component](graph initializer name)` is each weight's name in the file, `shapes(name,
    graph shape)` its shape there. The weights are the package's, quantized to `formats[component]`
    under the precision `rules` (`reshape`: convolutions too, in ComfyUI-GGUF's layout); or, with
    `stored(component, name)`, tensors taken from another file, as stored or, with `formats`,
    requantized one at a time. `weights(component)` maps graph names to the weights when the
    package's graphs hold none (a diffusers folder's files, read one tensor at a time)."""
    import onnx
    from gguf import GGUFWriter, LlamaFileType

    from edgediff.kernels.bind import check_shape, strip_weights
    from edgediff.kernels.ldm_names import stored_transposed

    plan: list[_Planned] = []
    graphs: dict[str, bytes] = {}
    components = {}
    written_names: set[str] = set()
    for component, entry in manifest.components.items():
        model = onnx.load(str(package / entry.file), load_external_data=False)
        inits = [(t.name, tuple(int(d) for d in t.dims)) for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT and t.dims]
        rename = {name: names[component](name) for name, _ in inits}
        turned = {n for n, ref in rename.items() if stored_transposed(ref)}
        sizes: Counter[str] = Counter()
        for name, (dims, sources) in _file_tensors(inits, rename.__getitem__).items():
            if name in written_names:
                raise UsageError(f"two components write the tensor name '{name}'")
            written_names.add(name)
            if stored_transposed(name):
                dims = dims[::-1]
            w = None if stored is None else stored(component, name)
            if stored is not None:
                check_shape(w, name, dims, component)
            if formats:  # quantized here: the package's weights, or the stored ones requantized
                fmt = stored_format(sources[0][0], dims, formats[component], rules, reshape)
                shape = shapes(name, dims) if w is None else tuple(w.shape)
                item = (_Planned(component, name, shape, fmt, tuple(sources)) if can_store(fmt, shape) else
                        _Planned(component, name, written_shape(shape), fmt, tuple(sources), shape))
            else:
                written = w.shape if can_store(w.fmt, w.shape) else (
                    w.data.shape[0], w.data.shape[1] // w.fmt.block_bytes * w.fmt.block)
                item = _Planned(component, name, written, w.fmt, (), None if written == w.shape else w.shape)
            plan.append(item)
            sizes[item.fmt.name] += _stored_bytes(item.shape, item.fmt)
        graph = strip_weights(model, rename, turned).SerializeToString()
        key = GGUF_GRAPH + component
        graphs[key] = graph
        blocks = Counter({k: v for k, v in sizes.items() if not FORMATS[k].float})
        main = formats[component].name if formats else (blocks or sizes).most_common(1)[0][0]
        components[component] = dataclasses.replace(
            entry, file=key, precision=main, bytes=sum(sizes.values()), sha256=hashlib.sha256(graph).hexdigest(),
            data_files=(), weights="", notes={"bytes_by_type": dict(sizes)})
    original = manifest.components
    manifest = dataclasses.replace(manifest, components=components)

    writer = GGUFWriter(str(output), arch=manifest.family)
    writer.add_quantization_version(2)
    main = manifest.components[manifest.denoiser].precision
    file_type = getattr(LlamaFileType, "ALL_F32" if main == "f32" else f"MOSTLY_{main.upper()}", None)
    if file_type is not None:
        writer.add_file_type(int(file_type))
    writer.add_string(GGUF_MANIFEST, manifest.to_json())
    writer.add_string(GGUF_SCHEDULER, (package / "scheduler" / "scheduler_config.json").read_text())
    for te in manifest.text_encoders:
        for file in TOKENIZER_FILES:
            path = package / te.tokenizer / file
            if path.is_file():
                writer.add_string(f"{GGUF_TOKENIZER}{te.tokenizer}.{file}", path.read_text(encoding="utf-8"))
    for key, graph in graphs.items():
        writer.add_string(key, base64.b64encode(graph).decode("ascii"))
    for item in plan:
        if item.true_shape:
            writer.add_array(ORIG_SHAPE + item.name, list(item.true_shape))
        dtype = {"f32": np.float32, "f16": np.float16}.get(item.fmt.name, np.float32)
        writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), _stored_bytes(item.shape, item.fmt),
                               raw_dtype=None if item.fmt.name in ("f32", "f16") else item.fmt.ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    loaded, arrays = None, {}
    for item in plan:
        if item.component != loaded:
            loaded = item.component
            if progress:
                progress(f"writing {item.component} as {manifest.components[item.component].precision}")
            if stored is None:
                arrays = weights(item.component) if weights else _weights(package / original[item.component].file)
        if stored is not None:
            w = stored(item.component, item.name)
            if not formats:
                writer.write_tensor_data(np.ascontiguousarray(w.data))
                continue
            array = dequantize(w.data, w.fmt, w.shape)
        else:
            array = _assembled(item, arrays)
            array = array.T if stored_transposed(item.name) else array
        array = array.reshape(item.shape)
        writer.write_tensor_data(array.astype(np.float32 if item.fmt.name == "f32" else np.float16)
                                 if item.fmt.float else quantize(array, item.fmt))
    writer.close()
    return manifest


def _assembled(item: _Planned, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The file tensor from its graph weights: one whole, or rows of several."""
    if item.sources[0][3] == -1:
        return weights[item.sources[0][0]]
    rows = max(s[2] + s[3] for s in item.sources)
    first = weights[item.sources[0][0]]
    out = np.empty((rows, *first.shape[1:]), np.float32)
    for graph_name, start, at, count in item.sources:
        out[at:at + count] = weights[graph_name][start:start + count]
    return out


def _weights(path: Path) -> dict[str, np.ndarray]:
    """A graph's float weights, memory-mapped from its external data file where it has one."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or not t.dims:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = np.memmap(path.parent / info["location"], dtype=np.float32, mode="r",
                                    offset=int(info.get("offset", 0)), shape=tuple(t.dims))
        else:
            out[t.name] = numpy_helper.to_array(t)
    return out


def _stored_bytes(shape: tuple[int, ...], fmt: BlockFormat) -> int:
    return math.prod(shape) // fmt.block * fmt.block_bytes

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
from pathlib import Path

import numpy as np

from edgediff.errors import UsageError
from edgediff.kernels.gguf_blocks import FORMATS, BlockFormat, can_store, quantize
from edgediff.kernels.policy import SMALL, Rule, precision_for
from edgediff.manifest import Manifest
from edgediff.runtime.package import GGUF_GRAPH, GGUF_MANIFEST, GGUF_SCHEDULER, GGUF_TOKENIZER
from edgediff.runtime.tokenizer import TOKENIZER_FILES

ALIASES = {"fp32": "f32", "fp16": "f16"}


def gguf_format(name: str) -> BlockFormat:
    name = ALIASES.get(name, name)
    if name not in FORMATS or not FORMATS[name].writable:
        writable = ", ".join(n for n, f in FORMATS.items() if f.writable)
        raise UsageError(f"unknown GGUF precision '{name}'; choose one of: {writable}")
    return FORMATS[name]


def stored_format(name: str, shape: tuple[int, ...], fmt: BlockFormat, rules: Sequence[Rule]) -> BlockFormat:
    """The ggml type a weight is written in: the component's, unless the policy keeps it (1-D and
    small tensors in F32, larger ones in F16) or its rows cannot hold whole blocks (F16: 3x3 and
    1x1 convolutions, whose last axis is the kernel width, as stable-diffusion.cpp keeps them)."""
    choice = precision_for(name, shape, fmt.name, rules)
    if choice in FORMATS and FORMATS[choice].writable:
        chosen = FORMATS[choice]
    elif len(shape) <= 1 or math.prod(shape) <= SMALL or fmt.name == "f32":
        return FORMATS["f32"]
    else:
        chosen = FORMATS["f16"] if fmt.name != "f32" else fmt
    return chosen if can_store(chosen, shape) else FORMATS["f16"]


def write_gguf(package: Path, manifest: Manifest, output: Path, formats: Mapping[str, BlockFormat],
               rules: Sequence[Rule], names: Mapping[str, Callable[[str], str]],
               shapes: Callable[[str, tuple[int, ...]], tuple[int, ...]],
               progress: Callable[[str], None] | None = None) -> Manifest:
    """Write the fp32 ONNX package in `package` as one GGUF file at `output`.

    `names[component](graph initializer name)` is the tensor's name in the file, `shapes(name,
    graph shape)` its shape there; `formats[component]` the component's type."""
    import onnx
    from gguf import GGUFWriter, LlamaFileType

    from edgediff.kernels.bind import strip_weights

    plan = []  # (component, graph name, file name, shape, format)
    graphs: dict[str, bytes] = {}
    components = {}
    seen: dict[str, str] = {}
    for component, entry in manifest.components.items():
        model = onnx.load(str(package / entry.file), load_external_data=False)
        rename = {}
        counts: Counter[str] = Counter()
        total = 0
        for t in model.graph.initializer:
            if t.data_type != onnx.TensorProto.FLOAT or not t.dims:
                continue
            name = names[component](t.name)
            if name in seen:
                raise UsageError(f"two weights map to the tensor name '{name}' ({seen[name]} and {t.name})")
            seen[name] = t.name
            shape = tuple(int(d) for d in t.dims)
            fmt = stored_format(t.name, shape, formats[component], rules)
            plan.append((component, t.name, name, shapes(name, shape), fmt))
            rename[t.name] = name
            counts[fmt.name] += 1
            total += _stored_bytes(shape, fmt)
        graph = strip_weights(model, rename).SerializeToString()
        key = GGUF_GRAPH + component
        graphs[key] = graph
        main = formats[component].name
        components[component] = dataclasses.replace(
            entry, file=key, precision=main, bytes=total, sha256=hashlib.sha256(graph).hexdigest(),
            data_files=(), weights="", notes={"tensors_by_type": dict(counts)})
    original = manifest.components
    manifest = dataclasses.replace(manifest, components=components)

    writer = GGUFWriter(str(output), arch=manifest.family)
    writer.add_quantization_version(2)
    main = formats.get("unet") or next(iter(formats.values()))
    file_type = getattr(LlamaFileType, f"MOSTLY_{main.name.upper()}", None) or (
        LlamaFileType.ALL_F32 if main.name == "f32" else None)
    if file_type is not None:
        writer.add_file_type(int(file_type))
    writer.add_name(manifest.source.get("path", "") and Path(str(manifest.source["path"])).name or manifest.family)
    writer.add_string(GGUF_MANIFEST, manifest.to_json())
    writer.add_string(GGUF_SCHEDULER, (package / "scheduler" / "scheduler_config.json").read_text())
    for te in manifest.text_encoders:
        for file in TOKENIZER_FILES:
            path = package / te.tokenizer / file
            if path.is_file():
                writer.add_string(f"{GGUF_TOKENIZER}{te.tokenizer}.{file}", path.read_text(encoding="utf-8"))
    for key, graph in graphs.items():
        writer.add_string(key, base64.b64encode(graph).decode("ascii"))
    for _, _, name, shape, fmt in plan:
        nbytes = _stored_bytes(shape, fmt)
        if fmt.float:
            writer.add_tensor_info(name, shape, np.dtype(np.float32 if fmt.name == "f32" else np.float16), nbytes)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=fmt.ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    loaded, weights = None, {}
    for component, graph_name, _, shape, fmt in plan:
        if component != loaded:
            loaded = component
            if progress:
                progress(f"writing {component} as {formats[component].name}")
            weights = _weights(package / original[component].file)
        array = weights.pop(graph_name).reshape(shape)
        writer.write_tensor_data(array.astype(np.float32 if fmt.name == "f32" else np.float16)
                                 if fmt.float else quantize(array, fmt))
    writer.close()
    return manifest


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

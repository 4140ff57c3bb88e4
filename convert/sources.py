"""Reading what users have: a diffusers folder, a single-file checkpoint, or a GGUF file.

Only headers are read here (names, dtypes, shapes), after validating them, so detection and
`inspect` never allocate tensor data and never need torch. Pickle files are refused unless the
caller explicitly allows them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edgediff.errors import SourceError, UnsafeFileError, require
from edgediff.families import DENOISER, bare_denoiser
from edgediff.runtime.safetensors_file import (
    SAFETENSORS_DTYPES,
    TensorInfo,
    read_safetensors_header,
)

__all__ = ["SAFETENSORS_DTYPES", "Source", "TensorInfo", "open_source", "read_safetensors_header"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Diffusers folder: component -> weight file names, in order of preference.
DIFFUSERS_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors",),
    "transformer": ("diffusion_pytorch_model.safetensors",),
    "vae": ("diffusion_pytorch_model.safetensors",),
    "text_encoder": ("model.safetensors",),
    "text_encoder_2": ("model.safetensors",),
    "text_encoder_3": ("model.safetensors",),
    "image_encoder": ("model.safetensors",),
}


@dataclass
class Source:
    """A model source: tensor names in its own layout, mapped to where each tensor lives."""

    path: Path
    kind: str  # 'diffusers' | 'safetensors' | 'checkpoint' | 'gguf'
    tensors: dict[str, TensorInfo]
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise UnsafeFileError(
            f"{path}: this is a pickle-based checkpoint, which can run arbitrary code when loaded; "
            "edgediff will not open it. Use a .safetensors version of the model, or, if you trust "
            "the file, pass --allow-pickle (it is then loaded with torch.load(weights_only=True))"
        )


def _open_diffusers(folder: Path, allow_pickle: bool) -> Source:
    tensors: dict[str, TensorInfo] = {}
    for component, names in DIFFUSERS_WEIGHTS.items():
        sub = folder / component
        if not sub.is_dir():
            continue
        files = [sub / n for n in names if (sub / n).is_file()]
        index = sorted(sub.glob("*.safetensors.index.json"))
        if not files and index:
            files = _indexed_files(index[0])
        if not files:
            pickles = [p for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                _refuse_pickle(pickles[0], allow_pickle)
                raise SourceError(
                    f"{pickles[0]}: diffusers folders with pickle weights are not supported; "
                    "save the pipeline with safe_serialization=True"
                )
            raise SourceError(f"{sub}: no weights found (expected {' or '.join(names)})")
        for file in files:
            found, _ = read_safetensors_header(file)
            for name, info in found.items():
                tensors[f"{component}.{name}"] = info
    if not tensors:
        raise SourceError(
            f"{folder}: a folder, but not a diffusers model (no unet/, transformer/, vae/ or "
            "text_encoder/ with .safetensors weights)"
        )
    return Source(folder, "diffusers", tensors)


def _indexed_files(index: Path) -> list[Path]:
    """The shard files a `*.safetensors.index.json` names, each checked to be a file beside it
    (a name like `../../etc/hostname` is refused, never followed)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise SourceError(f"{index}: not a valid safetensors index ({exc}); download it again") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{index}: its 'weight_map' is not a map of tensor names to shard files; download it again")
    files = []
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or name in (".", ".."):
            raise SourceError(f"{index}: the shard {name!r} is not a file name beside the index (it points "
                              "elsewhere); the index is damaged or malicious")
        if not (index.parent / name).is_file():
            raise SourceError(f"{index}: the shard {name!r} it names is missing from {index.parent}; download it")
        files.append(index.parent / name)
    return files


def _open_checkpoint(path: Path) -> Source:
    torch = require("torch", "convert", "Reading a pickle checkpoint")

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise SourceError(f"{path}: could not be read as a weights-only checkpoint ({exc})") from exc
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise SourceError(f"{path}: no state dict inside this checkpoint")
    tensors = {
        k: TensorInfo(str(v.dtype).replace("torch.", ""), tuple(v.shape), path, k)
        for k, v in state.items()
        if hasattr(v, "shape")
    }
    return Source(path, "checkpoint", tensors)


class CheckpointFile:
    """A pickle checkpoint's state dict (`torch.load(weights_only=True)`, only behind the explicit
    flag) as a weight file, like runtime's safetensors and GGUF readers: names, shapes, fp32 arrays."""

    prefix = ""

    def __init__(self, path: Path):
        import types

        torch = require("torch", "convert", "Reading a pickle checkpoint")
        self.path = Path(path)
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = data.get("state_dict", data) if isinstance(data, dict) else {}
        self.state = {k: v for k, v in state.items() if hasattr(v, "shape")}
        self.header = {k: types.SimpleNamespace(shape=tuple(v.shape)) for k, v in self.state.items()}

    def names(self) -> list[str]:
        return list(self.header)

    def weight(self, name: str):
        from edgediff.kernels.bind import Weight
        from edgediff.kernels.gguf_blocks import FORMATS

        t = self.state.get(name)
        if t is None or not t.is_floating_point():
            return None
        return Weight(name, FORMATS["f32"], tuple(t.shape), t.float().numpy())

    def drop_pages(self) -> None:
        pass


def _open_gguf(path: Path) -> Source:
    from edgediff.runtime.gguf_file import GGUFFile

    gguf = GGUFFile(path)
    metadata = {}
    for key in gguf.keys:
        value = gguf.field(key) if gguf.reader.fields[key].types[0].name != "STRING" else gguf.string(key)
        metadata[key] = f"<{len(value)} characters>" if isinstance(value, str) and len(value) > 200 else value
    tensors = {name: TensorInfo(w.fmt.name.upper(), w.shape, path, w.name) for name, w in gguf.tensors.items()}
    tensors.update({name: TensorInfo(kind, (), path, name) for name, kind in gguf.unsupported.items()})
    return Source(path, "gguf", tensors, metadata)


def _with_denoiser_prefix(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Denoiser-only files often drop `model.diffusion_model.` (ComfyUI-GGUF, BFL's FLUX
    release); put it back so names mean one thing everywhere."""
    if bare_denoiser(tensors):
        return {DENOISER + k: v for k, v in tensors.items()}
    return tensors


def open_source(path: str | Path, allow_pickle: bool = False) -> Source:
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_diffusers(path, allow_pickle)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata = read_safetensors_header(path)
        return Source(path, "safetensors", _with_denoiser_prefix(tensors), dict(metadata))
    if suffix == ".gguf":
        return _open_gguf(path)
    if suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path, allow_pickle)
        return _open_checkpoint(path)
    raise SourceError(
        f"{path}: unknown model file type '{suffix}'; edgediff reads diffusers folders, "
        ".safetensors, .gguf, and (with --allow-pickle) .ckpt/.pt/.bin"
    )


# Single-file prefixes -> the component they hold (LDM/SGM names, stable-diffusion.cpp names).
_COMPONENT_PREFIXES = (
    ("model.diffusion_model.", "denoiser"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    ("text_encoders.clip_l.", "clip_l"),
    ("text_encoders.clip_g.", "clip_g"),
    ("text_encoders.t5xxl.", "t5xxl"),
    ("model_ema.", "ema (training copy)"),
)


def component_of(source: Source, name: str) -> str:
    if source.kind == "diffusers":
        return name.split(".", 1)[0]
    for prefix, component in _COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return component
    return "other"


def tensor_bytes(info: TensorInfo) -> int:
    """Bytes of a tensor as stored (GGUF block types included, via gguf-py's size table)."""
    if info.dtype in SAFETENSORS_DTYPES:
        return math.prod(info.shape) * SAFETENSORS_DTYPES[info.dtype]
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[info.dtype]]
        return math.prod(info.shape) // block * size
    except (ImportError, KeyError):
        torch_sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8}
        return math.prod(info.shape) * torch_sizes.get(info.dtype, 4)


def summarize(source: Source) -> dict[str, dict[str, object]]:
    """Per component: tensor count, bytes, and dtype counts."""
    out: dict[str, dict[str, object]] = {}
    for name, info in source.tensors.items():
        entry = out.setdefault(component_of(source, name), {"tensors": 0, "bytes": 0, "dtypes": Counter()})
        entry["tensors"] += 1
        entry["bytes"] += tensor_bytes(info)
        entry["dtypes"][info.dtype] += 1
    return out

"""Reading safetensors files without torch: the header validated against the file before
anything is allocated, and tensors as memory-mapped NumPy views (a weight source for
kernels.bind, like a GGUF file)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.errors import SourceError

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
MAX_HEADER = 100 * 1024 * 1024
_FLOATS = {"F32": ("f32", np.float32), "F16": ("f16", np.float16), "BF16": ("bf16", np.uint8)}


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path
    name: str  # the name inside `file`
    offset: int = 0  # where its data starts in `file` (safetensors)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors header against the file before anything is allocated."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SourceError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise SourceError(
                f"{path}: corrupt safetensors header (it claims {length} bytes; the file has "
                f"{size}); the file is truncated or not safetensors: download it again"
            )
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"{path}: garbled safetensors header ({exc}); download the file again") from exc
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SourceError(f"{path}: its safetensors __metadata__ is not a map of strings (the format requires one); "
                          "the file is damaged or was not written by a safetensors library")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}")
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"bad shape {shape!r}")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError(f"bad data offsets {[begin, end]!r}")
            need = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
            if end - begin != need:
                raise ValueError(f"{end - begin} data bytes for shape {shape} of {dtype} ({need} needed)")
            if end > data_size:
                raise ValueError(f"data ends at byte {end} but the file holds {data_size} data bytes (truncated?)")
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}: tensor '{name}' has an invalid header entry: {exc}") from exc
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(dtype, tuple(shape), path, name, 8 + length + begin)
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise SourceError(f"{path}: tensors '{n0}' and '{n1}' overlap in the data section (corrupt file)")
    return tensors, metadata


class SafetensorsFile:
    """A safetensors file as a weight source: `weight(name)` is a memory-mapped view."""

    def __init__(self, path: str | Path, prefix: str = ""):
        from edgediff.runtime.weight_cache import identity

        self.path = Path(path)
        self.header, self.metadata = read_safetensors_header(self.path)
        self.identity = identity(self.path)  # what binding checks the file still is
        self.prefix = prefix  # prepended to names that lack it (a bare VAE or text encoder file)
        self._map = None

    def names(self) -> list[str]:
        return [n if n.startswith(self.prefix) else self.prefix + n for n in self.header]

    def weight(self, name: str):
        from edgediff.kernels.bind import Weight
        from edgediff.kernels.gguf_blocks import FORMATS

        info = self.header.get(name) or self.header.get(name.removeprefix(self.prefix))
        if info is None or info.dtype not in _FLOATS:
            return None
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        fmt, dtype = _FLOATS[info.dtype]
        size = math.prod(info.shape) * SAFETENSORS_DTYPES[info.dtype]
        raw = self._map[info.offset:info.offset + size]
        data = raw.view(dtype) if dtype is not np.uint8 else raw.reshape(-1, 2 * info.shape[-1] if info.shape else 2)
        return Weight(name, FORMATS[fmt], info.shape, data, self.path, info.offset)

    def drop_pages(self) -> None:
        import mmap

        handle = getattr(self._map, "_mmap", None)
        if handle is not None and hasattr(handle, "madvise"):
            handle.madvise(mmap.MADV_DONTNEED)

"""Reading a GGUF file: validated before any tensor is used, memory-mapped, and its tensors given
as `kernels.bind.Weight`s (torch-order shapes, ComfyUI-GGUF's reshapes undone).

gguf-py's `GGUFReader` does the parsing; each tensor's type, shape and data range are checked
first, so a damaged file is one `SourceError` naming the file, the tensor and the offset.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from edgediff.errors import SourceError
from edgediff.families import DENOISER, bare_denoiser
from edgediff.kernels.bind import Weight
from edgediff.kernels.gguf_blocks import format_of
from edgediff.runtime.weight_cache import identity

MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF stores a reshaped tensor's true shape here
PREFIX = "edgediff."  # our metadata keys


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def _check_header(data, size: int) -> None:
    """Walk the header's counts and lengths before gguf-py parses it: a count or length that
    the file cannot hold (gguf-py would loop over empty reads, or allocate for it) is refused."""
    import struct

    if len(data) < 24:
        raise _Bad("truncated header")
    version, tensors, kvs = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise _Bad(f"GGUF version {version} (edgediff reads versions 2 and 3)")
    if kvs * 13 > size or tensors * 32 > size:  # the smallest key/value and tensor entries
        raise _Bad(f"the header claims {kvs} metadata entries and {tensors} tensors, more than the "
                   f"{size}-byte file can hold")
    pos = 24

    def take(n: int) -> int:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise _Bad(f"a metadata entry runs past the end of the header at byte {pos}")
        pos += n
        return pos - n

    def string() -> None:
        (n,) = struct.unpack_from("<Q", data, take(8))
        take(n)

    def value(kind: int, depth: int = 0) -> None:
        if kind in _SCALARS:
            take(_SCALARS[kind])
        elif kind == _STRING:
            string()
        elif kind == _ARRAY and depth < 4:
            item, count = struct.unpack_from("<IQ", data, take(12))
            if count * (_SCALARS.get(item, 8)) > len(data) - pos:
                raise _Bad(f"an array of {count} items at byte {pos} is longer than the file")
            for _ in range(count):
                value(item, depth + 1)
        else:
            raise _Bad(f"unknown metadata value type {kind} at byte {pos}")

    for _ in range(kvs):
        string()
        (kind,) = struct.unpack_from("<I", data, take(4))
        value(kind)


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor's type and data range before mapping it."""

    def _build_tensors(self, start_offs, fields):
        size = len(self.data)
        seen = set()
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            if name in seen:
                raise _Bad(f"tensor '{name}' appears twice; the file is damaged")
            seen.add(name)
            try:
                ggml = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise _Bad(f"tensor '{name}' has unknown type number {int(raw_dtype[0])}") from None
            block, type_size = GGML_QUANT_SIZES[ggml]
            count = math.prod(int(d) for d in dims)
            if count == 0:
                raise _Bad(f"tensor '{name}' ({ggml.name}) has no values (shape {[int(d) for d in dims]})")
            if dims.size and int(dims[0]) % block:
                raise _Bad(f"tensor '{name}' ({ggml.name}) has rows of {int(dims[0])} values, not whole "
                           f"blocks of {block}")
            begin = int(start_offs) + int(offset[0])
            end = begin + count // block * type_size
            if end > size:
                raise _Bad(f"tensor '{name}' data runs from byte {begin} to {end}, past the end of the "
                           f"file ({size} bytes): the file is truncated")
        super()._build_tensors(start_offs, fields)


class _Bad(Exception):
    pass


class GGUFFile:
    """A GGUF file: `metadata` (key -> value), `tensors` (name -> Weight), `writer`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with self.path.open("rb") as fh:
                magic = fh.read(4)
            self.identity = identity(self.path)  # what binding checks the file still is
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot be read ({exc})") from exc
        if magic != MAGIC:
            raise SourceError(f"{self.path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        try:
            import mmap

            with self.path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                _check_header(view, len(view))
        except _Bad as exc:
            raise SourceError(f"{self.path}: corrupt or truncated GGUF header ({exc}); download the file again") from None
        try:
            self.reader = _CheckedReader(self.path)
        except _Bad as exc:
            raise SourceError(f"{self.path}: {exc}") from None
        except (ValueError, KeyError, IndexError, OverflowError) as exc:
            raise SourceError(f"{self.path}: corrupt or truncated GGUF header ({exc}); download the file "
                              "again") from exc
        self.tensors: dict[str, Weight] = {}
        self.unsupported: dict[str, str] = {}  # tensor -> its type, for types edgediff cannot read
        reshaped = 0
        for t in self.reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            orig = self.reader.fields.get(ORIG_SHAPE + t.name)
            if orig is not None:
                true = tuple(int(orig.parts[i][0]) for i in orig.data)
                if math.prod(true) != math.prod(shape):
                    raise SourceError(f"{self.path}: {ORIG_SHAPE}{t.name} says {list(true)}, which does not "
                                      f"hold the tensor's {math.prod(shape)} values")
                shape, reshaped = true, reshaped + 1
            fmt = format_of(t.tensor_type)
            if fmt is None:
                self.unsupported[t.name] = t.tensor_type.name
                continue
            data = t.data if fmt.float and fmt.name != "bf16" else t.data.reshape(-1, t.data.shape[-1])
            self.tensors[t.name] = Weight(t.name, fmt, shape, data, self.path if fmt.float else None,
                                          int(t.data_offset))
        self.reshaped = reshaped
        self.stripped = bare_denoiser(self.tensors)  # names are kept with the prefix put back
        if self.stripped:
            self.tensors = {DENOISER + k: v for k, v in self.tensors.items()}

    # metadata -------------------------------------------------------------
    def field(self, key: str):
        """A metadata value: str, int, float, bool or list; None when absent."""
        f = self.reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception as exc:  # gguf-py raises its own errors on odd values
            raise SourceError(f"{self.path}: metadata '{key}' cannot be read ({exc})") from exc

    def string(self, key: str) -> str | None:
        f = self.reader.fields.get(key)
        if f is None:
            return None
        if f.types != [GGUFValueType.STRING]:
            raise SourceError(f"{self.path}: metadata '{key}' should be a string")
        try:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.path}: metadata '{key}' is not UTF-8 text ({exc})") from exc

    def blob(self, key: str) -> bytes | None:
        """Binary metadata edgediff stores as a base64 string."""
        text = self.string(key)
        if text is None:
            return None
        try:
            return base64.b64decode(text, validate=True)
        except ValueError as exc:
            raise SourceError(f"{self.path}: metadata '{key}' is not valid base64 ({exc})") from exc

    @property
    def keys(self) -> list[str]:
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    @property
    def writer(self) -> str:
        """Which tool wrote the file, as far as its metadata tells."""
        if self.string(PREFIX + "manifest") is not None:
            return "edgediff"
        if any(k.startswith(ORIG_SHAPE) for k in self.keys) or (
                self.stripped and self.field("general.architecture") is not None):
            return "ComfyUI-GGUF"
        if not self.keys:
            return "stable-diffusion.cpp (no metadata)"
        return "unknown"

    def weight(self, name: str) -> Weight | None:
        if name in self.unsupported or name.removeprefix(DENOISER) in self.unsupported:
            kind = self.unsupported.get(name) or self.unsupported[name.removeprefix(DENOISER)]
            raise SourceError(f"{self.path}: tensor '{name}' is stored as {kind}, a type edgediff cannot "
                              "read (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K)")
        return self.tensors.get(name)

    def drop_pages(self) -> None:
        """Let go of the file pages read while binding (onnxruntime holds its own copy now): they
        count as this process's memory while mapped."""
        import mmap

        handle = getattr(self.reader.data, "_mmap", None)
        if handle is not None and hasattr(handle, "madvise"):
            handle.madvise(mmap.MADV_DONTNEED)

    def bytes_by_type(self) -> dict[str, tuple[int, int, int]]:
        """Format -> (tensors, values, bytes) as stored."""
        out: dict[str, list[int]] = {}
        for w in self.tensors.values():
            entry = out.setdefault(w.fmt.name, [0, 0, 0])
            entry[0] += 1
            entry[1] += math.prod(w.shape)
            entry[2] += int(np.asarray(w.data).nbytes)
        return {k: tuple(v) for k, v in out.items()}

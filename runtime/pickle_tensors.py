"""Tensors from the files `torch.save` writes (`.pth`, `.pt`, `.bin`, `.ckpt`), without torch and
without running anything the file asks for.

A torch.save file is a pickle program plus raw storages: the zip format (torch >= 1.6:
`NAME/data.pkl` and `NAME/data/KEY`) or the legacy one (pickles, then each storage as an 8-byte
element count and its bytes). Unpickling calls whatever globals the program names; here every
global is looked up in a short table of our own stand-ins (OrderedDict, the storage types, torch's
tensor and parameter rebuild functions, as A1111's safe unpickler allows), and any other one is
refused with UnsafeFileError before it is called. Tensors come back as NumPy arrays (bf16 as
float32, which NumPy lacks), each checked to lie inside its storage.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.errors import SourceError, UnsafeFileError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_STORAGES = {"FloatStorage": "<f4", "HalfStorage": "<f2", "DoubleStorage": "<f8", "BFloat16Storage": "<u2",
             "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
             "ByteStorage": "u1", "BoolStorage": "?"}


@dataclass(frozen=True, slots=True)
class _StorageType:
    name: str


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str  # numpy's, little-endian
    numel: int
    view: tuple[int, int] | None = None  # legacy views: (offset, size) in the root storage


@dataclass(frozen=True, slots=True)
class _Tensor:
    """A tensor met while unpickling; its data is read once every storage is known."""

    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 (and v1): only its arguments are kept."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor rebuilt from {type(storage).__name__}, not a storage")
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor."""
    return data


_ALLOWED: dict[tuple[str, str], Callable | _StorageType] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file, encoding="utf-8")
        self.where = where
        self.storages: dict[str, _Storage] = {}  # by key: every storage the program named

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeFileError(
                f"{self.where}: its pickle asks for '{module}.{name}', which is not a tensor or a dict of them; "
                "edgediff read no further and ran nothing. A file that needs it can run code when loaded: use a "
                ".safetensors version of it, or convert it where you trust it")
        return found

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise ValueError(f"an unknown persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage" or len(pid) not in (5, 6):
            raise UnsafeFileError(f"{self.where}: its pickle holds a '{kind}' object, not a tensor storage; "
                                  "edgediff reads only tensors from pickle files")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"a storage entry of {storage_type!r} with {numel!r} elements")
        view = pid[5] if len(pid) == 6 else None  # legacy: (view_key, offset, size) or None
        storage = _Storage(str(key), _STORAGES[storage_type.name], numel,
                           (int(view[1]), int(view[2])) if view is not None else None)
        self.storages.setdefault(storage.key, storage)
        return storage


def _unpickle(data: io.BufferedIOBase, where: str, storages: dict[str, _Storage] | None = None):
    """One pickle program run against the allowed globals; the storages it names go into `storages`."""
    try:
        unpickler = _Unpickler(data, where)
        obj = unpickler.load()
        if storages is not None:
            storages.update(unpickler.storages)
        return obj
    except UnsafeFileError:
        raise
    except Exception as exc:  # pickle raises many types for a damaged program
        raise SourceError(f"{where}: not a readable torch.save file ({type(exc).__name__}: {exc}); "
                          "download it again") from None


def _array(raw: bytes | memoryview, dtype: str, numel: int, where: str, key: str) -> np.ndarray:
    size = numel * np.dtype(dtype).itemsize
    if len(raw) < size:
        raise SourceError(f"{where}: storage '{key}' holds {len(raw)} bytes where its tensors need {size} "
                          "(a truncated file); download it again")
    return np.frombuffer(raw, dtype, numel)


def _tensor(t: _Tensor, storages: dict[str, np.ndarray], where: str) -> np.ndarray:
    """The tensor's elements, checked to lie inside its storage, as an array of its own."""
    base = storages[t.storage.key]
    if t.storage.view is not None:
        start, size = t.storage.view
        base = base[start:start + size]
    if not (isinstance(t.offset, int) and all(isinstance(d, int) and d >= 0 for d in t.size)
            and all(isinstance(s, int) and s >= 0 for s in t.stride) and len(t.size) == len(t.stride)):
        raise SourceError(f"{where}: a tensor with shape {t.size}, strides {t.stride} and offset {t.offset!r} "
                          "(a damaged file)")
    if math.prod(t.size) > len(base):  # what a zero stride repeats: no weight file holds it, a bomb might
        raise SourceError(f"{where}: a tensor of shape {list(t.size)} made from a storage of {len(base)} elements "
                          "(it repeats them); edgediff reads only tensors that lie in their storage")
    if math.prod(t.size):
        end = t.offset + sum((d - 1) * s for d, s in zip(t.size, t.stride, strict=True))
        if t.offset < 0 or end >= len(base):
            raise SourceError(f"{where}: a tensor of shape {list(t.size)} reaches element {end} of a storage of "
                              f"{len(base)} (a damaged file); download it again")
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(base[t.offset:], t.size, [s * item for s in t.stride], writeable=False)
    else:
        view = np.zeros(t.size, base.dtype)
    array = np.array(view)
    if array.dtype == np.uint16:  # bf16: its bits are the top half of a float32's
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


@dataclass(frozen=True)
class Shape:
    """A tensor of the file, not read: what `load(data=False)` gives in its place."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _resolve(obj, storages: dict[str, np.ndarray] | None, where: str, seen: dict[int, object] | None = None):
    """`obj` with every tensor made an array (a `Shape` without `storages`); dicts, lists and
    tuples walked."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, _Tensor):
        if storages is None:
            dtype = np.dtype(np.float32 if obj.storage.dtype == "<u2" else obj.storage.dtype)
            out = Shape(tuple(int(d) for d in obj.size), dtype)
        else:
            out = _tensor(obj, storages, where)
    elif isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        seen[id(obj)] = out
        for k, v in obj.items():
            out[k] = _resolve(v, storages, where, seen)
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_resolve(v, storages, where, seen) for v in obj)
    else:
        out = obj
    seen[id(obj)] = out
    return out


def _load_zip(path: Path, where: str, data: bool):
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise SourceError(f"{where}: a zip file, but not one torch.save writes (no single NAME/data.pkl)")
        for info in archive.infolist():  # torch.save never compresses: nothing can expand past the file's size
            if info.compress_type != zipfile.ZIP_STORED:
                raise SourceError(f"{where}: '{info.filename}' is compressed, which torch.save never does (a damaged "
                                  "or altered file)")
        root = pickles[0][: -len("data.pkl")]
        order = f"{root}byteorder"
        big = order in archive.namelist() and archive.read(order).strip() == b"big"
        named: dict[str, _Storage] = {}
        obj = _unpickle(io.BytesIO(archive.read(pickles[0])), where, named)
        if not data:
            return _resolve(obj, None, where)
        storages = {}
        for key, s in named.items():
            name = f"{root}data/{key}"
            if "/" in key or name not in archive.namelist():
                raise SourceError(f"{where}: storage '{key}' that its pickle names is missing (a damaged file)")
            dtype = s.dtype.replace("<", ">") if big else s.dtype
            storages[key] = _array(archive.read(name), dtype, s.numel, where, key).astype(s.dtype)
        return _resolve(obj, storages, where)


def _load_legacy(path: Path, where: str, data: bool):
    with path.open("rb") as fh:
        magic = _unpickle(fh, where)
        if magic != _LEGACY_MAGIC:
            raise SourceError(f"{where}: not a torch.save file (neither its zip format nor its legacy one)")
        _unpickle(fh, where)  # protocol version
        info = _unpickle(fh, where)
        if isinstance(info, dict) and info.get("little_endian") is False:
            raise SourceError(f"{where}: written on a big-endian machine in torch's legacy format, which edgediff "
                              "does not read; re-save it with a current torch")
        used: dict[str, _Storage] = {}
        obj = _unpickle(fh, where, used)
        keys = _unpickle(fh, where)
        if not isinstance(keys, list) or set(used) != set(map(str, keys)):
            raise SourceError(f"{where}: its storage list does not name the storages its tensors use (a damaged file)")
        if not data:
            return _resolve(obj, None, where)
        total = path.stat().st_size
        storages = {}
        for key in map(str, keys):
            head = fh.read(8)
            if len(head) < 8:
                raise SourceError(f"{where}: truncated in storage '{key}'; download it again")
            (count,) = struct.unpack("<q", head)
            dtype = used[key].dtype
            size = count * np.dtype(dtype).itemsize
            if count < 0 or fh.tell() + size > total:
                raise SourceError(f"{where}: storage '{key}' claims {count} elements, past the file's end "
                                  "(a truncated file); download it again")
            storages[key] = _array(fh.read(size), dtype, count, where, key)
        return _resolve(obj, storages, where)


def load(path: str | Path, data: bool = True):
    """What a torch.save file holds, its tensors as NumPy arrays (without `data`, as `Shape`s: the
    storages are not read); dicts, lists, numbers and strings as they are. Any other object is
    refused (UnsafeFileError) without being made."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SourceError(f"{where}: no such file")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, where, data)
        return _load_legacy(path, where, data)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{where}: a damaged zip file ({exc}); download it again") from None
    except RecursionError:  # containers nested deeper than any state dict
        raise SourceError(f"{where}: its pickle nests containers thousands deep, which no weight file does") from None

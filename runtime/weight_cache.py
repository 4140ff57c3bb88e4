"""The arrays a weight file needs before onnxruntime can run it, made once and then mapped.

A GGUF file's Linear weights are repacked into MatMulNBits' layout, its convolution weights
into 8-bit codes and scales, K-quant tensors dequantized (kernels.bind). Made at every open and
handed over with `add_external_initializers`, they cost the repacking each time and sat in
memory three times over while the session opened (ours, onnxruntime's copy, its prepacked
one): 17.4 GB for a 10 GB Flux file. Written once to `weights.bin` here, they are external data
that onnxruntime maps itself, per tensor, dropping each mapping once its kernel has prepacked
it; a later open repacks nothing.

An entry is one (weight file, component, graph) and lives in a folder of its own: `index.json`
says where each array lies and what it was made from (the file's path, size and modification
time, the graph's digest, the options that change the arrays, this module's FORMAT). Any
difference, a missing or resized `weights.bin`, or an index that does not parse, and the entry
is made again. It is written into a staging folder and renamed into place after its index: a
run killed or a disk filled while writing leaves no entry a later open would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from edgediff.errors import SourceError
from edgediff.kernels.bind import Arrays, Bound, Sink, bind, external
from edgediff.runtime import paths
from edgediff.runtime.paths import cache_root, remove

FORMAT = 1  # what the arrays are for the same inputs: raise it when kernels.bind makes others
DATA, INDEX = "weights.bin", "index.json"
ALIGN = 4096  # each array on its own pages: onnxruntime maps and releases them one by one
DROP_EVERY = 256 << 20  # source bytes read between dropping the file's pages while repacking


def root() -> Path:
    return cache_root() / "weights"


def identity(path: Path) -> dict:
    """What says a file is still the one an entry was made from, without reading gigabytes."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Stale(Exception):
    """The entry does not describe what the graph needs: it is made again."""


class Unwritable(Exception):
    """The entry could not be written (a full disk, a read-only cache folder)."""


class Entry(Sink):
    """A `kernels.bind.Sink` backed by one cache entry: reads it where valid, else writes it. The
    file is written by a thread of its own while the next weight is repacked (writing is as slow
    as repacking: 15 and 22 s for the Flux transformer's 6.9 GB); at most QUEUED arrays wait."""

    QUEUED = 2

    def __init__(self, folder: Path, key: dict, drop_pages: Callable[[], None] | None = None):
        super().__init__()
        self.folder, self.key, self.drop_pages = folder, key, drop_pages
        self.index = _read_index(folder, key)  # None: to be written
        self._staged: Path | None = None
        self._out = None
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._failed: OSError | None = None  # what the writer hit
        self._groups: dict[str, dict[str, list]] = {}
        self._size = 0
        self._since_drop = 0

    @property
    def hit(self) -> bool:
        return self.index is not None

    def put(self, group: str, make: Arrays, keep: bool = True) -> dict[str, TensorProto]:
        if not keep:  # a LoRA's change: held in memory, never cached
            return super().put(group, make)
        data = self.folder / DATA
        if self.index is not None:
            entries = self.index["groups"].get(group)
            if entries is None:
                raise Stale(group)
            return {name: external(name, dtype, shape, data, offset, length)
                    for name, (offset, length, dtype, shape) in entries.items()}
        arrays = make()
        out = {}
        self._start()
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            pad = -self._size % ALIGN
            offset = self._size + pad
            self._size = offset + array.nbytes
            self._write(pad, array)
            dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
            self._groups.setdefault(group, {})[name] = [offset, array.nbytes, dtype, list(array.shape)]
            out[name] = external(name, dtype, array.shape, data, offset, array.nbytes)
            self._since_drop += array.nbytes
        if self.drop_pages is not None and self._since_drop > DROP_EVERY:
            self.drop_pages()  # the source's pages read so far: repacked now
            self._since_drop = 0
        return out

    def _start(self) -> None:
        if self._out is not None:
            return
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self._staged = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}-", dir=self.folder.parent))
            self._out = (self._staged / DATA).open("wb")
        except OSError as exc:
            self.discard()
            raise Unwritable(f"{self.folder.parent}: {exc.strerror or exc}") from exc
        self._queue = queue.Queue(self.QUEUED)
        self._writer = threading.Thread(target=self._drain, name="edgediff-repack-cache", daemon=True)
        self._writer.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._failed is None:
                pad, array = item
                try:
                    self._out.write(b"\0" * pad)
                    self._out.write(memoryview(array).cast("B"))
                except OSError as exc:
                    self._failed = exc  # what is queued after is dropped; put and commit raise it

    def _write(self, pad: int, array: np.ndarray) -> None:
        self._check()
        self._queue.put((pad, array))

    def _check(self) -> None:
        if self._failed is not None:
            exc = self._failed
            self.discard()
            raise Unwritable(f"{self.folder.parent}: {exc.strerror or exc}") from exc

    def _stop(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def commit(self) -> None:
        """Publish what was written: its index last, then the folder renamed into place."""
        if self._out is None:
            return
        self._stop()
        self._check()
        try:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            index = {"key": self.key, "size": self._size, "groups": self._groups}
            (self._staged / INDEX).write_text(json.dumps(index))
        except OSError as exc:
            self.discard()
            raise Unwritable(f"{self.folder.parent}: {exc.strerror or exc}") from exc
        remove(self.folder)
        try:
            os.rename(self._staged, self.folder)
        except OSError:  # another process published the same entry first: theirs is as good
            remove(self._staged)
        self._out = self._staged = None
        prune()

    def discard(self) -> None:
        self._stop()
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
        if self._staged is not None:
            remove(self._staged)
        self._out = self._staged = None


def _read_index(folder: Path, key: dict) -> dict | None:
    """The entry's index if it is whole and made from what `key` says, else None."""
    try:
        index = json.loads((folder / INDEX).read_text())
        if index["key"] != key or (folder / DATA).stat().st_size != index["size"]:
            return None
        for entries in index["groups"].values():
            for offset, length, _dtype, _shape in entries.values():
                if offset < 0 or offset + length > index["size"]:
                    return None
        return index
    except (OSError, ValueError, KeyError, TypeError):
        return None


def entry(weights_path: Path, component: str, graph: bytes, expand: bool,
          drop_pages: Callable[[], None] | None = None) -> Entry:
    """The entry of a component's arrays made from `weights_path` for the graph `graph`."""
    source = identity(weights_path)
    name = hashlib.sha256(f"{source['path']}\0{component}\0{expand}".encode()).hexdigest()[:20]
    key = {"format": FORMAT, "source": source, "component": component, "expand": expand,
           "graph": hashlib.sha256(graph).hexdigest()}
    return Entry(root() / name, key, drop_pages)


def bind_mapped(model, weights, graph: bytes, component: str, **how) -> Bound:
    """`kernels.bind.bind` with its arrays in the cache: read where an entry is valid, written
    (once) where not. A cache that cannot be written costs only the cache: the arrays are then
    handed over in memory, and a warning says why."""
    opened = getattr(weights, "identity", None)
    if opened is not None and identity(weights.path) != opened:
        raise SourceError(f"{weights.path}: the file changed after it was opened (size or modification time); "
                          "open the model again")
    where = str(weights.path)
    for _ in range(2):
        sink = entry(weights.path, component, graph, how.get("expand", False), weights.drop_pages)
        try:
            bound = bind(model, weights.weight, where, sink=sink, **how)
            sink.commit()
            return bound
        except Stale:  # an index that lacks a weight the graph binds: made again
            remove(sink.folder)
        except Unwritable as exc:
            sink.discard()
            warnings.warn(f"the repacked weights of {component} could not be cached ({exc}); they are held "
                          "in memory for this run, which needs more memory and repacks at every open",
                          RuntimeWarning, stacklevel=3)
            break
        except BaseException:  # a missing tensor, Ctrl-C: nothing half-written stays
            sink.discard()
            raise
    return bind(model, weights.weight, where, **how)


def entries() -> list[tuple[Path, str, int]]:
    """(folder, the weight file it was made from, bytes) for every entry."""
    return paths.entries(root(), lambda folder: json.loads((folder / INDEX).read_text())["key"]["source"]["path"])


def prune() -> int:
    """Remove entries whose weight file is gone or changed, and abandoned staging folders; bytes freed."""
    freed = 0
    for folder, source, size in entries():
        try:
            key = json.loads((folder / INDEX).read_text())["key"]
            current = identity(Path(source)) == key["source"]
        except (OSError, ValueError, KeyError, TypeError):
            current = False
        if not current:
            remove(folder)
            freed += size
    paths.remove_abandoned(root())
    return freed


def of_package(package: Path) -> list[tuple[Path, str, int]]:
    """The entries made from a model file, or from the weight files a package folder binds (its
    own, or the files of another tool it was adopted from)."""
    from edgediff.errors import EdgediffError
    from edgediff.manifest import Manifest

    package = Path(package).resolve()
    sources = {str(package)}
    if package.is_dir():
        with contextlib.suppress(EdgediffError):
            sources |= {str((package / c.weights).resolve()) for c in Manifest.read(package).components.values()
                        if c.weights}
    inside = str(package) + os.sep
    return [e for e in entries() if e[1] in sources or e[1].startswith(inside)]

"""onnxruntime's optimized graphs, kept between runs.

Opening an fp32 SD 1.5 U-Net spends ~10 s in onnxruntime's graph optimizer (constant folding,
fusions, the NCHWc layout rewrite); the optimized graph, saved once, opens in under a second.
That graph is only valid for the onnxruntime version, the CPU features (the NCHWc rewrite is
specific to the vector width) and the options that made it, and for the exact files it came
from: all of those are its key, and an entry whose key differs is rebuilt. One entry per
component file, so a changed package replaces its entries rather than adding to them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from edgediff.runtime import paths
from edgediff.runtime.paths import remove

FORMAT = 1
MODEL = "model.onnx"
KEY = "key.json"


def root() -> Path:
    return paths.cache_root() / "optimized"


@cache
def cpu_features() -> str:
    """What the optimizer's choices depend on: the CPU's instruction-set flags."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    return f"{platform.machine()} {platform.processor()}"


def _files(model: Path) -> list[list]:
    """The model file and its neighbours (its external data), by size and modification time:
    a rewritten package changes these without anyone hashing gigabytes."""
    out = []
    for path in sorted(model.parent.iterdir()):
        if path.is_file():
            st = path.stat()
            out.append([path.name, st.st_size, st.st_mtime_ns])
    return out


def key(model: Path, providers: list[str]) -> dict:
    import onnxruntime

    return {"format": FORMAT, "source": str(model.resolve()), "files": _files(model),
            "onnxruntime": onnxruntime.__version__, "cpu": cpu_features(), "providers": providers}


def _folder(model: Path) -> Path:
    return root() / hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:20]


@dataclass
class Entry:
    """Where a component's optimized graph is (or will be) kept."""

    folder: Path
    key: dict

    @property
    def model(self) -> Path:
        return self.folder / MODEL

    def valid(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return self.model.is_file() and json.loads((self.folder / KEY).read_text()) == self.key
        return False

    def staging(self) -> Path:
        """A private folder for onnxruntime to write into; `commit` moves it into place."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{self.folder.name}-", dir=self.folder.parent))

    def commit(self, staged: Path) -> None:
        """Publish what onnxruntime wrote, atomically: a reader sees the old entry, none, or this
        one whole. If another process published first, keep theirs."""
        (staged / KEY).write_text(json.dumps(self.key))
        remove(self.folder)
        try:
            os.rename(staged, self.folder)
        except OSError:
            remove(staged)
        prune()

    def drop(self) -> None:
        remove(self.folder)


def entry(model: Path, providers: list[str]) -> Entry:
    return Entry(_folder(model), key(model, providers))


# what makes onnxruntime write the optimized graph's weights into one external file beside it
# (a U-Net's exceed protobuf's 2 GB)
SAVE_CONFIG = {"session.optimized_model_external_initializers_file_name": MODEL + ".data",
               "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}


def entries() -> list[tuple[Path, str, int]]:
    """(folder, the component file it was made from, bytes) for every entry."""
    return paths.entries(root(), lambda folder: json.loads((folder / KEY).read_text())["source"])


def prune() -> int:
    """Remove entries whose component file is gone, and abandoned staging folders; bytes freed."""
    freed = 0
    for folder, source, size in entries():
        if not source or not Path(source).is_file():
            remove(folder)
            freed += size
    paths.remove_abandoned(root())
    return freed


def of_package(package: Path) -> list[tuple[Path, str, int]]:
    """The entries made from a package folder's components."""
    inside = str(package.resolve()) + os.sep
    return [e for e in entries() if e[1].startswith(inside)]

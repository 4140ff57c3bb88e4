"""Where edgediff keeps what it makes once and reuses: converted defaults, adopted graphs,
optimized graphs, repacked weights, synthetic models and peer environments."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`EDGEDIFF_CACHE`, else `$XDG_CACHE_HOME/edgediff`, else `~/.cache/edgediff`."""
    root = os.environ.get("EDGEDIFF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgediff"
    return Path(root)


def remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def entries(base: Path, source_of) -> list[tuple[Path, str, int]]:
    """(folder, what it was made from, bytes) for every entry folder of a cache under `base`;
    `source_of(folder)` reads what it was made from ("" where that cannot be read)."""
    out = []
    if not base.is_dir():
        return out
    for folder in sorted(base.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            source = source_of(folder)
        except (OSError, ValueError, KeyError, TypeError):
            source = ""
        out.append((folder, source, sum(p.stat().st_size for p in folder.iterdir() if p.is_file())))
    return out


def remove_abandoned(base: Path) -> None:
    """Staging folders (`.NAME-*`) that no process has written to for an hour."""
    import contextlib
    import time

    if base.is_dir():
        for staged in base.glob(".*-*"):
            with contextlib.suppress(OSError):
                if time.time() - staged.stat().st_mtime > 3600:  # not one being written now
                    remove(staged)


def measured_once(path: Path, key: dict, measure) -> dict:
    """What `measure()` returns (a dict of numbers), kept in `path` under `key` (the CPU, the
    runtime versions): measured again only when the key changes or the file cannot be read."""
    import json

    try:
        kept = json.loads(path.read_text())
        if kept["key"] == key:
            return kept
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = {"key": key, **measure()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    except OSError:
        pass  # measured again next time
    return result

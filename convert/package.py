"""Writing a package atomically: everything goes into a scratch folder beside the output, which
is renamed into place only when complete; on failure nothing is left behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from edgediff.errors import UsageError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output(output: Path, overwrite: bool) -> None:
    """Fail before any work if the output cannot be written."""
    if output.exists() and not overwrite:
        raise UsageError(f"{output}: already exists; choose another --output or pass --overwrite")
    parent = next((p for p in output.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{output}: {parent} is a file, not a folder; choose another --output")


@contextlib.contextmanager
def atomic_folder(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces `output`, on any error it is deleted."""
    output = Path(output)
    check_output(output, overwrite)
    created = [p for p in reversed(output.parents) if not p.exists()]  # made here, removed on failure
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(old)
            scratch.rename(output)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            scratch.rename(output)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise

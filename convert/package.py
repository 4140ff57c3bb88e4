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
    with _atomic(output, overwrite, folder=True) as scratch:
        yield scratch


@contextlib.contextmanager
def atomic_file(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch file path beside `output`; on success it replaces `output`."""
    with _atomic(output, overwrite, folder=False) as scratch:
        yield scratch


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale(output: Path) -> None:
    """Scratch folders of earlier conversions of `output` whose process is gone (killed by the
    out-of-memory killer or a power cut: no cleanup ran). A full-size model leaves gigabytes."""
    for path in output.parent.glob(f".{output.name}.partial-*"):
        pid = path.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(path)
        except PermissionError:  # alive, another user's
            pass


@contextlib.contextmanager
def _atomic(output: Path, overwrite: bool, folder: bool) -> Iterator[Path]:
    output = Path(output)
    check_output(output, overwrite)
    created = [p for p in reversed(output.parents) if not p.exists()]  # made here, removed on failure
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(output)
    scratch = output.parent / f".{output.name}.partial-{os.getpid()}"
    _remove(scratch)
    if folder:
        scratch.mkdir()
    try:
        yield scratch
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(old)
            scratch.rename(output)
            _remove(old)
        else:
            scratch.rename(output)
    except BaseException:
        _remove(scratch)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise

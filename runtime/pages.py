"""Dropping the resident pages of weight files that onnxruntime has mapped.

onnxruntime maps each external initializer of a component on its own and keeps the mappings of
those its kernels did not take over whole. Their pages count in the process's resident size for
as long as they stay in memory, read once or not: MatMulNBits at accuracy level 4 copies the
scales into its prepacked weights and never reads the originals again (measured, the Flux
transformer: 1.46 GB of scales resident beside 8.8 GB of prepacked weights, peak 10.3 GB; with
the pages dropped while the session opens, 8.9 GB, the same output and speed).

Only mappings that hold no private copy of a page (`Anonymous: 0` in /proc/self/smaps: nothing was
written through them) are dropped: their pages are the file's, so the kernel maps them again from
the page cache or the file if they are touched, and nothing is lost. Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Collection, Iterator
from pathlib import Path

MADV_DONTNEED = 4
EVERY = 0.2  # seconds between drops while a session opens


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def drop(files: Collection[str]) -> int:
    """Drop the resident pages of this process's clean mappings of `files`; bytes they held."""
    if not sys.platform.startswith("linux") or not files:
        return 0
    madvise = _madvise()
    dropped, mapping = 0, None
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head, _, rest = line.partition(" ")
                if "-" in head and ":" not in head:  # a mapping's first line: range perms offset dev inode path
                    fields = rest.split(None, 4)
                    path = fields[4].strip() if len(fields) == 5 else ""
                    mapping = [int(x, 16) for x in head.split("-")] if path in files else None
                elif mapping is not None and head == "Rss:":
                    mapping.append(int(rest.split()[0]) * 1024)
                elif mapping is not None and head == "Anonymous:":
                    if int(rest.split()[0]) == 0 and madvise(mapping[0], mapping[1] - mapping[0], MADV_DONTNEED) == 0:
                        dropped += mapping[2] if len(mapping) > 2 else 0
                    mapping = None
    except OSError:
        return dropped
    return dropped


@contextlib.contextmanager
def dropping(files: Collection[str | Path]) -> Iterator[None]:
    """Keep dropping the pages of `files` while the body runs (onnxruntime opening a session
    reads them all for its prepacking, one initializer after another), and once after."""
    names = {str(Path(f).resolve()) for f in files}
    if not sys.platform.startswith("linux") or not names:
        yield
        return
    done = threading.Event()

    def loop() -> None:
        while not done.wait(EVERY):
            drop(names)

    thread = threading.Thread(target=loop, name="edgediff-drop-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        drop(names)

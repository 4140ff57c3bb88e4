"""Dropping mapped weight files' pages: clean mappings give their pages back and read the same
bytes again; a mapping with a page written to is left alone."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from edgediff.runtime import pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/smaps: Linux")


def _resident(path) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                inside = line.rstrip().endswith(str(path))
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def test_clean_pages_are_dropped_and_read_back_the_same(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    mapped = np.memmap(path, np.uint8, mode="r")
    checksum = int(mapped.sum())  # every page read: resident
    assert _resident(path) >= 8 << 20
    with pages.dropping([path]):
        pass
    assert _resident(path) < 1 << 20
    assert int(mapped.sum()) == checksum  # read back from the file


def test_a_mapping_with_a_written_page_is_kept(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(4 << 20))
    with path.open("r+b") as fh, mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE) as view:
        view[0] = 7  # a private copy of the first page: dropping it would lose the write
        view[:].hex()  # read the rest
        assert pages.drop({str(path.resolve())}) == 0
        assert view[0] == 7 and _resident(path) >= 4 << 20

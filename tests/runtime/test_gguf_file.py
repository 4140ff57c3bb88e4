"""The GGUF reader refuses headers whose counts and lengths the file cannot hold, before gguf-py
parses them (findings of benchmarks/fuzz.py become these regression tests)."""

from __future__ import annotations

import base64
import struct

import pytest

from edgediff.errors import SourceError
from edgediff.runtime.gguf_file import GGUFFile

# fuzz finding: 10^12 metadata entries claimed by a 188-byte file; gguf-py looped over empty reads
HUGE_COUNTS = "R0dVRgMAAAACAAAAAP4AAAMAAAAAAQAAFAAAAAAAAABnZW5lcmFsLmFyY2hpdGVjdHVyZQgAAAANAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAkAAAAAAAAAAAAAAAAAAP//////////////////////////////////////////////////////////////////////////////////////////////AAAAAAAAAAAAAAAAAAAAAAA="


def _header(version=3, tensors=0, kvs=1, rest=b""):
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs) + rest


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(("data", "message"), [
    (base64.b64decode(HUGE_COUNTS), "claims 1099511627779 metadata entries"),
    (_header(version=1), "GGUF version 1"),
    (_header(kvs=1, rest=_string(b"k") + struct.pack("<I", 8) + struct.pack("<Q", 10**12)), "runs past the end"),
    (_header(kvs=1, rest=_string(b"k") + struct.pack("<IIQ", 9, 4, 10**15)), "array of 1000000000000000 items"),
    (_header(kvs=1, rest=_string(b"k") + struct.pack("<I", 77)), "unknown metadata value type 77"),
    (b"GGUF\x03\x00", "truncated header"),
])
def test_headers_the_file_cannot_hold(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(SourceError, match=message):
        GGUFFile(path)

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


# fuzz finding: a Q8_0 tensor of shape [0, 2] (no values) made the reader's reshape fail
EMPTY_TENSOR = "R0dVRgMAAAACAAAAAAAAAAMAAAAAAAAAFAAAAAAAAABnZW5lcmFsLmFyY2hpdGVjdHVyZQgAAAANAAAAAAAAAGVkZ2VkaWZmLWZ1enoNAAAAAAAAAGVkZ2VkaWZmLm5vdGUIAAAABgAAAAAAAABjb3JwdXMOAAAAAAAAAGVkZ2VkaWZmLmNvdW50BAAAAAMAAAABAAAAAAAAAGECAAAAIAAAAAAAAAAEAAAAAAAAAAAAAAAAAAAAAAAAAAEAAAAAAAAAYgIAAAAAAAAAAAAAAAIAAAAAAAAACAAAAAACAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAGy/AD5/Rge+vfIjP9/V1j2hIQm//SK5Pnnppj/mc3I//ic0v44fv25FKT1OzRTA7ApgvgN6n7/gdTu/j1QLvxjyob49wdI+FHGFP5eeA75G6K4/M0oqvyH5sz7SSWc/hYnAPfhVPr8y9mu/ClvqvtV6YT4rO4G/HzJWvuILI77bdAo/ms9bPmnztT5QYSe/cLkEvp6ySD/AKL8/Dymhv0HIwT+lRaw/BgRIP7pmhz5+uqC+bKC6P7/p+j/5m+Y/UlWoP5H6tj4vqpq/+vORu74OKD8H6aS/cE3KPhgX3D7bLzI/LZGXv1dlKb9xdN++EryVv5uj3j8D6P2+tW6oPp9jhL49r8o/lwGpP2YjIj9OBg3AVRxVPQ8GL///////////////////////////P9CBgD8oLx6/qzfpP+IDqb/nWSm/cF9vP372SD0zJwBALQtBPgIZIr8BUMG+raqLvwaLo7+mD2IhP0jHFD8atKU/2C1Bv6w02D97JJO+NobJPxuW3b6iSDy/vcd/PqgGhD+y3yQ+OOUVvxatq78EZbO/068AP9VdfT/XPCi+yoSJv7F/Xz/z46O/oYs2vwf7Hj9QAhDAPNLFPmrmFL8Jzt89ZwmbvRP3Tj5BtTE/hSRCv73iZxy2v+1ThD7WJOLJyQ4TRv83Sj2DQRIWFBQR7Zv61TnxBNPl/7EQ+sGB1yMi7d3xd/0Gn2w8RgM8GCj2oEOC8PO8KPPjIuFbF+GBqwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _header(version=3, tensors=0, kvs=1, rest=b""):
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs) + rest


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(("data", "message"), [
    (base64.b64decode(HUGE_COUNTS), "claims 1099511627779 metadata entries"),
    (base64.b64decode(EMPTY_TENSOR), r"tensor 'b' \(Q8_0\) has no values"),
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

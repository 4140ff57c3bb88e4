"""The attention benchmark runs both MultiHeadAttention paths on SD 1.5's shapes."""

from __future__ import annotations

import os

from edgediff.benchmarks.attention import measure, table


def test_attention_paths_are_measured():
    rows = measure(size=64, threads=1, repeats=1)
    assert [r["layer"] for r in rows][:2] == ["self 64x64", "cross 64x64"]
    assert rows[0]["tokens"] == rows[0]["context"] == 64 and rows[1]["context"] == 77
    assert all(r[f"{p}_ms"] > 0 for r in rows for p in ("flash", "unfused", "gemm"))
    assert "ORT_DISABLE_FLASH_ATTENTION" not in os.environ
    assert table(rows).count("\n") == len(rows) + 1

"""A short coverage-guided fuzzing run per reader (benchmarks/fuzz.py): each may refuse its
input only with an EdgediffError; no other exception, hang or runaway memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgediff.benchmarks.fuzz import READERS

# inputs per reader (20 to 65 s each here), from a fixed seed with a fixed hash seed: every
# machine runs the very inputs this suite was checked with, so a pass here is a pass there
RUNS = {"safetensors": 600_000, "gguf": 300_000, "manifest": 200_000, "lora": 300_000}


@pytest.mark.parametrize("reader", READERS)
def test_reader_survives_fuzzing(reader, tmp_path):
    pytest.importorskip("atheris")
    import os

    done = subprocess.run([sys.executable, "-P", "-m", "edgediff.benchmarks.fuzz", reader, "--runs", str(RUNS[reader]),
                           "--seed", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env={**os.environ, "PYTHONHASHSEED": "0"})
    findings = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert done.returncode == 0 and not findings, (findings, done.stderr[-3000:])

"""A short coverage-guided fuzzing run per reader (benchmarks/fuzz.py): each may refuse its
input only with an EdgediffError; no other exception, hang or runaway memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgediff.benchmarks.fuzz import READERS

SECONDS = {"safetensors": 60, "gguf": 60, "manifest": 45, "lora": 30}


@pytest.mark.parametrize("reader", READERS)
def test_reader_survives_fuzzing(reader, tmp_path):
    pytest.importorskip("atheris")
    done = subprocess.run([sys.executable, "-m", "edgediff.benchmarks.fuzz", reader, "--seconds", str(SECONDS[reader]),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=SECONDS[reader] + 120,
                          cwd=tmp_path)
    findings = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert done.returncode == 0 and not findings, (findings, done.stderr[-3000:])

"""The VAE memory benchmark decodes whole and in tiles, each in a process of its own."""

from __future__ import annotations

from edgediff.benchmarks.vae_memory import main


def test_vae_memory_rows(tiny_package, capsys):
    assert main([str(tiny_package("sd1")), "--size", "128", "--tiles", "0", "64", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 128 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["whole", "64"]
    assert all(float(r.split("|")[4]) > 10 for r in rows)  # a peak RSS was read

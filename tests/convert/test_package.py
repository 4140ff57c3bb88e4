"""Atomic package writing: scratch folders of conversions that were killed are cleaned up."""

from __future__ import annotations

import os
import subprocess

from edgediff.convert.package import atomic_folder


def test_scratch_of_a_killed_conversion_is_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    stale = tmp_path / f".pkg.partial-{dead.pid}"
    (stale / "unet").mkdir(parents=True)
    alive = tmp_path / f".pkg.partial-{os.getppid()}"  # a running process's scratch stays
    alive.mkdir()
    with atomic_folder(tmp_path / "pkg") as scratch:
        (scratch / "edgediff.json").write_text("{}")
    assert not stale.exists() and alive.exists()
    assert (tmp_path / "pkg" / "edgediff.json").is_file()

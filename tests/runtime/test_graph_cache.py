"""The optimized-graph cache: a second open uses it and computes the same; anything its key
covers (the files, onnxruntime's version, the CPU's features) changing gives a fresh
optimization; a damaged entry is rebuilt."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from edgediff.runtime import graph_cache
from edgediff.runtime.package import open_package
from edgediff.runtime.sessions import SessionOptions

LATENT = {"latent_sample": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}


@pytest.fixture
def package(tiny_package, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "pkg"
    shutil.copytree(tiny_package("sd1"), root)
    return root


def decode(root, **options):
    comp = open_package(root).component("vae_decoder", SessionOptions(device="cpu", **options))
    return comp, comp.run(LATENT)["sample"]


def test_a_second_open_uses_the_optimized_graph_and_computes_the_same(package):
    _, plain = decode(package, graph_cache=False)
    assert graph_cache.entries() == []  # off means off
    first, a = decode(package)
    second, b = decode(package)
    assert not first.cached and second.cached
    # the cached graph is onnxruntime's optimized one, not a copy of the package's file
    (folder, source, size), = graph_cache.entries()
    assert source == str((package / "vae_decoder" / "model.onnx").resolve())
    assert size == sum(f.stat().st_size for f in folder.iterdir())
    import onnx

    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    original = {n.op_type for n in onnx.load(str(package / "vae_decoder" / "model.onnx")).graph.node}
    assert ops != original
    np.testing.assert_allclose(a, plain, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", ["package file", "onnxruntime version", "cpu features"])
def test_a_changed_key_gives_a_fresh_optimization(package, monkeypatch, change):
    decode(package)
    (folder, _, _), = graph_cache.entries()
    before = (folder / graph_cache.KEY).read_text()
    if change == "package file":
        model = package / "vae_decoder" / "model.onnx"
        os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    elif change == "onnxruntime version":
        import onnxruntime

        monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".post1")
    else:
        monkeypatch.setattr(graph_cache, "cpu_features", lambda: "sse2")
    comp, _ = decode(package)
    assert not comp.cached
    (folder2, _, _), = graph_cache.entries()  # replaced, not added beside
    assert folder2 == folder and (folder / graph_cache.KEY).read_text() != before
    assert decode(package)[0].cached


def test_a_damaged_entry_is_rebuilt(package):
    _, a = decode(package)
    (folder, _, _), = graph_cache.entries()
    (folder / "model.onnx").write_bytes(b"not a graph")
    comp, b = decode(package)
    assert not comp.cached
    np.testing.assert_array_equal(a, b)
    assert decode(package)[0].cached


def test_entries_of_removed_packages_are_pruned(package, tmp_path):
    decode(package)
    other = tmp_path / "other"
    shutil.copytree(package, other)
    decode(other)
    assert len(graph_cache.entries()) == 2
    assert [e[1] for e in graph_cache.of_package(other)] == [str((other / "vae_decoder" / "model.onnx").resolve())]
    shutil.rmtree(other)
    freed = graph_cache.prune()
    (_, source, _), = graph_cache.entries()
    assert source.startswith(str(package.resolve())) and freed > 0


def test_inspect_shows_the_cache_and_the_cache_command_removes_it(package, capsys):
    from edgediff.cli import main

    decode(package)
    assert main(["inspect", str(package)]) == 0
    assert "optimized-graph cache: " in capsys.readouterr().out
    assert main(["cache"]) == 0
    listed = capsys.readouterr().out
    assert str((package / "vae_decoder" / "model.onnx").resolve()) in listed and " in 1 optimized graphs" in listed
    assert main(["cache", "--clear", str(package)]) == 0
    assert "removed: " in capsys.readouterr().out
    assert graph_cache.entries() == []
    assert main(["inspect", str(package)]) == 0
    assert "optimized-graph cache" not in capsys.readouterr().out

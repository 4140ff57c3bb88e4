"""The repack cache: a GGUF component's arrays are made once and mapped by onnxruntime on every
later open (the same outputs as arrays handed over in memory), its memory stays near its weights'
bytes, and an entry is trusted only while it and its source are what it says."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from onnx import helper

from edgediff.errors import SourceError
from edgediff.kernels import bind as bind_module
from edgediff.kernels.bind import bind, placeholder
from edgediff.runtime import weight_cache
from edgediff.runtime.gguf_file import GGUFFile
from edgediff.runtime.sessions import Component, SessionOptions

Q4 = gguf.GGMLQuantizationType


def _write(path: Path, layers: list[tuple[str, int]], width: int, seed: int = 0) -> int:
    """A GGUF file of `layers` [width, width] Linear weights (name, ggml type) of random codes,
    and a conv weight; returns the bytes of its tensor data."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "test")
    total = 0
    for name, kind in [*layers, ("conv.weight", Q4.Q8_0)]:
        rows, cols = (width, width) if name != "conv.weight" else (8, 32 * 3 * 3)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        if kind == Q4.F16:
            raw = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)
        else:
            raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
            raw[..., 0:2] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)  # every block's scale
            if kind == Q4.Q4_1:
                raw[..., 2:4] = np.frombuffer(np.float16(-0.004).tobytes(), np.uint8)  # and minimum
            raw = raw.reshape(rows, -1)
        writer.add_tensor(name, raw, raw_dtype=kind)
        total += raw.nbytes
    writer.add_array("comfy.gguf.orig_shape.conv.weight", [8, 32, 3, 3])  # ComfyUI-GGUF's reshape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total


def _graph(layers: list[tuple[str, int]], width: int) -> bytes:
    """x -> Linear layers in turn (Transpose -> MatMul) -> Tanh, and a convolution on `img`."""
    nodes, inits, x = [], [], "x"
    for i, (name, _) in enumerate(layers):
        inits.append(placeholder(name, onnx.TensorProto.FLOAT, [width, width]))
        nodes += [helper.make_node("Transpose", [name], [f"t{i}"], perm=[1, 0]),
                  helper.make_node("MatMul", [x, f"t{i}"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        x = f"h{i}"
    inits.append(placeholder("conv.weight", onnx.TensorProto.FLOAT, [8, 32, 3, 3]))
    nodes.append(helper.make_node("Conv", ["img", "conv.weight"], ["z"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, [1, width]),
                     helper.make_tensor_value_info("img", 1, [1, 32, 6, 6])],
        [helper.make_tensor_value_info(x, 1, None), helper.make_tensor_value_info("z", 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


LAYERS = [("a.weight", Q4.Q4_0), ("b.weight", Q4.Q8_0), ("c.weight", Q4.Q4_1), ("d.weight", Q4.F16)]
WIDTH = 256
FEEDS = {"x": np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32),
         "img": np.random.default_rng(2).standard_normal((1, 32, 6, 6)).astype(np.float32)}


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    _write(path, LAYERS, WIDTH)
    return path


def component(path: Path, graph: bytes | None = None) -> Component:
    graph = graph or _graph(LAYERS, WIDTH)
    weights = GGUFFile(path)
    return Component("test", path, SessionOptions(device="cpu"), bind=lambda: weight_cache.bind_mapped(
        onnx.load_model_from_string(graph), weights, graph, "test"))


def run(path: Path, graph: bytes | None = None) -> list[np.ndarray]:
    return list(component(path, graph).run(FEEDS).values())


def in_memory(path: Path) -> list[np.ndarray]:
    """The same graph with its arrays handed to onnxruntime in memory, as before the cache."""
    weights = GGUFFile(path)
    comp = Component("test", path, SessionOptions(device="cpu"),
                     bind=lambda: bind(onnx.load_model_from_string(_graph(LAYERS, WIDTH)), weights.weight, "t"))
    return list(comp.run(FEEDS).values())


def test_cached_arrays_compute_what_arrays_in_memory_compute_and_are_made_once(source, monkeypatch):
    want = in_memory(source)
    assert weight_cache.entries() == []
    cold = run(source)
    (folder, made_from, size), = weight_cache.entries()
    assert made_from == str(source.resolve())
    index = json.loads((folder / weight_cache.INDEX).read_text())
    # repacked Linear weights (a, b, c) and the convolution's codes are cached; F16 stays in the file
    assert set(index["groups"]) == {"a.weight", "b.weight", "c.weight", "conv.weight"}
    assert size > (folder / weight_cache.DATA).stat().st_size > 0

    def no_repacking(*args, **kwargs):
        raise AssertionError("a valid entry was repacked again")

    monkeypatch.setattr(bind_module, "to_matmul_nbits", no_repacking)
    monkeypatch.setattr(bind_module, "unpack", no_repacking)
    warm = run(source)
    for a, b, c in zip(want, cold, warm, strict=True):
        np.testing.assert_array_equal(a, b)  # the same kernels on the same bytes: bit-identical
        np.testing.assert_array_equal(a, c)


def test_the_bound_graph_points_into_the_cache_and_the_source_file(source):
    comp = component(source)
    comp.session  # noqa: B018 - binds and opens
    bound = weight_cache.bind_mapped(onnx.load_model_from_string(_graph(LAYERS, WIDTH)), GGUFFile(source),
                                     _graph(LAYERS, WIDTH), "test")
    assert bound.arrays == {}  # nothing handed over in memory
    places = {t.name: {e.key: e.value for e in t.external_data} for t in bound.model.graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL}
    assert places["d.weight"]["location"] == os.path.relpath(source.resolve(), bound.folder)
    cached = {p["location"] for n, p in places.items() if n != "d.weight"}
    assert len(cached) == 1 and (bound.folder / cached.pop()).parent.parent == weight_cache.root()


@pytest.mark.parametrize("damage", ["truncated", "garbled index", "index of another file"])
def test_a_damaged_entry_is_made_again(source, damage):
    want = run(source)
    (folder, _, _), = weight_cache.entries()
    data, index = folder / weight_cache.DATA, folder / weight_cache.INDEX
    if damage == "truncated":
        with data.open("r+b") as fh:
            fh.truncate(data.stat().st_size // 2)
    elif damage == "garbled index":
        index.write_text("{not json")
    else:
        text = json.loads(index.read_text())
        text["key"]["source"]["size"] += 1
        index.write_text(json.dumps(text))
    for got, expected in zip(run(source), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    (again, _, _), = weight_cache.entries()
    assert weight_cache._read_index(again, json.loads((again / weight_cache.INDEX).read_text())["key"]) is not None


def test_a_changed_source_invalidates_its_entry_and_a_removed_one_drops_it(source):
    run(source)
    (folder, _, _), = weight_cache.entries()
    first = json.loads((folder / weight_cache.INDEX).read_text())["key"]
    _write(source, LAYERS, WIDTH, seed=5)  # other weights under the same name
    want = in_memory(source)
    for got, expected in zip(run(source), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    (folder, _, _), = weight_cache.entries()  # replaced, not added to
    assert json.loads((folder / weight_cache.INDEX).read_text())["key"] != first
    source.unlink()
    assert weight_cache.prune() > 0 and weight_cache.entries() == []


def test_another_graph_for_the_same_file_gets_its_own_key(source):
    run(source)
    fewer = _graph(LAYERS[:2] + LAYERS[3:], WIDTH)  # without c
    assert len(run(source, fewer)) == 2
    (folder, _, _), = weight_cache.entries()
    assert "c.weight" not in json.loads((folder / weight_cache.INDEX).read_text())["groups"]


def test_a_file_changed_after_it_was_opened_is_refused(source):
    comp = component(source)
    with source.open("r+b") as fh:  # truncated underneath the open reader
        fh.truncate(source.stat().st_size - 4096)
    with pytest.raises(SourceError, match="changed after it was opened"):
        comp.run(FEEDS)


def test_a_full_disk_leaves_no_entry_and_costs_only_the_cache(source, monkeypatch):
    want = in_memory(source)
    real = weight_cache.Entry.put
    calls = []

    def filling(self, group, make, keep=True):
        calls.append(group)
        if len(calls) == 3:
            raise weight_cache.Unwritable(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real(self, group, make, keep)

    monkeypatch.setattr(weight_cache.Entry, "put", filling)
    with pytest.warns(RuntimeWarning, match="could not be cached"):
        got = run(source)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert weight_cache.entries() == []
    assert not [p for p in weight_cache.root().iterdir() if p.name.startswith(".")]  # no staging left


def test_a_write_that_fails_midway_removes_what_it_wrote(source, monkeypatch):
    """The real write path failing (ENOSPC from the file): the staging folder goes."""
    real_open = Path.open

    class Full:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 40_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def opening(self, mode="r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        return Full(fh) if self.name == weight_cache.DATA and "w" in mode else fh

    monkeypatch.setattr(Path, "open", opening)  # only the cache's data file fills up
    with pytest.warns(RuntimeWarning, match="No space left"):
        run(source)
    assert weight_cache.entries() == []
    assert not [p for p in weight_cache.root().iterdir() if p.name.startswith(".")]


PEAK = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, onnx
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    import test_weight_cache as t
    from edgediff.runtime import weight_cache
    layers = json.loads(sys.argv[2])
    graph = t._graph(layers, int(sys.argv[4]))
    t.FEEDS["x"] = np.ones((1, int(sys.argv[4])), np.float32)
    import onnxruntime  # noqa: F401 - counted in the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t.component(Path(sys.argv[1]), graph).run(t.FEEDS)
    print(json.dumps({"base": base * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def test_a_mid_size_component_peaks_near_its_weights_bytes(tmp_path):
    """~300 MB of q4_0, q8_0 and F16 weights: opened (cold, then from the cache) and run in a
    fresh process, the peak above the process's baseline stays within 1.3x the weights' bytes plus
    48 MB for the graph and onnxruntime's own allocations. Handing repacked arrays to onnxruntime
    in memory peaked near 3x."""
    width = 4096
    layers = [(f"q4.{i}.weight", Q4.Q4_0) for i in range(24)] + [(f"q8.{i}.weight", Q4.Q8_0) for i in range(3)]
    layers.append(("f16.weight", Q4.F16))
    path = tmp_path / "mid.gguf"
    stored = _write(path, layers, width)
    env = {**os.environ, "EDGEDIFF_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-c", PEAK, str(path), json.dumps([(n, int(k)) for n, k in layers]),
            str(Path(__file__).parent), str(width)]
    for state in ("cold", "warm"):
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        m = json.loads(out.stdout.strip().splitlines()[-1])
        grown = m["peak"] - m["base"]
        assert grown <= 1.3 * stored + (48 << 20), (state, grown / 2**20, stored / 2**20)


def test_a_gguf_package_runs_from_its_cache_and_the_cache_command_shows_and_clears_it(tiny_source, tmp_path,
                                                                                      monkeypatch, capsys):
    from edgediff.cli import main
    from edgediff.convert import convert
    from edgediff.runtime.pipeline import Pipeline

    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "sd1-q4_0.gguf"
    convert(tiny_source("sd1"), package, precision="q4_0")

    def image():
        return np.asarray(Pipeline(package, device="cpu").generate("a red circle", steps=3, seed=4))

    first = image()
    made = weight_cache.of_package(package)
    assert {json.loads((f / weight_cache.INDEX).read_text())["key"]["component"] for f, _, _ in made} == {
        "text_encoder", "unet"}  # the VAE stays F32 in the file: nothing to repack
    np.testing.assert_array_equal(image(), first)
    assert main(["inspect", str(package)]) == 0
    assert "repacked weights: " in capsys.readouterr().out
    assert main(["cache"]) == 0
    listed = capsys.readouterr().out
    assert str(package.resolve()) in listed and "kept: " in listed and " in 2 repacked weights" in listed
    assert main(["cache", "--clear", str(package)]) == 0
    assert " in 2 repacked weights" in capsys.readouterr().out and weight_cache.entries() == []
    assert main(["cache", str(tmp_path / "nope.gguf")]) == 2
    assert "no such package" in capsys.readouterr().err

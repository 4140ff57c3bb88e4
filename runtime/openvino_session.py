"""OpenVINO as a second CPU runtime behind the component interface (`--device openvino`,
`pip install 'edgediff[openvino]'`).

The precision a package holds is what runs: OpenVINO runs an fp32 graph at f32 unless bf16 is
asked for by name (`--precision bf16`), which it computes on CPUs whose plugin reports BF16
(AVX-512 BF16, AMX) and which onnxruntime's CPU provider cannot. bf16 is a lower precision (the
held-out parity falls from 60-95 dB to 40-46 dB), so it is never chosen for the user. `auto`
takes OpenVINO at f32 only where a one-time measurement here says it is faster at f32 (cached per
CPU and versions; on the CPUs measured so far it was not: benchmarks/RESULTS.md, "OpenVINO").

`Session` reads like an onnxruntime InferenceSession to `sessions.Component`: inputs and
outputs keep the ONNX graph's names and types, and `run` returns arrays."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from edgediff.errors import EdgediffError, MissingDependencyError, UsageError
from edgediff.errors import require as _require

FASTER = 1.25  # auto takes OpenVINO when the probe runs this much faster than onnxruntime, both at f32
# "0" keeps `auto` on onnxruntime: fp32 images that are the same on every CPU (the tests set it)
AUTO_ENV = "EDGEDIFF_AUTO_OPENVINO"
_ONNX_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 7: "tensor(int64)", 6: "tensor(int32)"}


def require():
    return _require("openvino", "openvino", "--device openvino")


def installed() -> bool:
    try:
        require()
    except MissingDependencyError:
        return False
    return True


@cache
def capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin can compute in here ('FP32', 'INT8', 'BF16', 'FP16', ...)."""
    return tuple(require().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def hint(precision: str) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a run precision ('auto': the graph's own, f32)."""
    return "bf16" if precision == "bf16" else "f32"


def require_bf16() -> None:
    """bf16 runs only where the CPU computes it: elsewhere OpenVINO would emulate it, slower than
    f32 and less exact."""
    require()
    if "BF16" not in capabilities():
        raise UsageError(f"--precision bf16: this CPU has no native bf16 (OpenVINO reports {', '.join(capabilities())}); "
                         "emulated it would be slower than fp32 and less exact: leave --precision out to run "
                         "at the package's precision")


@dataclass(frozen=True)
class Arg:
    """An input or output as onnxruntime's NodeArg shows it: the two fields Component reads."""

    name: str
    type: str


class Session:
    """One ONNX graph compiled by OpenVINO for the CPU."""

    def __init__(self, path: Path, threads: int | None = None, cache_dir: Path | None = None,
                 precision: str = "auto"):
        import onnx

        ov = require()
        graph = onnx.load(str(path), load_external_data=False).graph  # names and types only
        initialized = {i.name for i in graph.initializer}
        self._inputs = [Arg(v.name, _ONNX_TYPES.get(v.type.tensor_type.elem_type, "tensor(float)"))
                        for v in graph.input if v.name not in initialized]
        self._outputs = [Arg(v.name, _ONNX_TYPES.get(v.type.tensor_type.elem_type, "tensor(float)"))
                         for v in graph.output]
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": hint(precision), "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if cache_dir is not None:  # OpenVINO keeps the compiled model: a second open skips compiling
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self.precision = config["INFERENCE_PRECISION_HINT"]
        self._model = core.compile_model(str(path), "CPU", config)
        self._request = self._model.create_infer_request()
        self._in_ports = {a.name: self._port(self._model.inputs, a.name) for a in self._inputs}
        self._out_ports = {a.name: self._port(self._model.outputs, a.name) for a in self._outputs}

    @staticmethod
    def _port(ports, name: str):
        """OpenVINO gives a port every name its tensor had in the graph; find the ONNX one."""
        for port in ports:
            if name in port.get_names():
                return port
        raise EdgediffError(f"OpenVINO's compiled graph has no port named '{name}'")

    def get_inputs(self) -> list[Arg]:
        return self._inputs

    def get_outputs(self) -> list[Arg]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return [f"openvino {require().__version__} CPU {self.precision}"]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._request.infer({self._in_ports[k]: v for k, v in feeds.items()})
        return [self._request.get_tensor(self._out_ports[n]).data.copy() for n in names]


def _probe_graph():
    """One U-Net-like 3x3 convolution (320 channels at 64x64: ~3.8 GMAC), the operation that
    dominates a denoising step, as an in-memory ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((320, 320, 3, 3)) * 0.02).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 320, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 320, 64, 64])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _best_of(run, repeats: int = 3) -> float:
    run()  # warm-up: first-run allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(threads: int | None = None) -> tuple[float, float]:
    """Seconds for the probe convolution on onnxruntime's CPU provider and on OpenVINO, both at f32."""
    import tempfile

    import onnx
    import onnxruntime as ort

    model = _probe_graph()
    x = np.random.default_rng(1).standard_normal((1, 320, 64, 64)).astype(np.float32)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ort_s = _best_of(lambda: session.run(None, {"x": x}))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path))
        ov = Session(path, threads)
        ov_s = _best_of(lambda: ov.run(["y"], {"x": x}))
    return ort_s, ov_s


def prefer(ort_s: float | None, ov_s: float | None) -> bool:
    """auto's rule: OpenVINO only when measured FASTER-times faster at the same precision."""
    return ort_s is not None and ov_s is not None and ort_s >= FASTER * ov_s


def cache_dir() -> Path:
    """Where OpenVINO keeps compiled models (its CACHE_DIR; `edgediff cache --clear` empties it)."""
    from edgediff.runtime.paths import cache_root

    return cache_root() / "openvino"


def compiled_cache(path: Path, precision: str = "auto") -> Path:
    """OpenVINO's CACHE_DIR for one component file. OpenVINO finds a compiled model by the file's
    path, not its contents (measured: a rewritten file ran the old compiled model), so each file
    gets its own folder, emptied whenever the key of runtime.graph_cache (the files' sizes and
    times, the CPU's features) or OpenVINO's version or precision changes."""
    from edgediff.runtime import graph_cache

    key = graph_cache.key(path, [f"openvino {require().__version__} {hint(precision)}"])
    folder = cache_dir() / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]
    stamp = folder / graph_cache.KEY
    try:
        if json.loads(stamp.read_text()) == key:
            return folder
    except (OSError, ValueError):
        pass
    graph_cache.remove(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(key))
    return folder


def _probe_file() -> Path:
    return cache_dir() / "probe.json"


@cache
def auto_picks() -> bool:
    """Whether `auto` runs fp32 graphs on OpenVINO on this machine: installed, and measured faster
    at f32. The measurement (a few seconds, once) is kept per CPU and runtime versions."""
    if os.environ.get(AUTO_ENV) == "0" or not installed():
        return False
    import onnxruntime

    from edgediff.runtime.graph_cache import cpu_features
    from edgediff.runtime.paths import measured_once

    key = {"openvino": require().__version__, "onnxruntime": onnxruntime.__version__, "cpu": cpu_features(),
           "precision": "f32"}
    kept = measured_once(_probe_file(), key, lambda: dict(zip(("onnxruntime_s", "openvino_s"), measure(), strict=True)))
    return prefer(kept["onnxruntime_s"], kept["openvino_s"])

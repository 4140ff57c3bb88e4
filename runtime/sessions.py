"""onnxruntime sessions: provider choice, threads, and components that open on first use and
can be released, so only the component in use holds memory."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgediff.errors import RuntimeFailure, UsageError
from edgediff.runtime import graph_cache, pages

DEVICES = ("auto", "cpu", "cuda", "openvino")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _ort():
    import onnxruntime

    return onnxruntime


_FELL_BACK: set[str] = set()  # fallbacks already warned about (once each per process)


def providers_for(device: str) -> list[str]:
    """onnxruntime's execution providers for `device`; CUDA falls back to CPU with a warning that
    says why. ('openvino' gets the CPU provider: it runs what OpenVINO cannot take.)"""
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}'; choose one of: {', '.join(DEVICES)}")
    available = _ort().get_available_providers()
    if device in ("cpu", "openvino"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda" and "cuda-missing" not in _FELL_BACK:  # said once per process
        _FELL_BACK.add("cuda-missing")
        warnings.warn(
            "CUDA was requested but this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); running on the CPU. For CUDA, replace the "
            "package: pip uninstall onnxruntime && pip install onnxruntime-gpu",
            RuntimeWarning,
            stacklevel=2,
        )
    return ["CPUExecutionProvider"]


# what a run computes in: 'auto' the precision the package holds (what every run does unless
# told), 'bf16' OpenVINO's on CPUs that compute it natively (asked for by name, never chosen)
RUN_PRECISIONS = ("auto", "bf16")


def uses_openvino(device: str, precision: str = "auto") -> bool:
    """Whether components run on OpenVINO: asked for by name (it must be installed), for bf16
    (the CPU must compute it), or chosen by `auto` where there is no GPU and OpenVINO measured
    faster here at f32 (runtime.openvino_session)."""
    from edgediff.runtime import openvino_session

    if precision not in RUN_PRECISIONS:
        raise UsageError(f"unknown --precision '{precision}' to run at; choose one of: {', '.join(RUN_PRECISIONS)} "
                         "(auto: the package's own; convert it for another)")
    if precision == "bf16":
        if device not in ("auto", "openvino"):
            raise UsageError(f"--precision bf16 runs on OpenVINO on the CPU, not with --device {device}: "
                             "use --device auto or openvino")
        openvino_session.require_bf16()
        return True
    if device == "openvino":
        openvino_session.require()  # raises the install hint
        return True
    return device == "auto" and providers_for("auto")[0] == "CPUExecutionProvider" and openvino_session.auto_picks()


def runtime_name(device: str, precision: str = "auto") -> str:
    """What runs the components, for reports: 'openvino 2026.4.1 CPU bf16', 'onnxruntime 1.32.0 CPUExecutionProvider'."""
    if uses_openvino(device, precision):
        from edgediff.runtime import openvino_session

        return f"openvino {openvino_session.require().__version__} CPU {openvino_session.hint(precision)}"
    return f"onnxruntime {_ort().__version__} {providers_for(device)[0]}"


WEIGHTS = ("compact", "expanded")
LORA_MODES = ("merge", "branch")


@dataclass
class SessionOptions:
    device: str = "auto"
    threads: int | None = None  # intra-op threads; None lets onnxruntime use all cores
    # Weights a file stores as F16, or in GGUF blocks where no low-bit kernel takes them
    # (convolutions): 'compact' keeps them so and converts each as its node runs; 'expanded'
    # converts them to fp32 once at load (faster steps, more memory).
    weights: str = "compact"
    # MatMulNBits compute: 0 fp32 activations, 4 int8; for every weight, or per repacked bit width
    # ({4: 4, 8: 0}: what `auto` gives on a CPU with VNNI; runtime.accuracy)
    accuracy_level: int | dict[int, int] = 0
    # a LoRA on quantized weights: 'merge' requantizes them changed; 'branch' keeps them and adds
    # a low-rank side branch (float weights are always changed in place)
    lora_mode: str = "branch"
    # keep onnxruntime's optimized graph of a package's component files between runs
    # (runtime.graph_cache; the CPU provider only): a second open skips the optimizer
    graph_cache: bool = True
    precision: str = "auto"  # RUN_PRECISIONS


def _check_fallback(session, device: str, name: str) -> None:
    """CUDA asked for and available, yet the session runs on the CPU (a missing CUDA/cuDNN
    library makes onnxruntime fall back without an error): say so, once per process."""
    wanted = providers_for(device)[0]
    got = session.get_providers()[0]
    if wanted != got and wanted not in _FELL_BACK:
        _FELL_BACK.add(wanted)
        warnings.warn(f"the {name} component asked for {wanted} but onnxruntime runs it on {got} (its CUDA "
                      "libraries did not load: check CUDA and cuDNN against onnxruntime-gpu's requirements); "
                      "every component will run there", RuntimeWarning, stacklevel=3)


def _return_freed_memory() -> None:
    """Give freed heap memory back to the system: glibc keeps large freed blocks in its heap, so
    a process's resident size would stay at its high-water mark."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Component:
    """One ONNX graph of a package, opened on first `run` and closed by `release`. With `bind`,
    the graph is weight-less and `bind()` gives it with its weights (a kernels.bind.Bound)."""

    name: str
    path: Path
    options: SessionOptions
    bind: Callable[[], object] | None = None
    _session: object | None = field(default=None, repr=False)
    bindings: list = field(default_factory=list)  # how each bound weight is held
    load_seconds: float = 0.0
    tap: Callable[[dict[str, np.ndarray]], None] | None = None  # sees every run's inputs (calibration)
    seen: Callable[[dict[str, np.ndarray]], None] | None = None  # sees every run's outputs (calibration)
    cached: bool = False  # opened from the optimized-graph cache
    runtime: str = "onnxruntime"  # or "openvino": which one opened the session
    ran_on: str = ""  # what ran it, as reports say: 'onnxruntime 1.32.0 CPUExecutionProvider'

    @property
    def session(self):
        if self._session is None:
            start = time.perf_counter()
            self.cached, self.runtime = False, "onnxruntime"
            if uses_openvino(self.options.device, self.options.precision):
                self._session = self._open_openvino()
            if self._session is not None:
                self.load_seconds += time.perf_counter() - start
                self.ran_on = self._session.get_providers()[0]
                return self._session
            bound = self.bind() if self.bind is not None else None
            entry = self._cache_entry()
            if entry is not None and entry.valid():
                try:
                    self._session, self.cached = self._open(bound, None, cached=entry.model), True
                except RuntimeFailure:  # a damaged entry: rebuilt below
                    entry.drop()
            if self._session is None:  # writing the cache entry when there is one to write
                self._session = self._open(bound, entry)
            self.load_seconds += time.perf_counter() - start
            self.ran_on = f"onnxruntime {_ort().__version__} {self._session.get_providers()[0]}"
            _check_fallback(self._session, self.options.device, self.name)
            if bound is not None:
                # the weights are mapped from files; arrays handed over in memory (a LoRA's
                # changes, or a repack cache that could not be written) were copied: free ours. Its
                # Python wrapper would re-create the session from these options after a provider
                # failure, when they are gone.
                self._session.disable_fallback()
                del bound
                _return_freed_memory()
        return self._session

    def _open_openvino(self):
        """The component on OpenVINO, or None where OpenVINO cannot take it: then onnxruntime's
        CPU provider runs it, and a warning says why."""
        from edgediff.runtime import openvino_session

        if self.bind is not None:
            reason = "its weights are bound at load from a GGUF file, which only onnxruntime takes"
        else:
            try:
                precision = self.options.precision
                cache = openvino_session.compiled_cache(self.path, precision) if self.options.graph_cache else None
                session = openvino_session.Session(self.path, self.options.threads, cache, precision)
                self.runtime = "openvino"
                return session
            except Exception as exc:  # OpenVINO raises its own exception types
                last = str(exc).strip().splitlines()
                reason = f"OpenVINO could not compile it ({last[-1] if last else type(exc).__name__})"
        asked = self.options.device == "openvino" or self.options.precision == "bf16"  # auto's falls back quietly
        if asked and reason not in _FELL_BACK:  # once per reason, not once per component
            _FELL_BACK.add(reason)
            warnings.warn(f"the {self.name} component (and any other for the same reason) runs on onnxruntime's "
                          f"CPU provider, not OpenVINO: {reason}", RuntimeWarning, stacklevel=4)
        return None

    def _cache_entry(self):
        """The optimized-graph cache entry of a component file on the CPU provider, else None
        (bound graphs are made in memory; other providers' graphs hold their own kernels)."""
        if self.bind is not None or not self.options.graph_cache or not self.path.is_file():
            return None
        providers = providers_for(self.options.device)
        if providers != ["CPUExecutionProvider"]:
            return None
        return graph_cache.entry(self.path, providers)

    def _open(self, bound, entry, cached: Path | None = None):
        """A session of the graph (`cached`: an already optimized one), writing its optimized
        graph into `entry` when given. Failing to write the cache only costs the cache."""
        ort = _ort()
        opts = ort.SessionOptions()
        if self.options.threads:
            opts.intra_op_num_threads = self.options.threads
            opts.inter_op_num_threads = 1
        if providers_for(self.options.device)[0] == "CPUExecutionProvider":
            # From its second run onnxruntime allocates the activations it planned in one block,
            # which holds more than the tensors alive at once: peak 3.5 against 2.9 GB for the
            # SDXL U-Net at 1024x1024, 2.1 against 1.8 GB for SD 1.5 at 512, 2.4 against 1.4 GB for
            # the VAE in 512-pixel tiles; the same step times (benchmarks/RESULTS.md, issue 26).
            opts.enable_mem_pattern = False
        source: str | bytes = str(cached or self.path)
        if cached is not None:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        staged = None
        if entry is not None:
            staged = entry.staging()
            opts.optimized_model_filepath = str(staged / graph_cache.MODEL)
            for k, v in graph_cache.SAVE_CONFIG.items():
                opts.add_session_config_entry(k, v)
            opts.log_severity_level = 3  # its warning that NCHWc graphs are CPU-specific: the key says so
        if bound is not None:
            names = list(bound.arrays)  # in memory (kernels.bind.Sink): onnxruntime copies them
            opts.add_external_initializers(
                names, [ort.OrtValue.ortvalue_from_numpy(bound.arrays[n]) for n in names])
            if bound.folder is not None:
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(bound.folder))
            if self.options.weights == "compact" and any(b.kind in ("stored", "blocks") and b.stored != "f32"
                                                         for b in bound.bindings):
                # folding their casts (and the NCHWc rewrite) would expand the weights to fp32
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
            self.bindings = bound.bindings
            source = bound.model.SerializeToString()
            # prepacking on every thread: the Flux transformer (6.9 GB of 4-bit blocks) opens in
            # 12.7 s instead of 18.7 at level 0 and 15.3 instead of 26.7 at level 4, its peak 0.2 GB
            # higher, because the dropping below releases each tensor's pages once read (without
            # it, every tensor's stay mapped until the last is packed: twice the peak)
            opts.add_session_config_entry("session.prepack.enable_parallel", "1")
        try:
            with pages.dropping(bound.files if bound is not None else ()):
                session = ort.InferenceSession(source, sess_options=opts, providers=providers_for(self.options.device))
        except Exception as exc:  # onnxruntime raises its own exception types
            if staged is not None:
                graph_cache.remove(staged)
                return self._open(bound, None)  # perhaps the disk is full: open without the cache
            raise RuntimeFailure(
                f"{cached or self.path}: onnxruntime could not load the {self.name} graph ({exc}); "
                "re-convert the model or check that the provider supports its operators"
            ) from exc
        if staged is not None:
            entry.commit(staged)
        return session

    @property
    def input_names(self) -> list[str]:
        return [arg.name for arg in self.session.get_inputs()]

    def input_type(self, name: str):
        for arg in self.session.get_inputs():
            if arg.name == name:
                return _NUMPY_TYPES.get(arg.type, np.float32)
        raise RuntimeFailure(f"{self.path}: the {self.name} graph has no input '{name}'")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with inputs cast to the graph's own input types; outputs come back as float32."""
        session = self.session
        cast = {k: np.ascontiguousarray(v, dtype=self.input_type(k)) for k, v in feeds.items()}
        if self.tap is not None:
            self.tap(cast)
        names = [o.name for o in session.get_outputs()]
        try:
            outputs = session.run(names, cast)
        except Exception as exc:  # onnxruntime raises its own exception types
            shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in cast.items())
            raise RuntimeFailure(
                f"the {self.name} component failed in {self.runtime} ({self.path}; inputs: {shapes}): "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}. An image size "
                "or batch the graph was not exported for, too little memory, or a damaged package: try a "
                "smaller size, --low-memory, or re-convert the model"
            ) from exc
        result = {}
        for name, value in zip(names, outputs, strict=True):
            value = np.asarray(value)
            if value.dtype == np.float16:
                value = value.astype(np.float32)
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise RuntimeFailure(
                    f"the {self.name} component produced NaN or Inf in '{name}' "
                    f"({self.path}); its precision may overflow: re-convert it at fp32"
                )
            result[name] = value
        if self.seen is not None:
            self.seen(result)
        return result

    def release(self) -> None:
        self._session = None

"""optimum's onnxruntime Stable Diffusion pipeline (optimum-onnx), on the graphs optimum itself
exports from the same diffusers folder. optimum-onnx needs transformers < 4.58, so it runs in
an interpreter of its own (`edgediff bench` finds it under the cache; see README)."""

from __future__ import annotations

import time
from pathlib import Path

from edgediff.benchmarks.peers.diffusers_torch import measure


def prepare(config: dict) -> Path:
    """optimum's own export of the diffusers folder (once; it is the peer's conversion step)."""
    from optimum.exporters.onnx import main_export

    out = Path(config["work_dir"]) / "optimum-onnx"
    if not (out / "model_index.json").is_file():
        main_export(model_name_or_path=config["diffusers"], output=str(out), task="text-to-image")
    return out


def run(config: dict) -> dict:
    import onnxruntime
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    folder = prepare(config)
    options = onnxruntime.SessionOptions()
    if config.get("threads"):
        options.intra_op_num_threads = int(config["threads"])
    started = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider",
                                                      session_options=options)
    load = time.perf_counter() - started
    result = measure(pipe, config)
    return {**result, "load_cold_s": load, "load_warm_s": None,
            "provider": f"optimum-onnx, onnxruntime {onnxruntime.__version__} CPUExecutionProvider"}

"""One measured run in a process of its own, so the peak memory is that run's alone.

    python -m edgediff.benchmarks.worker '{"tool": "edgediff", ...}'

Prints one JSON line: stage timings (a warm-up run first, then the measured run), the image
path, and the process's peak resident memory. That is the kernel's VmHWM of this process's own
address space: Linux carries ru_maxrss across fork and exec, so a worker started by a large
parent would report the parent's size.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
from pathlib import Path


def run_edgediff(config: dict) -> dict:
    from edgediff.convert.adopt import runnable
    from edgediff.runtime import Pipeline

    # a GGUF file edgediff did not write runs through its cached graphs
    pipe = Pipeline(runnable(config["package"]), device=config["device"], threads=config.get("threads"),
                    weights=config.get("weights", "compact"), accuracy_level=config.get("accuracy_level", 0),
                    graph_cache=config.get("graph_cache", True), vae_tile=config.get("vae_tile", 0),
                    precision=config.get("run_precision", "auto"))
    args = dict(guidance=config["guidance"], sampler=config["sampler"], schedule=config["schedule"],
                seed=config["seed"], width=config["size"], height=config["size"],
                cache_interval=config.get("cache_interval", 1))
    pipe.generate(config["prompt"], config["negative_prompt"], steps=1, **args)  # warm-up, cold load
    cold = pipe.timings.load
    cached = sorted(name for name, c in pipe._components.items() if c.cached)  # cold load from the graph cache
    image = pipe.generate(config["prompt"], config["negative_prompt"], steps=config["steps"], **args)
    t = pipe.timings
    image.save(config["image"])
    from edgediff.runtime.sessions import runtime_name

    return {"load_cold_s": cold, "load_warm_s": t.load, "text_encode_s": t.text_encode,
            "steps_s": list(t.steps), "vae_decode_s": t.vae_decode, "total_s": t.compute,
            "image": config["image"], "cold_load_cached": cached, "provider": runtime_name(config["device"], config.get("run_precision", "auto"))}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    started = time.perf_counter()
    if config.get("action") == "prepare":  # a peer's one-time conversion, outside the measurements
        importlib.import_module(f"edgediff.benchmarks.peers.{config['module']}").prepare(config)
        print(json.dumps({"prepared": True}), flush=True)
        return 0
    if config["tool"] == "edgediff":
        result = run_edgediff(config)
    else:
        module = importlib.import_module(f"edgediff.benchmarks.peers.{config['module']}")
        result = module.run(config)
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Where a component's time goes: onnxruntime's profiler over one warm run, by operator type.

    edgediff bench profile PACKAGE --component unet --size 512

The inputs are the component's real ones, captured from a 1-step generation at that size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def capture_inputs(package: Path, component: str, size: int, threads: int | None) -> dict:
    from edgediff.runtime import Pipeline

    pipe = Pipeline(package, device="cpu", threads=threads, keep_loaded=True)
    feeds: list[dict] = []
    pipe.component(component).tap = lambda f: feeds.append(dict(f))
    pipe.generate("a lighthouse at dusk", "blurry", steps=1, seed=0, width=size, height=size)
    return feeds[0]


def op_times(trace: list[dict]) -> dict[str, float]:
    """Milliseconds per operator type over the last model run of a profiler trace."""
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]
    start, end = last["ts"], last["ts"] + last["dur"]
    out: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= end:
            out[e["args"]["op_name"]] += e["dur"] / 1000
    return dict(out)


def profile(package: Path, component: str, size: int, threads: int | None = None) -> tuple[float, dict[str, float]]:
    """(wall ms of the profiled run, ms per operator type)."""
    import onnxruntime as ort

    from edgediff.manifest import Manifest

    feeds = capture_inputs(package, component, size, threads)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        path = package / Manifest.read(package).components[component].file
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        session.run(None, feeds)  # warm-up
        session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    wall = [e for e in trace if e.get("name") == "model_run"][-1]["dur"] / 1000
    return wall, op_times(trace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgediff bench profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--component", default="unet")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    wall, ops = profile(args.package, args.component, args.size, args.threads)
    total = sum(ops.values())
    print(f"{args.package} {args.component} at {args.size}x{args.size}: {wall:.0f} ms per run")
    print("| operator | ms | share |\n| --- | --- | --- |")
    for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {op} | {ms:.0f} | {ms / total:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

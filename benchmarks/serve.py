"""`edgediff serve`, measured: the time a served request adds over `Pipeline.generate` on the same
loaded model, requests per minute, and resident memory over many sequential requests.

    edgediff bench serve PACKAGE [--size 256] [--steps 4] [--repeats 5] [--sequential 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgediff bench serve", description=__doc__.splitlines()[0])
    p.add_argument("package")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sequential", type=int, default=0, help="then this many requests in a row: memory growth")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import requests

    from edgediff.runtime.server import Limits, Models, Running, Service

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "model").symlink_to(Path(args.package).resolve())
        service = Service(Models(Path(folder)), limits=Limits(queue=2), device="cpu", threads=args.threads)
        running = Running(service)
        body = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "steps": args.steps, "seed": 1,
                "width": args.size, "height": args.size, "sampler_name": "Euler", "cfg_scale": 7}
        try:
            def served() -> float:
                started = time.perf_counter()
                r = requests.post(f"{running.url}/sdapi/v1/txt2img", json=body, timeout=3600)
                r.raise_for_status()
                return time.perf_counter() - started

            def direct() -> float:
                started = time.perf_counter()
                service.pipe.generate(body["prompt"], body["negative_prompt"], steps=args.steps, guidance=7.0,
                                      sampler="euler", seed=1, width=args.size, height=args.size)
                return time.perf_counter() - started

            served()  # warm-up: the components open once and stay
            direct()
            times = {"direct": [], "served": []}
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                times["direct"].append(direct())
                times["served"].append(served())
            d, s = statistics.median(times["direct"]), statistics.median(times["served"])
            result = {"package": args.package, "size": args.size, "steps": args.steps, "repeats": args.repeats,
                      "direct_s": d, "served_s": s, "overhead_s": s - d, "overhead_pct": 100 * (s - d) / d,
                      "requests_per_minute": 60 / s}
            if args.sequential:
                before = _rss_mb()
                started = time.perf_counter()
                for _ in range(args.sequential):
                    served()
                result.update(sequential=args.sequential, sequential_rpm=60 * args.sequential / (time.perf_counter() - started),
                              rss_before_mb=before, rss_after_mb=_rss_mb(), rss_growth_mb=_rss_mb() - before)
        finally:
            running.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

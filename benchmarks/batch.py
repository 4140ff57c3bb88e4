"""`edgediff batch`, measured: images per minute in this process and on a local Ray cluster, and
what Ray adds per job and at start.

    edgediff bench batch [MODEL] [--jobs 32] [--size PX] [--steps N] [--configs process:1x2,ray:2x1,ray:1x2]

A configuration is WHERE:ACTORSxTHREADS: `process:1x2` is one process with 2 onnxruntime threads
(`edgediff batch --threads 2`), `ray:2x1` two Ray actors of 1 thread each (`--ray --threads 1
--actors 2`). Each runs 2 jobs untimed (warm-up), then N/2 jobs and N jobs, each time into a fresh folder (the Ray ones on
one local Ray started first, its start timed apart). Images per minute: N over the wall time of
the N-job run (start-up included). The per-job time is the slope between the two runs,
(wall(N) - wall(N/2)) / (N/2), and the start-up the intercept, wall(N) - N x slope: Ray Data hands
results back in bursts, so arrival times alone would mislead. Ray's cost per job is its slope at
1 actor x T threads less the process's at T threads; its start-up cost the same of intercepts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _config(text: str) -> tuple[str, int, int]:
    where, _, shape = text.partition(":")
    actors, _, threads = shape.partition("x")
    if where not in ("process", "ray") or not actors.isdigit() or not threads.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write WHERE:ACTORSxTHREADS, e.g. process:1x2 or ray:2x1")
    if where == "process" and actors != "1":
        raise argparse.ArgumentTypeError(f"{text!r}: in this process there is one model (process:1xTHREADS)")
    return where, int(actors), int(threads)


def measure(jobs: Path, model: str | None, where: str, actors: int, threads: int) -> dict:
    """One run of a jobs file: its wall time and the mean seconds a job spent generating."""
    from edgediff.batch import run

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        summary = run(jobs, Path(folder) / "out", model=model, threads=threads, device="cpu",
                      ray=True if where == "ray" else None, actors=actors if where == "ray" else None)
        wall = time.perf_counter() - started
        records = [json.loads(x) for x in (Path(folder) / "out" / "results.jsonl").read_text().splitlines()]
    if summary.failed:
        raise SystemExit(f"{len(summary.failed)} jobs failed: {summary.failed[:3]}")
    return {"wall_s": wall, "generate_s_mean": statistics.mean(r["seconds"] for r in records)}


def write_jobs(path: Path, n: int, extra: dict) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"a lighthouse at dusk, study {i}", "seed": i, **extra}) + "\n"
                            for i in range(n)))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgediff bench batch", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="package, model file or builtin:NAME (default: the embedded model)")
    p.add_argument("--jobs", type=int, default=32, help="images (default 32)")
    p.add_argument("--size", type=int, help="width and height in pixels (default: the model's)")
    p.add_argument("--steps", type=int, help="steps (default: the model's)")
    p.add_argument("--configs", type=lambda t: [_config(x) for x in t.split(",")],
                   default=[("process", 1, 2), ("ray", 2, 1), ("ray", 1, 2)],
                   help="comma-separated WHERE:ACTORSxTHREADS (default process:1x2,ray:2x1,ray:1x2)")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON lines")
    args = p.parse_args(argv)

    from edgediff.batch import open_model
    from edgediff.benchmarks.harness import system_info

    open_model(args.model, lambda m: print(m, file=sys.stderr))  # converted once, before any timing
    rows = []
    extra = {k: v for k, v in (("steps", args.steps), ("width", args.size), ("height", args.size)) if v}
    with tempfile.TemporaryDirectory() as folder:
        warm = write_jobs(Path(folder) / "warm.jsonl", 2, extra)
        half = write_jobs(Path(folder) / "half.jsonl", args.jobs // 2, extra)
        full = write_jobs(Path(folder) / "full.jsonl", args.jobs, extra)
        ray_start = None
        for where, actors, threads in args.configs:
            if where == "ray" and ray_start is None:
                import ray

                t = time.perf_counter()
                ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
                ray_start = round(time.perf_counter() - t, 2)
            measure(warm, args.model, where, actors, threads)  # page cache, Ray's worker processes: not timed
            small, big = (measure(jobs, args.model, where, actors, threads) for jobs in (half, full))
            slope = (big["wall_s"] - small["wall_s"]) / (args.jobs - args.jobs // 2)
            rows.append({"config": f"{where}:{actors}x{threads}", "jobs": args.jobs, "wall_s": round(big["wall_s"], 2),
                         "images_per_min": round(args.jobs / big["wall_s"] * 60, 1),
                         "per_job_s": round(slope, 3), "steady_images_per_min": round(60 / slope, 1),
                         "startup_s": round(big["wall_s"] - args.jobs * slope, 2),
                         "generate_s_mean": round(big["generate_s_mean"], 3), "half_wall_s": round(small["wall_s"], 2)})
            print(json.dumps(rows[-1]), file=sys.stderr)
        if ray_start is not None:
            import ray

            ray.shutdown()
    base = {r["config"].split("x")[1]: r for r in rows if r["config"].startswith("process:")}
    print(f"{args.jobs} jobs of {args.model or 'the embedded model'} ({', '.join(f'{k} {v}' for k, v in extra.items()) or 'its defaults'}) "
          f"on {system_info(None)['cpu']}, {system_info(None)['cores']} cores; ray.init: {ray_start} s")
    print("| configuration | wall s | images/min | s/job (slope) | steady images/min | start-up s | generate s/job "
          "| Ray's cost per job s | Ray's start-up s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        actors, threads = r["config"].split(":")[1].split("x")
        per_job = startup = ""
        if r["config"].startswith("ray:") and threads in base and actors == "1":
            per_job = f"{r['per_job_s'] - base[threads]['per_job_s']:.3f}"
            startup = f"{r['startup_s'] - base[threads]['startup_s']:.1f}"
        print(f"| {r['config']} | {r['wall_s']} | {r['images_per_min']} | {r['per_job_s']} | {r['steady_images_per_min']} | "
              f"{r['startup_s']} | {r['generate_s_mean']} | {per_job} | {startup} |")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

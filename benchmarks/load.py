"""Opening a package, each way in a fresh process: without the optimized-graph cache, building
it (the first open), and from it (every later open), each then running one 256x256 step so a
cost moved from the open into the first run is counted too.

    edgediff bench load PACKAGE [--threads 2]

The package's files are read once beforehand, so all three read them from the page cache."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def child(package: str, threads: int, graph_cache: bool) -> dict:
    from edgediff.runtime import Pipeline

    pipe = Pipeline(package, device="cpu", threads=threads, keep_loaded=True, graph_cache=graph_cache)
    opened = {}
    for name in pipe.manifest.components:
        start = time.perf_counter()
        pipe.component(name).session  # noqa: B018 - opening is what is measured
        opened[name] = time.perf_counter() - start
    pipe.generate("a photo of a cat", steps=1, width=256, height=256, seed=0, sampler="euler")
    t = pipe.timings
    return {"open_s": opened, "first_step_s": t.steps[0], "vae_decode_s": t.vae_decode,
            "cached": sorted(n for n, c in pipe._components.items() if c.cached)}


def measure(package: Path, threads: int) -> list[tuple[str, dict]]:
    from edgediff.runtime import graph_cache

    for path in package.rglob("*"):  # into the page cache, for every way alike
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    for folder, _, _ in graph_cache.of_package(package):
        graph_cache.remove(folder)
    rows = []
    for label, cache in (("no cache", False), ("first open (builds the cache)", True), ("cached", True)):
        out = subprocess.run([sys.executable, "-P", "-m", "edgediff.benchmarks.load", str(package), "--child",
                              "--threads", str(threads)] + ([] if cache else ["--no-graph-cache"]),
                             capture_output=True, text=True, check=True)
        rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edgediff bench load", description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-graph-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.child:  # a package that cannot open is a message here, not a child's traceback
        from edgediff.runtime.package import open_package

        open_package(args.package)
    if args.child:
        print(json.dumps(child(args.package, args.threads, not args.no_graph_cache)))
        return 0
    rows = measure(Path(args.package), args.threads)
    names = list(rows[0][1]["open_s"])
    print(f"| open | {' | '.join(names)} | all s | first 256x256 step s | VAE decode s |")
    print("|---" * (len(names) + 4) + "|")
    for label, r in rows:
        opens = [r["open_s"][n] for n in names]
        print(f"| {label} | {' | '.join(f'{x:.2f}' for x in opens)} | {sum(opens):.1f} | "
              f"{r['first_step_s']:.2f} | {r['vae_decode_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

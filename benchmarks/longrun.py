"""Many generations in one process, resident memory sampled after each: the growth per image
after warm-up, with components kept loaded and released after each use.

    edgediff bench longrun PACKAGE [--images 200] [--size 64] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgediff bench longrun", description=__doc__.splitlines()[0])
    p.add_argument("package")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)

    from edgediff.benchmarks.serve import _rss_mb
    from edgediff.runtime import Pipeline

    results = {}
    for keep in (True, False):
        pipe = Pipeline(args.package, device="cpu", threads=2, keep_loaded=keep)
        rss = []
        for i in range(args.warmup + args.images):
            pipe.generate(f"a red circle {i}", "blurry", steps=args.steps, seed=i, width=args.size, height=args.size)
            rss.append(_rss_mb())
        after = np.array(rss[args.warmup:])
        slope = float(np.polyfit(np.arange(len(after)), after, 1)[0])  # MB per image, least squares
        results["keep-loaded" if keep else "low-memory"] = {
            "images": args.images, "rss_first_mb": float(after[0]), "rss_last_mb": float(after[-1]),
            "rss_max_mb": float(after.max()), "growth_mb_per_image": slope}
        del pipe
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

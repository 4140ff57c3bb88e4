"""The VAE decoder alone at a large size, whole and in tiles: time and the process's peak memory
(each in a fresh process, so one does not inherit the other's peak).

    edgediff bench vae_memory PACKAGE --size 1024 --tiles 0 512 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(package: str, size: int, tile: int, threads: int | None) -> dict:
    import resource

    import numpy as np

    from edgediff.runtime import Pipeline
    from edgediff.runtime import vae as vae_ops

    pipe = Pipeline(package, device="cpu", threads=threads, graph_cache=False)
    m = pipe.package.manifest
    decoder = pipe.component("vae_decoder")
    down = m.vae_downscale
    latents = np.random.default_rng(0).standard_normal((1, m.latent_channels, size // down, size // down)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    decoder.session  # noqa: B018 (opened outside the timing)
    start = time.perf_counter()
    vae_ops.decode(decoder, latents, m.latent_scale, m.latent_shift, tile, down)
    seconds = time.perf_counter() - start
    return {"size": size, "tile": tile, "decode_s": seconds, "rss_before_mb": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgediff bench vae_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tiles", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child:  # a package that cannot open is a message here, not a child's traceback
        from edgediff.runtime.package import open_package

        open_package(args.package)
    if args.child:
        print(json.dumps(child(args.package, args.size, args.tiles[0], args.threads)))
        return 0
    print("| size | tile px | decode s | peak RSS MB |\n| --- | --- | --- | --- |")
    for tile in args.tiles:
        cmd = [sys.executable, "-P", "-m", "edgediff.benchmarks.vae_memory", args.package, "--size", str(args.size),
               "--tiles", str(tile), "--child", *(["--threads", str(args.threads)] if args.threads else [])]
        row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"| {row['size']} | {tile or 'whole'} | {row['decode_s']:.1f} | {row['peak_rss_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

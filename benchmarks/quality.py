"""Image quality of each precision against the reference precision, same seeds and prompts,
one process per precision (the model loads once for all its images).

    edgediff bench quality sd15-512 --seeds 8 --steps 2

takes the model, precisions, size and prompts of a scenario. For the embedded shapes model,

    edgediff bench quality tiny --draw

scores instead what share of 50 images show the prompted shape and colours, per precision
(a precision's '@cacheN' runs it with --cache-interval N, '@openvino' on OpenVINO).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgediff.benchmarks import shapes, stats
from edgediff.benchmarks.harness import prepare
from edgediff.benchmarks.scenario import load_scenario

PROMPTS = ("a photograph of a lighthouse on a rocky coast at dusk, dramatic clouds",
           "portrait of an old fisherman, oil painting, detailed brush strokes")


def sweep(packages: dict[str, Path], reference: str, prompts, seeds, size: int, steps: int,
          out: Path, progress=print) -> list[dict]:
    from edgediff.runtime import Pipeline

    out.mkdir(parents=True, exist_ok=True)
    rows, ref_images = [], {}
    for precision in [reference, *(p for p in packages if p != reference)]:
        pipe = Pipeline(packages[precision], **device_of(precision), keep_loaded=True)
        for p, prompt in enumerate(prompts):
            for seed in seeds:
                progress(f"{precision}: prompt {p} seed {seed}")
                image = pipe.generate(prompt, "blurry, low quality", steps=steps, sampler="euler",
                                      schedule="normal", seed=seed, width=size, height=size)
                path = out / f"{precision}-p{p}-s{seed}.png"
                image.save(path)
                if precision == reference:
                    ref_images[p, seed] = image
                ref = ref_images[p, seed]
                rows.append({"precision": precision, "prompt_index": p, "seed": seed, "size": size,
                             "steps": steps, "psnr_db": stats.psnr(ref, image), "ssim": stats.ssim(ref, image),
                             "image": str(path)})
    return rows


def evaluation_prompts(n: int = 50, seed: int = 2024) -> list[tuple[str, int, shapes.Sample]]:
    """Varied (caption, seed, truth) triples, with wordings from the training templates."""
    rng = np.random.default_rng(seed)
    return [(truth.caption, 1000 + i, truth) for i, (_, truth) in enumerate(shapes.sample(rng) for _ in range(n))]


def device_of(precision: str) -> dict[str, str]:
    """onnxruntime's CPU provider, or OpenVINO for a '@openvino' configuration (in bf16 for '@bf16')."""
    from edgediff.benchmarks.harness import parse_configuration

    options = parse_configuration(precision)[2]
    if "bf16" in options:
        return {"device": "openvino", "precision": "bf16"}
    return {"device": "openvino" if "openvino" in options else "cpu"}


def draw_score(package: Path, n: int = 50, device: str = "cpu", precision: str = "auto", **kwargs) -> float:
    """Share of generated images that show the prompted shape and colours (package defaults)."""
    from edgediff.runtime import Pipeline

    pipe = Pipeline(package, device=device, precision=precision, keep_loaded=True)
    hits = [shapes.check(pipe.generate(caption, seed=seed, **kwargs)).matches(truth)
            for caption, seed, truth in evaluation_prompts(n)]
    return sum(hits) / len(hits)


def table(rows: list[dict]) -> str:
    out = ["| precision | images | PSNR dB median (min) | SSIM median (min) |", "| --- | --- | --- | --- |"]
    for precision in dict.fromkeys(r["precision"] for r in rows):
        sel = [r for r in rows if r["precision"] == precision]
        ps, ss = stats.summary([r["psnr_db"] for r in sel]), stats.summary([r["ssim"] for r in sel])
        psnr = "identical" if ps["min"] == float("inf") else f"{ps['median']:.1f} ({ps['min']:.1f})"
        out.append(f"| {precision} | {len(sel)} | {psnr} | {ss['median']:.3f} ({ss['min']:.3f}) |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgediff bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, help="denoising steps (default 2; with --draw, the package's)")
    parser.add_argument("--size", type=int, help="image size (default: the scenario's first)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/quality"))
    parser.add_argument("--draw", action="store_true", help="score shapes drawn (the embedded model)")
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    _, packages = prepare(scenario, progress=lambda m: print(m, file=sys.stderr))
    if args.draw:
        from edgediff.benchmarks.harness import _number, parse_configuration

        steps = {"steps": args.steps} if args.steps else {}
        scores = {precision: draw_score(package, **device_of(precision),
                                        cache_interval=_number(parse_configuration(precision)[2], "cache", 1), **steps)
                  for precision, package in packages.items()}
        ref = scores[scenario.reference]
        print("| precision | images drawn right (of 50) | share of the reference's score |\n| --- | --- | --- |")
        for precision, score in scores.items():
            print(f"| {precision} | {score:.0%} | {score / ref:.0%} |" if ref else f"| {precision} | {score:.0%} | - |")
        return 0
    prompts = scenario.prompts if len(scenario.prompts) >= 2 else PROMPTS
    rows = sweep(packages, scenario.reference, prompts, range(args.seeds), args.size or scenario.sizes[0], args.steps or 2,
                 args.output, progress=lambda m: print(m, file=sys.stderr, flush=True))
    (args.output / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = table(rows)
    (args.output / "quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

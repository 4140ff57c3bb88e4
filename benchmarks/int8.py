"""int8-static's choices, measured on a package's U-Net against its fp32 U-Net: weight range,
which layers stay float, and one block at a time (the sensitivity table).

    edgediff bench int8 ~/.cache/edgediff/synthetic/sd15/package-fp32 --work /tmp/int8
    edgediff bench int8 PACKAGE --work /tmp/int8 --sensitivity
    edgediff bench int8 --kernels      # fp32 and int8 GEMM rates on this CPU

Calibration is the converter's own (its prompts, 10 euler steps at up to 256x256), run once and
kept as onnxruntime's range cache in WORK (one per range method); every variant quantizes the same fp32 graph with those
ranges. Each variant is judged by the images of held-out prompts and seeds (PSNR against fp32's
with the same seeds) and by the U-Net's output on those runs' fp32 inputs (SNR per step, high
noise first). Timings are single U-Net evaluations at the image size; run alone for clean ones.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.benchmarks import stats
from edgediff.benchmarks.quality import PROMPTS
from edgediff.convert.precision import STATIC_FLOAT, StaticInt8, chooser, static_int8
from edgediff.kernels.policy import Rule

BLOCKS = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
          "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3")


@dataclass(frozen=True)
class Variant:
    name: str
    options: StaticInt8 = StaticInt8()
    rules: tuple[Rule, ...] = ()
    float_layers: tuple[Rule, ...] = STATIC_FLOAT  # int8-static's own


def variants() -> list[Variant]:
    return [Variant("8-bit weights, every layer", StaticInt8(reduce_range=False), float_layers=()),
            Variant("7-bit weights (reduce_range), every layer", float_layers=()),
            Variant("7-bit, shortcut convolutions float (int8-static)"),
            Variant("7-bit, shortcut convolutions float, mean of per-input ranges", StaticInt8(ranges="mean"))]


def block_only(block: str) -> Variant:
    """Only `block` quantized, as int8-static quantizes it; everything else float."""
    return Variant(f"only {block}", rules=(Rule(rf"^(?!(.*\.)?{re.escape(block)}\.)", "fp32"),))


class Bench:
    def __init__(self, package: Path, work: Path, size: int, steps: int, seeds: int, threads: int | None):
        self.package, self.work, self.size, self.steps, self.threads = package, work, size, steps, threads
        self.seeds = list(range(100, 100 + seeds))
        self.fp32 = package / "unet" / "model.onnx"
        work.mkdir(parents=True, exist_ok=True)
        self.results = work / "results.json"

    def _pipeline(self, unet: Path):
        from edgediff.runtime import Pipeline

        pipe = Pipeline(self.package, device="cpu", threads=self.threads, keep_loaded=True, graph_cache=False)
        pipe.component("unet").path = unet
        return pipe

    def _images(self, unet: Path, tap=None) -> list[np.ndarray]:
        pipe = self._pipeline(unet)
        pipe.component("unet").tap = tap
        return [np.asarray(pipe.generate(prompt, "blurry, low quality", steps=self.steps, sampler="euler",
                                         schedule="normal", seed=seed, width=self.size, height=self.size))
                for prompt in PROMPTS for seed in self.seeds]

    def reference(self) -> dict:
        """fp32's images, the U-Net inputs of those runs and its outputs on them; recorded once."""
        path = self.work / f"reference-{self.size}-{self.steps}-{len(self.seeds)}.pkl"
        if not path.is_file():
            feeds: list[dict] = []
            images = self._images(self.fp32, tap=lambda f: feeds.append(dict(f)))
            outputs, seconds = self._unet_outputs(self.fp32, feeds)
            path.write_bytes(pickle.dumps({"images": images, "feeds": feeds, "outputs": outputs,
                                           "unet_seconds": seconds}))
        return pickle.loads(path.read_bytes())

    def _unet_outputs(self, unet: Path, feeds: list[dict]) -> tuple[list[np.ndarray], float]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        session = ort.InferenceSession(str(unet), opts, providers=["CPUExecutionProvider"])
        outputs, times = [], []
        for f in feeds:
            start = time.perf_counter()
            outputs.append(session.run(None, f)[0])
            times.append(time.perf_counter() - start)
        return outputs, float(np.median(times))

    def quantize(self, variant: Variant, out: Path) -> dict:

        from edgediff.convert.int8_static import Ranges, calibrate
        from edgediff.runtime.package import open_package

        cache = self.work / f"ranges-{variant.options.ranges}.json"
        if cache.is_file():
            ranges = Ranges.load(cache)
        else:  # every Conv and MatMul observed, so one calibration serves every variant
            print("calibrating (once; the ranges are cached)", file=sys.stderr)
            everything = chooser("unet", "int8-static", static_float=())
            ranges = calibrate(self.package, open_package(self.package).manifest, {"unet": everything},
                               variant.options.ranges)["unet"]
            ranges.save(cache)
        out.parent.mkdir(parents=True, exist_ok=True)
        return static_int8(self.fp32, out, chooser("unet", "int8-static", variant.rules, variant.float_layers),
                           ranges, variant.options)

    def measure(self, variant: Variant, keep: bool = False) -> dict:
        ref = self.reference()
        folder = self.work / variant.name.replace(" ", "_").replace(",", "").replace("/", "_")
        start = time.perf_counter()
        notes = self.quantize(variant, folder / "model.onnx")
        quantize_s = time.perf_counter() - start
        images = self._images(folder / "model.onnx")
        outputs, seconds = self._unet_outputs(folder / "model.onnx", ref["feeds"])
        per_step = np.asarray([_snr(r, o) for r, o in zip(ref["outputs"], outputs, strict=True)]).reshape(-1, self.steps)
        psnrs = [stats.psnr(r, i) for r, i in zip(ref["images"], images, strict=True)]
        row = {"variant": variant.name, "size": self.size, "steps": self.steps, "images": len(images),
               "psnr_db_median": float(np.median(psnrs)), "psnr_db_min": float(np.min(psnrs)),
               "unet_snr_db_per_step": [round(float(x), 1) for x in per_step.mean(axis=0)],
               "unet_seconds": seconds, "fp32_unet_seconds": ref["unet_seconds"],
               "excluded_nodes": notes["excluded_nodes"], "quantize_seconds": round(quantize_s)}
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        rows = json.loads(self.results.read_text()) if self.results.is_file() else []
        rows = [r for r in rows if (r["variant"], r["size"], r["steps"]) != (variant.name, self.size, self.steps)]
        self.results.write_text(json.dumps([*rows, row], indent=1))
        return row


def kernel_throughput(threads: int | None = None, m: int = 8192, k: int = 2880, n: int = 320,
                      repeats: int = 5) -> dict[str, float]:
    """GMAC/s of one U-Net-sized product ([m, k] x [k, n]: a 3x3 convolution of 320 channels on a
    64x64 latent at batch 2, as a GEMM) in fp32 (MatMul) and int8 (MatMulInteger: uint8
    activations times int8 or uint8 weights, the kernels QLinearConv and QLinearMatMul use)."""
    from onnx import TensorProto, helper

    from edgediff.benchmarks.attention import run_seconds

    rng = np.random.default_rng(0)
    cases = {"fp32": (TensorProto.FLOAT, np.float32, TensorProto.FLOAT, np.float32),
             "u8 x s8": (TensorProto.UINT8, np.uint8, TensorProto.INT8, np.int8),
             "u8 x u8": (TensorProto.UINT8, np.uint8, TensorProto.UINT8, np.uint8)}
    out = {}
    for name, (a_type, a_np, b_type, b_np) in cases.items():
        op = "MatMul" if name == "fp32" else "MatMulInteger"
        weight = (rng.standard_normal((k, n)) * 40).clip(-64, 63).astype(b_np) if b_np is not np.uint8 \
            else rng.integers(0, 255, (k, n), dtype=np.uint8)
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["y"])], "gemm",
            [helper.make_tensor_value_info("a", a_type, [m, k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT if name == "fp32" else TensorProto.INT32, None)],
            [helper.make_tensor("b", b_type, [k, n], weight.tobytes(), raw=True)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        a = rng.standard_normal((m, k)).astype(np.float32) if a_np is np.float32 else rng.integers(0, 255, (m, k), dtype=np.uint8)
        out[name] = m * k * n / run_seconds(model, {"a": a}, threads, repeats) / 1e9
    return out


def _snr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(ref.astype(np.float64) ** 2) / np.mean((ref - got).astype(np.float64) ** 2)))


def table(rows: list[dict]) -> str:
    out = ["| variant | image PSNR dB median (min) | U-Net SNR dB per step | U-Net s (fp32 s) | float nodes |",
           "| --- | --- | --- | --- | --- |"]
    for r in rows:
        snr = " / ".join(f"{x:.1f}" for x in r["unet_snr_db_per_step"])
        out.append(f"| {r['variant']} | {r['psnr_db_median']:.1f} ({r['psnr_db_min']:.1f}) | {snr} | "
                   f"{r['unet_seconds']:.2f} ({r['fp32_unet_seconds']:.2f}) | {r['excluded_nodes']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgediff bench int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, nargs="?", help="an fp32 package")
    parser.add_argument("--work", type=Path, default=Path("bench-results/int8"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--sensitivity", action="store_true", help="one U-Net block at a time")
    parser.add_argument("--only", help="run only the variants whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep each variant's graph in WORK")
    parser.add_argument("--kernels", action="store_true", help="only the GEMM throughput of fp32 and int8 here")
    args = parser.parse_args(argv)
    if args.kernels:
        rates = kernel_throughput(args.threads)
        print("| product [8192x2880] x [2880x320] | GMAC/s | vs fp32 |\n| --- | --- | --- |")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.0f} | {rate / rates['fp32']:.2f}x |")
        return 0
    if args.package is None:
        parser.error("give an fp32 package (or --kernels)")
    bench = Bench(args.package, args.work, args.size, args.steps, args.seeds, args.threads)
    chosen = [block_only(b) for b in BLOCKS] if args.sensitivity else variants()
    rows = []
    for variant in chosen:
        if args.only and args.only not in variant.name:
            continue
        print(f"{variant.name} ...", file=sys.stderr, flush=True)
        rows.append(bench.measure(variant, keep=args.keep))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

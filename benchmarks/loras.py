"""LoRA at load time, measured: random LoRA files for a package's own modules, then load time,
step time, peak memory and the image against the LoRA merged at fp32, per package and LoRA mode.

    edgediff bench loras FP32_PACKAGE INT4_PACKAGE [--size 512] [--steps 4] [--out DIR]

`write_lora` is also what the tests use to make LoRA files in each format.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

# the Linear (and SD 1.x's 1x1 projection) layers kohya's trainers give a LoRA by default
LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2",
                "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "ff_context.net.0.proj",
                "ff_context.net.2")
_KOHYA_TE = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def write_lora(modules: Mapping[str, Mapping[str, tuple[int, ...]]], path: Path, fmt: str = "kohya",
               rank: int = 4, seed: int = 0, alpha: float | None = 2.0, scale: float = 0.3,
               unet_name: Callable[[str], str] | None = None) -> Path:
    """A random LoRA file for `modules` (component -> diffusers module name -> weight shape;
    4-D shapes are convolutions: LoCon). `fmt`: 'kohya' (`lora_unet_*`, `lora_te_*`; SDXL's
    two encoders `lora_te1_`/`lora_te2_`; U-Net modules renamed by `unet_name`, as kohya's SDXL
    files use LDM names) or 'peft' (diffusers' files: `unet.X.lora_A.weight`)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    two = "text_encoder_2" in modules
    tensors = {}
    for component, shapes in modules.items():
        for name, shape in shapes.items():
            out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
            down = (rng.standard_normal((rank, inp, *kernel)) * scale / np.sqrt(inp)).astype(np.float32)
            up = (rng.standard_normal((out, rank, *((1, 1) if kernel else ()))) * scale).astype(np.float32)
            text = component.startswith("text_encoder")
            if text and not name.startswith("text_model."):  # transformers' names, as LoRA files have them
                name = "text_model." + name
            if fmt == "peft":
                key = f"{component}.{name}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
                continue
            if text:
                prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component] if two else _KOHYA_TE[component]
                key = prefix + name.replace(".", "_")
            else:
                key = "lora_unet_" + (unet_name(name) if unet_name else name).replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            if alpha is not None:
                tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, str(path))
    return path


def package_modules(package: Path, components=("unet", "text_encoder")) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> module -> weight shape of the LoRA-able layers of an fp32 ONNX package."""
    import onnx

    from edgediff.runtime.package import open_package

    pkg = open_package(package)
    out = {}
    for component in components:
        model = onnx.load(str(package / pkg.manifest.components[component].file), load_external_data=False)
        shapes = {}
        for t in model.graph.initializer:
            name = t.name.removesuffix(".weight")
            if name != t.name and any(name.endswith("." + m) for m in LORA_MODULES):
                shapes[name.split(".", 1)[1]] = tuple(int(d) for d in t.dims)
        out[component] = shapes
    return out


def _run(config: dict) -> dict:
    """One image in this process: load seconds, step seconds, peak RSS."""
    from edgediff.benchmarks.worker import peak_rss_mb
    from edgediff.runtime import Pipeline

    pipe = Pipeline(config["package"], device="cpu", threads=2, loras=config["loras"], lora_mode=config["mode"])
    image = pipe.generate("a lighthouse at dusk", "blurry", steps=config["steps"], guidance=7.5, sampler="euler",
                          schedule="normal", seed=0, width=config["size"], height=config["size"])
    image.save(config["image"])
    t = pipe.timings
    return {"load_s": t.load, "step_s": float(np.median(t.steps)), "text_s": t.text_encode,
            "vae_s": t.vae_decode, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgediff bench loras", description=__doc__.splitlines()[0])
    p.add_argument("fp32")
    p.add_argument("int4")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default="lora-bench")
    p.add_argument("--run", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    args = p.parse_args(argv)
    if not args.run:  # a package that cannot open is a message here, not a child's traceback
        from edgediff.runtime.package import open_package

        for package in (args.fp32, args.int4):
            open_package(package)
    if args.run:
        print(json.dumps(_run(json.loads(args.run))))
        return 0
    from PIL import Image

    from edgediff.benchmarks.stats import psnr

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modules = package_modules(Path(args.fp32))
    files = [str(write_lora(modules, out / f"lora{i}.safetensors", rank=args.rank, seed=i, alpha=args.rank / 2))
             for i in range(3)]
    rows = []
    for count in (0, 1, 3):
        for package, mode in ((args.fp32, "merge"), (args.int4, "merge"), (args.int4, "branch")):
            if count == 0 and mode == "branch":
                continue
            label = f"{Path(package).name} {count} LoRA{'s' if count != 1 else ''} {mode if count else ''}".strip()
            image = out / f"{label.replace(' ', '-')}.png"
            config = dict(package=str(package), loras=files[:count], mode=mode, steps=args.steps, size=args.size,
                          image=str(image))
            done = subprocess.run([sys.executable, "-P", "-m", "edgediff.benchmarks.loras", args.fp32, args.int4,
                                   "--run", json.dumps(config)], capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(dict(label=label, count=count, mode=mode, package=str(package), image=str(image),
                             **json.loads(done.stdout.strip().splitlines()[-1])))
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:  # against the same LoRAs merged into the fp32 package
        ref = next(r for r in rows if r["count"] == row["count"] and r["package"] == args.fp32)
        row["psnr_vs_fp32"] = psnr(np.asarray(Image.open(ref["image"])), np.asarray(Image.open(row["image"])))
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("| package, LoRAs, mode | load s | step s | peak RSS GB | PSNR vs fp32 with the same LoRAs |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['load_s']:.1f} | {r['step_s']:.1f} | {r['peak_rss_mb'] / 1024:.1f} | "
              f"{r['psnr_vs_fp32']:.1f} dB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `edgediff` command: convert, generate, inspect.

Errors edgediff expects print one line, no traceback: exit code 2 for usage errors, 1 for
failures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

from edgediff import __version__
from edgediff.errors import EdgediffError, UsageError, command_line
from edgediff.runtime.sessions import DEVICES, RUN_PRECISIONS

DEVICE_HELP = ("auto (default): CUDA where onnxruntime-gpu has it, else OpenVINO where it is installed and "
               "measured faster on this CPU at the package's precision, else onnxruntime's CPU provider; "
               "openvino needs pip install 'edgediff[openvino]'. The package's precision is what runs")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class ProgressBar:
    """A one-line progress display on stderr, redrawn in place when stderr is a terminal. Its
    s/step is the mean of the steps' own times (`step_times()`: the pipeline's clock), so loading
    the denoiser before the first step does not count."""

    def __init__(self, label: str, step_times, stream=sys.stderr):
        self.label, self.step_times, self.stream = label, step_times, stream
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.tty and done not in (total,) and done % max(1, total // 10):
            return
        width = 24
        filled = int(width * done / max(total, 1))
        times = self.step_times()
        rate = f"{sum(times) / len(times):.2f} s/step" if times else ""
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate}"
        end = "\r" if self.tty and done < total else "\n"
        self.stream.write(line + end)
        self.stream.flush()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: usage, exit 2, no traceback
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _parts_arguments(p: argparse.ArgumentParser) -> None:
    """What supplies the components a GGUF file lacks (a denoiser-only ComfyUI-GGUF file)."""
    p.add_argument("--base", help="the checkpoint (.safetensors or .gguf) whose other components go with a "
                                  "denoiser-only GGUF file")
    p.add_argument("--vae", help="the VAE to use instead of the model's: a .safetensors or .gguf file (or, when "
                                 "converting, a diffusers VAE folder)")
    p.add_argument("--text-encoder", action="append", default=[], metavar="FILE",
                   help="a text encoder file (.safetensors or .gguf); repeatable, in the family's order")


def _parts(args) -> dict:
    return {"base": args.base, "vae": args.vae, "text_encoders": args.text_encoder}


def _generate_epilog() -> str:
    """The samplers, schedules and each family's defaults, for `generate --help`."""
    import textwrap

    from edgediff.families import FAMILIES
    from edgediff.runtime.samplers import sampler_list
    from edgediff.runtime.schedules import SCHEDULES

    lines = textwrap.wrap(f"samplers: {sampler_list()}. A1111's names ending in a schedule ('DPM++ 2M Karras') "
                          "set both.", 100)
    lines += textwrap.wrap(f"schedules: {', '.join(SCHEDULES)} (or A1111's: Karras, SGM Uniform, Uniform = normal, "
                           "Automatic = the model's).", 100)
    lines += ["", "defaults by model family (a package's scheduler may change them: Flux dev 28 steps, guidance 3.5):"]
    for name, fam in FAMILIES.items():
        d = fam.defaults
        lines.append(f"  {name:13s} {d.steps:2d} steps, {d.sampler} {d.schedule}, guidance {d.guidance:g}, "
                     f"{d.resolution}x{d.resolution}")
    return "\n".join(lines)


# `edgediff bench TOOL ...` runs edgediff.benchmarks.TOOL's main (from any folder: the console
# script's path does not start with the current folder, whose kernels/ would shadow a package)
BENCH_TOOLS = {
    "quality": "PSNR/SSIM of each precision vs the reference, or --draw: the embedded model's draw score",
    "profile": "onnxruntime's profiler on one component: time per operator",
    "int8": "int8-static's choices and per-block cost vs fp32; --kernels: GEMM rates on this CPU",
    "attention": "MultiHeadAttention's CPU paths vs bare GEMMs",
    "vae_memory": "VAE decode whole vs tiled: time and peak memory",
    "loras": "LoRA load time and quality per mode",
    "serve": "what a served request costs over generate",
    "longrun": "resident memory over many images",
    "load": "session creation with and without the optimized-graph cache",
    "fuzz": "fuzz the file readers (pip install atheris)",
    "graph_build": "how long building each full-size component's graph takes",
    "synthetic": "write a full-size diffusers folder with random weights (sd15, sdxl, svd)",
    "synthetic_dit": "write a full-size DiT (flux-schnell, sd35-medium) with random weights as one GGUF file",
    "train_tiny": "train the embedded tiny model",
    "batch": "edgediff batch in this process vs on a local Ray: images/minute, Ray's cost per job and at start",
}


def _scenarios() -> list[tuple[str, str, str]]:
    """(name, model, its opening comment's first sentence) of each scenario in benchmarks/scenarios/."""
    import tomllib

    from edgediff.benchmarks.scenario import SCENARIOS

    rows = []
    for path in sorted(SCENARIOS.glob("*.toml")):
        text = path.read_text(encoding="utf-8")
        try:
            model = str(tomllib.loads(text).get("model", "?"))
        except tomllib.TOMLDecodeError:
            model = "(not valid TOML)"
        lines = text.splitlines()
        header = " ".join(line.lstrip("# ") for line in lines[:next((i for i, x in enumerate(lines)
                                                                       if not x.startswith("#")), len(lines))])
        first = re.split(r"\.(?:\s|$)", header, maxsplit=1)[0]
        rows.append((path.stem, model, first if len(first) <= 100 else first[:97] + "..."))
    return rows


def _bench_epilog() -> str:
    lines = ["scenarios (benchmarks/scenarios/; `edgediff bench --list` says what each runs):"]
    lines += [f"  {name}" for name, _, _ in _scenarios()]
    lines += ["", "tools (`edgediff bench TOOL --help` for each one's arguments):"]
    lines += [f"  {name:14s} {what}" for name, what in BENCH_TOOLS.items()]
    return "\n".join(lines)


# generate's options for images only: an image-to-video model refuses them (a video takes no
# prompt file, batch, mask, hires pass, ControlNet, refiner or SDXL conditioning)
_IMAGE_ONLY = ("prompt_file", "batch_count", "strength", "mask", "mask_blur", "inpainting_fill", "inpaint_full_res",
               "inpaint_full_res_padding", "invert_mask", "hires_scale", "hires_width", "hires_height",
               "hires_upscaler", "hires_steps", "hires_strength", "controlnet", "control_image",
               "control_preprocessor", "control_start", "control_end", "clip_skip", "refiner", "refiner_start",
               "original_size", "crop", "target_size", "aesthetic_score", "negative_aesthetic_score",
               "cache_interval")
# generate's options for image-to-video models (Pipeline.generate's names), passed on only when given
_VIDEO_OPTIONS = ("frames", "fps", "motion_bucket_id", "noise_aug_strength", "min_guidance", "decode_chunk")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgediff", description="Quantized edge inference for diffusion image models.")
    p.add_argument("--version", action="version", version=f"edgediff {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="convert a diffusers folder or checkpoint into a package")
    c.add_argument("source", help="diffusers folder, .safetensors checkpoint, or builtin:NAME")
    c.add_argument("--output", "-o", required=True, help="package folder to create")
    c.add_argument("--format", choices=("onnx", "gguf"),
                   help="onnx (a folder of graphs) or gguf (one file stable-diffusion.cpp also reads); "
                        "default: gguf when --output ends in .gguf, else onnx")
    c.add_argument("--precision",
                   help="onnx: fp32, fp16, int8 (= int8-static), int8-static, int8-weights or int4; gguf: f32, f16, q8_0, "
                        "q5_0, q5_1, q4_0 or q4_1; or per component, e.g. unet=int4,text_encoder=int8,vae=fp16. "
                        "Default: fp32; a GGUF source keeps its own types (nothing is requantized)")
    c.add_argument("--rule", action="append", default=[], metavar="REGEX=PRECISION",
                   help="give weights whose name matches REGEX this precision (or 'keep'); repeatable")
    c.add_argument("--family", default="auto", help="model family, or auto to detect it")
    c.add_argument("--prediction", choices=("eps", "v"), help="override the prediction type")
    c.add_argument("--allow-pickle", action="store_true",
                   help="read pickle checkpoints (.ckpt/.pt/.bin) with torch.load(weights_only=True)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--quantize-convolutions", action="store_true",
                   help="gguf: store convolution weights in the block type too (ComfyUI-GGUF's reshaped layout): "
                        "smaller, and less memory in edgediff, but stable-diffusion.cpp cannot read the file")
    c.add_argument("--deep-cache", action="store_true",
                   help="also write the U-Net's shallow branch, so `generate --cache-interval N` can reuse its "
                        "deep features across steps (DeepCache; SD 1.x/2.x/SDXL, ONNX packages)")
    _parts_arguments(c)

    g = sub.add_parser("generate", help="generate images (or, with an image-to-video model, a video) with a "
                                        "converted package",
                       description="Generate images, or with an image-to-video model (Stable Video Diffusion) a video "
                                   "from --init-image. Options left out take the model's own defaults (below).",
                       epilog=_generate_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--model", "-m",
                   help="package folder (from `edgediff convert`), .gguf or .safetensors file; default: the "
                        "embedded tiny model")
    prompts = g.add_mutually_exclusive_group()  # one is required, but for an image-to-video model (none)
    prompts.add_argument("--prompt", "-p", help="what to draw (an image-to-video model takes no text)")
    prompts.add_argument("--prompt-file", metavar="FILE",
                         help="one prompt a line, or JSON lines with fields of their own: prompt, negative_prompt, "
                              "seed, steps, width, height, guidance (or cfg_scale), sampler, schedule")
    g.add_argument("--negative-prompt", "-n", default="", help="what to keep out (default: nothing)")
    g.add_argument("--batch-count", type=int, default=1, metavar="N",
                   help="images per prompt, seeds counting up from --seed as A1111's batch count (default 1); "
                        "several images are numbered: OUT-00000.png, OUT-00001.png, ...")
    g.add_argument("--steps", type=int, help="denoising steps (default: the model's, e.g. 20 for SD 1.x)")
    g.add_argument("--guidance", "--cfg", type=float,
                   help="classifier-free guidance scale, A1111's CFG scale (default: the model's, e.g. 7.5)")
    g.add_argument("--sampler", help="edgediff's or A1111's name, e.g. dpmpp_2m or 'DPM++ 2M Karras' (which also "
                                     "sets the schedule); default: the model's. Listed below")
    g.add_argument("--schedule", help="sigma schedule, e.g. karras (default: the model's). Listed below")
    g.add_argument("--seed", type=int, help="starting-noise seed (default: random; the file's parameters keep it)")
    g.add_argument("--width", type=int, help="pixels, a multiple of 8 (16 for SD3/Flux); default: the model's size")
    g.add_argument("--height", type=int, help="pixels (default: the model's size)")
    g.add_argument("--force", action="store_true",
                   help="run even when the memory estimate says the size does not fit this machine")
    g.add_argument("--init-image", help="start from this image (img2img); an image-to-video model's first frame "
                                        "(required for one)")
    g.add_argument("--strength", type=float, default=0.75, help="img2img: how much to change (0, 1]")
    g.add_argument("--mask", metavar="FILE",
                   help="inpainting, with --init-image: repaint where this image is white (or, in an RGBA image with "
                        "transparency, where it is painted) and keep the rest")
    g.add_argument("--mask-blur", type=float, default=4, metavar="PIXELS",
                   help="inpainting: Gaussian blur of the mask's edge (default 4, as A1111)")
    g.add_argument("--inpainting-fill", type=int, choices=(0, 1, 2, 3), default=1,
                   help="inpainting: what the masked area starts from, A1111's 'masked content': 0 fill, 1 original "
                        "(default), 2 latent noise, 3 latent nothing")
    g.add_argument("--inpaint-full-res", action="store_true",
                   help="inpainting, A1111's 'only masked': draw the mask's box at --width x --height (default: the "
                        "model's size) and paste it back into the image")
    g.add_argument("--inpaint-full-res-padding", type=int, default=32, metavar="PIXELS",
                   help="inpainting with --inpaint-full-res: pixels around the mask's box (default 32)")
    g.add_argument("--invert-mask", action="store_true",
                   help="inpainting: repaint where the mask is black (A1111's 'inpaint not masked')")
    g.add_argument("--hires-scale", type=float, metavar="X",
                   help="hires fix (A1111's two passes): draw at --width x --height, upscale X times and draw "
                        "again from there")
    g.add_argument("--hires-width", type=int, default=0, metavar="PIXELS",
                   help="hires fix to this width (with --hires-height too: covered, then cropped; alone: the "
                        "height in proportion); instead of --hires-scale")
    g.add_argument("--hires-height", type=int, default=0, metavar="PIXELS", help="hires fix to this height")
    g.add_argument("--hires-upscaler", default="Latent", metavar="NAME|FILE",
                   help="hires fix upscaler: Latent (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent "
                        "(bicubic antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', Lanczos, Nearest, "
                        "None, or an ESRGAN-family model file (.pth/.safetensors)")
    g.add_argument("--hires-steps", type=int, default=0, metavar="N",
                   help="hires fix: steps of the second pass (default 0: as many as --steps)")
    g.add_argument("--hires-strength", type=float, default=0.7, metavar="S",
                   help="hires fix: A1111's denoising strength of the second pass, in (0, 1] (default 0.7)")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="a ControlNet (converted package, diffusers folder or .safetensors file) steering the U-Net "
                        "with the --control-image given after it, at STRENGTH (default 1); repeat the pair for several")
    g.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="the control image of the --controlnet before it (an edge map, a pose, a depth map...)")
    g.add_argument("--control-preprocessor", choices=("none", "canny"), default="none",
                   help="what every control image is made into first: none (as it is, default) or canny edges")
    g.add_argument("--control-start", type=float, default=0.0, metavar="F",
                   help="the part of the steps the ControlNets start acting at (0..1, default 0)")
    g.add_argument("--control-end", type=float, default=1.0, metavar="F",
                   help="the part of the steps the ControlNets stop acting after (0..1, default 1)")
    g.add_argument("--clip-skip", type=int, default=1, help="1 = last layer, 2 = the one before (A1111)")
    g.add_argument("--refiner", help="an SDXL refiner package that finishes the image (base to refiner)")
    g.add_argument("--refiner-start", type=float, default=0.8,
                   help="fraction of the schedule the base runs before the refiner takes over (default 0.8)")
    g.add_argument("--original-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL size conditioning: the size the picture was 'taken' at (default: the image size)")
    g.add_argument("--crop", type=int, nargs=2, metavar=("TOP", "LEFT"), default=(0, 0),
                   help="SDXL crop conditioning (default 0 0: uncropped)")
    g.add_argument("--target-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL target-size conditioning (default: the image size)")
    g.add_argument("--aesthetic-score", type=float, help="SDXL refiner: score for the prompt (default 6.0)")
    g.add_argument("--negative-aesthetic-score", type=float,
                   help="SDXL refiner: score for the negative prompt (default 2.5)")
    g.add_argument("--output", "-o", help="image to write: .png, .jpg/.jpeg or .webp, parameters inside as "
                                          "A1111 writes them (default: edgediff-SEED.png); an image-to-video "
                                          "model's video: animated .webp or .gif (default: edgediff-SEED.webp, "
                                          "or none with --frames-dir alone)")
    g.add_argument("--frames", type=int, metavar="N",
                   help="image-to-video: frames to make (default: the model's, 14 for SVD, 25 for SVD-XT)")
    g.add_argument("--fps", type=int, metavar="N",
                   help="image-to-video: frames a second, conditioning the motion and the file's timing (default: "
                        "the model's, 7)")
    g.add_argument("--motion-bucket", "--motion-bucket-id", dest="motion_bucket_id", type=int, metavar="N",
                   help="image-to-video: how much motion, SVD's motion bucket id (default: the model's, 127)")
    g.add_argument("--noise-aug", "--noise-aug-strength", dest="noise_aug_strength", type=float, metavar="F",
                   help="image-to-video: noise added to --init-image's latent; more lets the video stray further "
                        "from it (default: the model's, 0.02)")
    g.add_argument("--min-guidance", type=float, metavar="F",
                   help="image-to-video: guidance on the first frame, ramping to --guidance on the last (default: "
                        "the model's, 1.0)")
    g.add_argument("--decode-chunk", type=int, metavar="N",
                   help="image-to-video: frames the VAE decodes at a time (default: the model's, 0: as many as "
                        "memory allows)")
    g.add_argument("--frames-dir", metavar="DIR",
                   help="image-to-video: also (or, without --output, only) write each frame as DIR/NAME_000.png, "
                        "... with the parameters inside (NAME: --output's, else edgediff-SEED; DIR is created)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a LoRA file (kohya/A1111, LyCORIS or diffusers/PEFT .safetensors) at load, "
                        "strength 1 unless given; repeat to stack several")
    g.add_argument("--lora-dir", help="folder of LoRA files for A1111's <lora:NAME:STRENGTH> prompt tags")
    g.add_argument("--lora-mode", choices=("merge", "branch"), default="branch",
                   help="LoRA on quantized weights: branch keeps them and adds a low-rank side branch "
                        "(default); merge dequantizes, changes and requantizes them")
    g.add_argument("--embeddings-dir", metavar="DIR",
                   help="folder of textual inversion embeddings (.safetensors, .pt, .bin; subfolders too): a "
                        "file's name without its extension in a prompt stands for its vectors, as in A1111")
    _parts_arguments(g)
    g.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    g.add_argument("--precision", default="auto", choices=RUN_PRECISIONS,
                   help="auto (default): the package's own precision; bf16: OpenVINO's bf16 on CPUs that "
                        "compute it (AVX-512 BF16, AMX), faster and less exact (refused elsewhere)")
    g.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    g.add_argument("--keep-loaded", action="store_true",
                   help="keep every component in memory instead of releasing each after use (faster "
                        "repeated images; generate says what it costs)")
    g.add_argument("--memory-budget", type=float, metavar="GB",
                   help="the most memory the run may need: it gives up speed to fit (fp32 activations, VAE "
                        "tiles, guidance in two halves) or is refused before loading, with what it needs "
                        "(default: fit the memory available, warn when it cannot)")
    g.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="run the whole U-Net every N steps and only its shallow branch on the deep features "
                        "kept in between (DeepCache; needs a package converted with --deep-cache; default 1: off)")
    g.add_argument("--vae-tile", type=int, default=0, metavar="PIXELS",
                   help="decode (and encode) the image in overlapping tiles of this size, blended: "
                        "bounded memory for large images (512 is a good start; default 0: whole)")
    g.add_argument("--preview", metavar="FILE",
                   help="write a cheap preview of the image being sampled to FILE after every step (the latent "
                        "mapped to RGB, no VAE: what the server's /progress shows); PNG, JPEG or WebP by extension")
    g.add_argument("--no-graph-cache", dest="graph_cache", action="store_false",
                   help="do not keep onnxruntime's optimized graphs between runs (see `edgediff cache`)")
    g.add_argument("--split-guidance", action="store_true",
                   help="run the denoiser on prompt and negative prompt separately (less memory)")
    g.add_argument("--weights", choices=("compact", "expanded"), default="compact",
                   help="GGUF weights stored as F16 (convolutions): compact keeps them so, memory-mapped "
                        "(default); expanded converts them to fp32 at load: faster steps, more memory")
    g.add_argument("--accuracy-level", choices=("auto", "0", "4"), default="auto",
                   help="GGUF block weights in MatMulNBits: 0 computes with fp32 activations, 4 with int8 "
                        "activations (faster with VNNI, more memory); auto (default) takes 4 where it measured "
                        "faster on this CPU")
    # what an image-to-video model refuses when given: any value but these defaults
    g.set_defaults(image_only_defaults={dest: g.get_default(dest) for dest in _IMAGE_ONLY})

    b = sub.add_parser("bench", help="run a benchmark scenario (TOML), or a benchmark tool: edgediff bench TOOL ...",
                       usage="edgediff bench [-h] [--list] [SCENARIO] [options] | edgediff bench TOOL [tool arguments]",
                       epilog=_bench_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("scenario", nargs="?", help="scenario file, or the name of one in benchmarks/scenarios/")
    b.add_argument("--list", action="store_true", help="list the scenarios (model, what each measures) and the tools")
    b.add_argument("--output", "-o", help="results folder (default: bench-results/NAME-TIME)")
    b.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS",
                   help="run the scenario's runs on Ray (pip install 'edgediff[ray]'): a local cluster, or the "
                        "one at ADDRESS; one run at a time per node, each row naming its node's CPU (paths must "
                        "be the same on every node)")
    b.add_argument("--reconvert", action="store_true",
                   help="convert the model again instead of using the packages cached by an earlier run")
    b.add_argument("--install-peer", metavar="PEER",
                   help="create the environment of a peer whose packages clash with edgediff's")

    a = sub.add_parser("batch", help="generate the images of a JSONL file of jobs (A1111's fields) into a folder, "
                                     "resumably; --ray spreads them over a Ray cluster",
                       description="One image per line of JOBS, a JSON object with the A1111 API's fields (prompt, "
                                   "negative_prompt, seed, steps, cfg_scale, width, height, sampler_name, scheduler, "
                                   "denoising_strength, init_images as [PATH], model); what a line leaves out comes "
                                   "from the model. Line N (from 0) is written as OUTPUT/NNNNN.png, then recorded in "
                                   "OUTPUT/results.jsonl. The same command again skips the lines finished (PNG there, "
                                   "sha256 as recorded) and runs the rest. A bad line is reported by number and "
                                   "skipped. Paths in JOBS are read from its folder.")
    a.add_argument("jobs", metavar="JOBS", help="the JSONL file of jobs, one image a line")
    a.add_argument("--output", "-o", required=True, metavar="DIR", help="folder of the images and results.jsonl "
                                                                      "(created; a rerun continues it)")
    a.add_argument("--model", "-m", help="the model of lines without a 'model' field: package folder, .gguf or "
                                         ".safetensors file, builtin:NAME (default: the embedded tiny model)")
    a.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    a.add_argument("--threads", type=int, help="CPU threads for onnxruntime (with --ray: per actor, default 1)")
    a.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data with a pool of actors that each keep the model loaded: on a local Ray "
                        "started for the run (or the cluster RAY_ADDRESS names), or the cluster at ADDRESS "
                        "(pip install 'edgediff[ray]'; models must be at the same path on every node)")
    a.add_argument("--actors", type=int, metavar="N",
                   help="with --ray: actors per model (default: the cluster's CPUs / --threads)")

    i = sub.add_parser("inspect", help="describe a package, checkpoint, diffusers folder or GGUF file")
    i.add_argument("path", help="package folder, .gguf, .safetensors (checkpoint or LoRA), diffusers folder, or "
                                "builtin:NAME")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--allow-pickle", action="store_true",
                   help="read pickle checkpoints (.ckpt/.pt/.bin) with torch.load(weights_only=True)")

    k = sub.add_parser("cache", help="list or remove what is kept between runs: optimized graphs (onnxruntime), "
                                     "repacked GGUF weights, compiled models (OpenVINO)")
    k.add_argument("package", nargs="?", help="only the entries made from this package folder or model file")
    k.add_argument("--clear", action="store_true", help="remove them")

    v = sub.add_parser("serve", help="keep models loaded behind AUTOMATIC1111's web API and a web page "
                                     "(pip install 'edgediff[serve]')")
    v.add_argument("--models", required=True, help="folder of packages and .gguf files to serve")
    v.add_argument("--model", help="the one to load first (default: the first by name)")
    v.add_argument("--host", default="127.0.0.1", help="address to answer on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=7860, help="TCP port (default 7860, as A1111's)")
    v.add_argument("--listen", action="store_true", help="answer on every address (0.0.0.0); needs --api-auth")
    v.add_argument("--api-auth", metavar="USER:PASSWORD", help="HTTP basic authentication, as A1111's")
    v.add_argument("--insecure", action="store_true", help="allow --listen without --api-auth")
    v.add_argument("--low-memory", action="store_true", help="release each component after use")
    v.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    v.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    v.add_argument("--max-side", type=int, default=2048, help="largest width or height a request may ask")
    v.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask (default 150)")
    v.add_argument("--max-images", type=int, default=16, help="most images a request may ask (batch x n_iter)")
    v.add_argument("--queue", type=int, default=4, help="jobs waiting or running; more get 503")
    v.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MB (default 32)")
    v.add_argument("--lora-dir", help="folder of LoRA files for <lora:NAME:STRENGTH> tags in prompts")
    v.add_argument("--lenient", action="store_true",
                   help="answer requests that set A1111 fields edgediff does not implement with 200, listing "
                        "them in info['ignored'] (default: 422 naming them), for front ends that send everything")
    v.add_argument("--embeddings-dir", metavar="DIR", help="textual inversion embeddings, used by file name in prompts "
                   "(A1111's embeddings folder) and listed at /sdapi/v1/embeddings")
    v.add_argument("--upscalers-dir", metavar="DIR", help="ESRGAN-family upscaler files (.pth, .safetensors) for "
                   "/sdapi/v1/extra-single-image, listed at /sdapi/v1/upscalers")
    v.add_argument("--controlnet-dir", metavar="DIR", help="ControlNets (converted packages, diffusers folders, "
                   ".safetensors files) for the ControlNet extension's API units, listed at /controlnet/model_list")
    v.add_argument("--outputs", metavar="DIR",
                   help="where images asked to be saved go, as A1111's outputs/txt2img-images/DATE/ "
                        "(default: outputs beside the models folder)")

    u = sub.add_parser("upscale", help="enlarge an image with an ESRGAN-family model (ESRGAN, Real-ESRGAN, "
                                       "Real-ESRGAN compact)")
    u.add_argument("image", help="the image to enlarge")
    u.add_argument("--model", required=True, metavar="FILE", help="the upscaler: a .pth/.pt file (read without running anything in "
                                                  "it) or a .safetensors file")
    u.add_argument("--scale", type=float, metavar="N", help="how many times larger (default: the model's own scale; another runs "
                                               "the model again while smaller, then resizes with Lanczos)")
    u.add_argument("--tile", type=int, metavar="PX", help="tile side in input pixels (default 192; 0: the whole image at once)")
    u.add_argument("--output", "-o", required=True, metavar="OUT", help="the image to write: .png, .jpg or .webp")
    u.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default): CUDA where onnxruntime-gpu has it, else the CPU")
    u.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    return p


def _convert(args) -> int:
    from edgediff.convert import convert

    def say(msg: str) -> None:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    manifest = convert(args.source, args.output, fmt=args.format, precision=args.precision,
                       family=args.family, prediction=args.prediction,
                       allow_pickle=args.allow_pickle, overwrite=args.overwrite, rules=args.rule,
                       progress=say, quantize_convolutions=args.quantize_convolutions, deep_cache=args.deep_cache,
                       **_parts(args))
    size = sum(c.bytes for c in manifest.components.values())
    kinds = ", ".join(sorted({c.precision for c in manifest.components.values()}))
    print(f"wrote {args.output} ({manifest.family}, {kinds}, {_human(size)}) "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def _runnable(model: str | None, say, **parts):
    """A package to open for --model: the package itself; for builtin:NAME (None: the embedded
    default), a GGUF or single .safetensors file (or a model given in parts), the cached package
    that runs it (convert.adopt.runnable)."""
    from edgediff.convert.adopt import runnable

    return runnable(model, progress=say, **parts)


# --prompt-file's JSON fields -> generate's; A1111's API names too
_JOB_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
               "width": "width", "height": "height", "guidance": "guidance", "cfg_scale": "guidance",
               "sampler": "sampler", "sampler_name": "sampler", "schedule": "schedule", "scheduler": "schedule"}
_JOB_TYPES = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "width": int, "height": int,
              "guidance": float, "sampler": str, "schedule": str}


def _names(sampler: str | None, schedule: str | None, default_schedule: str | None = None):
    """edgediff's or A1111's sampler and schedule names -> edgediff's (the schedule given wins over
    one a sampler name carries, which wins over `default_schedule`)."""
    from edgediff.runtime.samplers import resolve_sampler
    from edgediff.runtime.schedules import resolve_schedule

    sampler, carried = resolve_sampler(sampler) if sampler else (None, None)
    return sampler, resolve_schedule(schedule) if schedule else carried or default_schedule


def _jobs(args) -> list[dict]:
    """What to generate: one dict of `Pipeline.generate` arguments per prompt, from the options,
    or per line of --prompt-file over them."""
    sampler, schedule = _names(args.sampler, args.schedule)
    base = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                width=args.width, height=args.height, guidance=args.guidance, sampler=sampler, schedule=schedule)
    if args.prompt is not None:
        if re.fullmatch(r"@\S+", args.prompt):  # curl's @file is not ours: one way to read a file, said so
            raise UsageError(f"--prompt {args.prompt}: to read prompts from a file, give --prompt-file "
                             f"{args.prompt[1:]} (a prompt that is one '@word' is taken for that mistake; add words "
                             "to mean the text)")
        return [base]
    path = Path(args.prompt_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"--prompt-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompt-file {path}: cannot be read as UTF-8 text ({exc})") from None
    jobs = []
    for number, line in enumerate(lines, 1):
        where = f"--prompt-file {path} line {number}"
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            jobs.append({**base, "prompt": line.strip()})
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc}); write one prompt a line, or one JSON object") from None
        job = dict(base)
        for key, value in fields.items():
            if key not in _JOB_FIELDS:
                raise UsageError(f"{where}: unknown field '{key}' (known: {', '.join(_JOB_FIELDS)})")
            kind = _JOB_TYPES[_JOB_FIELDS[key]]
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise UsageError(f"{where}: '{key}' must be {kind.__name__ if kind is not str else 'text'} (got {value!r})")
            job[_JOB_FIELDS[key]] = value
        if "prompt" not in fields:
            raise UsageError(f"{where}: no 'prompt' field")
        try:
            job["sampler"], job["schedule"] = _names(fields.get("sampler") or fields.get("sampler_name") or sampler,
                                                     fields.get("schedule") or fields.get("scheduler"), schedule)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        jobs.append(job)
    if not jobs:
        raise UsageError(f"--prompt-file {path}: no prompts in it (one a line, or JSON lines with a 'prompt')")
    return jobs


def _check_memory(pipe, args, job: dict) -> None:
    """Refuse, before anything loads, an image whose lowest-memory plan (runtime.memory's estimate:
    int8 activations off, the VAE in 256-pixel tiles, guidance in halves) cannot fit the memory
    this machine has available. --force runs it anyway; with --memory-budget the pipeline decides.
    Not for videos (_generate_video skips it: the estimate is of one image, not of frames)."""
    from edgediff.runtime import memory
    from edgediff.runtime.image import open_image

    free = memory.available()
    if args.force or args.memory_budget is not None or free is None:
        return
    m = pipe.manifest
    width, height = job["width"], job["height"]
    if width is None and height is None and args.init_image:
        width, height = (s // m.size_multiple * m.size_multiple for s in open_image(args.init_image).size)
    width, height = width or int(m.defaults["width"]), height or int(m.defaults["height"])
    if width <= 0 or height <= 0:
        return  # generate says what is wrong with the size
    guidance = float(m.defaults["guidance"] if job["guidance"] is None else job["guidance"])
    level = pipe.options.accuracy_level
    tile = 256 if width * height > 256 * 256 and (not args.vae_tile or args.vae_tile > 256) else args.vae_tile
    stages = memory.stages(pipe.package, width=width, height=height, img2img=bool(args.init_image),
                           guided=guidance > 1 and m.conditioning.cfg and not m.conditioning.guidance_embedded,
                           level=dict.fromkeys(level, 0) if isinstance(level, dict) else 0, vae_tile=tile,
                           split_guidance=True, keep_loaded=args.keep_loaded, expand=args.weights == "expanded")
    over = [stage for stage, need in stages.items() if need > free]
    if not over:
        return
    need = max(stages.values())
    parts = ", ".join(f"{stage} {b / memory.GB:.1f}" for stage, b in stages.items())
    raise UsageError(f"{pipe.package.name} at {width}x{height} needs an estimated {need / memory.GB:.1f} GB in its "
                     f"lowest-memory plan (GB per stage: {parts}); this machine has {free / memory.GB:.1f} GB "
                     f"available, too little for {' and '.join(over)}. Choose a smaller size, or give --force to try "
                     "anyway")


def _previewer(path: str | None, pipe):
    """generate's on_step for --preview: the latent so far, as runtime.preview shows it, written
    atomically (a viewer watching the file never reads half of one)."""
    if path is None:
        return None
    from edgediff.runtime.image import save_image
    from edgediff.runtime.preview import preview

    # a video's latent (1, frames, C, h, w): its first frame
    return lambda step, denoised: save_image(preview(denoised[:, 0] if denoised.ndim == 5 else denoised,
                                                     pipe.manifest), path, f"Step: {step}")


def _outputs(args, seeds: list[int]) -> list[Path]:
    """The file of each image: --output (numbered OUT-00000.png ... when there are several), or
    edgediff-SEED.png (00000-SEED numbered, as A1111's)."""
    if args.output:
        out = Path(args.output)
        if len(seeds) == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{n:05d}{out.suffix}") for n in range(len(seeds))]
    if len(seeds) == 1:
        return [Path(f"edgediff-{seeds[0]}.png")]
    return [Path(f"edgediff-{n:05d}-{seed}.png") for n, seed in enumerate(seeds)]


def _controlnets(args) -> list:
    """--controlnet PATH[:STRENGTH] and --control-image FILE, in pairs."""
    from edgediff.runtime.controlnet import ControlNetUnit

    if len(args.controlnet) != len(args.control_image):
        raise UsageError(f"{len(args.controlnet)} --controlnet and {len(args.control_image)} --control-image given; "
                         "give them in pairs: --controlnet PATH[:STRENGTH] --control-image FILE")
    from edgediff.api import adopted_controlnets

    return adopted_controlnets([ControlNetUnit.parse(spec, image, start=args.control_start, end=args.control_end,
                                                     preprocessor=args.control_preprocessor)
                                for spec, image in zip(args.controlnet, args.control_image, strict=True)])


def _generate(args) -> int:
    import random

    from edgediff.runtime import Pipeline
    from edgediff.runtime.conditioning import SizeConditioning
    from edgediff.runtime.image import VIDEO_FORMATS, image_format, save_image

    kind = _model_kind(args.model)  # (makes videos, its name) where told before loading; else after
    if args.output:
        out = Path(args.output)
        if not out.parent.is_dir():
            raise UsageError(f"--output {out}: the folder {out.parent} does not exist; create it first")
        if out.is_dir():
            raise UsageError(f"--output {out}: is a folder; name the image file to write")
        try:
            if kind is None and out.suffix.lower() not in VIDEO_FORMATS:  # an image's or a video's, told at load
                image_format(out)
        except UsageError as exc:
            raise UsageError(f"--output {exc}") from None
    if args.frames_dir is not None and Path(args.frames_dir).exists() and not Path(args.frames_dir).is_dir():
        raise UsageError(f"--frames-dir {args.frames_dir}: is a file; name a folder (created if missing)")
    if kind is not None:
        _check_kind(args, *kind)
    if args.preview:
        try:
            image_format(args.preview)
        except UsageError as exc:
            raise UsageError(f"--preview {exc}") from None
    if args.batch_count < 1:
        raise UsageError(f"--batch-count must be at least 1 (got {args.batch_count})")
    jobs = _jobs(args) if args.prompt is not None or args.prompt_file is not None else []
    controlnets = _controlnets(args)
    say = lambda msg: print(f"[convert] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    model = _runnable(args.model, say, **_parts(args))
    options = dict(device=args.device, precision=args.precision, threads=args.threads, keep_loaded=args.keep_loaded,
                   split_guidance=args.split_guidance, weights=args.weights, accuracy_level=args.accuracy_level,
                   graph_cache=args.graph_cache, vae_tile=args.vae_tile, memory_budget=args.memory_budget,
                   embeddings_dir=args.embeddings_dir)
    pipe = Pipeline(model, loras=args.lora, lora_dir=args.lora_dir, lora_mode=args.lora_mode, **options)
    video = bool(pipe.manifest.conditioning.image_encoder)
    if kind is None:
        _check_kind(args, video, f"{pipe.package.name} ({pipe.manifest.family})")
    if video:
        return _generate_video(args, pipe)
    refiner = Pipeline(_runnable(args.refiner, say), **options) if args.refiner else None
    size = SizeConditioning(
        original_size=args.original_size and tuple(args.original_size), crop=tuple(args.crop),
        target_size=args.target_size and tuple(args.target_size), aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score)
    for job in jobs:  # every image's size checked before the first loads anything
        _check_memory(pipe, args, job)
    images = []  # (job, seed): A1111's batch count counts the seed up from the job's
    for job in jobs:
        first = random.randrange(2**32) if job["seed"] is None else job["seed"]
        images += [(job, first + i) for i in range(args.batch_count)]
    paths = _outputs(args, [seed for _, seed in images])
    for (job, seed), path in zip(images, paths, strict=True):
        image = pipe.generate(
            job["prompt"], job["negative_prompt"], steps=job["steps"], guidance=job["guidance"],
            sampler=job["sampler"], schedule=job["schedule"], seed=seed, width=job["width"],
            height=job["height"], init_image=args.init_image, strength=args.strength,
            clip_skip=args.clip_skip, size_conditioning=size, refiner=refiner, refiner_start=args.refiner_start,
            progress=ProgressBar("sampling", lambda: pipe.timings.steps), cache_interval=args.cache_interval,
            on_step=_previewer(args.preview, pipe), mask=args.mask, mask_blur=args.mask_blur,
            inpainting_fill=args.inpainting_fill, inpaint_full_res=args.inpaint_full_res,
            inpaint_full_res_padding=args.inpaint_full_res_padding, inpainting_mask_invert=args.invert_mask,
            hires_scale=args.hires_scale, hires_width=args.hires_width, hires_height=args.hires_height,
            hires_upscaler=args.hires_upscaler, hires_steps=args.hires_steps, hires_strength=args.hires_strength,
            controlnets=controlnets, **_video_options(args),  # given to an image model: the pipeline refuses them
        )
        save_image(image, path, image.info["parameters"])
        print(f"wrote {path} ({image.width}x{image.height}, seed {seed})")
    print(f"device: {pipe.device}")
    print(f"ran: {pipe.ran()}")
    print(f"memory: {pipe.memory_note()}")
    print(f"time: {pipe.timings.summary()}")
    return 0


def _model_kind(model: str | None) -> tuple[bool, str] | None:
    """(whether --model makes videos, its name for messages) where that is known before anything
    loads: the builtin models make images, a package folder's manifest says; None for a file
    that only opening tells about (a GGUF or .safetensors file, adopted first)."""
    if model is None or model.startswith("builtin:"):
        return False, model or "the embedded model"
    path = Path(model)
    if not (path / "edgediff.json").is_file():
        return None
    from edgediff.manifest import Manifest

    try:
        m = Manifest.read(path)
    except Exception:  # noqa: BLE001 - opening the package says what is wrong with it
        return None
    return bool(m.conditioning.image_encoder), f"{path.name} ({m.family})"


def _check_kind(args, video: bool, name: str) -> None:
    """Refuse the options of the other kind of model (an image model's --frames & co. are the
    pipeline's to refuse), a missing prompt for images, and an --output of the wrong type."""
    from edgediff.runtime.image import image_format, video_format

    if video:
        same = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731 - --crop 0 0 is its default (0, 0)
        given = [f"--{dest.replace('_', '-')}" for dest, default in args.image_only_defaults.items()
                 if same(getattr(args, dest)) != same(default)]
        if given:
            raise UsageError(f"{', '.join(given)}: not for image-to-video models; {name} makes a video from "
                             "--init-image (its options: --frames, --fps, --motion-bucket, --noise-aug, "
                             "--min-guidance, --decode-chunk, --frames-dir)")
        for name in ("frames", "fps"):  # the pipeline takes 0 for its default
            if (value := getattr(args, name)) is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1 (got {value})")
    elif args.frames_dir is not None:
        raise UsageError(f"--frames-dir: an option of image-to-video models; {name} makes images: give "
                         "--output FILE")
    elif args.prompt is None and args.prompt_file is None:
        raise UsageError("one of the arguments --prompt/-p --prompt-file is required")
    if args.output:
        try:
            (video_format if video else image_format)(args.output)
        except UsageError as exc:
            raise UsageError(f"--output {exc}") from None


def _video_options(args) -> dict:
    """--frames, --fps, --motion-bucket, ... as Pipeline.generate names them, those given only."""
    return {name: getattr(args, name) for name in _VIDEO_OPTIONS if getattr(args, name) is not None}


def _generate_video(args, pipe) -> int:
    """An image-to-video model's run (Pipeline.generate checks the prompt is absent and
    --init-image given): the frames as an animated WebP or GIF (--output; default
    edgediff-SEED.webp unless --frames-dir alone) and/or one PNG a frame in --frames-dir. The
    pre-load check (_check_memory) is the image's; a video's plan is the pipeline's (runtime.memory
    with the frames: guidance split, the decode chunk), said after the run."""
    import random

    from edgediff.runtime.image import save_image, save_video

    seed = random.randrange(2**32) if args.seed is None else args.seed
    sampler, schedule = _names(args.sampler, args.schedule)
    frames = pipe.generate(
        args.prompt or "", args.negative_prompt, steps=args.steps, guidance=args.guidance, sampler=sampler,
        schedule=schedule, seed=seed, width=args.width, height=args.height, init_image=args.init_image,
        progress=ProgressBar("sampling", lambda: pipe.timings.steps), on_step=_previewer(args.preview, pipe),
        **_video_options(args))
    fps = args.fps or int(pipe.manifest.defaults.get("fps") or 7)  # the pipeline's default, which it ran at
    first = frames[0]
    name = Path(args.output).stem if args.output else f"edgediff-{seed}"
    if args.output or not args.frames_dir:
        path = save_video(frames, Path(args.output or f"{name}.webp"), fps)
        print(f"wrote {path} ({len(frames)} frames, {first.width}x{first.height}, {fps} fps, seed {seed})")
    if args.frames_dir:
        folder = Path(args.frames_dir)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [save_image(frame, folder / f"{name}_{n:03d}.png", frame.info["parameters"])
                 for n, frame in enumerate(frames)]
        print(f"wrote {len(paths)} frames to {folder} ({paths[0].name} ... {paths[-1].name}; "
              f"{first.width}x{first.height}, seed {seed})")
    print(f"device: {pipe.device}")
    print(f"ran: {pipe.ran()}")
    print(f"memory: {pipe.memory_note()}")
    print(f"time: {pipe.timings.summary()}")
    return 0


def _batch(args) -> int:
    from edgediff.batch import run

    for name in ("threads", "actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.actors is not None and args.ray is None:
        raise UsageError("--actors is for --ray runs; without --ray the jobs run in this process")
    summary = None
    try:
        summary = run(args.jobs, args.output, model=args.model, device=args.device, threads=args.threads,
                      ray=args.ray, actors=args.actors, say=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print(f"stopped: what finished is in {args.output}; the same command again runs the rest", file=sys.stderr)
        raise
    print(f"{summary.line()}; {Path(args.output) / 'results.jsonl'}")
    return 1 if summary.failed else 0


def _bench(args) -> int:
    from edgediff.benchmarks.harness import check_runnable, run_scenario
    from edgediff.benchmarks.report import chart, markdown
    from edgediff.benchmarks.scenario import load_scenario

    say = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.install_peer:
        from edgediff.benchmarks.harness import install_peer

        print(f"installed {args.install_peer}: {install_peer(args.install_peer, say)}")
        return 0
    if args.list:
        for name, model, comment in _scenarios():
            print(f"{name:22s} {model:24s} {comment}")
        print("\ntools: edgediff bench TOOL [arguments] (TOOL --help for them)")
        for name, what in BENCH_TOOLS.items():
            print(f"{name:22s} {what}")
        return 0
    if not args.scenario:
        raise UsageError("edgediff bench needs a SCENARIO, a TOOL, --list or --install-peer PEER; "
                         "`edgediff bench --list` lists the scenarios and tools")
    scenario = load_scenario(args.scenario)
    check_runnable(scenario)
    out = Path(args.output or f"bench-results/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--output {out}: exists and is not empty; choose another folder")
    created = not out.exists()
    try:
        rows = run_scenario(scenario, out, say, args.reconvert, ray=args.ray)
    except BaseException:  # a failed bench leaves no half-filled results folder
        if created:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    (out / "report.md").write_text(markdown(rows, f"{scenario.name}: {scenario.model}"))
    chart(rows, out / "chart.png")
    print(f"wrote {out / 'runs.jsonl'}, {out / 'report.md'}, {out / 'chart.png'}")
    return 0


_KINDS = {"quantized": "run quantized (MatMulNBits)", "blocks": "held in blocks, dequantized as they run",
          "stored": "held as stored", "expanded": "expanded to fp32 at load"}


def _gguf_report(path: Path) -> dict:
    """Family, writer, tensors by type and, for a package, how its weights are held at run time."""
    from edgediff.convert import resolve_family
    from edgediff.convert.sources import open_source
    from edgediff.runtime.gguf_file import GGUFFile
    from edgediff.runtime.package import GGUF_MANIFEST, open_package

    gguf = GGUFFile(path)
    report: dict = {"path": str(path), "kind": "gguf", "writer": gguf.writer}
    try:
        family, layout = resolve_family(open_source(path))
        report.update(family=family.name, title=family.title, layout=layout)
    except EdgediffError as exc:
        report.update(family=None, error=str(exc))
    total = [0, 0, 0]
    report["types"] = {}
    for kind, (tensors, values, size) in sorted(gguf.bytes_by_type().items(), key=lambda kv: -kv[1][2]):
        report["types"][kind] = {"tensors": tensors, "values": values, "bytes": size,
                                 "bits_per_weight": round(8 * size / max(values, 1), 2)}
        total = [total[0] + tensors, total[1] + values, total[2] + size]
    report["tensors"], report["values"], report["bytes"] = total
    report["bits_per_weight"] = round(8 * total[2] / max(total[1], 1), 2)
    report["unsupported"] = gguf.unsupported
    if gguf.string(GGUF_MANIFEST) is not None:
        package = open_package(path)
        report["resident"] = {}
        for mode in ("compact", "expanded"):
            per = {}
            for component, bindings in package.residency(expand=mode == "expanded").items():
                kinds: dict[str, list[int]] = {}
                for b in bindings:
                    entry = kinds.setdefault(b.kind, [0, 0, 0])
                    entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + b.weights, entry[2] + b.resident_bytes
                weights = sum(v[1] for v in kinds.values())
                size = sum(v[2] for v in kinds.values())
                per[component] = {"kinds": {k: {"tensors": v[0], "weights": v[1], "bytes": v[2]}
                                            for k, v in kinds.items()},
                                  "bytes": size, "bits_per_weight": round(8 * size / max(weights, 1), 2)}
            report["resident"][mode] = per
    from edgediff.runtime import weight_cache

    cached = weight_cache.of_package(path)
    report["repacked"] = {"components": len(cached), "bytes": sum(e[2] for e in cached)}
    return report


def _print_gguf(report: dict) -> None:
    print(f"gguf: {report['path']} (written by {report['writer']})")
    if report["family"]:
        print(f"  family: {report['family']} ({report['title']}; {report['layout']} names)")
    else:
        print(f"  family: unknown: {report['error']}")
    for kind, v in report["types"].items():
        print(f"  {kind:6s} {v['tensors']:5d} tensors {_human(v['bytes']):>10s}  {v['bits_per_weight']:5.2f} bits/weight")
    print(f"  total  {report['tensors']:5d} tensors {_human(report['bytes']):>10s}  "
          f"{report['bits_per_weight']:5.2f} bits/weight")
    for name, kind in report["unsupported"].items():
        print(f"  {name}: {kind}, a type edgediff cannot read")
    if report["repacked"]["components"]:
        print(f"  repacked weights: {_human(report['repacked']['bytes'])} for {report['repacked']['components']} "
              f"components, mapped at every open (`edgediff cache --clear {report['path']}` removes them)")
    if "resident" not in report:
        print("  no stored graphs: `edgediff generate --model FILE` builds them once; "
              "`edgediff convert FILE --output PACKAGE.gguf` stores them")
        return
    for mode, per in report["resident"].items():
        total = sum(c["bytes"] for c in per.values())
        print(f"  in memory with --weights {mode}: {_human(total)}")
        for component, c in per.items():
            parts = "; ".join(f"{v['tensors']} {_KINDS[k]} ({_human(v['bytes'])})" for k, v in c["kinds"].items())
            print(f"    {component:14s} {_human(c['bytes']):>10s} {c['bits_per_weight']:5.2f} bits/weight: {parts}")


def _lora_report(path: Path) -> dict:
    from edgediff.runtime.lora import read_lora

    lora = read_lora(path)
    kinds: dict[str, int] = {}
    for layer in lora.layers.values():
        kind = "convolution" if "down" in layer.tensors and layer.tensors["down"].ndim == 4 else "linear"
        kinds[f"{layer.kind} {kind}"] = kinds.get(f"{layer.kind} {kind}", 0) + 1
    return {"path": str(path), "kind": "lora", "format": lora.format, "family": lora.family(),
            "ranks": lora.ranks, "layers": len(lora.layers), "components": lora.components(),
            "modules": kinds, "unknown_tensors": lora.unknown, "hash": lora.short_hash()}


def _inspect(args) -> int:
    if args.path.startswith("builtin:"):
        from edgediff.convert import resolve_source

        path = resolve_source(args.path)
    else:
        path = Path(args.path)
    from edgediff.runtime.lora import is_lora

    if path.is_file() and path.suffix.lower() == ".safetensors" and is_lora(path):
        r = _lora_report(path)
        if args.json:
            print(json.dumps(r, indent=2))
            return 0
        print(f"LoRA: {path}")
        print(f"  format: {r['format']}; for: {r['family'] or 'unknown (no telling from its names and shapes)'}")
        print(f"  {r['layers']} layers, rank {', '.join(map(str, r['ranks']))}; A1111 hash {r['hash']}")
        for name, n in r["components"].items():
            print(f"  {name:16s} {n:4d} layers")
        print("  " + ", ".join(f"{n} {kind}" for kind, n in r["modules"].items()))
        if r["unknown_tensors"]:
            print(f"  {len(r['unknown_tensors'])} tensors are no LoRA part edgediff knows: "
                  f"{', '.join(r['unknown_tensors'][:5])}")
        return 0
    if path.is_file() and path.suffix.lower() == ".gguf":
        report = _gguf_report(path)
        print(json.dumps(report, indent=2)) if args.json else _print_gguf(report)
        return 0
    if (path / "edgediff.json").is_file():
        from edgediff.manifest import Manifest

        m = Manifest.read(path)
        if args.json:
            print(m.to_json(), end="")
            return 0
        print(f"edgediff package: {path}")
        print(f"  family: {m.family} (prediction {m.prediction}, latent {m.latent_channels}ch "
              f"x{m.vae_downscale}, scale {m.latent_scale})")
        for name, c in m.components.items():
            stored = ""
            if c.notes.get("weights_quantized"):
                stored = (f"  ({c.notes['weights_quantized'] / 1e6:.1f}M weights at {c.notes['bits_per_quantized_weight']:.2f} "
                          f"bits with scales, {c.notes['weights_kept'] / 1e6:.1f}M kept)")
            print(f"  {name:14s} {c.precision:12s} {_human(c.bytes):>10s}  {c.file}{stored}")
        print(f"  total: {_human(sum(c.bytes for c in m.components.values()))}; made by {m.created_by} "
              f"from {m.source.get('kind')} {m.source.get('path')}")
        from edgediff.runtime import graph_cache, weight_cache

        for what, cache in (("optimized-graph cache", graph_cache), ("repacked weights", weight_cache)):
            if cached := cache.of_package(path):
                print(f"  {what}: {_human(sum(e[2] for e in cached))} for {len(cached)} components "
                      f"(`edgediff cache --clear {path}` removes it)")
        return 0
    from edgediff.convert import resolve_family
    from edgediff.convert.sources import open_source, summarize

    source = open_source(path, allow_pickle=args.allow_pickle)
    parts = summarize(source)
    try:
        family, layout = resolve_family(source)
        detected = {"family": family.name, "title": family.title, "layout": layout}
    except EdgediffError as exc:
        detected = {"family": None, "error": str(exc)}
    if args.json:
        print(json.dumps({"path": str(path), "kind": source.kind, **detected,
                          "components": {k: {**v, "dtypes": dict(v["dtypes"])} for k, v in parts.items()}},
                         indent=2))
        return 0
    print(f"{source.kind}: {path}")
    if detected["family"]:
        print(f"  family: {detected['family']} ({detected['title']}; {detected['layout']} names)")
    else:
        print(f"  family: unknown: {detected['error']}")
    for name, v in sorted(parts.items()):
        dtypes = ", ".join(f"{k} x{n}" for k, n in v["dtypes"].most_common())
        print(f"  {name:20s} {v['tensors']:5d} tensors {_human(v['bytes']):>10s}  ({dtypes})")
    return 0


def _serve(args) -> int:
    from edgediff.runtime.server import Limits, serve

    host = "0.0.0.0" if args.listen else args.host
    auth = None
    if args.api_auth:
        user, sep, password = args.api_auth.partition(":")
        if not sep or not user or not password:
            raise UsageError("--api-auth must be USER:PASSWORD")
        auth = (user, password)
    if host not in ("127.0.0.1", "localhost", "::1") and auth is None and not args.insecure:
        raise UsageError(f"--host {host} answers other machines: give --api-auth USER:PASSWORD (or --insecure "
                         "to serve them without a password)")
    for name in ("max_side", "max_steps", "max_images", "queue", "max_body_mb"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    limits = Limits(max_body=int(args.max_body_mb * 1024 * 1024), max_side=args.max_side, max_steps=args.max_steps,
                    max_images=args.max_images, queue=args.queue)
    from edgediff.convert.adopt import runnable
    from edgediff.convert.controlnet import controlnet_package

    serve(Path(args.models), args.model, host, args.port, auth, limits, args.low_memory, args.device, args.threads,
          Path(args.lora_dir) if args.lora_dir else None, runnable, lenient=args.lenient,
          outputs=Path(args.outputs) if args.outputs else None,
          embeddings_dir=Path(args.embeddings_dir) if args.embeddings_dir else None,
          upscalers_dir=Path(args.upscalers_dir) if args.upscalers_dir else None,
          controlnets_dir=Path(args.controlnet_dir) if args.controlnet_dir else None,
          controlnet_package=controlnet_package)
    return 0


def _cache(args) -> int:
    from edgediff.runtime import graph_cache, openvino_session, weight_cache

    target = Path(args.package) if args.package else None
    if target is not None and not target.exists():
        raise UsageError(f"{target}: no such package or model file; `edgediff cache` alone lists every entry")
    for what, cache in (("optimized graphs", graph_cache), ("repacked weights", weight_cache)):
        cache.prune()
        found = cache.of_package(target) if target else cache.entries()
        for folder, source, size in found:
            print(f"{_human(size):>10s}  {source or '(unreadable entry)'}")
            if args.clear:
                cache.remove(folder)
        total = _human(sum(e[2] for e in found))
        print(f"{'removed' if args.clear else 'kept'}: {total} in {len(found)} {what} under {cache.root()}")
    compiled = openvino_session.cache_dir()
    if not args.package and compiled.is_dir():  # its files are named by hashes: all or nothing
        size = sum(p.stat().st_size for p in compiled.rglob("*") if p.is_file())
        if args.clear:
            graph_cache.remove(compiled)
        print(f"{'removed' if args.clear else 'kept'}: {_human(size)} of OpenVINO's compiled models under {compiled}")
    return 0


def _upscale(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from edgediff.runtime.image import image_format, save_image
    from edgediff.runtime.upscale import TILE, load_upscaler, upscale

    output, source, model = Path(args.output), Path(args.image), Path(args.model)
    image_format(output)  # the file type, asked before the work
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: its folder {output.parent} does not exist")
    for flag, path in (("IMAGE", source), ("--model", model)):
        if not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive (got {args.threads})")
    try:
        with Image.open(source) as img:
            img.load()
            image = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"IMAGE {source}: not a readable image ({exc})") from None
    started = time.perf_counter()
    upscaler = load_upscaler(model, args.device, args.threads)
    result = upscale(upscaler, image, args.scale, tile=TILE if args.tile is None else args.tile)
    factor = result.width / image.width
    save_image(result, output, f"Postprocess upscale by: {factor:g}, Postprocess upscaler: {upscaler.name}")
    print(f"wrote {output} ({result.width}x{result.height} from {image.width}x{image.height}; {upscaler.name}: "
          f"{upscaler.arch.kind} x{upscaler.scale}) in {time.perf_counter() - started:.1f} s")
    return 0


def _bench_tool(name: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(f"edgediff.benchmarks.{name}").main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message) not in shown:  # one warning per run, however many components meet its cause
            shown.add(str(message))
            print(f"edgediff: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) > 1 and argv[0] == "bench" and argv[1].replace("-", "_") in BENCH_TOOLS:
            return _bench_tool(argv[1].replace("-", "_"), argv[2:])
        args = _parser().parse_args(argv)
        commands = {"convert": _convert, "generate": _generate, "inspect": _inspect, "bench": _bench, "serve": _serve,
                    "cache": _cache, "upscale": _upscale, "batch": _batch}
        with command_line():
            return commands[args.command](args)
    except EdgediffError as exc:
        print(f"edgediff: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgediff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edgediff inspect FILE | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

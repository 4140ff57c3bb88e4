"""stable-diffusion.cpp through stable-diffusion-cpp-python (which compiles it on install), on
the LDM single-file checkpoint of the same weights at its own weight types (f16, q8_0, q4_0), or
on the GGUF file edgediff wrote (sdcpp-gguf-*).
Its "cpu" RNG draws torch's CPU noise, yet its images differ from ours (~20 dB at 512x512,
measured): its quantized weights and sampler details differ."""

from __future__ import annotations

import time
from pathlib import Path


def prepare(config: dict) -> Path:
    """The file sd.cpp reads: the GGUF edgediff wrote (sdcpp-gguf-*), or the single-file
    checkpoint written once from the diffusers folder."""
    if config.get("gguf"):
        return Path(config["gguf"])
    from edgediff.benchmarks.single_file import write_ldm_checkpoint

    path = Path(config["work_dir"]) / "ldm-fp32.safetensors"
    if not path.is_file():
        scratch = path.with_suffix(".partial")
        write_ldm_checkpoint(Path(config["diffusers"]), scratch)
        scratch.rename(path)
    return path


def run(config: dict) -> dict:
    from stable_diffusion_cpp import StableDiffusion

    checkpoint = prepare(config)
    threads = int(config.get("threads") or -1)
    started = time.perf_counter()
    wtype = "default" if config.get("gguf") else config["variant"]  # a GGUF keeps its own types
    sd = StableDiffusion(model_path=str(checkpoint), wtype=wtype, n_threads=threads,
                         rng_type="cpu", sampler_rng_type="cpu", verbose=False)
    load = time.perf_counter() - started

    def once(steps: int) -> dict:
        marks = []
        t0 = time.perf_counter()
        try:
            images = sd.generate_image(
                prompt=config["prompt"], negative_prompt=config["negative_prompt"], width=config["size"],
                height=config["size"], cfg_scale=config["guidance"], sample_method=config["sampler"],
                sample_steps=steps, seed=config["seed"],
                progress_callback=lambda step, total, _t: marks.append(time.perf_counter()))
        except ValueError as exc:  # the bindings dereference the NULL sd.cpp returns on failure
            raise RuntimeError("stable-diffusion.cpp returned no image: it did not recognise the checkpoint "
                               "(it knows the real SD architectures only) or failed while sampling") from exc
        total = time.perf_counter() - t0
        step_marks = marks[-steps:] if len(marks) >= steps else marks
        steps_s = [b - a for a, b in zip(step_marks, step_marks[1:], strict=False)]
        return {"image": images[0], "steps_s": steps_s, "total_s": total}

    once(1)  # warm-up
    result = once(config["steps"])
    result["image"].convert("RGB").save(config["image"])
    result["image"] = config["image"]
    # sd.cpp reports no text-encoder or VAE time of its own: the stages are not separable here
    return {**result, "text_encode_s": None, "vae_decode_s": None, "load_cold_s": load, "load_warm_s": None,
            "provider": f"stable-diffusion.cpp (stable-diffusion-cpp-python), {config['variant']}"}

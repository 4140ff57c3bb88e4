"""How much memory a run needs, estimated before anything is loaded, and the cheapest way to run
within a budget.

A run holds one component at a time (text encoders, then the denoiser, then the VAE; with
`--keep-loaded` all of them). A stage needs the process itself, the weights of what is loaded,
and the activations of the component running. Weights are counted from what will be bound
(kernels.bind's `Binding.resident_bytes`, MatMulNBits' larger prepacked form at accuracy level
4) or from the component files; activations come from `families.Memory`, measured per family at
full size and scaled with the work (latent pixels and batch, tokens, image pixels). So the
figures are estimates, close for the architectures measured.

With a budget (`--memory-budget GB`), the plan gives up speed for memory in this order until the
estimate fits: MatMulNBits' int8 activations (accuracy level 0: prepacked weights 0.8x), the VAE in
512-pixel tiles, guidance as two half batches, 256-pixel tiles. If nothing fits, the run is
refused before anything is loaded, with what it would need.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

from edgediff.errors import UsageError, arg
from edgediff.families import get_family

GB = 2 ** 30  # as `free -g`, task managers and a laptop's "16 GB" count it
PROCESS = 0.2e9  # Python, NumPy, onnxruntime and tokenizers before any model (measured 180 MB)
LEVEL4 = 1.25  # MatMulNBits' prepacked bytes at accuracy level 4 per repacked byte (Flux: 8.66 GB for 6.93)
# weights kept in blocks are dequantized to fp32 as their nodes run: what that holds, in fp32 copies
# of the largest (SD 1.5's U-Net with q4_0 convolutions: 0.48 GB above the rest, its largest 118 MB)
DEQUANTIZING = 4


@dataclass(frozen=True)
class Plan:
    """How a run goes: the options that decide its memory, and what each stage needs."""

    accuracy_level: int | dict[int, int]
    vae_tile: int
    split_guidance: bool
    stages: dict[str, float]  # stage -> estimated peak bytes

    @property
    def need(self) -> float:
        return max(self.stages.values())

    def describe(self) -> str:
        worst = max(self.stages, key=self.stages.get)
        return f"{self.need / GB:.1f} GB at its peak ({worst})"


def available() -> float | None:
    """What the system can give this process without swapping (Linux: MemAvailable)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _weights(package, level: int | dict[int, int], expand: bool = False) -> dict[str, float]:
    """Bytes each component's weights hold once its session is open."""
    from edgediff.kernels.gguf_blocks import FORMATS

    bound = package.residency(expand)
    out = {}
    for name, entry in package.manifest.components.items():
        if name not in bound:
            out[name] = float(entry.bytes)
            continue
        total = 0.0
        for b in bound[name]:
            lv = level.get(FORMATS[b.stored].nbits, 0) if isinstance(level, dict) else level
            total += b.resident_bytes * (LEVEL4 if b.kind == "quantized" and lv == 4 else 1.0)
        blocks = [b.weights for b in bound[name] if b.kind == "blocks"]
        out[name] = total + DEQUANTIZING * 4 * max(blocks, default=0)
    return out


def stages(package, *, width: int, height: int, guided: bool, level: int | dict[int, int], vae_tile: int,
           split_guidance: bool, img2img: bool, keep_loaded: bool, expand: bool = False, frames: int = 1,
           decode_frames: int = 1) -> dict[str, float]:
    """Estimated peak bytes of each stage of one image (of a video: `frames` frames through the
    denoiser at once, `decode_frames` through the VAE decoder at once)."""
    m = package.manifest
    mem = get_family(m.family).memory
    weights = _weights(package, level, expand)
    held = 0.0  # weights kept from earlier stages (--keep-loaded)
    out = {}

    def stage(name: str, component: str, activations: float) -> None:
        nonlocal held
        out[name] = PROCESS + held + weights.get(component, 0.0) + activations
        if keep_loaded:
            held += weights.get(component, 0.0)

    for te in m.text_encoders:
        stage(f"text encoder {te.component}", te.component, mem.t5_activations if te.kind == "t5" else
              mem.clip_activations)
    if m.conditioning.image_encoder:
        stage("image encoder", m.conditioning.image_encoder, mem.clip_activations)
    pixels = width * height
    tiled = bool(vae_tile) and vae_tile * vae_tile < pixels
    vae = mem.vae_per_pixel * vae_tile * vae_tile + mem.vae_tiled_per_pixel * pixels if tiled else mem.vae_per_pixel * pixels
    if img2img:
        stage("VAE encode", "vae_encoder", vae)
    batch = 2 if guided and not split_guidance else 1
    latent_pixels = pixels / m.vae_downscale ** 2
    stage("denoiser", m.denoiser, mem.denoiser_per_latent_pixel * batch * frames * latent_pixels)
    stage("VAE decode", "vae_decoder", vae * decode_frames)
    return out


def plan(package, *, width: int, height: int, guided: bool, level: int | dict[int, int], vae_tile: int,
         split_guidance: bool, img2img: bool, keep_loaded: bool, budget: float | None, expand: bool = False,
         frames: int = 1, decode_frames: int = 1) -> Plan:
    """The fastest plan whose estimate fits `budget` (bytes; None: the one asked for). Raises a
    UsageError that says what the run needs when none fits."""
    args = dict(width=width, height=height, guided=guided, img2img=img2img, keep_loaded=keep_loaded, expand=expand,
                frames=frames, decode_frames=decode_frames)
    candidates = [Plan(level, vae_tile, split_guidance, {})]
    if budget is not None:  # each step keeps the ones before
        steps = [dict(accuracy_level=0 if not isinstance(level, dict) else dict.fromkeys(level, 0))]
        for tile in (512, 256):
            if tile * tile < width * height and (not vae_tile or vae_tile > tile):
                steps.append(dict(vae_tile=tile))
            if tile == 512 and guided and not split_guidance:
                steps.append(dict(split_guidance=True))
        for change in steps:
            candidates.append(replace(candidates[-1], **change))
    estimated = []
    for candidate in candidates:
        estimated.append(replace(candidate, stages=stages(
            package, level=candidate.accuracy_level, vae_tile=candidate.vae_tile,
            split_guidance=candidate.split_guidance, **args)))
        if budget is None or estimated[-1].need <= budget:
            return estimated[-1]
    least = min(estimated, key=lambda p: p.need)
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in least.stages.items())
    raise UsageError(
        f"{package.name} at {width}x{height} needs an estimated {least.need / GB:.1f} GB even in its "
        f"lowest-memory plan (GB per stage: {parts}), above {arg('memory_budget')} {budget / GB:g} GB: "
        "choose a smaller size, a smaller quantization (q4_0), or a larger budget")

"""Prompt to picture: text encoding, the sampler loop on onnxruntime, VAE decode.

Each component is opened when needed and released after use (unless `low_memory=False`), so the
text encoder and VAE are not resident while the denoiser runs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edgediff import __version__
from edgediff.errors import UsageError
from edgediff.runtime import image as img
from edgediff.runtime import text, vae
from edgediff.runtime.denoiser import make_denoiser, noisy_start
from edgediff.runtime.noise import TorchGenerator
from edgediff.runtime.package import Package, open_package
from edgediff.runtime.samplers import A1111_NAMES, get_sampler
from edgediff.runtime.schedules import DiscreteSchedule, get_sigmas
from edgediff.runtime.sessions import WEIGHTS, Component, SessionOptions, providers_for

Progress = Callable[[int, int], None]
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                   "simple": "Simple", "normal": None}


@dataclass
class Timings:
    """Seconds per stage of the last `generate` (session creation counted in `load`)."""

    load: float = 0.0
    text_encode: float = 0.0
    vae_encode: float = 0.0
    steps: list[float] = field(default_factory=list)
    vae_decode: float = 0.0
    total: float = 0.0  # wall time of `generate`, session creation included

    @property
    def compute(self) -> float:
        """Seconds spent computing (total less session creation)."""
        return self.total - self.load

    def summary(self) -> str:
        per_step = f"{np.median(self.steps):.2f} s/step" if self.steps else "no steps"
        parts = [f"load {self.load:.2f} s", f"text {self.text_encode:.2f} s"]
        if self.vae_encode:
            parts.append(f"vae-encode {self.vae_encode:.2f} s")
        parts += [f"denoise {sum(self.steps):.2f} s ({len(self.steps)} steps, {per_step})",
                  f"vae-decode {self.vae_decode:.2f} s", f"total {self.total:.2f} s"]
        return ", ".join(parts)


class Pipeline:
    """A converted package ready to generate images: `Pipeline(path).generate(prompt)`."""

    def __init__(self, model: str | Path, device: str = "auto", threads: int | None = None,
                 low_memory: bool = True, split_guidance: bool = False, weights: str = "compact",
                 accuracy_level: int = 0):
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {threads})")
        providers_for(device)  # validates the name, warns once about a CUDA fallback
        self.package: Package = open_package(model)
        if weights not in WEIGHTS:
            raise UsageError(f"unknown --weights '{weights}'; choose one of: {', '.join(WEIGHTS)}")
        if accuracy_level not in (0, 4):
            raise UsageError(f"--accuracy-level must be 0 or 4 (got {accuracy_level})")
        self.options = SessionOptions(device=device, threads=threads, weights=weights, accuracy_level=accuracy_level)
        self.low_memory = low_memory
        self.split_guidance = split_guidance  # guidance as two batch-1 runs: half the activations
        self.schedule = DiscreteSchedule.from_config(self.package.scheduler_config)
        self._components: dict[str, Component] = {}
        self._tokenizers: dict[str, object] = {}
        self.timings = Timings()

    @property
    def manifest(self):
        return self.package.manifest

    def component(self, name: str) -> Component:
        if name not in self._components:
            self._components[name] = self.package.component(name, self.options)
        return self._components[name]

    def _open(self, name: str) -> Component:
        """The component with its session created, its creation time counted as `load`."""
        comp = self.component(name)
        comp.session  # noqa: B018 - creates the session now, outside the timed stage
        self.timings.load += comp.load_seconds
        comp.load_seconds = 0.0
        return comp

    def _done(self, comp: Component) -> None:
        if self.low_memory:
            comp.release()

    def _encode_prompts(self, prompt: str, negative: str | None, clip_skip: int):
        """Conditioning for the prompt (and the negative prompt when guidance is on)."""
        entry = self.manifest.text_encoders[0]
        if entry.tokenizer not in self._tokenizers:  # building the BPE tables costs ~0.1 s
            self._tokenizers[entry.tokenizer] = self.package.tokenizer(entry.tokenizer)
        tok = self._tokenizers[entry.tokenizer]
        pad = tok.token_to_id(entry.pad_token)
        cond = text.chunk_prompt(tok, prompt, entry.max_length, pad)
        chunks = [cond]
        if negative is not None:
            uncond = text.chunk_prompt(tok, negative, entry.max_length, pad)
            count = max(len(cond), len(uncond))
            chunks = [text.pad_chunks(cond, count, tok, pad), text.pad_chunks(uncond, count, tok, pad)]
        encoder = self._open(entry.component)
        started = time.perf_counter()
        contexts = [text.encode_chunks(lambda ids: encoder.run({"input_ids": ids}), c, clip_skip)[0]
                    for c in chunks]
        self.timings.text_encode = time.perf_counter() - started
        self._done(encoder)
        return contexts[0], (contexts[1] if negative is not None else None)

    def _unet_fn(self, unet: Component):
        def run(x, t, context):
            return unet.run({"sample": x, "timestep": t, "encoder_hidden_states": context})["out_sample"]
        return run

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        schedule: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        init_image: str | Path | Image.Image | None = None,
        strength: float = 0.75,
        clip_skip: int = 1,
        progress: Progress | None = None,
    ) -> Image.Image:
        """One image. Its `.info["parameters"]` holds the A1111 parameter text; stage times are
        in `self.timings`."""
        m = self.manifest
        d = m.defaults
        steps = int(d["steps"] if steps is None else steps)
        guidance = float(d["guidance"] if guidance is None else guidance)
        sampler = sampler or str(d["sampler"])
        schedule = schedule or str(d["schedule"])
        seed = random.randrange(2**32) if seed is None else int(seed)
        sample_fn = get_sampler(sampler)
        sigmas = get_sigmas(schedule, self.schedule, steps)
        init = img.open_image(init_image) if isinstance(init_image, (str, Path)) else init_image
        if width is None and height is None and init is not None:
            width, height = (s // m.vae_downscale * m.vae_downscale for s in init.size)
        width = int(d["width"] if width is None else width)
        height = int(d["height"] if height is None else height)
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % m.vae_downscale:
                raise UsageError(f"--{name} must be a positive multiple of {m.vae_downscale} (got {value})")
        if clip_skip < 1:
            raise UsageError(f"--clip-skip must be at least 1 (got {clip_skip})")
        if guidance < 0:
            raise UsageError(f"--guidance must be >= 0 (got {guidance})")
        if init is not None:
            if not 0 < strength <= 1:
                raise UsageError(f"--strength must be in (0, 1] (got {strength})")
            start = steps - min(int(steps * strength), steps)
            if start >= steps:
                raise UsageError(
                    f"--strength {strength} with {steps} steps leaves no step to run; "
                    "raise --strength or --steps"
                )
            sigmas = sigmas[start:]

        self.timings = Timings()
        began = time.perf_counter()
        rng = TorchGenerator(seed)
        cond, uncond = self._encode_prompts(prompt, negative_prompt if guidance > 1 else None, clip_skip)

        shape = (1, m.latent_channels, height // m.vae_downscale, width // m.vae_downscale)
        latent = None
        if init is not None:
            encoder = self._open("vae_encoder")
            started = time.perf_counter()
            latent = vae.encode(encoder, img.from_pil(init, width, height), rng, m.latent_scale, m.latent_shift)
            self.timings.vae_encode = time.perf_counter() - started
            self._done(encoder)
        x = noisy_start(float(sigmas[0]), rng.randn(shape), latent)

        unet = self._open("unet")
        denoiser = make_denoiser(self._unet_fn(unet), self.schedule, m.prediction, cond, uncond, guidance,
                                 split_batch=self.split_guidance)
        total = len(sigmas) - 1
        last = [time.perf_counter()]

        def on_step(i, _x, _denoised):
            now = time.perf_counter()
            self.timings.steps.append(now - last[0])
            last[0] = now
            if progress:
                progress(i + 1, total)

        if progress:
            progress(0, total)
        x = sample_fn(denoiser, x, sigmas, rng, on_step)
        self._done(unet)

        decoder = self._open("vae_decoder")
        started = time.perf_counter()
        pixels = vae.decode(decoder, x.astype(np.float32), m.latent_scale, m.latent_shift)
        self.timings.vae_decode = time.perf_counter() - started
        self._done(decoder)
        self.timings.total = time.perf_counter() - began

        picture = img.to_pil(pixels)[0]
        fields = {
            "Steps": steps,
            "Sampler": A1111_NAMES[sampler],
            "Schedule type": A1111_SCHEDULES.get(schedule),
            "CFG scale": guidance,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": self.package.name,
            "Denoising strength": strength if init is not None else None,
            "Clip skip": clip_skip if clip_skip > 1 else None,
            "Version": f"edgediff {__version__}",
        }
        picture.info["parameters"] = img.a1111_parameters(prompt, negative_prompt, fields)
        return picture

"""Prompt to picture: text encoding, the sampler loop on onnxruntime, VAE decode.

Each component is opened when needed and released after use (unless `keep_loaded=True`), so the
text encoder and VAE are not resident while the denoiser runs.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edgediff import __version__
from edgediff.errors import PackageError, UsageError, arg
from edgediff.kernels.gguf_blocks import FORMATS
from edgediff.runtime import accuracy, controlnet, feature_cache, hires, inpaint, memory, text, vae
from edgediff.runtime import image as img
from edgediff.runtime.conditioning import Cond, SizeConditioning, guidance_embedding, time_ids
from edgediff.runtime.denoiser import Denoiser, latent_space, noisy_start
from edgediff.runtime.embeddings import Vocabulary, encoder_widths, listing, with_rows
from edgediff.runtime.lora import LoraRequest, Plan, plan, prompt_loras, read_lora
from edgediff.runtime.noise import TorchGenerator
from edgediff.runtime.package import Package, open_package
from edgediff.runtime.samplers import A1111_NAMES, get_sampler, resolve_sampler
from edgediff.runtime.schedules import get_sigmas, model_schedule, resolve_schedule
from edgediff.runtime.sessions import (
    LORA_MODES,
    WEIGHTS,
    Component,
    SessionOptions,
    providers_for,
    runtime_name,
    uses_openvino,
)

Progress = Callable[[int, int], None]
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                   "simple": "Simple", "beta": "Beta", "normal": None}


@dataclass
class Timings:
    """Seconds per stage of the last `generate` (session creation counted in `load`)."""

    load: float = 0.0
    text_encode: float = 0.0
    image_encode: float = 0.0  # an image-to-video model's image encoder
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
        parts = [f"load {self.load:.2f} s",
                 f"image {self.image_encode:.2f} s" if self.image_encode else f"text {self.text_encode:.2f} s"]
        if self.vae_encode:
            parts.append(f"vae-encode {self.vae_encode:.2f} s")
        parts += [f"denoise {sum(self.steps):.2f} s ({len(self.steps)} steps, {per_step})",
                  f"vae-decode {self.vae_decode:.2f} s", f"total {self.total:.2f} s"]
        return ", ".join(parts)


class Interrupted(Exception):
    """Raised inside the sampler loop when asked to stop; carries the latest denoised latent."""

    def __init__(self, denoised: np.ndarray):
        super().__init__("interrupted")
        self.denoised = denoised


class _StepClock:
    """The samplers' step callback: seconds per step into `timings`, progress, and stopping
    when `interrupt()` says so (the image so far is decoded, as A1111 does)."""

    def __init__(self, timings: Timings, progress: Progress | None, total: int,
                 interrupt: Callable[[], bool] | None = None,
                 on_step: Callable[[int, np.ndarray], None] | None = None):
        self.timings, self.progress, self.total, self.interrupt = timings, progress, total, interrupt
        self.on_step = on_step
        if progress:
            progress(0, total)

    def start(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, _i, _x, denoised) -> None:
        now = time.perf_counter()
        self.timings.steps.append(now - self.last)
        self.last = now
        if self.progress:
            self.progress(len(self.timings.steps), self.total)
        if self.on_step is not None:
            self.on_step(len(self.timings.steps), denoised)
        if self.interrupt is not None and self.interrupt():
            raise Interrupted(denoised)


class Pipeline:
    """A converted package ready to generate images: `Pipeline(path).generate(prompt)`."""

    def __init__(self, model: str | Path, device: str = "auto", threads: int | None = None,
                 keep_loaded: bool = False, split_guidance: bool = False, weights: str = "compact",
                 accuracy_level: int | str = "auto", loras: Sequence[str | Path | LoraRequest] = (),
                 lora_dir: str | Path | None = None, lora_mode: str = "branch", graph_cache: bool = True,
                 vae_tile: int = 0, memory_budget: float | None = None, precision: str = "auto",
                 embeddings_dir: str | Path | None = None):
        if threads is not None and threads < 1:
            raise UsageError(f"{arg('threads')} must be at least 1 (got {threads})")
        providers_for(device)  # validates the name, warns once about a CUDA fallback
        # fails now if OpenVINO is asked for and missing, or bf16 where the CPU has none; auto
        # measures OpenVINO once
        uses_openvino(device, precision)
        self.package: Package = open_package(model)
        if weights not in WEIGHTS:
            raise UsageError(f"unknown {arg('weights')} '{weights}'; choose one of: {', '.join(WEIGHTS)}")
        accuracy_level = accuracy.resolve(accuracy_level)
        self._asked_level = accuracy_level  # a memory plan may run an image at a lower level
        if lora_mode not in LORA_MODES:
            raise UsageError(f"unknown {arg('lora_mode')} '{lora_mode}'; choose one of: {', '.join(LORA_MODES)}")
        self.options = SessionOptions(device=device, threads=threads, weights=weights, accuracy_level=accuracy_level,
                                      lora_mode=lora_mode, graph_cache=graph_cache, precision=precision)
        self.keep_loaded = keep_loaded
        step = 4 * self.manifest.vae_downscale  # tiles overlap by a quarter, in whole latent pixels
        if vae_tile < 0 or vae_tile % step:
            raise UsageError(f"{arg('vae_tile')} {vae_tile}: give a multiple of {step} pixels (512 is a good start; "
                             "0 decodes whole)")
        self.vae_tile = vae_tile  # VAE in tiles of this many pixels (bounded memory for large images)
        self.split_guidance = split_guidance  # guidance as two batch-1 runs: half the activations
        if memory_budget is not None and not memory_budget > 0:
            raise UsageError(f"{arg('memory_budget')} must be a positive number of GB (got {memory_budget})")
        # GB a run may need (runtime.memory): the plan gives up speed to fit, or refuses before loading
        self.memory_budget = memory_budget
        self.plan: memory.Plan | None = None  # the last image's
        self.schedule = model_schedule(self.package.scheduler_config, self.manifest.prediction,
                                       self.manifest.flow_normal_end)
        self._components: dict[str, Component] = {}
        self._tokenizers: dict[str, object] = {}
        self._sample_channels: int | None = None  # the denoiser's input channels, read from its graph
        self.timings = Timings()
        # LoRAs: those given here apply to every image; `<lora:NAME:S>` in a prompt adds files
        # from `lora_dir` for that image (the components open again when the set changes)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self._loras = [LoraRequest.parse(x) for x in loras]
        self._weight_names: dict[str, tuple[dict, dict]] = {}
        self.lora_plan: Plan | None = None
        self._lora_key: list = []  # (file, strength) of the LoRAs `lora_plan` applies
        self._use_loras(self._loras)
        # textual inversion: files in `embeddings_dir` named in a prompt by their stem (runtime.embeddings)
        if embeddings_dir is not None and not Path(embeddings_dir).is_dir():
            raise UsageError(f"{arg('embeddings_dir')} {embeddings_dir}: no such folder")
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
        self.embeddings = None if embeddings_dir is None else Vocabulary(
            self.embeddings_dir, lambda: encoder_widths(self.package), self.package.name)
        self._token_rows: dict[str, tuple[int, np.ndarray]] = {}  # CLIP encoder -> (first new id, its rows)
        self._rows_version = 0

    @property
    def manifest(self):
        return self.package.manifest

    def component(self, name: str) -> Component:
        if name not in self._components:
            change = self.lora_plan.for_component(name) if self.lora_plan else None
            comp = self.package.component(name, self.options, change)
            if name in self._token_rows:  # the embeddings' vectors beside its token table
                comp = with_rows(comp, *self._token_rows[name])
            self._components[name] = comp
        return self._components[name]

    def _use_loras(self, requests: list[LoraRequest]) -> None:
        """Apply these LoRAs from the next component opened on (those open now are closed)."""
        key = [(r.path.resolve(), r.strength) for r in requests]
        if key == self._lora_key:
            return
        loras = [read_lora(r) for r in requests]
        m = self.manifest
        touched = {m.denoiser if layer.component == "denoiser" else layer.component
                   for lora in loras for layer in lora.layers.values()}
        for name in touched & set(m.components):
            if name not in self._weight_names:
                self._weight_names[name] = self.package.weight_names(name), self.package.weight_parts(name)
        wanted = touched & set(m.components)
        self.lora_plan = plan(loras, {n: self._weight_names[n][0] for n in wanted}, m.denoiser, m.family,
                              {n: self._weight_names[n][1] for n in wanted}) if loras else None
        self._lora_key = key
        for comp in self._components.values():
            comp.release()
        self._components.clear()

    def use_graph(self, name: str, path: Path, seen: Callable[[dict[str, np.ndarray]], None] | None = None) -> None:
        """Run component `name` from another graph with its inputs and outputs, and `seen` given
        every run's outputs, its own among them (int8-static's calibration copies)."""
        self._components[name] = Component(name, Path(path), self.options, seen=seen)

    def _open(self, name: str) -> Component:
        """The component with its session created, its creation time counted as `load`."""
        comp = self.component(name)
        comp.session  # noqa: B018 - creates the session now, outside the timed stage
        self.timings.load += comp.load_seconds
        comp.load_seconds = 0.0
        return comp

    def _done(self, comp: Component) -> None:
        if not self.keep_loaded:
            comp.release()

    def _tokenizer(self, folder: str):
        if folder not in self._tokenizers:  # building the BPE tables costs ~0.1 s
            self._tokenizers[folder] = self.package.tokenizer(folder)
        return self._tokenizers[folder]

    def _encode_prompts(self, prompt: str, negative: str | None, clip_skip: int) -> list[Cond]:
        """Text conditioning for the prompt (and the negative prompt when guidance is on): every
        encoder's chosen hidden layer, joined as the family joins them, and the pooled vectors
        where they are used."""
        m = self.manifest
        zero_negative = negative == "" and m.conditioning.zero_empty_negative
        texts = [prompt] if negative is None or zero_negative else [prompt, negative]
        chunks = {}
        words = self._embedding_words(texts)
        for entry in m.text_encoders:
            tok = self._tokenizer(entry.tokenizer)
            pad = tok.token_to_id(entry.pad_token)
            if entry.kind == "t5":
                chunks[entry.component] = [[text.window_ids(tok, t, entry.max_length, pad)] for t in texts]
            else:
                chunks[entry.component] = [text.chunk_prompt(tok, t, entry.max_length, pad, words.get(entry.component))
                                           for t in texts]
        count = max(len(c) for per_text in chunks.values() for c in per_text)  # equal lengths for guidance
        encoded: list[list] = [[] for _ in texts]
        for entry in m.text_encoders:
            encoder = self._open(entry.component)
            started = time.perf_counter()
            tok = self._tokenizer(entry.tokenizer)
            for outputs, ids in zip(encoded, chunks[entry.component], strict=True):
                if entry.kind != "t5":
                    ids = text.pad_chunks(ids, count, tok, tok.token_to_id(entry.pad_token))
                context, pooled = text.encode_chunks(lambda i, e=encoder: e.run({"input_ids": i}), ids,
                                                     1 if entry.kind == "t5" else clip_skip, entry.hidden_layer)
                outputs.append((entry, context, pooled))
            self.timings.text_encode += time.perf_counter() - started
            self._done(encoder)
        conds: list[Cond] = [text.join(outputs) for outputs in encoded]
        if zero_negative:
            conds.append({k: np.zeros_like(v) for k, v in conds[0].items()})
        return conds

    def _embedding_words(self, texts: list[str]) -> dict[str, text.Words]:
        """What the CLIP encoders read in place of the embeddings these texts name; an encoder whose
        added token rows changed opens again."""
        if self.embeddings is None:
            return {}
        clips = [e for e in self.manifest.text_encoders if e.kind != "t5"]
        body = min((e.max_length - 2 for e in clips), default=0)
        words = self.embeddings.words(texts, {e.component: self._tokenizer(e.tokenizer) for e in clips}, body)
        if self.embeddings.version != self._rows_version:
            firsts = {e.component: self._tokenizer(e.tokenizer).get_vocab_size(with_added_tokens=True) for e in clips}
            self._token_rows = {c: (firsts[c], rows) for c, rows in self.embeddings.rows().items()}
            self._rows_version = self.embeddings.version
            for e in clips:
                if (comp := self._components.pop(e.component, None)) is not None:
                    comp.release()
        return words

    def embedding_list(self) -> dict:
        """The embeddings of `embeddings_dir` as A1111's /sdapi/v1/embeddings lists them for this
        model: {"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}},
        "skipped": {...}} (skipped: made for other models, or unreadable)."""
        return listing(self.embeddings_dir, self.package)

    def _conditioning(self, prompt: str, negative: str | None, clip_skip: int, size: SizeConditioning,
                      height: int, width: int, guidance: float) -> tuple[Cond, Cond | None]:
        """Everything the denoiser takes besides latent and timestep, for the prompt and the
        negative prompt (None without guidance: CFG off, or guidance embedded, as LCM's and
        Flux dev's)."""
        spec = self.manifest.conditioning
        if spec.guidance_embedded or not spec.cfg:
            negative = None
        conds = self._encode_prompts(prompt, negative, clip_skip)
        for i, cond in enumerate(conds):
            ids = time_ids(spec, size, height, width, negative=i == 1)
            if ids is not None:
                cond["time_ids"] = ids
            if spec.guidance_embedding:
                cond["timestep_cond"] = guidance_embedding(guidance, spec.guidance_embedding)
            if spec.guidance_input:
                cond["guidance"] = np.full(1, guidance, np.float32)
        return conds[0], (conds[1] if len(conds) > 1 else None)

    def _sample(self, x, sigmas, cond: Cond, uncond: Cond | None, guidance: float, sampler: str, rng,
                clock: _StepClock, cache_interval: int = 1, split_guidance: bool = False,
                extra: np.ndarray | None = None, keep: tuple[np.ndarray, np.ndarray] | None = None,
                control: controlnet.Control | None = None) -> np.ndarray:
        """Run the sampler over `sigmas` with this model's denoiser (opened, then released), fed
        by the names its graph declares. `extra`: channels joined to the latent in `sample` (an
        inpainting model's mask and masked image); `keep` (latent, mask): the prediction keeps the
        latent outside the mask (runtime.inpaint.Blended); `control`: ControlNets' residuals
        (runtime.controlnet; zeros without)."""
        comp = self._open(self.manifest.denoiser)
        residuals = controlnet.Residuals(self, comp, control, len(sigmas) - 1)
        if control is not None:
            for unit in control.units:
                self.timings.load += unit.component.load_seconds
                unit.component.load_seconds = 0.0
        clock.start()  # opening the session is load time, not the first step's
        names = set(comp.input_names)
        missing = names - {"sample", "timestep", *cond, *residuals.names}
        if missing:
            raise PackageError(
                f"{self.package.name}: the {comp.name} graph takes {', '.join(sorted(missing))}, which this "
                "package's manifest does not describe; re-convert it with this edgediff version"
            )
        cond, uncond = ({k: v for k, v in c.items() if k in names} if c is not None else None for c in (cond, uncond))
        if control is None:  # zeros for the residual inputs, fed as conditioning (each cond stays one dict)
            cond, uncond = ({**c, **residuals.zeros} if c is not None else None for c in (cond, uncond))

        def run(x_in, t, c):
            return comp.run({"sample": x_in, "timestep": t, **c})["out_sample"]

        shallow = self._open("unet_shallow") if cache_interval > 1 else None
        if shallow is not None:
            takes = set(shallow.input_names)  # SDXL's outer layers have no cross-attention: no text input
            run = feature_cache.reusing(comp.run, lambda f: shallow.run({k: v for k, v in f.items() if k in takes}),
                                        cache_interval)
        if extra is not None:
            model = run

            def run(x_in, t, c):
                return model(np.concatenate([x_in, np.repeat(extra, x_in.shape[0], 0)], 1), t, c)

        if control is not None:  # the ControlNets see the latent alone, as diffusers feeds them
            unfed = run

            def run(x_in, t, c):
                return unfed(x_in, t, {**c, **residuals(x_in, t, c)})

        denoiser = Denoiser(run, self.schedule, self.manifest.prediction, cond, uncond, guidance,
                            split_batch=split_guidance)
        if keep is not None:
            denoiser = inpaint.Blended(denoiser, *keep)
        x = get_sampler(sampler)(denoiser, x, sigmas, rng, residuals.track(clock))
        self._done(comp)
        if control is not None:
            control.release()
        if shallow is not None:
            self._done(shallow)
        return x

    def _inpainting_model(self) -> bool:
        """Whether the denoiser takes a mask and a masked image's latent beside its latent (a U-Net
        of 2C+1 input channels, as sd-1.5-inpainting's 9), read from its graph's `sample` input."""
        if self._sample_channels is None:
            m = self.manifest
            entry = m.components[m.denoiser]
            if self.package.gguf is not None:
                data = self.package.gguf.blob(entry.file)
                dims = inpaint.input_dims(data, "sample") if data is not None else None
            else:
                dims = inpaint.file_input_dims(self.package.root / entry.file, "sample")
            channels = dims[1] if dims and len(dims) == 4 and isinstance(dims[1], int) else m.latent_channels
            if channels not in (m.latent_channels, 2 * m.latent_channels + 1):
                raise PackageError(f"{self.package.name}: its {m.denoiser} takes {channels} input channels, neither "
                                   f"the {m.latent_channels} of a latent nor the {2 * m.latent_channels + 1} of an "
                                   "inpainting model; re-convert it with this edgediff version")
            self._sample_channels = channels
        return self._sample_channels != self.manifest.latent_channels

    def _encode(self, pixels: np.ndarray, rng, tile: int, release: bool = True) -> np.ndarray:
        """Images in [-1, 1] to latents with the VAE encoder (kept open unless `release`)."""
        m = self.manifest
        encoder = self._open("vae_encoder")
        started = time.perf_counter()
        latent = vae.encode(encoder, pixels, rng, m.latent_scale, m.latent_shift, tile, m.vae_downscale)
        self.timings.vae_encode += time.perf_counter() - started
        if release:
            self._done(encoder)
        return latent

    def _image_conditioning(self, pixels: np.ndarray | None, mask: np.ndarray | None, rng, tile: int,
                            size: tuple[int, int]) -> np.ndarray:
        """An inpainting model's extra channels [1, 1 + C, h, w]: the mask at the latent's size
        (nearest) and the latent of the image with the mask's area blacked out (A1111's
        inpainting_image_conditioning); without a mask (text to image, image to image) all is
        masked: ones and the latent of a mid-grey image (its txt2img_image_conditioning)."""
        height, width = size
        if mask is None:
            pixels, mask = np.zeros((1, 3, height, width), np.float32), np.ones((1, 1, height, width), np.float32)
        latent = self._encode((pixels * (1 - mask)).astype(np.float32), rng, tile)
        small = inpaint.nearest(mask, *latent.shape[-2:])
        return np.concatenate([small, latent], 1).astype(np.float32)

    def _denoise(self, stages, conds, x, guidance: float, sampler: str, rng, clock: _StepClock,
                 cache_interval: int, split_guidance: bool, extra, keep, control=None) -> tuple[np.ndarray, bool]:
        """Each stage's sampler in turn (an inpainting model with `extra`, a regular one keeping
        `keep`); (latent, whether `interrupt` stopped it)."""
        try:
            for (pipe, part), (cond, uncond) in zip(stages, conds, strict=True):
                special = pipe._inpainting_model()
                x = pipe._sample(x, part, cond, uncond, guidance, sampler, rng, clock, cache_interval,
                                 split_guidance, extra if special else None, None if special else keep, control)
        except Interrupted as stop:  # what the sampler has so far
            for pipe, _ in stages:
                pipe._done(pipe.component(pipe.manifest.denoiser))
            if control is not None:
                control.release()
            return stop.denoised, True
        return x, False

    def _hires_pass(self, x: np.ndarray, second: hires.Target, upscaler, seed: int, conds, size: SizeConditioning,
                    guidance: float, sampler: str, schedule: str, steps: int, strength: float, plan: memory.Plan,
                    clock: _StepClock, cache_interval: int) -> tuple[np.ndarray, bool]:
        """A1111's sample_hr_pass: the first latent upscaled (in latent space, or decoded, upscaled
        as pixels and encoded again), then image to image at the larger size from a generator
        seeded again with `seed`: the last `steps` steps of a schedule of steps / strength."""
        m = self.manifest
        down = m.vae_downscale
        (lat_h, lat_w), (up_w, up_h) = second.latent, second.upscale
        height, width = lat_h * down, lat_w * down
        rng = TorchGenerator(seed)
        if isinstance(upscaler, str) and upscaler in hires.LATENT_MODES:
            mode, antialias = hires.LATENT_MODES[upscaler]
            big = hires.interpolate(x, up_h // down, up_w // down, mode, antialias)
            latent = big[..., second.top:second.top + lat_h, second.left:second.left + lat_w]
        else:
            decoder = self._open("vae_decoder")
            started = time.perf_counter()
            first = vae.decode(decoder, x.astype(np.float32), m.latent_scale, m.latent_shift, plan.vae_tile, down)
            self.timings.vae_decode += time.perf_counter() - started
            self._done(decoder)
            image = hires.upscale_image(hires.first_pass_image(first), up_w, up_h, upscaler)
            left, top = second.left * down, second.top * down
            image = image.crop((left, top, left + width, top + height))
            latent = self._encode(img.from_pil(image, width, height), rng, plan.vae_tile,
                                  release=not self._inpainting_model())
        noise = rng.randn((1, m.latent_channels, lat_h, lat_w))
        extra = (self._image_conditioning(None, None, rng, plan.vae_tile, (height, width))
                 if self._inpainting_model() else None)
        patch = m.size_multiple // down
        total, start = hires.second_pass_steps(steps, strength)
        sigmas = get_sigmas(schedule, self.schedule.at_size((lat_h // patch) * (lat_w // patch)), total)[start:]
        resized = []
        for i, cond in enumerate(conds):  # SDXL's size ids say the larger size
            ids = time_ids(m.conditioning, size, height, width, negative=i == 1) if cond is not None else None
            resized.append(cond if ids is None else {**cond, "time_ids": ids})
        x = noisy_start(latent_space(m.prediction), float(sigmas[0]), noise, latent)
        return self._denoise([(self, sigmas)], [tuple(resized)], x, guidance, sampler, rng, clock, cache_interval,
                             plan.split_guidance, extra, None)

    def refiner_split(self, sigmas: np.ndarray, refiner_start: float) -> int:
        """How many of `sigmas`' steps the base runs before a refiner takes over at
        `refiner_start` of the schedule: the steps at timesteps >= (1 - start) * T, as
        diffusers' `denoising_end` counts them."""
        if not 0 < refiner_start < 1:
            raise UsageError(f"{arg('refiner_start')} must be in (0, 1) (got {refiner_start})")
        train = len(self.schedule.sigmas)
        cutoff = round(train - refiner_start * train)
        base = sum(1 for s in sigmas[:-1] if self.schedule.sigma_to_t(float(s)) >= cutoff)
        if not 0 < base < len(sigmas) - 1:
            who = "the base" if base == 0 else "the refiner"
            raise UsageError(
                f"{arg('refiner_start')} {refiner_start} with {len(sigmas) - 1} steps leaves {who} no step; "
                f"{'raise' if base == 0 else 'lower'} {arg('refiner_start')} or raise {arg('steps')}"
            )
        return base

    def generate(
        self,
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] = "",
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
        size_conditioning: SizeConditioning | None = None,
        refiner: Pipeline | None = None,
        refiner_start: float = 0.8,
        loras: Sequence[str | Path | LoraRequest] | None = None,
        progress: Progress | None = None,
        interrupt: Callable[[], bool] | None = None,
        cache_interval: int = 1,
        on_step: Callable[[int, np.ndarray], None] | None = None,
        mask: str | Path | Image.Image | None = None,
        mask_blur: float = 4,
        inpainting_fill: int = 1,
        inpaint_full_res: bool = False,
        inpaint_full_res_padding: int = 32,
        inpainting_mask_invert: bool = False,
        hires_scale: float | None = None,
        hires_width: int = 0,
        hires_height: int = 0,
        hires_upscaler: str | Path | object = hires.DEFAULT_UPSCALER,
        hires_steps: int = 0,
        hires_strength: float = 0.7,
        controlnets: Sequence[controlnet.ControlNetUnit] | None = None,
        frames: int | None = None,
        fps: int | None = None,
        motion_bucket_id: int | None = None,
        noise_aug_strength: float | None = None,
        min_guidance: float | None = None,
        decode_chunk: int | None = None,
    ) -> Image.Image | list[Image.Image]:
        """One image; for a list of prompts, a list of images (seeds counting up from `seed`, as
        A1111's batches; a list of negative prompts pairs with them). Its `.info["parameters"]`
        holds the A1111 parameter text; stage times are in `self.timings`.

        With a `refiner` (an SDXL refiner's Pipeline), this model runs the schedule up to
        `refiner_start` and the refiner the rest, on the same latent, seed and noise stream, as
        diffusers' `denoising_end`/`denoising_start` hand-off does.

        `loras` replaces the Pipeline's LoRAs for this image (and `<lora:NAME:S>` tags in the
        prompt add to them); the components open again when the set changes. When `interrupt()`
        turns true after a step, sampling stops and the latest denoised latent is decoded.

        `cache_interval` N > 1 runs the whole U-Net every N evaluations and its shallow branch on
        the deep features kept in between (runtime.feature_cache; packages converted with
        --deep-cache). `on_step(step, denoised)` sees each step's prediction of the final latent
        (live previews).

        Inpainting (A1111's, runtime.inpaint): with `init_image`, a `mask` (an image or its file;
        white repaints, black keeps; an RGBA mask with transparency: its painted alpha) says where
        to draw anew. `mask_blur` pixels of Gaussian blur soften its edge; `inpainting_fill` is
        what the masked area starts from: 0 fill (blurred surroundings), 1 original, 2 latent
        noise, 3 latent nothing. `inpaint_full_res` ("only masked") draws the mask's box, grown by
        `inpaint_full_res_padding` pixels, at `width` x `height` (default the model's size) and
        pastes it back; `inpainting_mask_invert` repaints what is black. A regular model keeps the
        original latent outside the mask at every step; an inpainting model (its U-Net takes 2C+1
        channels: sd-1.5-inpainting, SDXL inpainting) is given the mask and the masked image's
        latent instead. Outside the mask the result is the original's pixels, the blurred mask the
        alpha between them. A mask of another size than the image is resized to it (the parameters
        say so).

        Hires fix (A1111's two-pass text to image, runtime.hires): with `hires_scale` (or
        `hires_width` and/or `hires_height`: the other side in proportion; both: covered, then
        cropped), the image drawn at `width` x `height` is upscaled with `hires_upscaler` (
        'Latent', 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic antialiased)',
        'Latent (nearest)', 'Latent (nearest-exact)', 'Lanczos', 'Nearest', 'None', an
        ESRGAN-family model file, or a runtime.upscale.Upscaler) and drawn again from there as
        image to image with the same seed: `hires_steps` steps (0: `steps`) of a schedule of
        hires_steps / `hires_strength` steps, as A1111 counts them.

        `controlnets` (runtime.controlnet.ControlNetUnit: a ControlNet, its control image,
        strength, start and end) steer the U-Net, several at once, as diffusers' ControlNet
        pipelines do.

        An image-to-video model (Stable Video Diffusion) takes no prompt: `init_image` becomes
        `frames` frames (a list of images) at `width` x `height` (default its 1024 x 576), as
        diffusers' StableVideoDiffusionPipeline makes them: conditioned on `fps` - 1,
        `motion_bucket_id` and `noise_aug_strength` (the noise added to the image's latent),
        guidance ramping from `min_guidance` on the first frame to `guidance` on the last, the
        frames decoded `decode_chunk` at a time (0 or None: as many as memory allows)."""
        if not isinstance(prompt, str):
            options = {k: v for k, v in locals().items() if k not in ("self", "prompt", "negative_prompt", "seed")}
            return self._each(list(prompt), negative_prompt, seed, options)
        video = dict(frames=frames, fps=fps, motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                     min_guidance=min_guidance, decode_chunk=decode_chunk)
        if self.manifest.conditioning.image_encoder:
            return self._video(prompt, negative_prompt, video, steps=steps, guidance=guidance, sampler=sampler,
                               schedule=schedule, seed=seed, width=width, height=height, init_image=init_image,
                               progress=progress, interrupt=interrupt, on_step=on_step)
        if given := [arg(k) for k, v in video.items() if v is not None]:
            raise UsageError(f"{', '.join(given)}: options of image-to-video models; {self.package.name} "
                             f"({self.manifest.family}) makes images")
        negative_prompt = "" if negative_prompt is None else negative_prompt
        if not isinstance(negative_prompt, str):
            raise UsageError("negative_prompt: a list of negative prompts goes with a list of prompts")
        m = self.manifest
        d = m.defaults
        text_prompt, tagged = prompt_loras(prompt, self.lora_dir)
        base = self._loras if loras is None else [LoraRequest.parse(x) for x in loras]
        self._use_loras(base + tagged)
        steps, guidance, sampler, schedule, seed = self._settings(steps, guidance, sampler, schedule, seed)
        size = size_conditioning or SizeConditioning()
        size.check()
        init = img.open_image(init_image) if isinstance(init_image, (str, Path)) else init_image
        if init is None and m.role == "refiner":
            raise UsageError(
                f"{self.package.name} is a refiner ({m.family}): it finishes an image, it does not start one; "
                f"give it {arg('init_image')}, or use it as {arg('refiner')} after a base model"
            )
        given_mask = None
        if mask is not None:
            if init is None:
                raise UsageError(f"{arg('mask')} needs {arg('init_image')}: the mask says which part of that image to "
                                 "repaint (white: repaint, black: keep)")
            inpaint.check(mask_blur, inpainting_fill, inpaint_full_res_padding)
            given_mask = inpaint.open_mask(mask)
        upscaling = hires_scale is not None or bool(hires_width) or bool(hires_height)
        if upscaling:
            hires.check(hires_scale, hires_width, hires_height, hires_steps, hires_strength)
            if init is not None:
                raise UsageError(f"hires fix ({arg('hires_scale')}, {arg('hires_width')}, {arg('hires_height')}) is "
                                 f"A1111's two-pass text to image; it does not take {arg('init_image')}")
            if refiner is not None:
                raise UsageError(f"hires fix does not run with {arg('refiner')} yet; leave one of them out")
            upscaler_name, upscaler = hires.resolve_upscaler(hires_upscaler, self.options.device, self.options.threads)
        # only masked: the crop is drawn at the model's size unless asked otherwise (A1111's width and height)
        if width is None and height is None and init is not None and not (given_mask is not None and inpaint_full_res):
            width, height = (s // m.size_multiple * m.size_multiple for s in init.size)
        width, height = self._size(width, height)
        patch = m.size_multiple // m.vae_downscale  # a DiT's latent patch: its tokens set Flux's shift
        tokens = (height // m.vae_downscale // patch) * (width // m.vae_downscale // patch)
        sigmas = get_sigmas(schedule, self.schedule.at_size(tokens), steps)
        if clip_skip < 1:
            raise UsageError(f"{arg('clip_skip')} must be at least 1 (got {clip_skip})")
        if cache_interval < 1:
            raise UsageError(f"{arg('cache_interval')} must be at least 1 (got {cache_interval}; 1 runs the whole U-Net "
                             "every step)")
        for pipe in (self, refiner) if refiner is not None else (self,):
            if cache_interval > 1 and "unet_shallow" not in pipe.manifest.components:
                raise UsageError(f"{arg('cache_interval')} {cache_interval}: {pipe.package.name} has no shallow U-Net "
                                 f"branch; convert it with {arg('deep_cache')} (SD 1.x/2.x/SDXL, ONNX packages)")
        if reason := feature_cache.advice(steps, cache_interval):
            warnings.warn(reason, stacklevel=2)
        spec = m.conditioning
        if guidance > 1 and not spec.cfg and not spec.guidance_embedded:
            warnings.warn(f"{m.family} is distilled to run without guidance: {arg('guidance')} {guidance} is ignored",
                          stacklevel=2)
        if init is not None:
            if not 0 < strength <= 1:
                raise UsageError(f"{arg('strength')} must be in (0, 1] (got {strength})")
            start = (int(max(steps - steps * strength, 0)) if m.strength_rounding == "skip"
                     else steps - min(int(steps * strength), steps))
            if start >= steps:
                raise UsageError(
                    f"{arg('strength')} {strength} with {steps} steps leaves no step to run; "
                    f"raise {arg('strength')} or {arg('steps')}"
                )
            sigmas = sigmas[start:]
        second = None
        if upscaling:
            second = hires.target(width, height, hires_scale, hires_width, hires_height, m.vae_downscale, patch)
        stages = [(self, sigmas)]
        if refiner is not None:
            self._check_refiner(refiner)
            split = self.refiner_split(sigmas, refiner_start)
            stages = [(self, sigmas[:split + 1]), (refiner, sigmas[split:])]
        for pipe, _ in stages:
            pipe._inpainting_model()  # a U-Net that takes other channels is refused before any work
        if controlnets and (refiner is not None or upscaling or cache_interval > 1):
            raise UsageError(f"{controlnet.option()} does not run with {arg('refiner')}, hires fix or "
                             f"{arg('cache_interval')} yet; leave one of them out")
        control = controlnet.prepare(self, controlnets, width, height)
        largest = second.size if second is not None else (width, height)
        plan = self._plan(*largest, guidance > 1 and spec.cfg and not spec.guidance_embedded,
                          init is not None or upscaling)

        self.timings = Timings()
        began = time.perf_counter()
        rng = TorchGenerator(seed)
        negative = negative_prompt if guidance > 1 else None
        if refiner is not None:
            refiner.timings = Timings()
        conds = [pipe._conditioning(text_prompt, negative, clip_skip, size, height, width, guidance)
                 for pipe, _ in stages]

        job = None
        if given_mask is not None:
            job = inpaint.prepare(init, given_mask, width, height, blur=mask_blur, fill_mode=inpainting_fill,
                                  full_res=inpaint_full_res, padding=inpaint_full_res_padding,
                                  invert=inpainting_mask_invert)
            if job is None:
                warnings.warn(f"{arg('inpaint_full_res')}: the mask is empty, so there is nothing to repaint; the "
                              "image is made from the whole init image, as A1111 does", stacklevel=2)
        special = any(pipe._inpainting_model() for pipe, _ in stages)
        shape = (1, m.latent_channels, height // m.vae_downscale, width // m.vae_downscale)
        latent = pixels = None
        if init is not None:
            pixels = img.from_pil(job.image if job is not None else init, width, height)
            latent = self._encode(pixels, rng, plan.vae_tile, release=not special)
        noise = rng.randn(shape)
        keep = None
        if job is not None:
            repaint = job.latent_mask(*shape[2:])
            if inpainting_fill == 2:  # latent noise: the sampling noise itself, as A1111's same-seed tensor is
                latent = latent * (1 - repaint) + noise * repaint
            elif inpainting_fill == 3:  # latent nothing
                latent = latent * (1 - repaint)
            keep = (latent.astype(np.float32), repaint)
        extra = None
        if special:  # drawn after the noise, as diffusers' StableDiffusionInpaintPipeline encodes it
            extra = self._image_conditioning(pixels if job is not None else None,
                                             job.condition_mask() if job is not None else None, rng, plan.vae_tile,
                                             (height, width))
        x = noisy_start(latent_space(self.manifest.prediction), float(sigmas[0]), noise, latent)

        first_steps = len(sigmas) - 1
        hr_steps = (hires_steps or steps) if upscaling else 0
        clock = _StepClock(self.timings, progress, first_steps + hr_steps, interrupt, on_step)
        x, interrupted = self._denoise(stages, conds, x, guidance, sampler, rng, clock, cache_interval,
                                       plan.split_guidance, extra, keep, control)
        finisher = stages[-1][0]
        if keep is not None and not finisher._inpainting_model():
            x = x * keep[1] + keep[0] * (1 - keep[1])  # A1111's last blend: outside the mask, the original latent
        if second is not None and not interrupted:
            x, interrupted = self._hires_pass(x, second, upscaler, seed, conds[0], size, guidance, sampler, schedule,
                                              hr_steps, hires_strength, plan, clock, cache_interval)
        decoder = finisher._open("vae_decoder")  # the model that finishes decodes, as diffusers does
        started = time.perf_counter()
        pixels = vae.decode(decoder, x.astype(np.float32), m.latent_scale, m.latent_shift,
                            plan.vae_tile if finisher is self else finisher.vae_tile, m.vae_downscale)
        self.timings.vae_decode += time.perf_counter() - started
        finisher._done(decoder)
        if finisher is not self:
            self.timings.load += finisher.timings.load
            self.timings.text_encode += finisher.timings.text_encode
        self.timings.total = time.perf_counter() - began

        picture = img.to_pil(pixels)[0]
        if job is not None:
            picture = job.composite(picture)  # the original over it where it was not repainted
        ran = len(self.timings.steps)
        in_hires = interrupted and ran > first_steps
        extras: dict[str, object] = dict(job.fields) if job is not None else {}
        if second is not None:
            extras.update(second.fields)
            extras.update({"Hires steps": hires_steps or None, "Hires upscaler": upscaler_name})
        fields = {
            # an interrupted image says the steps that ran (of an img2img's, as A1111 counts them)
            "Steps": steps - len(sigmas) + 1 + ran if interrupted and not in_hires else steps,
            "Interrupted": (f"after {ran - first_steps} of {hr_steps} hires steps" if in_hires
                            else f"after {ran} of {first_steps} steps" if interrupted else None),
            "Sampler": A1111_NAMES[sampler],
            "Schedule type": A1111_SCHEDULES.get(schedule),
            "CFG scale": guidance,
            "Seed": seed,
            "Size": f"{shape[3] * m.vae_downscale}x{shape[2] * m.vae_downscale}",  # the first pass's (A1111's)
            "Model": self.package.name,
            "Denoising strength": strength if init is not None else hires_strength if upscaling else None,
            "Clip skip": clip_skip if clip_skip > 1 else None,
            "Cache interval": cache_interval if cache_interval > 1 else None,
            "Refiner": refiner.package.name if refiner is not None else None,
            "Refiner switch at": refiner_start if refiner is not None else None,
            **extras,
            "Lora hashes": f'"{self.lora_plan.hashes()}"' if self.lora_plan else None,
            "Version": f"edgediff {__version__}",
            "Device": self.device,
        }
        picture.info["parameters"] = img.a1111_parameters(prompt, negative_prompt, fields)
        picture.info["seed"] = seed  # for callers: never parse it back out of the text
        return picture

    def _settings(self, steps, guidance, sampler, schedule, seed) -> tuple[int, float, str, str, int]:
        """Steps, guidance, sampler, schedule and seed: the package's defaults where not given,
        A1111's spellings read ('DPM++ 2M Karras' is a sampler and a schedule), bad values refused
        before any work."""
        d = self.manifest.defaults
        steps = int(d["steps"] if steps is None else steps)
        guidance = float(d["guidance"] if guidance is None else guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise UsageError(f"{arg('guidance')} must be a finite number >= 0 (got {guidance})")
        sampler, carried = resolve_sampler(sampler) if sampler else (str(d["sampler"]), None)
        schedule = (resolve_schedule(schedule) if schedule else None) or carried or str(d["schedule"])
        get_sampler(sampler)
        return steps, guidance, sampler, schedule, random.randrange(2**32) if seed is None else int(seed)

    def _size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """Width and height (the package's defaults where not given), multiples of what the model takes."""
        m = self.manifest
        width = int(m.defaults["width"] if width is None else width)
        height = int(m.defaults["height"] if height is None else height)
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % m.size_multiple:
                raise UsageError(f"{arg(name)} must be a positive multiple of {m.size_multiple} for {m.family} "
                                 f"(got {value})")
        return width, height

    def _video(self, prompt, negative_prompt, video: dict, *, steps, guidance, sampler, schedule, seed, width, height,
               init_image, progress, interrupt, on_step) -> list[Image.Image]:
        """An image-to-video model's frames (see `generate`): the image's embedding as the
        context, its latent (noise-augmented, the posterior's mode, unscaled) beside every frame's,
        the frames on the latent's second axis through the same sampler loop."""
        from edgediff.runtime.clip_image import clip_pixels

        m, d = self.manifest, self.manifest.defaults
        if prompt or negative_prompt:
            raise UsageError(f"{self.package.name} ({m.family}) makes a video from an image and takes no text: leave "
                             f"the prompt and negative prompt out and give {arg('init_image')}")
        if init_image is None:
            raise UsageError(f"{self.package.name} ({m.family}) makes a video from an image: give {arg('init_image')}")
        init = img.open_image(init_image) if isinstance(init_image, (str, Path)) else init_image.convert("RGB")
        v = {k: d.get(k) if value is None else value for k, value in video.items()}
        frames, fps, chunk = int(v["frames"]), int(v["fps"]), int(v["decode_chunk"] or 0)
        motion, aug, low = float(v["motion_bucket_id"]), float(v["noise_aug_strength"]), float(v["min_guidance"])
        for name, value, least in (("frames", frames, 1), ("fps", fps, 1), ("decode_chunk", chunk, 0),
                                   ("motion_bucket_id", motion, 0), ("noise_aug_strength", aug, 0),
                                   ("min_guidance", low, 0)):
            if not math.isfinite(value) or value < least:
                raise UsageError(f"{arg(name)} must be at least {least} (got {value})")
        steps, guidance, sampler, schedule, seed = self._settings(steps, guidance, sampler, schedule, seed)
        width, height = self._size(width, height)
        sigmas = get_sigmas(schedule, self.schedule, steps)
        down = m.vae_downscale
        shape = (1, frames, m.latent_channels, height // down, width // down)
        guided, auto = guidance > 1, not chunk
        budget = self.memory_budget * memory.GB if self.memory_budget is not None else None
        chunk = chunk or self._decode_frames(width, height, frames, budget or memory.available())
        plan = self._plan(width, height, guided, True, frames=frames, decode_frames=chunk)

        self.timings = Timings()
        began = time.perf_counter()
        rng = TorchGenerator(seed)
        spec = m.conditioning
        encoder = self._open(spec.image_encoder)
        started = time.perf_counter()
        embedding = encoder.run({"pixel_values": clip_pixels(init)})["image_embeds"][:, None]  # [1, 1, width]
        self.timings.image_encode += time.perf_counter() - started
        self._done(encoder)
        pixels = img.from_pil(init, width, height)
        pixels = (pixels + aug * rng.randn(pixels.shape)).astype(np.float32)
        vae_encoder = self._open("vae_encoder")
        started = time.perf_counter()
        moments = vae_encoder.run({"sample": pixels})["latent_parameters"]
        self.timings.vae_encode += time.perf_counter() - started
        self._done(vae_encoder)
        latent = np.split(moments, 2, axis=1)[0]  # the mode, unscaled: as SVD was trained
        ids = {"fps": fps - 1, "motion_bucket_id": motion, "noise_aug_strength": aug}
        cond = {"encoder_hidden_states": embedding, "image_latents": latent,
                "time_ids": np.asarray([[ids[name] for name in spec.time_ids]], np.float32)}
        uncond = {**cond, "encoder_hidden_states": np.zeros_like(embedding),
                  "image_latents": np.zeros_like(latent)} if guided else None
        ramp = np.linspace(low, guidance, frames).reshape(1, frames, 1, 1, 1).astype(np.float32)
        noise = rng.randn(shape)
        x = noisy_start(latent_space(m.prediction), float(sigmas[0]), noise, None)
        clock = _StepClock(self.timings, progress, len(sigmas) - 1, interrupt, on_step)
        x, interrupted = self._denoise([(self, sigmas)], [(cond, uncond)], x, ramp, sampler, rng, clock, 1,
                                       plan.split_guidance, None, None)
        if auto and budget is None:  # again, now that the memory the denoiser held is known
            chunk = min(chunk, self._decode_frames(width, height, frames, memory.available()))
        decoder = self._open("vae_decoder")
        started = time.perf_counter()
        pixels = vae.decode(decoder, x[0].astype(np.float32), m.latent_scale, m.latent_shift, plan.vae_tile, down,
                            frames=chunk)
        self.timings.vae_decode += time.perf_counter() - started
        self._done(decoder)
        self.timings.total = time.perf_counter() - began
        ran = len(self.timings.steps)
        fields = {
            "Steps": ran if interrupted else steps,
            "Interrupted": f"after {ran} of {len(sigmas) - 1} steps" if interrupted else None,
            "Sampler": A1111_NAMES[sampler],
            "Schedule type": A1111_SCHEDULES.get(schedule),
            "CFG scale": guidance,
            "Min CFG scale": low,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": self.package.name,
            "Frames": frames, "FPS": fps, "Motion bucket id": v["motion_bucket_id"], "Noise aug strength": aug,
            "Decode chunk": chunk,
            "Version": f"edgediff {__version__}",
            "Device": self.device,
        }
        out = img.to_pil(pixels)
        for frame in out:
            frame.info["parameters"] = img.a1111_parameters("", "", fields)
            frame.info["seed"] = seed
        return out

    def _each(self, prompts: list[str], negatives: str | Sequence[str], seed: int | None,
               options: dict) -> list[Image.Image]:
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts) or not prompts or not all(isinstance(p, str) for p in prompts + negatives):
            raise UsageError(f"prompt: a list of prompts (got {len(prompts)}) pairs with one negative prompt or "
                             f"a list of as many (got {len(negatives)}), all text")
        first = random.randrange(2**32) if seed is None else int(seed)
        return [self.generate(p, n, seed=(first + i) % 2**32, **options)
                for i, (p, n) in enumerate(zip(prompts, negatives, strict=True))]

    def _decode_frames(self, width: int, height: int, frames: int, budget: float | None) -> int:
        """The most frames (up to `frames`) whose decode's estimate fits `budget` bytes (1 if none;
        where the system does not say what is available, 8 GB)."""
        budget = budget or 8 * memory.GB
        return next((c for c in range(frames, 1, -1) if memory.stages(
            self.package, width=width, height=height, guided=False, level=self._asked_level, vae_tile=self.vae_tile,
            split_guidance=False, img2img=True, keep_loaded=self.keep_loaded, decode_frames=c)["VAE decode"] <= budget),
            1)

    def _plan(self, width: int, height: int, guided: bool, img2img: bool, frames: int = 1,
              decode_frames: int = 1) -> memory.Plan:
        """How this image (or video) runs within memory (runtime.memory), decided before anything
        loads. With a budget the plan fits it or the run is refused; without one, the machine's
        available memory is the budget the plan tries to fit, and a warning says when it cannot."""
        asked = dict(width=width, height=height, guided=guided, img2img=img2img, keep_loaded=self.keep_loaded,
                     expand=self.options.weights == "expanded", frames=frames, decode_frames=decode_frames,
                     level=self._asked_level, vae_tile=self.vae_tile, split_guidance=self.split_guidance)
        if self.memory_budget is not None:
            plan = memory.plan(self.package, budget=self.memory_budget * memory.GB, **asked)
        else:
            free = memory.available()
            try:
                plan = memory.plan(self.package, budget=free, **asked)
            except UsageError:
                plan = memory.plan(self.package, budget=None, **asked)
                warnings.warn(f"{self.package.name} at {width}x{height} needs an estimated {plan.describe()}; this "
                              f"machine has {free / memory.GB:.1f} GB available: it may not fit", RuntimeWarning,
                              stacklevel=3)
        changes = [what for what, now, was in (
            ("MatMulNBits with fp32 activations", plan.accuracy_level, self._asked_level),
            (f"the VAE in {plan.vae_tile}-pixel tiles", plan.vae_tile, self.vae_tile),
            ("guidance as two half batches", plan.split_guidance, self.split_guidance)) if now != was]
        if changes:
            budget = (f"{arg('memory_budget')} {self.memory_budget:g} GB" if self.memory_budget is not None
                      else "the memory available")
            warnings.warn(f"to fit {budget}, this image runs with {', '.join(changes)} (estimated "
                          f"{plan.describe()})", RuntimeWarning, stacklevel=3)
        if plan.accuracy_level != self.options.accuracy_level:
            self.options = dataclasses.replace(self.options, accuracy_level=plan.accuracy_level)
            for comp in self._components.values():
                comp.release()
            self._components.clear()
        self.plan = plan
        self._plan_args = {k: v for k, v in asked.items() if k != "keep_loaded"} | {
            "level": plan.accuracy_level, "vae_tile": plan.vae_tile, "split_guidance": plan.split_guidance}
        return plan

    def memory_note(self) -> str:
        """The last image's estimated peak and, with components kept loaded, what keeping them cost."""
        plan = self.plan
        if plan is None:
            return "no image made yet"
        note = f"estimated {plan.describe()}"
        if self.keep_loaded:
            released = memory.stages(self.package, keep_loaded=False, **self._plan_args)
            extra = (plan.need - max(released.values())) / memory.GB
            note += (f"; keeping every component loaded adds an estimated {extra:.1f} GB to it (without "
                     f"{arg('keep_loaded')} each is released after use)")
        return note

    @property
    def device(self) -> str:
        """The device, runtime and precision that ran the last image's denoiser (or will run it,
        before the first image): 'cpu onnxruntime 1.32.0 fp32', 'cpu openvino 2026.4.1 bf16'. The
        other components' are in `ran()`."""
        name = self.manifest.denoiser
        comp = self._components.get(name)
        runtime = comp.ran_on if comp is not None and comp.ran_on else runtime_name(self.options.device,
                                                                                     self.options.precision)
        if runtime.startswith("openvino "):  # 'openvino 2026.4.1 CPU bf16': it says its precision
            return f"cpu {runtime.replace(' CPU ', ' ')}"
        where = "cuda" if "CUDA" in runtime else "cpu"
        runtime = runtime.removesuffix(" CPUExecutionProvider").removesuffix(" CUDAExecutionProvider")
        return f"{where} {runtime} {self._precision(name, comp, detail=False)}"

    def _precision(self, name: str, comp: Component | None, detail: bool = True) -> str:
        """A component's precision as it ran: the package's, or for weights bound from a file what
        they are stored as there, most first (and whether MatMulNBits took int8 activations)."""
        precision = self.manifest.components[name].precision
        if comp is None or not comp.bindings:
            return precision
        stored: dict[str, int] = {}
        for b in comp.bindings:
            stored[b.stored] = stored.get(b.stored, 0) + b.weights
        precision = "+".join(sorted(stored, key=stored.get, reverse=True))
        if bits := {FORMATS[b.stored].nbits for b in comp.bindings if b.kind == "quantized"}:
            levels = self.options.accuracy_level
            level = max(levels.get(n, 0) for n in bits) if isinstance(levels, dict) else levels
            precision += (f" in MatMulNBits ({'int8' if level == 4 else 'fp32'} activations, accuracy level {level})"
                          if detail else f" ({'int8' if level == 4 else 'fp32'} activations)")
        return precision

    def ran(self) -> str:
        """What computed the last image: the runtime and, per component, its precision."""
        by_runtime: dict[str, list[str]] = {}
        for name, comp in self._components.items():
            by_runtime.setdefault(comp.ran_on, []).append(f"{name} {self._precision(name, comp)}")
        return "; ".join(f"{where}: {', '.join(parts)}" for where, parts in by_runtime.items())

    def _check_refiner(self, refiner: Pipeline) -> None:
        """A refiner continues this model's latent: it must read the same latent space."""
        mine, theirs = self.manifest, refiner.manifest
        same = (mine.latent_channels, mine.latent_scale, mine.latent_shift, mine.vae_downscale) == (
            theirs.latent_channels, theirs.latent_scale, theirs.latent_shift, theirs.vae_downscale)
        if not same:
            raise UsageError(
                f"{arg('refiner')} {refiner.package.name} ({theirs.family}: {theirs.latent_channels} latent channels, "
                f"scale {theirs.latent_scale}) cannot continue {self.package.name} ({mine.family}: "
                f"{mine.latent_channels} channels, scale {mine.latent_scale}): their latent spaces differ; "
                "pair a base with a refiner of its own family"
            )

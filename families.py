"""The one table of model families: what differs between families is data here, not code.

Constants are the models' own (diffusers configs, the LDM/SGM yaml files, ComfyUI's
latent_formats.py).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from edgediff.errors import SourceError, UsageError


@dataclass(frozen=True)
class Rule:
    """A key pattern (fnmatch) that must (or must not) match a tensor, optionally of a rank."""

    pattern: str
    ndim: int | None = None
    present: bool = True

    def holds(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        hits = [k for k in fnmatch.filter(shapes, self.pattern)]
        if self.ndim is not None:
            hits = [k for k in hits if len(shapes[k]) == self.ndim]
        return bool(hits) == self.present

    def describe(self) -> str:
        rank = f" of rank {self.ndim}" if self.ndim is not None else ""
        return f"{'a' if self.present else 'no'} tensor '{self.pattern}'{rank}"


@dataclass(frozen=True)
class Signature:
    """All rules of one layout ('ldm' single-file names or 'diffusers' folder names)."""

    layout: str
    rules: tuple[Rule, ...]

    def score(self, shapes: Mapping[str, Sequence[int]]) -> tuple[float, list[Rule]]:
        """(share of the required tensors that are there, the rules that fail)."""
        failed = [r for r in self.rules if not r.holds(shapes)]
        required = [r for r in self.rules if r.present]
        found = sum(1 for r in required if r not in failed)
        return found / max(len(required), 1), failed


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder and how the family uses it."""

    component: str = "text_encoder"
    tokenizer: str = "tokenizer"
    kind: str = "clip"  # 'clip' (CLIPTextModel) | 'clip_projection' (pooled output projected) | 't5' (encoder)
    ldm_prefix: str = "cond_stage_model.transformer."  # where single files keep it, when read
    ldm_layout: str = "hf"  # its names there: 'hf' (transformers') or 'open_clip' (fused q/k/v)
    gguf_prefix: str = "cond_stage_model.transformer."  # where edgediff writes it (stable-diffusion.cpp's names)
    hidden_act: str = "quick_gelu"  # when the config must be rebuilt from a single file
    head_dim: int = 64
    norm_hidden: bool = True  # final layer norm applied to the chosen hidden layer
    hidden_layer: int = 1  # the layer the denoiser sees, counted from the last (2: penultimate)
    pooled: bool = False  # the denoiser also takes the pooled output
    pad_token: str = "<|endoftext|>"
    max_length: int = 77
    # how its hidden states join the context: 'features' (side by side with the encoders before
    # it, SDXL), 'sequence' (as more tokens after them, theirs zero-padded to its width: SD3's
    # T5), 'none' (only its pooled output is used: Flux's CLIP)
    context: str = "features"


@dataclass(frozen=True)
class ImageEncoder:
    """An image-to-video family's image encoder: a CLIP vision tower whose projected class token
    is the denoiser's context (SVD: OpenCLIP ViT-H/14, 1280 wide in 16 heads of 80)."""

    component: str = "image_encoder"
    ldm_prefix: str = "conditioner.embedders.0.open_clip.model.visual."  # where single files keep it
    ldm_layout: str = "open_clip"  # its names there ('hf': transformers' CLIPVisionModelWithProjection)
    head_dim: int = 80  # its heads' width, when the config must be rebuilt from a single file
    hidden_act: str = "gelu"


@dataclass(frozen=True)
class Video:
    """An image-to-video family's run defaults (diffusers' StableVideoDiffusionPipeline's)."""

    frames: int = 14  # a folder's U-Net config says its own (`num_frames`: SVD-XT 25)
    fps: int = 7  # the model is conditioned on fps - 1, as SVD was trained
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02  # noise added to the conditioning frame, and said to the model
    min_guidance: float = 1.0  # guidance ramps from this on the first frame to `guidance` on the last
    decode_chunk: int = 0  # frames the VAE decodes per call (0: as memory allows)
    width: int = 1024
    height: int = 576


@dataclass(frozen=True)
class LatentFormat:
    """latent = (vae_latent - shift) * scale; the denoiser sees `latent`."""

    channels: int
    scale: float
    shift: float = 0.0
    downscale: int = 8


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser takes besides the text: SDXL's `time_ids` are built from the names in
    `time_ids` (original_size, crop, target_size: two numbers each; aesthetic_score: one)."""

    time_ids: tuple[str, ...] = ()
    aesthetic_score: float = 6.0  # the refiner's, for the prompt ...
    negative_aesthetic_score: float = 2.5  # ... and the negative prompt
    zero_empty_negative: bool = False  # an empty negative prompt is zeros, not encoded text
    guidance_embedding: int = 0  # LCM: guidance enters as a `timestep_cond` of this width, not CFG
    guidance_input: bool = False  # Flux dev: guidance enters as a number (`guidance`), not CFG
    cfg: bool = True  # classifier-free guidance applies (Flux schnell: distilled without it)
    # an image-to-video model's image encoder component (SVD): the context is an image's
    # embedding, not text; `time_ids` are then ('fps', 'motion_bucket_id', 'noise_aug_strength')
    image_encoder: str = ""

    @property
    def guidance_embedded(self) -> bool:
        """Guidance is an input of the model: no negative prompt, no second batch."""
        return bool(self.guidance_embedding) or self.guidance_input

    @property
    def time_id_count(self) -> int:
        """Numbers in `time_ids`: two per size or crop, one for anything else (the aesthetic score,
        SVD's fps, motion bucket and noise augmentation)."""
        return sum(2 if name in ("original_size", "crop", "target_size") else 1 for name in self.time_ids)


@dataclass(frozen=True)
class Memory:
    """Activation bytes per unit of work, measured at full size with random weights on a 2-core
    Zen 4 EPYC, onnxruntime 1.32 (benchmarks/RESULTS.md, "Memory"); runtime.memory scales them to
    estimate a run before it loads. The denoiser's are per latent pixel and batch item."""

    denoiser_per_latent_pixel: float
    # a text encoder's, whatever the prompt (fixed costs dominate: T5-XXL's F16 embedding alone
    # is a 0.5 GB fp32 cast as it runs): CLIP-L 0.16 GB, CLIP-G 0.29 GB; T5-XXL 0.81 GB at 512
    # tokens (Flux), 1.11 GB for two prompts of 256 (SD3.5)
    clip_activations: float = 0.3e9
    t5_activations: float = 1.15e9
    vae_per_pixel: float = 4.4e3  # decode whole: 1.1 GB at 512x512 (4.3 KB a pixel), 4.4 GB at 1024x1024
    # in tiles: a tile's activations as above, and per pixel of the whole image its output and
    # blend weights (1024x1024 in 512-pixel tiles: 1.41 GiB in all, measured)
    vae_tiled_per_pixel: float = 16.0


@dataclass(frozen=True)
class Defaults:
    sampler: str
    schedule: str
    steps: int
    guidance: float
    resolution: int


_SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    text_encoders: tuple[TextEncoder, ...]
    latent: LatentFormat
    prediction: str  # 'eps' | 'v' | 'flow' (a package's scheduler config may say otherwise)
    defaults: Defaults
    signatures: tuple[Signature, ...]
    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"  # diffusers' class of the denoiser
    size_multiple: int = 8  # image sides are multiples of this (latent patches of 2 in a DiT: 16)
    # flow models' `normal` spacing ends at the scheduler's smallest sigma ('min', SD3) or at
    # 1/steps ('last_step': FluxPipeline's linspace(1, 1/n))
    flow_normal_end: str = "min"
    # img2img with strength s over n steps runs floor(s*n) steps ('steps': StableDiffusion(XL)
    # Img2ImgPipeline) or skips floor(n - s*n) ('skip': SD3's and Flux's, one more when s*n is fractional)
    strength_rounding: str = "steps"
    role: str = "base"  # 'refiner': finishes images (img2img, or after a base), never starts one
    conditioning: Conditioning = Conditioning()
    onnx_pipeline: str = "ORTStableDiffusionPipeline"  # optimum's class, in model_index.json
    vae_fp16: bool = True  # its stock VAE runs in fp16 (SDXL's overflows unless the VAE says so)
    scheduler_config: Mapping[str, object] = field(default_factory=lambda: dict(_SD_SCHEDULER))
    # the scheduler of its guidance-distilled variant, for single files (Flux dev: shift by size)
    guided_scheduler_config: Mapping[str, object] | None = None
    # activations (runtime.memory); the U-Net's measured on SD 1.5 at 512x512, guided (0.34 GB)
    memory: Memory = Memory(denoiser_per_latent_pixel=4.2e4)
    unet_heads: int | None = None  # LDM `num_heads` (SD 1.x) ...
    unet_head_channels: int | None = None  # ... or `num_head_channels` (SD 2.x)
    image_encoder: ImageEncoder | None = None  # image-to-video: what conditions the denoiser instead of text
    video: Video | None = None  # image-to-video: the run defaults

    @property
    def components(self) -> list[str]:
        """Its graphs, in export order: text (or image) encoders, the denoiser, the VAE's two halves."""
        encoders = [te.component for te in self.text_encoders]
        if self.image_encoder is not None:
            encoders.append(self.image_encoder.component)
        return encoders + [self.denoiser, "vae_decoder", "vae_encoder"]


def _unet_rules(prefix: str, proj_ndim: int, label_emb: str, label: bool) -> tuple[Rule, ...]:
    return (
        Rule(prefix + "*proj_in.weight", ndim=proj_ndim),
        Rule(prefix + label_emb, present=label),
    )


DENOISER = "model.diffusion_model."  # the denoiser's prefix in single files (LDM/SGM, stable-diffusion.cpp)
# Prefixes that stay in a ComfyUI-GGUF file after it strips `model.diffusion_model.`.
_BARE_DENOISER = ("input_blocks.", "middle_block.", "output_blocks.", "joint_blocks.",
                  "double_blocks.", "single_blocks.", "time_embed.", "label_emb.", "out.",
                  "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def bare_denoiser(names) -> bool:
    """Names of a denoiser-only file without `model.diffusion_model.` (ComfyUI-GGUF, BFL's FLUX
    release)."""
    names = list(names)
    return bool(names) and all(k.startswith(_BARE_DENOISER) or "." not in k for k in names)


_SD1_TE = TextEncoder()
_SD2_TE = TextEncoder(
    ldm_prefix="cond_stage_model.model.", ldm_layout="open_clip", hidden_act="gelu", pad_token="!"
)
_XL_G = TextEncoder(component="text_encoder_2", tokenizer="tokenizer_2", kind="clip_projection",
                    hidden_act="gelu", norm_hidden=False, hidden_layer=2, pooled=True, pad_token="!",
                    ldm_layout="open_clip")
_T5 = TextEncoder(component="text_encoder_3", tokenizer="tokenizer_3", kind="t5", norm_hidden=False,
                 pad_token="<pad>", max_length=256, context="sequence",
                 ldm_prefix="text_encoders.t5xxl.transformer.", gguf_prefix="text_encoders.t5xxl.transformer.")
_LDM = DENOISER

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="sd1",
            title="Stable Diffusion 1.x",
            text_encoders=(_SD1_TE,),
            latent=LatentFormat(channels=4, scale=0.18215),
            prediction="eps",
            defaults=Defaults("dpmpp_2m", "karras", 20, 7.5, 512),
            unet_heads=8,
            signatures=(
                Signature("ldm", (
                    Rule(_LDM + "input_blocks.0.0.weight"),
                    *_unet_rules(_LDM, 4, "label_emb.*", False),
                    Rule("cond_stage_model.model.*", present=False),
                    Rule("conditioner.*", present=False),
                )),
                Signature("diffusers", (
                    Rule("unet.conv_in.weight"),
                    *_unet_rules("unet.", 4, "add_embedding.*", False),
                )),
            ),
        ),
        Family(
            name="sd2",
            title="Stable Diffusion 2.x",
            text_encoders=(_SD2_TE,),
            latent=LatentFormat(channels=4, scale=0.18215),
            prediction="eps",  # 768-v checkpoints say v in their scheduler config
            defaults=Defaults("dpmpp_2m", "karras", 20, 7.5, 768),
            unet_head_channels=64,
            scheduler_config={**_SD_SCHEDULER, "_class_name": "DDIMScheduler"},
            signatures=(
                Signature("ldm", (
                    Rule(_LDM + "input_blocks.0.0.weight"),
                    *_unet_rules(_LDM, 2, "label_emb.*", False),
                    Rule("conditioner.*", present=False),
                )),
                Signature("diffusers", (
                    Rule("unet.conv_in.weight"),
                    *_unet_rules("unet.", 2, "class_embedding.*", False),
                    Rule("unet.add_embedding.*", present=False),
                )),
            ),
        ),
        Family(
            name="sdxl",
            memory=Memory(denoiser_per_latent_pixel=2.3e4),  # SDXL at 1024x1024, guided: 0.74 GB
            title="Stable Diffusion XL (base)",
            text_encoders=(
                TextEncoder(norm_hidden=False, hidden_layer=2, ldm_prefix="conditioner.embedders.0.transformer."),
                replace(_XL_G, ldm_prefix="conditioner.embedders.1.model.",
                        gguf_prefix="cond_stage_model.1.transformer."),
            ),
            conditioning=Conditioning(time_ids=("original_size", "crop", "target_size"), zero_empty_negative=True),
            onnx_pipeline="ORTStableDiffusionXLPipeline",
            vae_fp16=False,
            latent=LatentFormat(channels=4, scale=0.13025),
            prediction="eps",
            defaults=Defaults("dpmpp_2m", "karras", 30, 6.0, 1024),
            scheduler_config={**_SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler",
                              "timestep_spacing": "leading"},
            unet_head_channels=64,
            signatures=(
                Signature("ldm", (
                    *_unet_rules(_LDM, 2, "label_emb.*", True),
                    Rule("conditioner.embedders.0.model.*", present=False),
                    Rule(_LDM + "middle_block.0.time_stack.*", present=False),
                )),
                Signature("diffusers", (
                    *_unet_rules("unet.", 2, "add_embedding.*", True),
                    Rule("text_encoder.*"),
                )),
            ),
        ),
        Family(
            name="sdxl-refiner",
            memory=Memory(denoiser_per_latent_pixel=2.3e4),  # as SDXL's (not measured)
            title="Stable Diffusion XL refiner",
            text_encoders=(replace(_XL_G, ldm_prefix="conditioner.embedders.0.model."),),
            role="refiner",
            onnx_pipeline="ORTStableDiffusionXLImg2ImgPipeline",
            vae_fp16=False,
            conditioning=Conditioning(time_ids=("original_size", "crop", "aesthetic_score")),
            latent=LatentFormat(channels=4, scale=0.13025),
            prediction="eps",
            defaults=Defaults("dpmpp_2m", "karras", 30, 6.0, 1024),
            scheduler_config={**_SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler",
                              "timestep_spacing": "leading"},
            unet_head_channels=64,
            signatures=(
                Signature("ldm", (
                    *_unet_rules(_LDM, 2, "label_emb.*", True),
                    Rule("conditioner.embedders.0.model.*"),
                )),
                Signature("diffusers", (
                    *_unet_rules("unet.", 2, "add_embedding.*", True),
                    Rule("text_encoder.*", present=False),
                    Rule("unet.mid_block.resnets.0.temporal_res_block.*", present=False),
                )),
            ),
        ),
        Family(
            name="sd3",
            memory=Memory(denoiser_per_latent_pixel=1.36e5),  # SD3.5-medium at 512x512, guided: 1.12 GB
            title="Stable Diffusion 3 / 3.5 (MMDiT)",
            text_encoders=(
                TextEncoder(kind="clip_projection", norm_hidden=False, hidden_layer=2, pooled=True,
                            ldm_prefix="text_encoders.clip_l.transformer.",
                            gguf_prefix="text_encoders.clip_l.transformer."),
                replace(_XL_G, ldm_prefix="text_encoders.clip_g.transformer.", ldm_layout="hf",
                        gguf_prefix="text_encoders.clip_g.transformer."),
                _T5,
            ),
            latent=LatentFormat(channels=16, scale=1.5305, shift=0.0609),
            prediction="flow",
            defaults=Defaults("euler", "normal", 28, 7.0, 1024),
            denoiser="transformer",
            denoiser_class="SD3Transformer2DModel",
            size_multiple=16,
            strength_rounding="skip",
            onnx_pipeline="ORTStableDiffusion3Pipeline",
            scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                              "shift": 3.0},
            signatures=(
                Signature("ldm", (Rule(_LDM + "joint_blocks.*"),)),
                Signature("diffusers", (Rule("transformer.transformer_blocks.*.ff_context.*"),
                                        Rule("transformer.single_transformer_blocks.*",
                                             present=False))),
            ),
        ),
        Family(
            name="flux",
            memory=Memory(denoiser_per_latent_pixel=1.21e5),  # FLUX.1-schnell at 512x512: 0.50 GB
            title="FLUX.1 (schnell / dev)",
            text_encoders=(
                TextEncoder(pooled=True, context="none", ldm_prefix="text_encoders.clip_l.transformer.",
                            gguf_prefix="text_encoders.clip_l.transformer."),
                replace(_T5, component="text_encoder_2", tokenizer="tokenizer_2", max_length=512),
            ),
            latent=LatentFormat(channels=16, scale=0.3611, shift=0.1159),
            prediction="flow",
            defaults=Defaults("euler", "normal", 4, 0.0, 1024),  # schnell's; dev's from its weights
            conditioning=Conditioning(cfg=False),
            denoiser="transformer",
            denoiser_class="FluxTransformer2DModel",
            size_multiple=16,
            flow_normal_end="last_step",
            strength_rounding="skip",
            onnx_pipeline="ORTFluxPipeline",
            scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                              "shift": 1.0},
            guided_scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                     "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                                     "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
            signatures=(
                Signature("ldm", (Rule(_LDM + "double_blocks.*"),)),
                Signature("diffusers", (Rule("transformer.single_transformer_blocks.*"),)),
            ),
        ),
        Family(
            # the full-size architecture at 1024x576, 14 frames (benchmarks/RESULTS.md, issue 30): the
            # U-Net's activations 0.50-0.60 GB a frame (fp32, int8-weights), the temporal decoder's
            # 3.6 GB a frame (6.1 KB a pixel: decode chunks of 1, 2 and 4 peaked at 2.8, 6.4, 13.6 GB)
            memory=Memory(denoiser_per_latent_pixel=6.5e4, vae_per_pixel=6.2e3),
            name="svd",
            title="Stable Video Diffusion (image to video)",
            text_encoders=(),
            image_encoder=ImageEncoder(),
            video=Video(),
            latent=LatentFormat(channels=4, scale=0.18215),
            prediction="v",
            defaults=Defaults("euler", "karras", 25, 3.0, 576),
            denoiser_class="UNetSpatioTemporalConditionModel",
            conditioning=Conditioning(time_ids=("fps", "motion_bucket_id", "noise_aug_strength"),
                                      image_encoder="image_encoder"),
            onnx_pipeline="StableVideoDiffusionPipeline",
            vae_fp16=False,  # its temporal decoder's config says force_upcast
            # EDM: continuous sigmas, c_noise = ln(sigma) / 4 as the timestep, Karras sigmas
            scheduler_config={**_SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction",
                              "timestep_type": "continuous", "use_karras_sigmas": True, "sigma_min": 0.002,
                              "sigma_max": 700.0, "timestep_spacing": "leading", "interpolation_type": "linear"},
            unet_head_channels=64,
            signatures=(
                Signature("ldm", (Rule(_LDM + "middle_block.0.time_stack.*"),)),
                Signature("diffusers", (Rule("unet.mid_block.resnets.0.temporal_res_block.*"),)),
            ),
        ),
    )
}


# Distilled variants: the same tensors as their base family, so never detected from shapes
# (no signatures); chosen with --family, or recognised by their scheduler config below.
_TURBO = dict(defaults=Defaults("euler_a", "normal", 1, 0.0, 512), signatures=())
_TURBO_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}
FAMILIES.update({
    "sd-turbo": replace(FAMILIES["sd2"], name="sd-turbo", title="SD-Turbo (SD 2.1, distilled)", **_TURBO,
                        scheduler_config={**FAMILIES["sd2"].scheduler_config, **_TURBO_SCHEDULER}),
    "sdxl-turbo": replace(FAMILIES["sdxl"], name="sdxl-turbo", title="SDXL-Turbo (distilled)", **_TURBO,
                          scheduler_config={**FAMILIES["sdxl"].scheduler_config, **_TURBO_SCHEDULER}),
})

# What a source's scheduler config says about how its model is run (distilled models): the
# first row whose keys all match overrides the family's defaults.
SCHEDULER_DEFAULTS: tuple[tuple[Mapping[str, object], Mapping[str, object]], ...] = (
    # LCM, and LCM-LoRA fused into a model: few steps; CFG off unless the UNet embeds guidance
    ({"_class_name": "LCMScheduler"}, {"sampler": "lcm", "schedule": "lcm", "steps": 4, "guidance": 1.0}),
    # SD-Turbo and SDXL-Turbo (adversarial distillation): one step, no guidance, trailing spacing
    (_TURBO_SCHEDULER, {"sampler": "euler_a", "schedule": "normal", "steps": 1, "guidance": 0.0}),
)
EMBEDDED_GUIDANCE = 8.5  # diffusers' LatentConsistencyModelPipeline default
DISTILLED_GUIDANCE = {"steps": 28, "guidance": 3.5}  # diffusers' FluxPipeline defaults (dev)


def scheduler_defaults(config: Mapping[str, object], conditioning: Conditioning) -> dict[str, object]:
    """Defaults implied by a scheduler config (empty when none applies)."""
    found = next((dict(d) for match, d in SCHEDULER_DEFAULTS
                  if all(config.get(k) == v for k, v in match.items())), {})
    if conditioning.guidance_embedding:
        found["guidance"] = EMBEDDED_GUIDANCE
    if conditioning.guidance_input:
        found.update(DISTILLED_GUIDANCE)
    return found


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UsageError(
            f"unknown model family '{name}'; known families: {', '.join(FAMILIES)}"
        ) from None


def detect_family(shapes: Mapping[str, Sequence[int]], where: str) -> tuple[Family, str]:
    """The one family (and layout) whose signature `shapes` satisfies, or an error naming near misses."""
    matches, scored = [], []
    for family in FAMILIES.values():
        for sig in family.signatures:
            share, failed = sig.score(shapes)
            if not failed:
                matches.append((family, sig.layout))
            scored.append((share, family, sig, failed))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(f"{f.name} ({layout})" for f, layout in matches)
        raise SourceError(
            f"{where}: the tensors match more than one family ({names}); "
            "pass --family NAME to choose"
        )
    scored.sort(key=lambda s: -s[0])
    near = "; ".join(
        f"{fam.name} ({sig.layout} names) lacks " + ", ".join(r.describe() for r in failed)
        for frac, fam, sig, failed in scored[:3]
        if frac > 0
    )
    raise SourceError(
        f"{where}: not a known model architecture ({len(shapes)} tensors). "
        f"Closest: {near or 'none share any tensor names'}. "
        f"Supported families: {', '.join(FAMILIES)}; pass --family NAME if you know it."
    )

"""Tiny seeded random models in the real architectures, saved as diffusers folders.

Config "sd1" keeps the rules a single-file checkpoint must be read back with (8 attention heads
in the UNet, 64-wide CLIP heads, 32 groups in every GroupNorm), so it also round-trips through
the LDM layout; the other configs vary widths, depths, head counts and prediction type.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgediff.benchmarks.synthetic import write_model_index

from clip_vocab import write_clip_tokenizer

CONFIGS = {
    "sd1": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=1, intermediate_size=128),
        vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
        family="sd1",
    ),
    "sd1-deep": dict(
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=4,
                  transformer_layers_per_block=(1, 2, 1),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96),
        vae=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=2),
        family="sd1",
    ),
    "sd2-v": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                  use_linear_projection=True,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  hidden_act="gelu"),
        vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
        family="sd2",
        prediction="v_prediction",
    ),
}

# "sdxl" and "sdxl-refiner" keep SDXL's single-file rules (64-wide heads everywhere), so they
# round-trip through the SGM layout
_XL_UNET = dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
_XL_TEXT = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=1, intermediate_size=128)
_XL_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, scaling_factor=0.13025)
CONFIGS.update({
    "sd1-lcm": dict(  # an LCM-distilled UNet: guidance enters as a 32-wide timestep_cond
        CONFIGS["sd1"], unet=dict(CONFIGS["sd1"]["unet"], time_cond_proj_dim=32), family="sd1",
        scheduler="LCMScheduler", pipeline="LatentConsistencyModelPipeline",
    ),
    "sdxl": dict(  # text_time conditioning: pooled text (32) + 6 time ids x 8
        unet=dict(_XL_UNET, projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2)),
        text=_XL_TEXT,
        text_2=dict(_XL_TEXT, hidden_act="gelu", projection_dim=32),
        vae=_XL_VAE,
        family="sdxl",
    ),
    "sdxl-wide": dict(  # other widths, heads and depths; attention at both levels
        unet=dict(_XL_UNET, block_out_channels=(32, 48), norm_num_groups=16, attention_head_dim=(4, 8),
                  transformer_layers_per_block=(2, 1), projection_class_embeddings_input_dim=24 + 6 * 8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(_XL_TEXT, hidden_size=48, num_attention_heads=4, num_hidden_layers=2),
        text_2=dict(_XL_TEXT, hidden_size=32, num_attention_heads=2, hidden_act="gelu", num_hidden_layers=4,
                    projection_dim=24),
        vae=_XL_VAE,
        family="sdxl",
    ),
    "sdxl-refiner": dict(  # one text encoder; 5 time ids (the aesthetic score replaces the target size)
        unet=dict(_XL_UNET, projection_class_embeddings_input_dim=32 + 5 * 8),
        text_2=dict(_XL_TEXT, hidden_act="gelu", projection_dim=32),
        vae=_XL_VAE,
        family="sdxl-refiner",
    ),
})

# the "sdxl" model with SDXL-Turbo's scheduler: euler a, trailing spacing
CONFIGS["sdxl-turbo"] = dict(CONFIGS["sdxl"], scheduler="EulerAncestralDiscreteScheduler", spacing="trailing")

# inpainting U-Nets (sd-1.5-inpainting, SDXL inpainting): 9 input channels, the latent, the mask and
# the masked image's latent
CONFIGS["sd1-inpaint"] = dict(CONFIGS["sd1"], in_channels=9, pipeline="StableDiffusionInpaintPipeline")
CONFIGS["sdxl-inpaint"] = dict(CONFIGS["sdxl"], in_channels=9, pipeline="StableDiffusionXLInpaintPipeline")

# DiT families: the context is the CLIPs' features side by side, zero-padded to T5's width, then
# T5's tokens; the pooled vector is both CLIPs' (16 + 24)
_T5 = dict(d_model=96, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
           feed_forward_proj="gated-gelu")  # T5 v1.1's gated GELU; its distance 128 (files do not say it)
# one head per CLIP (under 64 wide), 64-wide heads in the MMDiT: as single files are read back
_SD3_TEXT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=1, intermediate_size=64, projection_dim=16)
CONFIGS.update({
    "sd3": dict(
        transformer=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=64, num_attention_heads=2, joint_attention_dim=96,
                         caption_projection_dim=128, pooled_projection_dim=40, pos_embed_max_size=32),
        text=_SD3_TEXT,
        text_2=dict(_SD3_TEXT, hidden_size=48, hidden_act="gelu", projection_dim=24),  # CLIP-G's activation
        t5=_T5,
        vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16,
                 scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        family="sd3",
    ),
})
_FLUX_VAE = dict(CONFIGS["sd3"]["vae"], scaling_factor=0.3611, shift_factor=0.1159)
# rotary axes split as Flux's (16, 56, 56) of 128: an eighth, then half the rest each
_FLUX = dict(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2, in_channels=64,
             joint_attention_dim=96, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14))
_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
CONFIGS.update({
    # Flux: CLIP-L's pooled output only, T5 as the whole context; 2x2 latent patches packed
    "flux-schnell": dict(transformer=dict(_FLUX, guidance_embeds=False), text=_SD3_TEXT,
                         t5=_T5, vae=_FLUX_VAE, family="flux", scheduler=dict(_FLOW, shift=1.0)),
    "flux-dev": dict(transformer=dict(_FLUX, guidance_embeds=True, num_layers=2, num_single_layers=1),
                     text=_SD3_TEXT, t5=_T5, vae=_FLUX_VAE, family="flux",
                     scheduler=dict(_FLOW, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096)),
})
CONFIGS["sd35"] = dict(  # SD3.5 medium's additions: q/k RMS norm, a second attention in block 0
    CONFIGS["sd3"], transformer=dict(CONFIGS["sd3"]["transformer"], qk_norm="rms_norm", dual_attention_layers=(0,)))

SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


XL_SCHEDULER = dict(SCHEDULER, _class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                    interpolation_type="linear", use_karras_sigmas=False)


def build_tiny(dst: Path, name: str = "sd1", seed: int = 0) -> Path:
    """Write a diffusers folder for config `name`, every weight drawn from `seed`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name in SVD_CONFIGS:
        return build_tiny_svd(dst, name, seed)
    cfg = CONFIGS[name]
    dst = Path(dst)
    if "transformer" in cfg:
        return _build_tiny_dit(dst, cfg, seed)
    base_text = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                     bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=32)
    # (folder, tokenizer folder, model class, config, pad token), in the family's order
    encoders = [(folder, tok, model, dict(base_text, **cfg[key]), pad) for key, folder, tok, model, pad in (
        ("text", "text_encoder", "tokenizer", CLIPTextModel,
         "!" if cfg["family"] == "sd2" else "<|endoftext|>"),
        ("text_2", "text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, "!"),
    ) if key in cfg]
    torch.manual_seed(seed)
    context = sum(c["hidden_size"] for _, _, _, c, _ in encoders)
    unet = UNet2DConditionModel(sample_size=8, in_channels=cfg.get("in_channels", 4), out_channels=4,
                                cross_attention_dim=context, **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
                        **cfg["vae"])
    modules = [(unet, "unet"), (vae, "vae")]
    modules += [(model(CLIPTextConfig(**c)), folder) for folder, _, model, c, _ in encoders]
    _save(modules, dst)
    for _, tok, _, _, pad in encoders:
        write_clip_tokenizer(dst / tok, pad_token=pad)
    xl = cfg["family"].startswith("sdxl")
    scheduler = dict(XL_SCHEDULER if xl else SCHEDULER, prediction_type=cfg.get("prediction", "epsilon"))
    if "scheduler" in cfg:
        scheduler["_class_name"] = cfg["scheduler"]
    if "spacing" in cfg:
        scheduler["timestep_spacing"] = cfg["spacing"]
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    override = {"scheduler": ["diffusers", cfg["scheduler"]]} if "scheduler" in cfg else {}
    write_model_index(dst, cfg["family"], **override, **({"_class_name": cfg["pipeline"]} if "pipeline" in cfg else {}))
    return dst


def _build_tiny_dit(dst: Path, cfg: dict, seed: int) -> Path:
    """An SD3 or Flux folder: CLIPs, T5 (the tokenizer edgediff ships), the DiT and a 16-channel
    VAE."""
    import diffusers
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    import edgediff.convert

    base_text = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                     bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    sd3 = cfg["family"] == "sd3"
    clips = ([("text", "", CLIPTextModelWithProjection, "<|endoftext|>"), ("text_2", "_2", CLIPTextModelWithProjection, "!")]
             if sd3 else [("text", "", CLIPTextModel, "<|endoftext|>")])
    t5 = "_3" if sd3 else "_2"
    torch.manual_seed(seed)
    blocks = len(cfg["vae"]["block_out_channels"])
    modules = [
        (getattr(diffusers, "SD3Transformer2DModel" if sd3 else "FluxTransformer2DModel")(**cfg["transformer"]),
         "transformer"),
        (diffusers.AutoencoderKL(in_channels=3, out_channels=3, sample_size=64,
                                 down_block_types=("DownEncoderBlock2D",) * blocks,
                                 up_block_types=("UpDecoderBlock2D",) * blocks, **cfg["vae"]), "vae"),
        *[(model(CLIPTextConfig(**{**base_text, **cfg[key]})), "text_encoder" + n) for key, n, model, _ in clips],
        (T5EncoderModel(T5Config(vocab_size=32128, **cfg["t5"])), "text_encoder" + t5),
    ]
    _save(modules, dst)
    for _, n, _, pad in clips:
        write_clip_tokenizer(dst / ("tokenizer" + n), pad_token=pad)
    tokenizer = Path(edgediff.convert.__file__).parent / "data" / "t5_tokenizer" / "tokenizer.json"
    T5TokenizerFast(tokenizer_file=str(tokenizer)).save_pretrained(dst / ("tokenizer" + t5))
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        cfg.get("scheduler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                              "shift": 3.0}), indent=2))
    write_model_index(dst, cfg["family"])
    return dst


def _save(modules, dst: Path) -> None:
    """Save each (module, folder); random init leaves some layers at one value: give every
    weight a value of its own first."""
    import torch

    with torch.no_grad():
        for module, _ in modules:
            for param in module.parameters():
                if param.ndim == 1 and torch.all(param == param.flatten()[0]):
                    param.add_(torch.randn_like(param) * 0.02)
    for module, folder in modules:
        module.save_pretrained(dst / folder)


def build_tiny_controlnet(dst: Path, name: str = "sd1", seed: int = 1, channels: int = 3,
                          time_id_dim: int | None = None) -> Path:
    """A diffusers ControlNetModel folder for the tiny model `name` (diffusers' `from_unet` of its
    U-Net's config, seeded apart): its zero convolutions and the hint's last convolution are
    given random weights, so that the ControlNet changes the image. `time_id_dim`: SDXL's time
    ids embedded this wide (every released SDXL ControlNet: 256) instead of the tiny U-Net's."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    cfg = CONFIGS[name]
    context = sum(cfg[key]["hidden_size"] for key in ("text", "text_2") if key in cfg)
    unet_cfg = dict(cfg["unet"])
    if time_id_dim is not None:  # the pooled text keeps its width; the 6 time ids get wider
        pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
        unet_cfg.update(addition_time_embed_dim=time_id_dim, projection_class_embeddings_input_dim=pooled + 6 * time_id_dim)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=context,
                                **unet_cfg)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16),
                                    conditioning_channels=channels)
    with torch.no_grad():
        for module in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            for param in module.parameters():
                param.copy_(torch.randn_like(param) * 0.3)
    _save([(net, "")], Path(dst))
    return Path(dst)


# Stable Video Diffusion: a CLIP vision encoder (its projection is the U-Net's context), the
# spatio-temporal U-Net (8 input channels: the noisy latent and the conditioning frame's), the
# KL encoder with a temporal decoder. The pipeline resizes the image encoder's input to 224.
# "svd" keeps the single file's rules (64-wide heads in the U-Net, 80-wide in the image encoder,
# as SVD's ViT-H/14), so it round-trips through the SGM layout.
_SVD_VISION = dict(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=1,
                   image_size=224, patch_size=32, hidden_act="gelu", projection_dim=32)
_SVD_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, scaling_factor=0.18215)
SVD_CONFIGS = {
    "svd": dict(
        unet=dict(block_out_channels=(64, 128), layers_per_block=1, num_attention_heads=(1, 2), cross_attention_dim=32,
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_frames=4,
                  down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                  up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
        vision=_SVD_VISION, vae=_SVD_VAE,
    ),
    "svd-deep": dict(  # three levels, two layers a block, two transformer layers, other heads and widths
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, num_attention_heads=(1, 2, 4),
                  transformer_layers_per_block=(2, 1, 1), cross_attention_dim=48, addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=24, num_frames=5,
                  down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                                    "DownBlockSpatioTemporal"),
                  up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                                  "CrossAttnUpBlockSpatioTemporal")),
        vision=dict(_SVD_VISION, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
                    projection_dim=48),
        vae=dict(_SVD_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=2),
    ),
}
# what stable-video-diffusion-img2vid's scheduler_config.json says (EDM: continuous sigmas, v-prediction)
SVD_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous",
    "trained_betas": None, "use_karras_sigmas": True,
}


def svd_modules(name: str = "svd", seed: int = 0):
    """(image_encoder, unet, vae) of config `name`, every weight drawn from `seed`."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = SVD_CONFIGS[name]
    torch.manual_seed(seed)
    levels = len(cfg["vae"]["block_out_channels"])
    modules = (CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vision"])).eval(),
               UNetSpatioTemporalConditionModel(in_channels=8, out_channels=4, **cfg["unet"]).eval(),
               AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                                            **cfg["vae"]).eval())
    with torch.no_grad():  # random init leaves norms at 1, biases and mix factors at one value
        for module in modules:
            for param in module.parameters():
                if param.ndim <= 1 and torch.all(param == param.flatten()[0]):
                    param.add_(torch.randn_like(param) * (0.5 if param.numel() == 1 else 0.02))
    return modules


def build_tiny_svd(dst: Path, name: str = "svd", seed: int = 0) -> Path:
    """A diffusers StableVideoDiffusionPipeline folder of config `name`."""
    from transformers import CLIPImageProcessor

    dst = Path(dst)
    image_encoder, unet, vae = svd_modules(name, seed)
    for module, folder in ((image_encoder, "image_encoder"), (unet, "unet"), (vae, "vae")):
        module.save_pretrained(dst / folder)
    CLIPImageProcessor(crop_size=224, size=224).save_pretrained(dst / "feature_extractor")
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(SVD_SCHEDULER, indent=2))
    (dst / "model_index.json").write_text(json.dumps({
        "_class_name": "StableVideoDiffusionPipeline", "_diffusers_version": "0.24.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "image_encoder": ["transformers",
        "CLIPVisionModelWithProjection"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNetSpatioTemporalConditionModel"], "vae": ["diffusers", "AutoencoderKLTemporalDecoder"]},
        indent=2))
    return dst

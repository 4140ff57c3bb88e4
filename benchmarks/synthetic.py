"""Full-size architectures with random weights, so anyone can benchmark without downloading
weights (compute does not depend on the values). Needs the `convert` extra.

    python benchmarks/synthetic.py sd15 OUT_DIR     # writes a diffusers folder (sd15, sdxl, svd)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs)
SD15 = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=768),
    "scheduler": {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "trained_betas": None},
}
_CLIP_L = SD15["text"]
# Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs)
SDXL = {
    "family": "sdxl",
    "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    "vae": dict(SD15["vae"], sample_size=1024, scaling_factor=0.13025),
    "text": _CLIP_L,
    "text_2": dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280),
    "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                  "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
                  "prediction_type": "epsilon"},
}
# Stable Video Diffusion img2vid (stabilityai/stable-video-diffusion-img2vid configs; -xt differs only in
# num_frames=25): the spatio-temporal U-Net (8 input channels: the noisy latent and the image's), the
# CLIP ViT-H/14 vision encoder (its projection is the U-Net's context), the KL encoder with a temporal decoder
SVD = {
    "family": "svd",
    "unet": dict(sample_size=96, in_channels=8, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), num_attention_heads=(5, 10, 20, 20),
                 cross_attention_dim=1024, transformer_layers_per_block=1, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=768, num_frames=14,
                 down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
                 up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=768,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                scaling_factor=0.18215, force_upcast=True),
    "vision": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   num_channels=3, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
                   projection_dim=1024),
    # EDM: continuous sigmas, v-prediction (tests/tiny_models.SVD_SCHEDULER holds the same values)
    "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "sigma_max": 700.0, "sigma_min": 0.002, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "timestep_type": "continuous", "trained_betas": None,
                  "use_karras_sigmas": True},
}
ARCHITECTURES = {"sd15": SD15, "sdxl": SDXL, "svd": SVD}


SD1_MODEL_INDEX = {  # what diffusers' and optimum's pipelines read to know the folder's parts
    "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
    "requires_safety_checker": False, "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"]}


_XL_PARTS = {"scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "feature_extractor": [None, None], "image_encoder": [None, None],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"]}
MODEL_INDEX = {
    "sd1": SD1_MODEL_INDEX,
    "sdxl": {"_class_name": "StableDiffusionXLPipeline", **_XL_PARTS, "force_zeros_for_empty_prompt": True,
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]},
    "sdxl-refiner": {"_class_name": "StableDiffusionXLImg2ImgPipeline", **_XL_PARTS,
                     "force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True,
                     "text_encoder": [None, None], "tokenizer": [None, None]},
    "sd3": {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"], "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"], "image_encoder": [None, None],
            "feature_extractor": [None, None]},
    "flux": {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "image_encoder": [None, None], "feature_extractor": [None, None]},
    "svd": {"_class_name": "StableVideoDiffusionPipeline", "_diffusers_version": "0.24.0",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
            "vae": ["diffusers", "AutoencoderKLTemporalDecoder"]},
}


def write_model_index(dst: Path, family: str = "sd1", **override) -> None:
    index = {**MODEL_INDEX.get(family, SD1_MODEL_INDEX), **override}
    (Path(dst) / "model_index.json").write_text(json.dumps(index, indent=2))


def build(name: str, dst: Path, seed: int = 0) -> Path:
    """Write the diffusers folder of architecture `name`, one component at a time (a full-size
    SDXL UNet alone is 10 GB at fp32)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import edgediff.convert

    arch = ARCHITECTURES[name]
    dst = Path(dst)
    torch.manual_seed(seed)
    if arch.get("family") == "svd":
        return _build_svd(arch, dst)
    tokenizer = Path(edgediff.convert.__file__).parent / "data" / "clip_tokenizer"
    parts = [("unet", lambda: UNet2DConditionModel(**arch["unet"])), ("vae", lambda: AutoencoderKL(**arch["vae"])),
             ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**arch["text"])))]
    if "text_2" in arch:
        parts.append(("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_2"]))))
    for folder, make in parts:
        make().save_pretrained(dst / folder)  # each module is freed before the next is made
    shutil.copytree(tokenizer, dst / "tokenizer")
    if "text_2" in arch:  # SDXL's second tokenizer pads with "!"
        shutil.copytree(tokenizer, dst / "tokenizer_2")
        special = dst / "tokenizer_2" / "special_tokens_map.json"
        special.write_text(json.dumps({**json.loads(special.read_text()), "pad_token": "!"}, indent=2))
    (dst / "scheduler").mkdir(exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(arch["scheduler"], indent=2))
    write_model_index(dst, arch.get("family", "sd1"))
    return dst


def _build_svd(arch: dict, dst: Path) -> Path:
    """A StableVideoDiffusionPipeline folder (U-Net 1.52 B parameters, 6.1 GB at fp32), one module
    at a time."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    parts = [("image_encoder", lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**arch["vision"]))),
             ("unet", lambda: UNetSpatioTemporalConditionModel(**arch["unet"])),
             ("vae", lambda: AutoencoderKLTemporalDecoder(**arch["vae"]))]
    for folder, make in parts:
        make().save_pretrained(dst / folder)  # each module is freed before the next is made
    CLIPImageProcessor(crop_size=224, size=224).save_pretrained(dst / "feature_extractor")
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(arch["scheduler"], indent=2))
    write_model_index(dst, "svd")
    return dst


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="edgediff bench synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("architecture", choices=ARCHITECTURES)
    parser.add_argument("output", type=Path, help="the diffusers folder to write")
    args = parser.parse_args(argv)
    print(build(args.architecture, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def build_tiny(dst: Path, name: str = "sd1", seed: int = 0) -> Path:
    """Write a diffusers folder for config `name`, every weight drawn from `seed`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CONFIGS[name]
    dst = Path(dst)
    text_cfg = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                    bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=32)
    text_cfg.update(cfg["text"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                cross_attention_dim=text_cfg["hidden_size"], **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
                        **cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    with torch.no_grad():  # random init leaves some layers at zero; give every weight a value
        for module in (unet, vae, text_encoder):
            for param in module.parameters():
                if param.ndim == 1 and torch.all(param == param.flatten()[0]):
                    param.add_(torch.randn_like(param) * 0.02)
    for module, folder in ((unet, "unet"), (vae, "vae"), (text_encoder, "text_encoder")):
        module.save_pretrained(dst / folder)
    pad = "!" if cfg["family"] == "sd2" else "<|endoftext|>"
    write_clip_tokenizer(dst / "tokenizer", pad_token=pad)
    scheduler = dict(SCHEDULER, prediction_type=cfg.get("prediction", "epsilon"))
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    write_model_index(dst)
    return dst


"""Family detection: declarative signatures, exactly one match, near misses in the error.
Fake state dicts use real key names with tiny shapes (ComfyUI's model_detection_test idea)."""

from __future__ import annotations

import pytest

from edgediff.errors import SourceError, UsageError
from edgediff.families import FAMILIES, detect_family, get_family

M = "model.diffusion_model."
FAKES = {
    ("sd1", "ldm"): {
        M + "input_blocks.0.0.weight": (320, 4, 3, 3),
        M + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        M + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    },
    ("sd2", "ldm"): {
        M + "input_blocks.0.0.weight": (320, 4, 3, 3),
        M + "input_blocks.1.1.proj_in.weight": (320, 320),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    },
    ("sdxl", "ldm"): {
        M + "input_blocks.0.0.weight": (320, 4, 3, 3),
        M + "input_blocks.4.1.proj_in.weight": (640, 640),
        M + "label_emb.0.0.weight": (1280, 2816),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    },
    ("sdxl-refiner", "ldm"): {
        M + "input_blocks.0.0.weight": (384, 4, 3, 3),
        M + "input_blocks.4.1.proj_in.weight": (768, 768),
        M + "label_emb.0.0.weight": (1536, 2560),
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    },
    ("sd3", "ldm"): {
        M + "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
        M + "x_embedder.proj.weight": (1536, 16, 2, 2),
    },
    ("flux", "ldm"): {
        M + "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        M + "single_blocks.0.linear1.weight": (21504, 3072),
    },
    ("sd1", "diffusers"): {
        "unet.conv_in.weight": (320, 4, 3, 3),
        "unet.down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),
        "text_encoder.text_model.embeddings.token_embedding.weight": (49408, 768),
    },
    ("sd2", "diffusers"): {
        "unet.conv_in.weight": (320, 4, 3, 3),
        "unet.down_blocks.0.attentions.0.proj_in.weight": (320, 320),
        "text_encoder.text_model.embeddings.token_embedding.weight": (49408, 1024),
    },
    ("sdxl", "diffusers"): {
        "unet.conv_in.weight": (320, 4, 3, 3),
        "unet.down_blocks.1.attentions.0.proj_in.weight": (640, 640),
        "unet.add_embedding.linear_1.weight": (1280, 2816),
        "text_encoder.text_model.embeddings.token_embedding.weight": (49408, 768),
        "text_encoder_2.text_model.embeddings.token_embedding.weight": (49408, 1280),
    },
    ("sdxl-refiner", "diffusers"): {
        "unet.conv_in.weight": (384, 4, 3, 3),
        "unet.down_blocks.1.attentions.0.proj_in.weight": (768, 768),
        "unet.add_embedding.linear_1.weight": (1536, 2560),
        "text_encoder_2.text_model.embeddings.token_embedding.weight": (49408, 1280),
    },
    ("sd3", "diffusers"): {
        "transformer.transformer_blocks.0.ff_context.net.0.proj.weight": (6144, 1536),
        "transformer.pos_embed.proj.weight": (1536, 16, 2, 2),
    },
    ("flux", "diffusers"): {
        "transformer.transformer_blocks.0.ff_context.net.0.proj.weight": (12288, 3072),
        "transformer.single_transformer_blocks.0.proj_mlp.weight": (12288, 3072),
    },
    # SVD: SDXL's U-Net markers (linear proj_in, label_emb) plus the temporal layers
    ("svd", "ldm"): {
        M + "input_blocks.0.0.weight": (320, 8, 3, 3),
        M + "input_blocks.1.1.proj_in.weight": (320, 320),
        M + "label_emb.0.0.weight": (1280, 768),
        M + "middle_block.0.time_stack.in_layers.2.weight": (1280, 1280, 3, 1, 1),
        "conditioner.embedders.0.open_clip.model.visual.conv1.weight": (1280, 3, 14, 14),
    },
    ("svd", "diffusers"): {
        "unet.conv_in.weight": (320, 8, 3, 3),
        "unet.down_blocks.0.attentions.0.proj_in.weight": (320, 320),
        "unet.add_embedding.linear_1.weight": (1280, 768),
        "unet.mid_block.resnets.0.temporal_res_block.conv1.weight": (1280, 1280, 3, 1, 1),
        "image_encoder.vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
    },
}


@pytest.mark.parametrize(("family", "layout"), list(FAKES))
def test_each_fake_matches_exactly_its_family(family, layout):
    found, found_layout = detect_family(FAKES[family, layout], "fake")
    assert (found.name, found_layout) == (family, layout)


def test_every_family_has_both_layouts_covered():
    detected = {f.name for f in FAMILIES.values() if f.signatures}
    assert {f for f, _ in FAKES} == detected
    for name in detected:
        assert {s.layout for s in FAMILIES[name].signatures} == {"ldm", "diffusers"}


def test_distilled_variants_are_chosen_not_detected():
    """SD-Turbo and SDXL-Turbo have their base's tensors: --family or their scheduler config
    picks them, and their defaults and scheduler are the distilled ones."""
    from edgediff.families import Conditioning, scheduler_defaults

    for name, base in (("sd-turbo", "sd2"), ("sdxl-turbo", "sdxl")):
        turbo = FAMILIES[name]
        assert not turbo.signatures and turbo.text_encoders == FAMILIES[base].text_encoders
        assert (turbo.defaults.steps, turbo.defaults.guidance) == (1, 0.0)
        assert turbo.scheduler_config["timestep_spacing"] == "trailing"
        assert scheduler_defaults(turbo.scheduler_config, Conditioning())["steps"] == 1
    assert scheduler_defaults(FAMILIES["sdxl"].scheduler_config, Conditioning()) == {}
    lcm = {"_class_name": "LCMScheduler"}
    assert scheduler_defaults(lcm, Conditioning())["guidance"] == 1.0  # LCM-LoRA fused: CFG off
    assert scheduler_defaults(lcm, Conditioning(guidance_embedding=256))["guidance"] == 8.5


def test_signatures_are_unique():
    """No fake state dict satisfies two signatures (detection never depends on table order)."""
    for shapes in FAKES.values():
        hits = [(f.name, s.layout) for f in FAMILIES.values() for s in f.signatures if not s.score(shapes)[1]]
        assert len(hits) == 1, hits


def test_unet_only_files_are_detected():
    """stable-diffusion.cpp / ComfyUI GGUFs of the denoiser alone still say what they are."""
    unet_only = {k: v for k, v in FAKES["sd1", "ldm"].items() if k.startswith(M)}
    assert detect_family(unet_only, "fake")[0].name == "sd1"
    xl = {k: v for k, v in FAKES["sdxl", "ldm"].items() if k.startswith(M)}
    assert detect_family(xl, "fake")[0].name == "sdxl"


def test_unknown_architecture_lists_near_misses():
    shapes = {M + "input_blocks.0.0.weight": (320, 4, 3, 3), "foo.bar": (3,)}
    with pytest.raises(SourceError) as err:
        detect_family(shapes, "thing.safetensors")
    msg = str(err.value)
    assert "thing.safetensors" in msg and "not a known model architecture" in msg
    assert "Closest: sd1" in msg or "Closest: sd2" in msg
    assert "--family" in msg


def test_unknown_family_name_is_a_usage_error():
    with pytest.raises(UsageError, match="known families: sd1"):
        get_family("sd9")

"""Where a diffusers weight lies in the original LDM/SGM single-file layout (the one community
sites share and stable-diffusion.cpp and A1111 read: `model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`): one table the converter's readers and
writers and the runtime's LoRA matching both reach. The renaming follows diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any depth."""

from __future__ import annotations

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _unet_prefixes(config) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs, longest first."""
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1.")]
    for j in range(2):
        pairs.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    for i in range(levels):
        for j in range(n):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * (n + 1) + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * (n + 1) + j + 1}.1."))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (n + 1)}.0.op."))
        up_attn = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(n + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (n + 1) + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (n + 1) + j}.1."))
        if i < levels - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (n + 1) + n}.{2 if up_attn else 1}."))
    return sorted(pairs, key=lambda p: -len(p[0]))


def _rename(key: str, prefixes, inner=()) -> str:
    for hf, sd in prefixes:
        if key.startswith(hf):
            rest = key[len(hf):]
            for a, b in inner:
                rest = rest.replace(a, b)
            return sd + rest
    raise KeyError(key)


def _vae_prefixes(config) -> list[tuple[str, str]]:
    levels = len(config["block_out_channels"])
    n = config["layers_per_block"]
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out."),
             ("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
             ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1.")]
    for part in ("encoder", "decoder"):
        for j in range(2):
            pairs.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
        pairs += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out.")]
    for i in range(levels):
        for j in range(n):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(n + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}."))
        if i < levels - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    pairs += [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    return sorted(pairs, key=lambda p: -len(p[0]))


def unet_name(key: str, config) -> str:
    """A diffusers UNet weight name -> its LDM name (with `model.diffusion_model.`)."""
    return "model.diffusion_model." + _rename(key, _unet_prefixes(config), _RESNET if ".resnets." in key else ())


def vae_name(key: str, config) -> str:
    """A diffusers VAE weight name -> its LDM name (with `first_stage_model.`). LDM's attention
    weights are 1x1 convolutions: [C, C, 1, 1] where diffusers has the Linear [C, C]."""
    inner = _VAE_ATTN if ".attentions." in key else _VAE_RESNET
    return "first_stage_model." + _rename(key, _vae_prefixes(config), inner)


def clip_name(key: str, prefix: str = "cond_stage_model.transformer.", open_clip: bool = False) -> str:
    """A transformers CLIPTextModel weight name (with or without `text_model.`) -> its name in
    stable-diffusion.cpp's files. An OpenCLIP encoder's projection keeps OpenCLIP's name and
    orientation there (`stored_transposed`)."""
    if open_clip and key == "text_projection.weight":
        return prefix + "text_model.text_projection"
    return prefix + (key if key.startswith("text_model.") or key == "text_projection.weight" else "text_model." + key)


def stored_transposed(name: str) -> bool:
    """Whether a file stores this 2-D weight transposed against the graph's (torch) orientation:
    OpenCLIP's projection is [width, embed], applied as x @ P."""
    return name.endswith("text_model.text_projection")


def ldm_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape LDM files give a weight the graph holds as `shape`."""
    if ".attn_1." in name and name.endswith("weight") and len(shape) == 2:
        return (*shape, 1, 1)
    return tuple(shape)

"""Where a diffusers weight lies in the original LDM/SGM single-file layout (the one community
sites share and stable-diffusion.cpp and A1111 read: `model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`): one table the converter's readers and
writers and the runtime's LoRA matching both reach. The renaming follows diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any depth."""

from __future__ import annotations

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
# SVD's temporal decoder (diffusers' SpatioTemporalResBlock -> SGM's VideoResBlock)
_VAE_VIDEO = (("spatial_res_block.", ""), ("temporal_res_block.norm1.", "time_stack.in_layers.0."),
              ("temporal_res_block.conv1.", "time_stack.in_layers.2."),
              ("temporal_res_block.norm2.", "time_stack.out_layers.0."),
              ("temporal_res_block.conv2.", "time_stack.out_layers.3."), ("time_mixer.", ""))
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))

# transformers' CLIP text names -> OpenCLIP's (SD 2.x, SDXL's second encoder; q/k/v fused in `in_proj_*`)
_OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias",
                  "text_projection.weight": "text_projection"}
_OPEN_CLIP_LAYER = (("text_model.encoder.layers.", "transformer.resblocks."), (".self_attn.", ".attn."),
                    (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
                    (".mlp.fc2.", ".mlp.c_proj."))


def _unet_prefixes(config, decoder: bool = True) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs, longest first; without `decoder`, those of the
    encoder half (a ControlNet has no up blocks)."""
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
        if not decoder:
            continue
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
    pairs += [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv."),
              ("decoder.time_conv_out.", "decoder.conv_out.time_mix_conv.")]
    return sorted(pairs, key=lambda p: -len(p[0]))


# SVD's spatio-temporal U-Net (diffusers' UNetSpatioTemporalConditionModel -> SGM's VideoUNet, as
# diffusers' scripts/convert_svd_to_diffusers.py pairs them): a resnet's spatial half is the LDM
# ResBlock, its temporal half `time_stack`; a transformer's temporal blocks are `time_stack.K`
_VIDEO_RESNET = (("spatial_res_block.", ""), ("temporal_res_block.", "time_stack."))
_VIDEO_ATTN = (("temporal_transformer_blocks.", "time_stack."), ("time_pos_embed.linear_1.", "time_pos_embed.0."),
               ("time_pos_embed.linear_2.", "time_pos_embed.2."))


def unet_name(key: str, config) -> str:
    """A diffusers UNet weight name -> its LDM name (with `model.diffusion_model.`); SVD's too."""
    inner = (*_VIDEO_RESNET, *_RESNET) if ".resnets." in key else _VIDEO_ATTN
    return "model.diffusion_model." + _rename(key, _unet_prefixes(config), inner)


def controlnet_name(key: str, config) -> str:
    """A diffusers ControlNetModel weight name -> its LDM name (with `control_model.`): the U-Net's
    encoder half, the hint embedding (`controlnet_cond_embedding.conv_in`, `.blocks.k`,
    `.conv_out` -> `input_hint_block.0, 2, ...`: the odd indices are its SiLUs), the zero
    convolutions (`controlnet_down_blocks.i` -> `zero_convs.i.0`, `controlnet_mid_block` ->
    `middle_block_out.0`)."""
    head, _, rest = key.partition(".")
    if head == "controlnet_cond_embedding":
        part, _, rest = rest.partition(".")
        if part == "blocks":
            index, _, rest = rest.partition(".")
            return f"control_model.input_hint_block.{2 * (int(index) + 1)}.{rest}"
        if part == "conv_out":
            blocks = 2 * (len(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1)
            return f"control_model.input_hint_block.{2 * (blocks + 1)}.{rest}"
        if part == "conv_in":
            return f"control_model.input_hint_block.0.{rest}"
        raise KeyError(key)
    if head == "controlnet_down_blocks":
        index, _, rest = rest.partition(".")
        return f"control_model.zero_convs.{index}.0.{rest}"
    if head == "controlnet_mid_block":
        return f"control_model.middle_block_out.0.{rest}"
    return "control_model." + _rename(key, _unet_prefixes(config, decoder=False), _RESNET if ".resnets." in key else ())


def vae_name(key: str, config) -> str:
    """A diffusers VAE weight name -> its LDM name (with `first_stage_model.`). LDM's attention
    weights are 1x1 convolutions: [C, C, 1, 1] where diffusers has the Linear [C, C]. SVD's
    AutoencoderKLTemporalDecoder maps to SGM's VideoDecoder names (`time_stack`, `mix_factor`,
    `conv_out.time_mix_conv`)."""
    inner = _VAE_ATTN if ".attentions." in key else _VAE_VIDEO + _VAE_RESNET
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


def unet_layout(names) -> dict:
    """The parts of a diffusers UNet config its LDM names depend on, read off LDM names: levels
    from the downsamplers, layers per block from the output blocks, attention per up level."""
    p = "model.diffusion_model."
    inputs = {int(n[len(p):].split(".")[1]) for n in names if n.startswith(p + "input_blocks.")}
    outputs = {int(n[len(p):].split(".")[1]) for n in names if n.startswith(p + "output_blocks.")}
    downs = {i for i in inputs if f"{p}input_blocks.{i}.0.op.weight" in names}
    levels = len(downs) + 1
    n = len(outputs) // levels - 1
    up = ["CrossAttnUpBlock2D" if any(k.startswith(f"{p}output_blocks.{i * (n + 1)}.1.transformer_blocks.")
                                      for k in names) else "UpBlock2D" for i in range(levels)]
    return {"layers_per_block": n, "block_out_channels": [0] * levels, "up_block_types": up}


def unet_diffusers_names(names) -> dict[str, str]:
    """LDM U-Net weight names -> diffusers' (the inverse of `unet_name`), for the names both have."""
    names = set(names)
    config = unet_layout(names)
    forward = {}
    for hf, sd in _unet_prefixes(config):
        level = hf.split(".")[1] if hf.startswith("up_blocks.") and ".attentions." in hf else None
        if level is None or config["up_block_types"][int(level)].startswith("CrossAttn"):  # else: its upsampler's
            forward["model.diffusion_model." + sd] = hf
    prefixes = sorted(forward.items(), key=lambda p: -len(p[0]))
    out = {}
    for name in names:
        for sd, hf in prefixes:
            if name.startswith(sd):
                rest = name[len(sd):]
                if ".resnets." in hf:
                    for a, b in _RESNET:
                        rest = rest.replace(b, a)
                candidate = hf + rest
                if unet_name(candidate, config) == name:
                    out[name] = candidate
                break
    return out


def clip_lora_names(shapes, prefix: str, layout: str) -> dict[str, object]:
    """A text encoder's file names -> what LoRAs call them (transformers' names): a name, or for
    OpenCLIP's fused `in_proj_weight` the (layer weight, None, rows) of q, k and v."""
    out: dict[str, object] = {}
    top = {v: k for k, v in _OPEN_CLIP_TOP.items() if k != "text_projection.weight"}  # stored transposed
    for name, shape in shapes.items():
        if not name.startswith(prefix) or name.endswith("text_projection"):
            continue
        rest = name[len(prefix):]
        if layout != "open_clip":
            out[name] = rest if rest.startswith(("text_model.", "text_projection")) else "text_model." + rest
        elif rest in top:
            out[name] = top[rest]
        elif rest.endswith(".attn.in_proj_weight"):
            layer = rest.removesuffix(".attn.in_proj_weight")
            for a, b in _OPEN_CLIP_LAYER:
                layer = layer.replace(b, a)
            width = shape[1]
            out[name] = [(f"{layer}.self_attn.{x}_proj.weight", None, (i * width, (i + 1) * width))
                         for i, x in enumerate("qkv")]
        elif rest.startswith("transformer.resblocks."):
            for a, b in _OPEN_CLIP_LAYER:
                rest = rest.replace(b, a)
            out[name] = rest
    return out


# transformers' CLIPVisionModelWithProjection names -> OpenCLIP's visual tower (SVD's image encoder)
_OPEN_CLIP_VISION_TOP = {"vision_model.embeddings.class_embedding": "class_embedding",
                         "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
                         "vision_model.embeddings.position_embedding.weight": "positional_embedding",
                         "vision_model.pre_layrnorm.weight": "ln_pre.weight",
                         "vision_model.pre_layrnorm.bias": "ln_pre.bias",
                         "vision_model.post_layernorm.weight": "ln_post.weight",
                         "vision_model.post_layernorm.bias": "ln_post.bias",
                         "visual_projection.weight": "proj"}
_OPEN_CLIP_VISION_LAYER = (("vision_model.encoder.layers.", "transformer.resblocks."), (".self_attn.", ".attn."),
                           (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
                           (".mlp.fc2.", ".mlp.c_proj."))


def clip_vision_open_clip(state_dict, prefix: str = "conditioner.embedders.0.open_clip.model.visual.") -> dict:
    """A transformers CLIPVisionModelWithProjection state dict (name -> 2-D/1-D/4-D arrays) -> the
    same weights as SVD's single file holds them under `prefix`: OpenCLIP's names, each layer's
    q, k and v concatenated (in that order) into `attn.in_proj_weight` [3W, W] and
    `attn.in_proj_bias` [3W], the projection transposed to `proj` [W, E]. transformers' position
    ids (a buffer, not a weight) are left out."""
    import numpy as np

    out, fused = {}, {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in _OPEN_CLIP_VISION_TOP:
            out[prefix + _OPEN_CLIP_VISION_TOP[key]] = np.asarray(value).T.copy() if key == "visual_projection.weight" \
                else value
            continue
        if not key.startswith("vision_model.encoder.layers."):
            raise KeyError(key)
        for a, b in _OPEN_CLIP_VISION_LAYER:
            key = key.replace(a, b)
        head, _, kind = key.rpartition(".")  # kind: weight | bias
        if head.endswith((".q_proj", ".k_proj", ".v_proj")):
            fused.setdefault((head[:-len(".q_proj")], kind), {})[head[-6]] = value
            continue
        out[f"{prefix}{head}.{kind}"] = value
    for (layer, kind), parts in fused.items():
        out[f"{prefix}{layer}.in_proj_{kind}"] = np.concatenate([np.asarray(parts[x]) for x in "qkv"])
    return out

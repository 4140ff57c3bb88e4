"""A diffusers folder as a single-file checkpoint in the original LDM layout, the one community
sites share and stable-diffusion.cpp and A1111 read (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`, SDXL's `conditioner.embedders.N.*`). The renaming follows diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any depth; it is the
inverse of the single-file reader (a test round-trips it)."""

from __future__ import annotations

from pathlib import Path

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


_OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias",
                  "text_projection.weight": "text_projection"}
_OPEN_CLIP_LAYER = (("text_model.encoder.layers.", "transformer.resblocks."), (".self_attn.", ".attn."),
                    (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
                    (".mlp.fc2.", ".mlp.c_proj."))


def open_clip_state(weights: dict, prefix: str) -> dict:
    """transformers CLIP text weights -> OpenCLIP's names (SD 2.x, SDXL's second encoder):
    q, k and v fused into `in_proj_*`, the projection stored transposed."""
    import torch

    out, fused = {}, {}
    for key, value in weights.items():
        key = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = value.T.contiguous() if key.startswith("text_projection") else value
            continue
        head, _, tail = key.rpartition(".")  # tail: weight | bias
        if head.endswith(("q_proj", "k_proj", "v_proj")):
            fused.setdefault((head[:-len(".q_proj")], tail), {})[head[-6]] = value
            continue
        for a, b in _OPEN_CLIP_LAYER:
            key = key.replace(a, b)
        out[prefix + key] = value
    for (layer, kind), parts in fused.items():
        name = f"{layer}.in_proj_{kind}"
        for a, b in _OPEN_CLIP_LAYER:
            name = name.replace(a, b)
        out[prefix + name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def ldm_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape LDM files give a weight the graph holds as `shape`."""
    if ".attn_1." in name and name.endswith("weight") and len(shape) == 2:
        return (*shape, 1, 1)
    return tuple(shape)


def to_ldm_state_dict(folder: Path, family: str | None = None) -> dict:
    """The single-file state dict (torch tensors) of a diffusers folder: LDM layout for SD 1.x,
    SGM layout (`conditioner.embedders.N.*`) for SDXL. The family is detected when not given."""
    import json

    from safetensors.torch import load_file

    from edgediff.convert.sources import open_source
    from edgediff.families import detect_family, get_family

    folder = Path(folder)
    family = family or detect_family(open_source(folder).shapes, str(folder))[0].name
    out: dict = {}
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        out[unet_name(k, unet_cfg)] = v
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    for k, v in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name = vae_name(k, vae_cfg)
        out[name] = v.reshape(ldm_shape(name, tuple(v.shape)))
    for spec in get_family(family).text_encoders:
        weights = load_file(folder / spec.component / "model.safetensors")
        if spec.ldm_layout == "open_clip":
            out.update(open_clip_state(weights, spec.ldm_prefix))
        else:
            out.update({clip_name(k, spec.ldm_prefix): v for k, v in weights.items()})
    return out


def write_ldm_checkpoint(folder: Path, path: Path, state: dict | None = None, family: str | None = None) -> Path:
    """Write the single file at fp32, one tensor at a time (safetensors' own writer holds the
    whole file in memory: 14 GB for SDXL)."""
    import json

    state = to_ldm_state_dict(folder, family) if state is None else state
    header, offset = {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with Path(path).open("wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for tensor in state.values():
            out.write(memoryview(tensor.detach().float().contiguous().numpy()).cast("B"))
    return path

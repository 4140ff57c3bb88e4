"""A diffusers folder as a single-file checkpoint in the original LDM layout (SDXL's in SGM's,
`conditioner.embedders.N.*`), through kernels.ldm_names' table: the files the peers read
(stable-diffusion.cpp) and the tests' single-file fixtures are written with it. Uses torch (the
`convert` extra): it is a tool beside the product, not part of it."""

from __future__ import annotations

from pathlib import Path

from edgediff.kernels.ldm_names import (
    _OPEN_CLIP_LAYER,
    _OPEN_CLIP_TOP,
    clip_name,
    ldm_shape,
    unet_name,
    vae_name,
)


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

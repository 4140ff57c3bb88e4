"""A training-style single-file checkpoint for the tests: benchmarks.single_file's renaming, plus
EMA copies and the training-only keys a converter must drop."""

from __future__ import annotations

from pathlib import Path

from edgediff.benchmarks.single_file import to_ldm_state_dict
from edgediff.benchmarks.single_file import write_ldm_checkpoint as _write


def write_ldm_checkpoint(folder: Path, path: Path, ema_noise: float | None = None, family: str | None = None) -> Path:
    """With `ema_noise`, the UNet weights are also stored as `model_ema.*` copies and the plain
    copies perturbed by that much, as training checkpoints hold them (so a test can tell which
    copy was used)."""
    import torch

    state = to_ldm_state_dict(folder, family)
    if ema_noise is not None:
        for name in [k for k in state if k.startswith("model.diffusion_model.")]:
            state["model_ema." + "".join(name.split(".")[1:])] = state[name].clone()
            state[name] = state[name] + ema_noise * torch.randn_like(state[name])
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    return _write(folder, path, state, family)


def write_flux_files(folder: Path, dst: Path) -> dict[str, Path]:
    """A tiny Flux diffusers folder as Flux users have it: the transformer in BFL's names (fused
    q/k/v, no prefix), and separate clip_l, t5xxl and ae files, as ComfyUI stores them."""
    import json

    from safetensors.torch import load_file, save_file

    from edgediff.kernels.dit_names import flux_pieces
    from edgediff.kernels.ldm_names import ldm_shape, vae_name

    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    paths = {name: dst / f"{name}.safetensors" for name in ("flux", "clip_l", "t5xxl", "ae")}
    save_file(scatter(flux_pieces(config), load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")),
              paths["flux"])
    clip = load_file(folder / "text_encoder" / "model.safetensors")
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in clip.items()}, paths["clip_l"])
    t5 = load_file(folder / "text_encoder_2" / "model.safetensors")
    save_file({k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"}, paths["t5xxl"])
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    vae = {}
    for k, v in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name = vae_name(k, vae_cfg)
        vae[name.removeprefix("first_stage_model.")] = v.reshape(ldm_shape(name, tuple(v.shape))).contiguous()
    save_file(vae, paths["ae"])
    return paths


def write_sd3_file(folder: Path, path: Path) -> Path:
    """A tiny SD3 diffusers folder as one single file in the layout Stability ships SD3.5 in:
    the MMDiT in its own names (fused q/k/v), text encoders under `text_encoders.*`, the VAE in
    LDM's names."""
    import json

    from safetensors.torch import load_file, save_file

    from edgediff.families import DENOISER
    from edgediff.kernels.dit_names import sd3_pieces
    from edgediff.kernels.ldm_names import ldm_shape, vae_name

    config = json.loads((folder / "transformer" / "config.json").read_text())
    state = scatter(sd3_pieces(config, DENOISER),
                    load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    for component, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        for k, v in load_file(folder / component / "model.safetensors").items():
            if k != "encoder.embed_tokens.weight":
                key = k if name == "t5xxl" or k.startswith(("text_model.", "text_projection")) else "text_model." + k
                state[f"text_encoders.{name}.transformer.{key}"] = v
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    for k, v in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name = vae_name(k, vae_cfg)
        state[name] = v.reshape(ldm_shape(name, tuple(v.shape))).contiguous()
    save_file(state, path)
    return path


def gather(pieces, read) -> dict:
    """diffusers' state dict from file tensors: `read(name)` gives a torch tensor."""
    import torch

    out = {}
    for dst, parts in pieces.items():
        tensors = [read(name) for name, _, _ in parts]
        out[dst] = torch.cat([t if end == -1 else t[start:end] for t, (_, start, end) in zip(tensors, parts, strict=True)])
    return out


def scatter(pieces, state) -> dict:
    """The file's tensors from diffusers' state dict (the inverse of `gather`)."""
    import torch

    parts: dict[str, list[tuple[int, object]]] = {}
    for dst, sources in pieces.items():
        offset = 0
        for name, start, end in sources:
            size = state[dst].shape[0] if end == -1 else end - start
            parts.setdefault(name, []).append((0 if end == -1 else start, state[dst][offset:offset + size]))
            offset += size
    return {name: torch.cat([t for _, t in sorted(chunks, key=lambda c: c[0])]).contiguous()
            for name, chunks in parts.items()}

"""Tiny seeded random LoRA files for a tiny diffusers model's modules, in the formats people
download (written by benchmarks.loras.write_lora)."""

from __future__ import annotations

from pathlib import Path

from edgediff.benchmarks.loras import LORA_MODULES
from edgediff.benchmarks.loras import write_lora as _write


def modules(pipe, component: str, convolutions: bool = False) -> dict[str, tuple[int, ...]]:
    """name -> weight shape of the layers a LoRA of `component` changes: attention and
    feed-forward Linears (and, with `convolutions`, the U-Net's resnet convolutions: LoCon)."""
    import torch

    out = {}
    for name, m in getattr(pipe, component).named_modules():
        linear = isinstance(m, torch.nn.Linear) and any(name.endswith("." + s) for s in LORA_MODULES)
        if linear or convolutions and isinstance(m, torch.nn.Conv2d) and ".resnets." in name:
            out[name] = tuple(m.weight.shape)
    return out


def write_lora(pipe, path: Path, fmt: str = "kohya", components=("unet", "text_encoder"), ldm_config=None,
               **kw) -> Path:
    """A random LoRA for `pipe`'s modules: 'kohya' (diffusers module names), 'kohya-ldm' (the
    U-Net's LDM names, as kohya's SDXL files have them; `ldm_config` is the UNet config), 'peft'
    (diffusers' own files) or 'locon' (kohya with the resnet convolutions)."""
    from edgediff.kernels.ldm_names import unet_name

    found = {c: modules(pipe, c, fmt == "locon" and c == "unet") for c in components}
    rename = None
    if fmt == "kohya-ldm":
        def rename(name):
            return unet_name(name + ".weight", ldm_config).removeprefix("model.diffusion_model.").removesuffix(".weight")
    return _write(found, path, "peft" if fmt == "peft" else "kohya", unet_name=rename, **kw)

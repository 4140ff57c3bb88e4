"""A training-style single-file checkpoint for the tests: convert.ldm's renaming, plus EMA
copies and the training-only keys a converter must drop."""

from __future__ import annotations

from pathlib import Path

from edgediff.convert.ldm import to_ldm_state_dict
from edgediff.convert.ldm import write_ldm_checkpoint as _write


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

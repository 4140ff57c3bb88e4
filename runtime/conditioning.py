"""What a denoiser takes besides the noisy latent and the timestep, as named arrays: the text
encoders' hidden states and pooled vector, and the family's extras (SDXL's size and crop
`time_ids`, the refiner's aesthetic score). The denoiser is fed by input name, so every family
runs through the same code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgediff.errors import UsageError, arg
from edgediff.families import Conditioning

Cond = dict[str, np.ndarray]


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, as (height, width) and (top, left) pairs; None: the image size."""

    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None

    def check(self) -> None:
        for name in ("original_size", "target_size"):
            value = getattr(self, name)
            if value is not None and not _integers(value, minimum=1):
                raise UsageError(f"{arg(name)} must be two positive integers, height and "
                                 f"width (got {value})")
        if not _integers(self.crop, minimum=0):
            raise UsageError(f"{arg('crop')} must be two integers >= 0, top and left (got {self.crop})")


def _integers(pair, minimum: int) -> bool:
    return (len(pair) == 2 and all(float(v) == int(v) and int(v) >= minimum for v in pair))


def time_ids(spec: Conditioning, size: SizeConditioning, height: int, width: int,
             negative: bool = False) -> np.ndarray | None:
    """The [1, n] `time_ids` row for the names the family lists (None when it lists none)."""
    if not spec.time_ids:
        return None
    score = size.negative_aesthetic_score if negative else size.aesthetic_score
    if score is None:
        score = spec.negative_aesthetic_score if negative else spec.aesthetic_score
    parts = {
        "original_size": size.original_size or (height, width),
        "crop": size.crop,
        "target_size": size.target_size or (height, width),
        "aesthetic_score": (score,),
    }
    return np.asarray([[float(v) for name in spec.time_ids for v in parts[name]]], np.float32)


def guidance_embedding(guidance: float, width: int) -> np.ndarray:
    """LCM's `timestep_cond`: sinusoids of (guidance - 1) * 1000, [1, width] (the VDM embedding
    diffusers' LatentConsistencyModelPipeline computes)."""
    half = width // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -np.float32(np.log(10000.0) / (half - 1)))
    angles = np.float32((guidance - 1) * 1000.0) * freqs
    emb = np.concatenate([np.sin(angles), np.cos(angles)])
    return np.pad(emb, (0, width % 2))[None].astype(np.float32)


def stack(conds: list[Cond]) -> Cond:
    """One batch from several conditionings (the negative first, as diffusers orders them)."""
    return {k: np.concatenate([c[k] for c in conds]) for k in conds[0]}

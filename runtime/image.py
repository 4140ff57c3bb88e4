"""Pixels in and out: decoded arrays to PIL, init images to arrays, PNG with A1111 parameters."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from edgediff.errors import UsageError


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images, rounded as diffusers' VaeImageProcessor rounds."""
    arr = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--init-image {path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"--init-image {path}: not a readable image ({exc})") from exc


def from_pil(image: Image.Image, width: int, height: int) -> np.ndarray:
    """PIL -> [1, 3, H, W] in [-1, 1], resized (Lanczos) to width x height when it differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return (arr * 2 - 1).transpose(2, 0, 1)[None]


def a1111_parameters(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    """The `parameters` text A1111 writes, which A1111, ComfyUI and image sites read back."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write atomically (a scratch name, then rename), with the parameters in a tEXt chunk."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    scratch = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        image.save(scratch, format="PNG", pnginfo=info)
        scratch.replace(path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return path

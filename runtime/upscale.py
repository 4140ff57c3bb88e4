"""Upscaling images with the ESRGAN family (kernels.graphs.esrgan): ESRGAN and Real-ESRGAN RRDBNets
and Real-ESRGAN's compact models, from `.pth`/`.pt` (read by runtime.pickle_tensors, which runs
nothing from the file) or `.safetensors` files.

The graph is built from the file's tensors when its session opens (0.05 s for a full RRDBNet,
against 0.35 s to read its 67 MB and 2 s for onnxruntime to open it, on 2 cores), its weights
handed to onnxruntime in memory and then dropped: nothing is cached on disk. The image runs in
overlapping tiles blended with linear ramps (runtime.vae.tiled), which bounds memory on large
images; fp32, on the CPU provider unless CUDA is asked for and present. A scale other than the model's runs the model again while the image is
smaller than asked (at most 3 passes) and then resizes with Lanczos, as A1111 does (which, unlike
edgediff, skips the model when the image is already as large: a 1x model would never run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgediff.errors import SourceError, UsageError, arg
from edgediff.kernels.graphs.esrgan import Architecture, build_upscaler, detect
from edgediff.runtime.sessions import Component, SessionOptions, providers_for
from edgediff.runtime.vae import tiled

SUFFIXES = (".pth", ".pt", ".safetensors")
TILE = 192  # input pixels per tile side (A1111's ESRGAN default); 0: the whole image at once
OVERLAP = 16  # input pixels neighbouring tiles share, blended (a quarter of smaller tiles)
MAX_PASSES = 3
_STATE_KEYS = ("params_ema", "params", "state_dict", "model")  # where training scripts put the weights


@dataclass
class Upscaler:
    """A loaded upscaler: its architecture and the session that runs it (kept for reuse)."""

    name: str  # the file's stem, as A1111 names model upscalers
    path: Path
    arch: Architecture
    component: Component

    @property
    def scale(self) -> int:
        return self.arch.scale


@dataclass(frozen=True)
class UpscalerFile:
    name: str
    path: Path
    kind: str  # RRDBNet | SRVGGNetCompact
    scale: int


def _state(obj, where: str) -> dict:
    """The state dict inside what a .pth holds: Real-ESRGAN's {'params_ema': ...}, a training
    checkpoint's 'state_dict', or the dict itself; DataParallel's `module.` prefix dropped."""
    for key in _STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise SourceError(f"{where}: holds no state dict of tensors (found {type(obj).__name__})")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _read(path: Path, data: bool) -> dict:
    """name -> fp32 array (with `data`) or shape, of an upscaler file's tensors."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SourceError(f"{where}: no such upscaler file" + ("; it is a folder" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from edgediff.kernels.gguf_blocks import dequantize
        from edgediff.runtime.safetensors_file import SafetensorsFile

        file = SafetensorsFile(path)
        if not data:
            return {n: info.shape for n, info in file.header.items()}
        out = {}
        for name in file.header:
            w = file.weight(name)
            if w is None:
                raise SourceError(f"{where}: tensor '{name}' is not a float tensor; no upscaler holds one")
            out[name] = np.array(dequantize(w.data, w.fmt, w.shape), dtype=np.float32)
        return out
    if suffix in (".pth", ".pt"):
        from edgediff.runtime import pickle_tensors

        state = _state(pickle_tensors.load(path, data=data), where)
        out = {}
        for name, value in state.items():
            if data and isinstance(value, np.ndarray):
                out[name] = value.astype(np.float32)
            elif not data and isinstance(value, pickle_tensors.Shape):
                out[name] = value.shape
            else:
                raise SourceError(f"{where}: '{name}' in its state dict is a {type(value).__name__}, not a tensor")
        return out
    raise SourceError(f"{where}: not an upscaler file edgediff reads ('{suffix or 'no extension'}'); upscalers are "
                      f"{', '.join(SUFFIXES)} files")


def describe(path: str | Path) -> Architecture:
    """An upscaler file's architecture, from its tensors' shapes only (no weights read)."""
    return detect(_read(Path(path), data=False), str(path))


def list_upscalers(folder: str | Path) -> list[UpscalerFile]:
    """The upscaler files in `folder` (not its subfolders), by name; files of other architectures
    (SwinIR and the like, which A1111's ESRGAN folder may also hold) are left out."""
    found = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            try:
                arch = describe(path)
            except SourceError:
                continue
            found.append(UpscalerFile(path.stem, path, arch.kind, arch.scale))
    return found


def _bound(path: Path, arch: Architecture):
    """The graph and its weights, read again at each session open (nothing held in between)."""
    from edgediff.kernels.bind import Bound

    weights = _read(path, data=True)
    found = detect({k: v.shape for k, v in weights.items()}, str(path))
    if found != arch:
        raise SourceError(f"{path}: the file changed since it was loaded ({arch.kind} x{arch.scale} then, "
                          f"{found.kind} x{found.scale} now); load it again")
    return Bound(build_upscaler(found, str(path)), weights, [])


def load_upscaler(path: str | Path, device: str = "cpu", threads: int | None = None) -> Upscaler:
    """The upscaler of a file, its architecture read from the tensors' shapes; the weights are read
    and the graph built when the session first runs: fp32, on CUDA only when `device` asks for it
    and onnxruntime has it, else on the CPU provider."""
    path = Path(path)
    arch = describe(path)
    build_upscaler(arch, str(path))  # a file whose widths do not fit is refused now, not at the first run
    provider = "cuda" if providers_for(device)[0] == "CUDAExecutionProvider" else "cpu"
    options = SessionOptions(device=provider, threads=threads, graph_cache=False)
    return Upscaler(path.stem, path, arch, Component("upscaler", path, options, bind=lambda: _bound(path, arch)))


def upscale_array(upscaler: Upscaler, images: np.ndarray, tile: int = TILE, overlap: int | None = None) -> np.ndarray:
    """One pass of the model: [B, C, H, W] in [0, 1] -> [B, C, scale H, scale W]; in tiles of
    `tile` input pixels sharing `overlap` (tile 0: the whole image)."""
    if tile < 0:
        raise UsageError(f"{arg('tile')} {tile}: give a tile side in input pixels, or 0 for the whole image at once")
    overlap = min(OVERLAP, tile // 4) if overlap is None else overlap
    if overlap < 0 or (tile and overlap * 2 > tile):
        raise UsageError(f"{arg('tile')} {tile} with an overlap of {overlap}: the tiles must be at least twice the "
                         "overlap")
    r = upscaler.arch.unshuffle  # sizes, tiles and their offsets must divide by it
    height, width = images.shape[-2:]
    padded = np.pad(images, ((0, 0), (0, 0), (0, -height % r), (0, -width % r)), mode="edge")
    run = lambda x: upscaler.component.run({"image": x})["upscaled"]  # noqa: E731
    out = tiled(run, padded, max(r, tile // r * r), overlap // r * r, up=upscaler.scale) if tile else run(padded)
    return out[..., :height * upscaler.scale, :width * upscaler.scale]


def _to_array(image: Image.Image) -> np.ndarray:
    return (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(array[0], 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8))


def upscale(upscaler: Upscaler, image: Image.Image, scale: float | None = None, *,
            size: tuple[int, int] | None = None, tile: int = TILE, overlap: int | None = None) -> Image.Image:
    """`image` (RGB; alpha is dropped) made `scale` times larger (default: the model's scale) or
    exactly `size` (width, height): the model run once, and again while the image is smaller than
    that (at most 3 passes), then resized with Lanczos to it."""
    image = image.convert("RGB")
    if size is None:
        factor = upscaler.scale if scale is None else scale
        if not factor > 0:
            raise UsageError(f"{arg('scale')} {scale}: must be positive")
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    if min(size) < 1:
        raise UsageError(f"an upscaled size of {size[0]}x{size[1]}: both sides must be positive")
    for done in range(MAX_PASSES):
        if done and image.width >= size[0] and image.height >= size[1]:
            break
        image = _to_image(upscale_array(upscaler, _to_array(image), tile, overlap))
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.LANCZOS)
    return image

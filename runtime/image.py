"""Pixels in and out: decoded arrays to PIL, init images to arrays, PNG, JPEG or WebP files with
A1111 parameters, animated WebP or GIF videos."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from edgediff.errors import UsageError, arg


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images, rounded as diffusers' VaeImageProcessor rounds."""
    arr = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def open_image(image: str | Path | Image.Image, where: str | None = None, mode: str | None = "RGB") -> Image.Image:
    """An image a user gave: a PIL image, or a file read whole, in `mode` (None keeps the file's:
    a mask's alpha says where to paint); `where` names the argument in messages (init_image)."""
    where = where or arg("init_image")
    if isinstance(image, Image.Image):
        return image.convert(mode) if mode else image
    if not isinstance(image, (str, Path)):
        raise UsageError(f"{where}: give an image file or a PIL image (got {type(image).__name__})")
    path = Path(image)
    if not path.is_file():
        raise UsageError(f"{where} {path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode else img.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"{where} {path}: not a readable image ({exc})") from exc


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


# the file types images are written as, by the name's extension
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 80  # JPEG and WebP quality: A1111's default (jpeg_quality)
_UNICODE = b"UNICODE\0"  # EXIF UserComment's character-code prefix, then UTF-16 (piexif's, as A1111 writes it)


def image_format(path: str | Path) -> str:
    """The format a file name asks for: PNG, JPEG or WEBP, from its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"{path}: cannot tell the image type from '{suffix or 'no extension'}'; "
                         f"end the name in {', '.join(FORMATS)}")
    return FORMATS[suffix]


def encode(image: Image.Image, fmt: str, parameters: str) -> bytes:
    """The file's bytes in `fmt` (PNG, JPEG or WEBP), with the parameters where A1111 puts them: a
    PNG `parameters` text chunk, else the EXIF UserComment (UTF-16 big-endian behind the 'UNICODE'
    prefix, as piexif's helper encodes it for A1111)."""
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        options: dict = {"pnginfo": info}
    else:
        exif = Image.Exif()
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _UNICODE + parameters.encode("utf-16-be")
        options = {"exif": exif, "quality": QUALITY}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def save_image(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write the type the name's extension asks for, atomically (a scratch name, then rename)."""
    path = Path(path)
    return _write(path, encode(image, image_format(path), parameters))


def _write(path: Path, data: bytes) -> Path:
    """`data` into `path` atomically: a scratch name beside it, then rename."""
    scratch = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        scratch.write_bytes(data)
        scratch.replace(path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return path


# the file types videos are written as, by the name's extension (each frame a PNG: the CLI's --frames-dir)
VIDEO_FORMATS = {".webp": "WEBP", ".gif": "GIF"}


def video_format(path: str | Path) -> str:
    """The animated format a file name asks for: WEBP or GIF, from its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FORMATS:
        pngs = "give --frames-dir DIR" if arg("frames_dir").startswith("--") else "save_image each frame"
        raise UsageError(f"{path}: a video is written as animated {' or '.join(VIDEO_FORMATS)}, not "
                         f"'{suffix or 'no extension'}'; for one PNG a frame {pngs}")
    return VIDEO_FORMATS[suffix]


def save_video(frames: list[Image.Image], path: str | Path, fps: int, parameters: str | None = None) -> Path:
    """An animated WebP (quality as save_image's) or GIF (a palette per frame: lossy), by the name's
    extension, looping forever at `fps` frames a second (GIF keeps durations in hundredths of a
    second), written atomically. The parameters (default: the first frame's .info["parameters"])
    go where save_image puts them: WebP's EXIF UserComment, else a GIF comment; read_parameters
    reads both."""
    path = Path(path)
    fmt = video_format(path)
    if not frames:
        raise UsageError(f"{path}: no frames to write")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not 0 < fps < float("inf"):
        raise UsageError(f"{arg('fps')} must be a positive number of frames a second (got {fps!r})")
    text = frames[0].info.get("parameters", "") if parameters is None else parameters
    options: dict = {"save_all": True, "append_images": frames[1:], "duration": max(1, round(1000 / fps)),
                     "loop": 0}
    if fmt == "WEBP":
        options["quality"] = QUALITY
        if text:
            exif = Image.Exif()
            exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _UNICODE + text.encode("utf-16-be")
            options["exif"] = exif
    elif text:
        options["comment"] = text.encode("utf-8")
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, **options)
    return _write(path, buffer.getvalue())


def read_parameters(image: Image.Image) -> str | None:
    """The parameters text A1111 would read back from an image: PNG text, EXIF UserComment, or (an
    animated GIF, save_video's) the comment."""
    if "parameters" in image.info:
        return image.info["parameters"]
    if image.format == "GIF" and isinstance(image.info.get("comment"), bytes):
        return image.info["comment"].decode("utf-8", errors="replace")
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if not isinstance(comment, bytes):
        return None
    if comment.startswith(_UNICODE):
        return comment[len(_UNICODE):].decode("utf-16-be", errors="replace")
    return comment[8:].decode("ascii", errors="replace")  # 'ASCII\0\0\0' or an undefined code

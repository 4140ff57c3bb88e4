"""Inpainting as A1111 does it: the mask (white = repaint) made binary, blurred, resized or cropped
around ("only masked"), the masked content filled, the latent mask, and the result composited
over the original with the blurred mask as alpha.

Ported from AUTOMATIC1111/stable-diffusion-webui v1.10 (`modules/processing.py`:
StableDiffusionProcessingImg2Img.init and apply_overlay; `modules/masking.py`; `modules/images.py`
resize_image), with Pillow doing what it does there. The blur is cv2.GaussianBlur's (kernel of
2 * int(2.5 sigma + 0.5) + 1 taps, reflect-101 borders, along x then along y) computed in floating
point and rounded, where OpenCV's 8-bit path rounds in fixed point: a pixel may differ by 1.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from edgediff.errors import UsageError, arg

LANCZOS = Image.Resampling.LANCZOS
# A1111's "Masked content" (inpainting_fill): what the masked area starts from
FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def open_mask(mask: str | Path | Image.Image) -> Image.Image:
    """The mask as given: a PIL image, or read from a file (its mode kept: an RGBA mask's alpha
    says where to repaint)."""
    from edgediff.runtime.image import open_image

    return open_image(mask, arg("mask"), mode=None)


def binary_mask(image: Image.Image) -> Image.Image:
    """A1111's create_binary_mask: an RGBA mask with any transparency is its alpha thresholded at
    128 (painted = repaint); any other mask is its grey levels ('L')."""
    if image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return image.convert("L")


def _gaussian_taps(sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(2 * int(2.5 sigma + 0.5) + 1, sigma), as A1111 sizes it."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(x * x) / (2 * sigma * sigma))
    return taps / taps.sum()


def gaussian_blur(values: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """An 8-bit image blurred along one axis (reflect-101 borders, as OpenCV's default), rounded."""
    taps = _gaussian_taps(sigma)
    half = len(taps) // 2
    pad = [(0, 0)] * values.ndim
    pad[axis] = (half, half)
    padded = np.pad(values.astype(np.float64), pad, mode="reflect") if values.shape[axis] > 1 else \
        np.pad(values.astype(np.float64), pad, mode="edge")
    out = np.zeros(values.shape, np.float64)
    n = values.shape[axis]
    for i, w in enumerate(taps):
        out += w * np.take(padded, np.arange(i, i + n), axis=axis)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def blur_mask(mask: Image.Image, blur: float) -> Image.Image:
    """A1111's mask blur: a Gaussian of `blur` pixels along x, then along y (an 'L' image)."""
    if blur <= 0:
        return mask
    values = np.asarray(mask.convert("L"))
    values = gaussian_blur(gaussian_blur(values, blur, axis=1), blur, axis=0)
    return Image.fromarray(values, "L")


def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int] | None:
    """masking.get_crop_region_v2: the box (x1, y1, x2, y2) around the mask's non-zero pixels,
    `pad` pixels larger on each side within the image; None for an empty mask."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    return (max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)) if pad else box


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """The box grown on its short side to the processing size's aspect ratio and kept inside the
    image (A1111's "only masked" crop)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, by: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown by `by`, split around it, then shifted back inside [0, limit]."""
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """images.resize_image without an upscaler (Lanczos): 0 just resize; 1 crop and resize (cover,
    centred); 2 resize and fill (fit, centred, the edges stretched into the rest). Modes 1 and 2
    give RGB, as there."""
    if mode == 0:
        return image.resize((width, height), resample=LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif mode == 2 and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """masking.fill ('fill' masked content): the masked area painted with ever less blurred
    copies of what surrounds it."""
    out = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclass
class Inpainting:
    """An inpainting job made ready: the image to encode and the mask at the processing size, and
    what puts the result back over the original."""

    image: Image.Image  # RGB at the processing size, the masked content filled as asked
    mask: Image.Image  # the blurred mask at the processing size (A1111's image_mask)
    overlay: Image.Image  # the original, transparent where it is repainted (RGBA, the output's size)
    paste_to: tuple[int, int, int, int] | None  # only masked: (x, y, w, h) of the crop in the original
    fill: int
    fields: dict[str, object] = field(default_factory=dict)  # for the parameters text

    def latent_mask(self, height: int, width: int) -> np.ndarray:
        """[1, 1, h, w] 1 where the latent is repainted: the mask resized as Pillow's default
        (bicubic) and rounded, as A1111's latmask."""
        small = self.mask.convert("RGB").resize((width, height))
        return np.around(np.asarray(small, np.float32)[..., 0] / 255)[None, None].astype(np.float32)

    def condition_mask(self) -> np.ndarray:
        """[1, 1, H, W] the rounded mask an inpainting model is given (A1111's conditioning_mask)."""
        return np.round(np.asarray(self.mask.convert("L"), np.float32) / 255)[None, None]

    def composite(self, generated: Image.Image) -> Image.Image:
        """The generated image over which the original is laid where it was not repainted (apply_overlay;
        only masked: the result scaled into its crop of the original first)."""
        if self.paste_to is not None:
            x, y, w, h = self.paste_to
            base = Image.new("RGBA", self.overlay.size)
            base.paste(resize_image(1, generated, w, h), (x, y))
            generated = base
        out = generated.convert("RGBA")
        out.alpha_composite(self.overlay)
        return out.convert("RGB")


def prepare(init: Image.Image, mask: Image.Image, width: int, height: int, *, blur: float = 4,
            fill_mode: int = 1, full_res: bool = False, padding: int = 32,
            invert: bool = False) -> Inpainting | None:
    """The A1111 steps before encoding, for the processing size `width` x `height`. None when
    `full_res` finds nothing to repaint (A1111 then runs plain img2img)."""
    init = init.convert("RGB")
    fields: dict[str, object] = {}
    image_mask = binary_mask(mask)
    if invert:
        image_mask = ImageOps.invert(image_mask)
        fields["Mask mode"] = "Inpaint not masked"
    image_mask = blur_mask(image_mask, blur)
    if blur > 0:
        fields["Mask blur"] = f"{blur:g}"
    paste_to = None
    if full_res:
        if image_mask.size != init.size:  # the crop is found in the original's pixels
            fields["Mask resized"] = f"{image_mask.width}x{image_mask.height} to {init.width}x{init.height}"
            image_mask = image_mask.resize(init.size, resample=LANCZOS)
        region = crop_region(image_mask, padding)
        if region is None:
            return None
        x1, y1, x2, y2 = expand_crop_region(region, width, height, image_mask.width, image_mask.height)
        overlay_mask = image_mask
        image_mask = resize_image(2, image_mask.crop((x1, y1, x2, y2)), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        fields["Inpaint area"] = "Only masked"
        fields["Masked area padding"] = padding
        image = init
    else:
        if image_mask.size != init.size:
            fields["Mask resized"] = f"{image_mask.width}x{image_mask.height} to {width}x{height}"
        image_mask = resize_image(0, image_mask, width, height)
        overlay_mask = Image.fromarray(np.clip(np.asarray(image_mask, np.float32) * 2, 0, 255).astype(np.uint8))
        image = resize_image(0, init, width, height)
    overlay = Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    if paste_to is not None:
        x, y, w, h = paste_to
        image = resize_image(2, image.crop((x, y, x + w, y + h)), width, height)
    if fill_mode != 1:
        image = fill(image, image_mask)
        fields["Masked content"] = FILLS[fill_mode]
    return Inpainting(image, image_mask, overlay.convert("RGBA"), paste_to, fill_mode, fields)


def check(blur, fill_mode, padding) -> None:
    """The inpainting options' ranges, before anything loads."""
    if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not 0 <= blur <= 512:
        raise UsageError(f"{arg('mask_blur')} must be a number of pixels from 0 to 512 (got {blur!r})")
    if fill_mode not in FILLS or isinstance(fill_mode, bool):
        raise UsageError(f"{arg('inpainting_fill')} must be one of "
                         f"{', '.join(f'{k} ({v})' for k, v in FILLS.items())} (got {fill_mode!r})")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise UsageError(f"{arg('inpaint_full_res_padding')} must be a whole number of pixels >= 0 (got {padding!r})")


class Blended:
    """A denoiser whose prediction keeps the original latent outside the mask (A1111's
    CFGDenoiser blend, after denoising): D = D(x) * mask + latent * (1 - mask). With a
    deterministic sampler the unmasked latent stays the original noised at each sigma, as
    diffusers' StableDiffusionInpaintPipeline keeps it for a 4-channel U-Net."""

    def __init__(self, denoiser, latent: np.ndarray, mask: np.ndarray):
        self.denoiser, self.latent, self.mask = denoiser, latent, mask
        self.space = denoiser.space

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        return (self.denoiser(x, sigma) * self.mask + self.latent * (1 - self.mask)).astype(np.float32)


def nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mask, size) in its default 'nearest' mode: source index
    floor(i * in / out)."""
    rows = np.minimum(np.floor(np.arange(height) * (mask.shape[-2] / height)).astype(int), mask.shape[-2] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (mask.shape[-1] / width)).astype(int), mask.shape[-1] - 1)
    return mask[..., rows[:, None], cols[None, :]]


# --- a graph's input shape, read without parsing its weights --------------------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, value) of a protobuf message: an int, or the (start, end) of a length-delimited field."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = (pos, pos + size), pos + size
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
        yield number, value


def _first(buf, span, number):
    return next((v for n, v in _fields(buf, *span) if n == number), None)


def input_dims(buf, name: str) -> list[int | str] | None:
    """The dimensions of graph input `name` of a serialized ONNX model (ModelProto.graph = 7,
    GraphProto.input = 11, ValueInfoProto name 1 / type 2, TypeProto.tensor_type 1, its shape 2,
    TensorShapeProto.dim 1, dim_value 1 / dim_param 2), skipping over nodes and weights; None when
    it has no such input."""
    graph = _first(buf, (0, len(buf)), 7)
    if graph is None:
        return None
    for number, span in _fields(buf, *graph):
        if number != 11:
            continue
        label = _first(buf, span, 1)
        if label is None or bytes(buf[label[0]:label[1]]).decode("utf-8", "replace") != name:
            continue
        tensor = _first(buf, _first(buf, span, 2) or (0, 0), 1)
        shape = _first(buf, tensor, 2) if tensor else None
        if shape is None:
            return []
        dims: list[int | str] = []
        for n, dim in _fields(buf, *shape):
            if n == 1:
                value = _first(buf, dim, 1)
                param = _first(buf, dim, 2)
                dims.append(value if isinstance(value, int) else
                            bytes(buf[param[0]:param[1]]).decode() if param else "?")
        return dims
    return None


def file_input_dims(path: Path, name: str) -> list[int | str] | None:
    """input_dims of an ONNX file, mapped (its weights are skipped, not read)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return input_dims(buf, name)

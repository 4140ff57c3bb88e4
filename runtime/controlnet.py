"""ControlNets at sampling time: each unit's control image, strength and guidance window, run
beside the U-Net at every evaluation, their residuals summed into the U-Net's residual inputs
(kernels.graphs.unet `control`), as diffusers' StableDiffusionControlNetPipeline and its
MultiControlNetModel do: the ControlNet sees the same scaled latent, timestep and conditioning
(both halves of a guided batch), its control image repeated over the batch; unit k acts on step
i of N when not (i / N < start or (i + 1) / N > end), its residuals scaled by its strength.

The preprocessors that need no model: `none` (the image as it is) and `canny` (Canny's edges,
in NumPy, as A1111's ControlNet extension runs OpenCV's: Sobel gradients, the strongest channel,
non-maximum suppression, two thresholds joined by hysteresis; white edges on black)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgediff.errors import PackageError, UsageError, arg
from edgediff.runtime.image import open_image

PREPROCESSORS = ("none", "canny")
ROLE = "controlnet"  # a ControlNet package's manifest role
_SAME_WEIGHTS = {"sd-turbo": "sd2", "sdxl-turbo": "sdxl"}  # what a family's ControlNets are made for


@dataclass
class ControlNetUnit:
    """One ControlNet and what it steers with: `model` a converted ControlNet package (edgediff.Pipeline
    and the CLI also take a diffusers ControlNet folder or a .safetensors file, LDM's or diffusers'
    names, and build its graph once); `image` the control
    image (a file, a PIL image, or an array [H, W, 3] in 0..255); `strength` its residuals'
    scale; `start`, `end` the part of the steps it acts on (0..1); `preprocessor` what is made of
    the image first ('none', 'canny' with `low` and `high` thresholds on 0..255 gradients)."""

    model: str | Path
    image: str | Path | Image.Image | np.ndarray
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    low: float = 100.0
    high: float = 200.0

    @classmethod
    def parse(cls, spec: str, image, **kw) -> ControlNetUnit:
        """From the CLI's PATH[:STRENGTH]."""
        path, sep, strength = str(spec).rpartition(":")
        if sep and path and _number(strength) is not None and not Path(spec).exists():
            return cls(path, image, float(strength), **kw)
        return cls(spec, image, **kw)


def option() -> str:
    """The argument as the user spells it: --controlnet on the command line, controlnets in Python."""
    return "--controlnet" if arg("controlnet").startswith("--") else "controlnets"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_image(image, where: str) -> Image.Image:
    """A control image as RGB: a file, a PIL image or an array; a clear error otherwise."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise UsageError(f"{where}: an image array is [H, W] or [H, W, 1|3|4] (got {list(image.shape)})")
        return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8).squeeze()).convert("RGB")
    return open_image(image, where)


# -- preprocessors -------------------------------------------------------------------------------

def _filter3(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """3x3 correlation of [H, W, ...] with reflected borders (OpenCV's BORDER_REFLECT_101)."""
    pad = np.pad(x, ((1, 1), (1, 1)) + ((0, 0),) * (x.ndim - 2), mode="reflect")
    h, w = x.shape[:2]
    out = np.zeros(x.shape, np.float64)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * pad[dy:dy + h, dx:dx + w]
    return out


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """Canny's edge map of an RGB image (Canny 1986, as OpenCV's `Canny(img, low, high)` computes
    it: 3x3 Sobel, |gx| + |gy| of the channel where it is largest, non-maximum suppression along
    the gradient's direction in four sectors, edges above `high` grown through pixels above
    `low`), white on black in RGB, as A1111's ControlNet extension feeds it."""
    if not 0 <= low <= high:
        raise UsageError(f"canny thresholds: low {low} and high {high} must satisfy 0 <= low <= high")
    rgb = np.asarray(image.convert("RGB"), np.float64)
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
    gx, gy = _filter3(rgb, sobel), _filter3(rgb, sobel.T)
    mag = np.abs(gx) + np.abs(gy)
    pick = mag.argmax(-1)[..., None]
    gx, gy, mag = (np.take_along_axis(a, pick, -1)[..., 0] for a in (gx, gy, mag))
    # the gradient's sector: 0 horizontal, 45, vertical, 135 degrees (tan 22.5 = 0.4142)
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= ax * 0.41421356
    vertical = ay > ax * 2.41421356
    diagonal = ~horizontal & ~vertical
    same_sign = (gx * gy) > 0
    m = np.pad(mag, 1)
    h, w = mag.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    # OpenCV keeps a maximum that is > its one neighbour and >= the other
    keep = np.zeros_like(mag, bool)
    keep |= horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep |= diagonal & same_sign & (mag > at(-1, -1)) & (mag >= at(1, 1))
    keep |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag >= at(1, -1))
    weak = keep & (mag > low)
    edges = weak & (mag > high)
    while True:  # hysteresis: grow the strong edges through 8-connected weak pixels
        grown = np.pad(edges, 1)
        near = np.zeros_like(edges)
        for dy in range(3):
            for dx in range(3):
                near |= grown[dy:dy + h, dx:dx + w]
        more = edges | (weak & near)
        if (more == edges).all():
            break
        edges = more
    out = (edges * 255).astype(np.uint8)
    return Image.fromarray(np.stack([out] * 3, -1))


def preprocess(image: Image.Image, unit: ControlNetUnit, where: str) -> Image.Image:
    if unit.preprocessor == "none":
        return image
    if unit.preprocessor == "canny":
        return canny(image, unit.low, unit.high)
    raise UsageError(f"{where}: unknown preprocessor '{unit.preprocessor}'; this version has: "
                     f"{', '.join(PREPROCESSORS)}")


# -- sampling ------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    name: str  # for messages
    component: object  # runtime.sessions.Component
    image: np.ndarray  # [1, C, H, W] in [0, 1]
    strength: float
    start: float
    end: float


class Control:
    """The units of one image, checked and with their images ready; `residuals(unet, steps)`
    gives what each U-Net evaluation is fed."""

    def __init__(self, units: list[_Prepared], release: Callable[[object], None]):
        self.units, self._release = units, release

    def release(self) -> None:
        for unit in self.units:
            self._release(unit.component)


def prepare(pipe, units: Sequence[ControlNetUnit] | None, width: int, height: int) -> Control | None:
    """Check the units against the model before any work: each ControlNet opens (its graph built
    once for a folder or file) and must be for the model's family, each image must read."""
    from edgediff.runtime.package import open_package

    if not units:
        return None
    if isinstance(units, ControlNetUnit):
        units = [units]
    m = pipe.manifest
    if m.denoiser != "unet":
        raise UsageError(f"{option()}: {pipe.package.name} is {m.family}, which has a transformer; this "
                         "version runs ControlNets with U-Net models (SD 1.x, 2.x, SDXL)")
    prepared = []
    for k, unit in enumerate(units):
        where = f"{option()}[{k}]" if len(units) > 1 or option() == "controlnets" else option()
        if not isinstance(unit, ControlNetUnit):
            raise UsageError(f"{where}: give ControlNetUnit(model, image, strength, start, end) (got "
                             f"{type(unit).__name__})")
        if not (np.isfinite(unit.strength) and 0 <= unit.start <= unit.end <= 1):
            raise UsageError(f"{where}: strength must be a finite number and 0 <= start <= end <= 1 (got strength "
                             f"{unit.strength}, start {unit.start}, end {unit.end})")
        if unit.preprocessor not in PREPROCESSORS:
            raise UsageError(f"{where}: unknown preprocessor '{unit.preprocessor}'; this version has: "
                             f"{', '.join(PREPROCESSORS)}")
        try:
            package = open_package(unit.model)
        except PackageError as exc:
            raise UsageError(f"{where} {unit.model}: not a converted ControlNet ({exc}); convert it with `edgediff "
                             "convert`, or give it through edgediff.Pipeline or the CLI, which build its graph "
                             "once") from None
        cn = package.manifest
        if cn.role != ROLE:
            raise UsageError(f"{where} {unit.model}: a {cn.family} model package, not a ControlNet")
        if _SAME_WEIGHTS.get(cn.family, cn.family) != _SAME_WEIGHTS.get(m.family, m.family):
            raise UsageError(f"{where} {unit.model}: a ControlNet for {cn.family} cannot steer {pipe.package.name} "
                             f"({m.family}); give a ControlNet made for {m.family}")
        image = preprocess(read_image(unit.image, f"{where} image"), unit, where)
        if image.size != (width, height):  # as diffusers' control image processor resizes it
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        array = (np.asarray(image, np.float32) / 255.0).transpose(2, 0, 1)[None]
        component = package.component("controlnet", pipe.options)
        prepared.append(_Prepared(f"{where} {unit.model}", component, np.ascontiguousarray(array),
                                  float(unit.strength), float(unit.start), float(unit.end)))
    return Control(prepared, pipe._done)


def _graph_input_widths(pipe, names: Sequence[str]) -> dict[str, int]:
    """The widths of the denoiser graph's inputs `names`, read from the stored graph (its weights
    skipped; OpenVINO's sessions do not say their inputs' shapes)."""
    from edgediff.runtime import inpaint

    m = pipe.manifest
    entry = m.components[m.denoiser]
    if pipe.package.gguf is not None:
        data = pipe.package.gguf.blob(entry.file)
        dims = {n: inpaint.input_dims(data, n) for n in names} if data is not None else {}
    else:
        dims = {n: inpaint.file_input_dims(pipe.package.root / entry.file, n) for n in names}
    axis = {"encoder_hidden_states": -1}  # its width is the last axis; the residuals' the second
    return {n: d[axis.get(n, 1)] for n, d in dims.items() if d and len(d) > 1 and isinstance(d[axis.get(n, 1)], int)}


class Residuals:
    """What one sampler run feeds the U-Net's residual inputs: the units' summed residuals on the
    steps they act on, zeros of [1, C, 1, 1] (which broadcast) otherwise. `track(callback)` is the
    sampler's step callback that also counts the steps."""

    def __init__(self, pipe, unet, control: Control | None, steps: int):
        from edgediff.kernels.graphs.unet import MID_RESIDUAL, RESIDUAL

        inputs = set(unet.input_names)
        down = []
        while RESIDUAL.format(len(down)) in inputs:
            down.append(RESIDUAL.format(len(down)))
        order = [*down, MID_RESIDUAL] if MID_RESIDUAL in inputs else []
        self.names = set(order)
        where = pipe.package.name
        if control is not None and not order:
            raise PackageError(f"{where}: its U-Net takes no ControlNet residuals (converted by an earlier edgediff); "
                               "re-convert it with this version to use ControlNets")
        widths = _graph_input_widths(pipe, [*order, "encoder_hidden_states"]) if order else {}
        self.zeros = {n: np.zeros((1, widths[n], 1, 1), np.float32) for n in order}
        self.order, self.control, self.steps, self.step = order, control, steps, 0
        if control is not None:
            for unit in control.units:
                self._check(unit, widths, where)

    def _check(self, unit: _Prepared, widths: dict[str, int], where: str) -> None:
        from edgediff.kernels.graphs.controlnet import MID_RES_SAMPLE, RES_SAMPLE

        session = unit.component.session
        outputs = {o.name: getattr(o, "shape", None) for o in session.get_outputs()}
        wanted = [*(RES_SAMPLE.format(i) for i in range(len(self.order) - 1)), MID_RES_SAMPLE]
        shaped = all(outputs.get(n) for n in wanted)
        theirs = [outputs[n][1] for n in wanted] if shaped else []
        mine = [widths[n] for n in self.order]
        context = next((a.shape[2] for a in session.get_inputs()
                        if a.name == "encoder_hidden_states" and getattr(a, "shape", None)), None)
        fits = set(outputs) == set(wanted) and (not shaped or theirs == mine) and (
            context is None or context == widths.get("encoder_hidden_states", context))
        if not fits:
            raise UsageError(f"{unit.name}: this ControlNet does not fit {where}'s U-Net (its {len(outputs)} residuals "
                             f"are {theirs} channels wide, its text context {context}; the U-Net takes {mine} and "
                             f"{widths['encoder_hidden_states']}): it is for another model")

    def track(self, callback):
        if self.control is None:
            return callback

        def step(i, x, denoised):
            self.step = i + 1
            if callback is not None:
                callback(i, x, denoised)
        return step

    def __call__(self, x_in: np.ndarray, t: np.ndarray, cond: dict) -> dict[str, np.ndarray]:
        from edgediff.kernels.graphs.controlnet import MID_RES_SAMPLE, RES_SAMPLE

        total: list[np.ndarray] | None = None
        i, n = self.step, self.steps
        for unit in self.control.units if self.control is not None else ():
            if i / n < unit.start or (i + 1) / n > unit.end or unit.strength == 0:
                continue  # diffusers' controlnet_keep: 0 this step
            takes = set(unit.component.input_names)
            feeds = {k: v for k, v in cond.items() if k in takes}
            feeds.update(sample=x_in, timestep=t, controlnet_cond=np.repeat(unit.image, x_in.shape[0], 0),
                         conditioning_scale=np.array([unit.strength], np.float32))
            out = unit.component.run(feeds)
            got = [out[RES_SAMPLE.format(k)] for k in range(len(self.order) - 1)] + [out[MID_RES_SAMPLE]]
            total = got if total is None else [a + b for a, b in zip(total, got, strict=True)]
        if total is None:
            return dict(self.zeros)
        return dict(zip(self.order, total, strict=True))

"""`edgediff serve`: models kept loaded behind AUTOMATIC1111's web API and one small web page.

The programs people drive a local image model with (chat front ends, editor plug-ins, bots,
`webuiapi`) speak A1111's `/sdapi/v1/*`; this answers them with A1111's field names, defaults and
error shape. One model is loaded at a time and jobs run on it one at a time; a bounded queue
answers 503 with Retry-After when full. Starlette and uvicorn come with `edgediff[serve]`; the
rest of the runtime does not import this module.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from edgediff import __version__
from edgediff.errors import EdgediffError, UsageError, require
from edgediff.runtime.pipeline import A1111_SCHEDULES
from edgediff.runtime.samplers import A1111_NAMES, SAMPLERS

PAGE = Path(__file__).parent / "web" / "index.html"
# A1111's scheduler names -> edgediff's schedule (None: the model's default)
SCHEDULERS = {"automatic": None, "uniform": "normal", "normal": "normal", "karras": "karras",
              "exponential": "exponential", "sgm_uniform": "sgm_uniform", "simple": "simple", "beta": "beta"}
_COMBINED = ("karras", "exponential")  # A1111's old "DPM++ 2M Karras" sampler names

# A1111 request fields edgediff does not implement -> the values that leave them unused (A1111's
# defaults and what webuiapi sends; None and empty values never count). A field that only matters
# with another (hr_* with enable_hr, mask_blur and inpainting_fill with mask, script_args with
# script_name, s_tmin/s_tmax with s_churn) is not listed: A1111 ignores it too.
UNIMPLEMENTED = {
    "restore_faces": (False,), "tiling": (False,), "styles": (),
    "subseed_strength": (0,), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "s_churn": (0,), "s_noise": (1,), "script_name": (), "refiner_checkpoint": (),
    "disable_extra_networks": (False,), "infotext": (), "comments": (), "firstpass_image": (),
}
IMG2IMG_UNIMPLEMENTED = {"latent_mask": (), "resize_mode": (0,), "initial_noise_multiplier": (1,)}
# the eta each sampler runs with (A1111's `eta` sets it; samplers without fresh noise have none)
SAMPLER_ETA = {"ddim": 0.0, "euler_a": 1.0, "dpmpp_2m_sde": 1.0}
# the upscalers every server has: A1111's names for no upscaling and for plain resizing
BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
# /extra-single-image fields edgediff does not implement -> the values that leave them unused
EXTRAS_UNIMPLEMENTED = {"gfpgan_visibility": (0,), "codeformer_visibility": (0,), "extras_upscaler_2_visibility": (0,),
                        "upscale_first": (False,), "upscaling_crop": (True,)}
# A1111 options edgediff honours (POST /options and override_settings), with their checks;
# `samples_format` is honoured at "png" only (any option set to the value GET /options reports is no change)
OPTIONS = {"sd_model_checkpoint": (str, None, None), "CLIP_stop_at_last_layers": (int, 1, 12),
           "show_progress_every_n_steps": (int, -1, 1000)}


@dataclass
class Limits:
    """What one request may ask for (configurable with `edgediff serve` options)."""

    max_body: int = 32 * 1024 * 1024  # bytes of request body (init images are base64 in it)
    max_side: int = 2048  # pixels, width and height
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    queue: int = 4  # jobs waiting or running; more are answered 503


class ApiError(Exception):
    """An error answered as JSON in A1111's shape: {"error", "detail", "body", "errors"}."""

    def __init__(self, status: int, detail: str, error: str = "HTTPException", headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.error, self.headers = status, detail, error, headers or {}

    def payload(self) -> dict:
        return {"error": self.error, "detail": self.detail, "body": "", "errors": self.detail}


def sampler_choice(name: str | None, scheduler: str | None) -> tuple[str | None, str | None]:
    """A1111's sampler and scheduler names (or edgediff's, or A1111's aliases) -> edgediff's
    sampler and schedule (None: the model's default)."""
    schedule = None
    if scheduler:
        key = scheduler.strip().lower().replace(" ", "_")
        if key not in SCHEDULERS:
            raise ApiError(404, f"Scheduler not found: {scheduler!r} (known: {', '.join(SCHEDULERS)})")
        schedule = SCHEDULERS[key]
    if not name:
        return None, schedule
    key = name.strip().lower()
    by_a1111 = {v.lower(): k for k, v in A1111_NAMES.items()}
    for suffix in _COMBINED:  # "DPM++ 2M Karras": sampler plus schedule
        if key.endswith(" " + suffix) and key.removesuffix(" " + suffix) in by_a1111:
            return by_a1111[key.removesuffix(" " + suffix)], schedule or suffix
    if key in by_a1111:
        return by_a1111[key], schedule
    alias = key.removeprefix("k_")
    if alias in SAMPLERS:
        return alias, schedule
    raise ApiError(404, f"Sampler not found: {name!r}")


def decode_image(data: object, where: str, mode: str | None = "RGB"):
    """A base64 image as clients send it (raw, or a data: URL), in `mode` (None: as sent; a mask's
    alpha says where to paint)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise ApiError(422, f"{where}: expected a base64 string")
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, f"{where}: not valid base64 ({exc})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ApiError(422, f"{where}: not a readable image ({exc})") from None
    return image.convert(mode) if mode else image


def png_bytes(image) -> bytes:
    """The PNG of an image with its A1111 parameters in the "parameters" text chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def encode_png(image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def save_output(folder: Path, kind: str, image, seed: int) -> Path:
    """Write an image as A1111 does, `folder/KIND-images/YYYY-MM-DD/NNNNN-SEED.png` (NNNNN: one past
    the highest number in that day's folder), under a temporary name renamed at the end."""
    day = Path(folder) / f"{kind}-images" / datetime.now().strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name.split("-", 1)[0]) for p in day.glob("*.png") if p.name.split("-", 1)[0].isdigit()]
    path = day / f"{max(numbers, default=-1) + 1:05d}-{seed}.png"
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(png_bytes(image))
    partial.replace(path)
    return path


def history(folder: Path, limit: int = 200) -> list[dict]:
    """The images `save_output` wrote, newest first, with their parameters (read from the PNGs)."""
    from PIL import Image

    folder = Path(folder)
    found = []
    for kind in ("txt2img", "img2img"):
        for path in (folder / f"{kind}-images").glob("*/*.png"):
            number = path.name.split("-", 1)[0]
            with contextlib.suppress(OSError):  # removed meanwhile
                if number.isdigit():
                    found.append((path.parent.name, path.stat().st_mtime_ns, int(number), path))
    items = []
    for *_, path in sorted(found, reverse=True)[:limit]:
        try:
            with Image.open(path) as image:
                parameters = image.info.get("parameters", "")
        except OSError:  # half-written by another program, or not an image after all
            continue
        name = path.relative_to(folder).as_posix()
        items.append({"name": name, "url": f"/edgediff/outputs/{name}", "parameters": parameters})
    return items


def _field(body: dict, name: str, kind, default, low=None, high=None):
    """A request field checked for type and range (booleans are not numbers)."""
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ApiError(422, f"'{name}' must be {'a number' if kind in (int, float) else kind.__name__} (got {value!r})")
    if kind is float and not math.isfinite(value):
        raise ApiError(422, f"'{name}' must be a finite number (got {value})")
    if low is not None and value < low or high is not None and value > high:
        raise ApiError(422, f"'{name}' must be between {low} and {high} (got {value})")
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    """A yes/no field, as clients send it: true/false or A1111's 1/0."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ApiError(422, f"'{name}' must be true or false (got {value!r})")


def _unset(value, unused: tuple = ()) -> bool:
    return value is None or value in ("", [], {}) or value in unused


def _scripts_in_use(scripts: object) -> list[str]:
    """The always-on scripts (ControlNet, ADetailer, ...) a request enables: those with arguments,
    unless the first is False (A1111's "enabled" box) or every unit says `"enabled": false`."""
    if _unset(scripts):
        return []
    if not isinstance(scripts, dict):
        return ["alwayson_scripts"]
    used = []
    for name, spec in scripts.items():
        if name.lower() == "controlnet":  # its units are run (Request.parse reads them)
            continue
        args = spec.get("args") if isinstance(spec, dict) else spec
        if _unset(args) or isinstance(args, list) and args[0] in (False, None):
            continue
        if isinstance(args, list) and all(isinstance(a, dict) and a.get("enabled") is False for a in args):
            continue
        used.append(f"alwayson_scripts.{name}")
    return used


def unimplemented(body: dict, img2img: bool) -> list[str]:
    """The A1111 fields `body` sets that edgediff does not implement, in the body's order."""
    table = {**UNIMPLEMENTED, **(IMG2IMG_UNIMPLEMENTED if img2img else {})}
    return [name for name, value in body.items() if name in table and not _unset(value, table[name])] + (
        _scripts_in_use(body.get("alwayson_scripts")))


def option_changes(body: dict, current: dict, where: str = "") -> tuple[dict, list[str]]:
    """The options edgediff honours in `body`, checked, and the names of those it does not (an
    option set to the value GET /options reports, or to None, is no change)."""
    honoured, others = {}, []
    for key, value in body.items():
        if key in OPTIONS and value is not None:
            kind, low, high = OPTIONS[key]
            honoured[key] = _field(body, key, kind, None, low, high)
        elif value is not None and current.get(key) != value:
            others.append(where + key)
    return honoured, others


def refuse_or_ignore(names: list[str], lenient: bool) -> list[str]:
    """A 422 naming what edgediff does not implement, or (lenient) the names to list as ignored."""
    if names and not lenient:
        them = "it" if len(names) == 1 else "them"
        raise ApiError(422, f"edgediff does not implement {', '.join(names)}; leave {them} unset, or start the "
                            f"server with --lenient to have {them} ignored (and listed in info's 'ignored')")
    return names


# the A1111 ControlNet extension's resize modes: all equal when the image has the target's aspect
_JUST_RESIZE = (0, "Just Resize")
CONTROLNET_MODULES = {"none": "none", "canny": "canny"}  # its preprocessor names -> runtime.controlnet's


def controlnet_units(scripts: object, width: int, height: int) -> tuple[list, list[str]]:
    """The enabled units of the ControlNet extension's `alwayson_scripts` entry as ControlNetUnits
    (the model still a name), and the unit fields set to what edgediff does not implement."""
    from edgediff.runtime.controlnet import ControlNetUnit

    spec = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None) if isinstance(scripts, dict) else None
    args = spec.get("args") if isinstance(spec, dict) else spec
    units, unset = [], []
    for i, unit in enumerate(args if isinstance(args, list) else []):
        if not isinstance(unit, dict) or not unit.get("enabled", True):
            continue
        where = f"alwayson_scripts.ControlNet.args[{i}]"
        module = unit.get("module") or "none"
        if module not in CONTROLNET_MODULES:
            raise ApiError(422, f"{where}.module {module!r}: this server has the preprocessors "
                                f"{', '.join(CONTROLNET_MODULES)}")
        image = decode_image(unit.get("image") or unit.get("input_image"), f"{where}.image")
        if unit.get("control_mode", 0) not in (0, "Balanced"):
            unset.append(f"{where}.control_mode")
        if not _unset(unit.get("mask")):
            unset.append(f"{where}.mask")
        if unit.get("resize_mode", 0) not in _JUST_RESIZE and image.width * height != image.height * width:
            unset.append(f"{where}.resize_mode (the image is resized to {width}x{height}: 'Just Resize')")
        units.append(ControlNetUnit(
            unit.get("model") or "None", image, _field(unit, "weight", float, 1.0, 0.0, 10.0),
            _field(unit, "guidance_start", float, 0.0, 0.0, 1.0), _field(unit, "guidance_end", float, 1.0, 0.0, 1.0),
            CONTROLNET_MODULES[module], low=_field(unit, "threshold_a", float, 100.0, 0.0, 1024.0),
            high=_field(unit, "threshold_b", float, 200.0, 0.0, 1024.0)))
    return units, unset


@dataclass
class Request:
    """A txt2img/img2img request, A1111's fields with A1111's defaults, checked."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str | None = None
    schedule: str | None = None
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    denoising_strength: float = 0.75
    clip_skip: int | None = None  # None: the server's CLIP_stop_at_last_layers
    eta: float | None = None
    init_images: list = field(default_factory=list)
    model: str | None = None  # override_settings.sd_model_checkpoint
    save: bool = False  # save_images (and not do_not_save_samples): written to the outputs folder
    send: bool = True  # send_images
    settings: dict = field(default_factory=dict)  # the other honoured override_settings
    restore: bool = True  # override_settings_restore_afterwards
    ignored: list[str] = field(default_factory=list)  # set fields not implemented (--lenient)
    extra: dict = field(default_factory=dict)  # Pipeline.generate's inpainting and hires fix arguments
    controlnets: list = field(default_factory=list)  # enabled ControlNet units (runtime.controlnet.ControlNetUnit)

    @classmethod
    def parse(cls, body: object, limits: Limits, img2img: bool, options: dict | None = None,
              lenient: bool = False) -> Request:
        """`options`: the server's options now (an override equal to one is no change); `lenient`:
        list fields edgediff does not implement in `ignored` instead of answering 422."""
        if not isinstance(body, dict):
            raise ApiError(422, "the request body must be a JSON object")
        r = cls(
            prompt=_field(body, "prompt", str, ""),
            negative_prompt=_field(body, "negative_prompt", str, ""),
            steps=_field(body, "steps", int, 20, 1, limits.max_steps),
            cfg_scale=_field(body, "cfg_scale", float, 7.0, 0.0, 100.0),
            seed=_field(body, "seed", int, -1, -1, 2**32 - 1),
            width=_field(body, "width", int, 512, 8, limits.max_side),
            height=_field(body, "height", int, 512, 8, limits.max_side),
            batch_size=_field(body, "batch_size", int, 1, 1, limits.max_images),
            n_iter=_field(body, "n_iter", int, 1, 1, limits.max_images),
            denoising_strength=_field(body, "denoising_strength", float, 0.75, 0.0, 1.0),
        )
        if r.batch_size * r.n_iter > limits.max_images:
            raise ApiError(422, f"batch_size x n_iter is {r.batch_size * r.n_iter}; at most {limits.max_images} images a request")
        r.sampler, r.schedule = sampler_choice(_field(body, "sampler_name", str, None) or _field(body, "sampler_index", str, None),
                                               _field(body, "scheduler", str, None))
        r.eta = _field(body, "eta", float, None)
        overrides, others = option_changes(_field(body, "override_settings", dict, {}), options or {},
                                           "override_settings.")
        r.model = overrides.pop("sd_model_checkpoint", None)
        r.clip_skip = overrides.pop("CLIP_stop_at_last_layers", None)
        r.settings = overrides
        r.restore = _field(body, "override_settings_restore_afterwards", bool, True)
        r.save = _field(body, "save_images", bool, False) and not _field(body, "do_not_save_samples", bool, False)
        r.send = _field(body, "send_images", bool, True)
        units, unit_fields = controlnet_units(body.get("alwayson_scripts"), r.width, r.height)
        r.controlnets = units
        r.ignored = refuse_or_ignore(unimplemented(body, img2img) + others + unit_fields, lenient)
        if img2img:
            images = _field(body, "init_images", list, [])
            if not images:
                raise ApiError(422, "img2img needs 'init_images': a list with one base64 image")
            r.init_images = [decode_image(images[0], "init_images[0]")]
            if r.denoising_strength <= 0:
                raise ApiError(422, "'denoising_strength' must be above 0 for img2img")
            if not _unset(body.get("mask")):  # inpainting, with the API's defaults (not the UI's)
                r.extra = dict(mask=decode_image(body["mask"], "mask", mode=None),
                               mask_blur=_field(body, "mask_blur", int, 4, 0, 256),
                               inpainting_fill=_field(body, "inpainting_fill", int, 0, 0, 3),
                               inpaint_full_res=_flag(body, "inpaint_full_res", True),
                               inpaint_full_res_padding=_field(body, "inpaint_full_res_padding", int, 0, 0, 4096),
                               inpainting_mask_invert=_flag(body, "inpainting_mask_invert", False))
        elif _field(body, "enable_hr", bool, False):  # A1111's hires fix: a second pass, larger
            r.extra = dict(hires_scale=_field(body, "hr_scale", float, 2.0, 1.0, 8.0),
                           hires_width=_field(body, "hr_resize_x", int, 0, 0, limits.max_side),
                           hires_height=_field(body, "hr_resize_y", int, 0, 0, limits.max_side),
                           hires_upscaler=_field(body, "hr_upscaler", str, None) or "Latent",
                           hires_steps=_field(body, "hr_second_pass_steps", int, 0, 0, limits.max_steps),
                           hires_strength=r.denoising_strength if "denoising_strength" in body else 0.7)
        return r


@dataclass
class Job:
    """What /progress reports about the job running now."""

    started: float = 0.0
    step: int = 0
    steps: int = 0
    image: int = 0  # images of this request done
    images: int = 0
    interrupted: bool = False
    skipped: bool = False  # the image running now was skipped (POST /skip)
    timestamp: str = ""
    size: tuple[int, int] = (0, 0)  # width, height
    latent: object = None  # the latest kept prediction of the final latent (every N steps)
    latent_of: object = None  # its format: the manifest of the model sampling it
    shown: tuple | None = None  # (latent, base64 PNG) of the last current_image

    def current_image(self) -> str | None:
        """The latest kept latent as a base64 PNG (runtime.preview), made once per kept latent."""
        latent, shown = self.latent, self.shown
        if latent is None:
            return None
        if shown is None or shown[0] is not latent:
            from edgediff.runtime.preview import preview

            buffer = io.BytesIO()
            preview(latent, self.latent_of, self.size).save(buffer, format="PNG")
            shown = self.shown = (latent, base64.b64encode(buffer.getvalue()).decode("ascii"))
        return shown[1]

    def fraction(self) -> float:
        if not self.images or not self.steps:
            return 0.0
        return min(1.0, (self.image + self.step / self.steps) / self.images)


class Models:
    """The packages and .gguf files in a folder, by name (never used as a path)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UsageError(f"--models {folder}: no such folder")
        self.paths: dict[str, Path] = self.scan()
        if not self.paths:
            raise UsageError(f"--models {folder}: no edgediff packages or .gguf files in it; make one with "
                             f"`edgediff convert SOURCE --output {folder}/NAME`")

    def scan(self) -> dict[str, Path]:
        """The packages and .gguf files in the folder now, by name."""
        return {path.name: path for path in sorted(self.folder.iterdir())
                if (path / "edgediff.json").is_file() or path.suffix.lower() == ".gguf" and path.is_file()}

    def find(self, name: str) -> str:
        """A client's model name -> ours: exact, or A1111's 'title [hash]' form."""
        if name in self.paths:
            return name
        bare = name.split(" [", 1)[0]
        if bare in self.paths:
            return bare
        raise ApiError(404, f"model {name!r} is not served here (served: {', '.join(self.paths)})")

    def short_hash(self, name: str) -> str:
        path = self.paths[name]
        target = path / "edgediff.json" if path.is_dir() else path
        try:
            st = target.stat()
        except OSError:  # removed while loaded (it stays served until another is chosen)
            return hashlib.sha256(name.encode()).hexdigest()[:10]
        return hashlib.sha256(f"{name} {st.st_size} {st.st_mtime_ns}".encode()).hexdigest()[:10]

    def listing(self) -> list[dict]:
        return [{"title": f"{n} [{self.short_hash(n)}]", "model_name": n, "hash": self.short_hash(n),
                 "sha256": None, "filename": str(p), "config": None} for n, p in self.paths.items()]


class Service:
    """The loaded model, the job queue and the state /progress reports; the web layer calls in."""

    def __init__(self, models: Models, model: str | None = None, limits: Limits | None = None,
                 low_memory: bool = False, device: str = "auto", threads: int | None = None,
                 lora_dir: Path | None = None, runnable: Callable[[Path], Path] | None = None,
                 lenient: bool = False, preview_every: int = 10, outputs: Path | None = None,
                 embeddings_dir: Path | None = None, upscalers_dir: Path | None = None,
                 controlnets_dir: Path | None = None, controlnet_package: Callable[[Path], Path] | None = None):
        self.models, self.limits = models, limits or Limits()
        self.embeddings_dir, self.upscalers_dir, self.controlnets_dir = embeddings_dir, upscalers_dir, controlnets_dir
        # a ControlNet folder or file -> the package that runs it (convert.controlnet's; the CLI hands it in)
        self.controlnet_package = controlnet_package
        self._upscalers: dict[str, object] = {}  # loaded upscaler sessions, by file name
        self.runnable = runnable  # a file another tool wrote -> the package that runs it (convert.adopt's)
        self.low_memory, self.device, self.threads, self.lora_dir = low_memory, device, threads, lora_dir
        self.lenient = lenient  # fields edgediff does not implement: ignored and listed, not a 422
        # where requests with save_images write their images (A1111's outputs/txt2img-images/DATE/)
        self.outputs = Path(outputs) if outputs is not None else models.folder.parent / "outputs"
        # the honoured A1111 options besides the model (POST /options, override_settings)
        self.settings = {"CLIP_stop_at_last_layers": 1, "show_progress_every_n_steps": preview_every}
        self.name: str | None = None
        self.pipe = None
        self.model_lock = threading.Lock()  # one job (or model switch) on the model at a time
        self.admit_lock = threading.Lock()
        self.admitted = 0
        self.job = Job()
        self.interrupt_flag = threading.Event()  # stop the job (the image running now is decoded as it is)
        self.skip_flag = threading.Event()  # stop the image running now; the job goes on with the next
        self.switch(model or next(iter(models.paths)))

    def switch(self, name: str) -> None:
        """Load `name` (waiting for the running job), unloading the previous model."""
        name = self.models.find(name)
        with self.model_lock:
            self._switch(name)

    def _switch(self, name: str) -> None:
        from edgediff.runtime import Pipeline

        if name == self.name:
            return
        if self.pipe is not None:
            for comp in self.pipe._components.values():
                comp.release()
        self.pipe = None
        path = self.models.paths[name]
        if path.is_file() and self.runnable is not None:  # a GGUF another tool wrote: its cached graphs
            path = self.runnable(path)
        self.pipe = Pipeline(path, device=self.device, threads=self.threads, keep_loaded=not self.low_memory,
                             lora_dir=self.lora_dir, embeddings_dir=self.embeddings_dir)
        self.name = name

    def set_options(self, body: dict) -> list[str]:
        """POST /options: apply the options edgediff honours (all or none); the others are a 422
        or, lenient, returned as ignored."""
        honoured, others = option_changes(body, self.options())
        ignored = refuse_or_ignore(others, self.lenient)
        name = honoured.pop("sd_model_checkpoint", None)
        if name is not None:
            self.switch(name)
        self.settings.update(honoured)
        return ignored

    def admit(self) -> None:
        with self.admit_lock:
            if self.admitted >= self.limits.queue:
                raise ApiError(503, f"the queue is full ({self.limits.queue} jobs); try again shortly",
                               headers={"Retry-After": "5"})
            self.admitted += 1

    def release(self) -> None:
        with self.admit_lock:
            self.admitted -= 1

    def generate(self, r: Request) -> dict:
        """Run a request (the caller has admitted it): images, parameters and A1111's info. Its
        override_settings hold for this job and are restored after it unless it says not to."""
        wanted = self.models.find(r.model) if r.model is not None else None
        with self.model_lock:
            name, settings = self.name, dict(self.settings)
            try:
                if wanted is not None:
                    self._switch(wanted)
                self.settings.update(r.settings)
                if r.clip_skip is not None:
                    self.settings["CLIP_stop_at_last_layers"] = r.clip_skip
                return self._generate(r)
            finally:
                if r.restore:
                    self.settings = settings
                    self._switch(name)

    def _generate(self, r: Request) -> dict:
        pipe = self.pipe
        m = pipe.manifest
        if m.conditioning.image_encoder:  # this API makes images; a video is the command line's
            raise ApiError(422, f"{self.name} ({m.family}) makes videos from an image, which A1111's txt2img and "
                                "img2img do not return; choose an image model, or run `edgediff generate --model "
                                f"{self.models.paths[self.name]} --init-image IMAGE --output clip.webp`")
        for side in ("width", "height"):
            if getattr(r, side) % m.size_multiple:
                raise ApiError(422, f"'{side}' must be a multiple of {m.size_multiple} for {m.family} (got {getattr(r, side)})")
        sampler = r.sampler or str(m.defaults["sampler"])
        if not _unset(r.eta) and sampler in SAMPLER_ETA and r.eta != SAMPLER_ETA[sampler]:
            r.ignored += refuse_or_ignore([f"eta ({A1111_NAMES[sampler]} runs at eta {SAMPLER_ETA[sampler]:g})"],
                                          self.lenient)
        clip_skip = self.settings["CLIP_stop_at_last_layers"]
        seed = random.randrange(2**32) if r.seed == -1 else r.seed
        count = r.batch_size * r.n_iter
        self.interrupt_flag.clear()
        self.skip_flag.clear()
        self.job = Job(started=time.time(), steps=r.steps, images=count,
                       timestamp=datetime.now().strftime("%Y%m%d%H%M%S"), size=(r.width, r.height), latent_of=m)
        every = self.settings["show_progress_every_n_steps"]  # A1111's option; -1 or 0: no previews

        def progress(done: int, total: int) -> None:
            self.job.step, self.job.steps = done, total

        def on_step(done: int, denoised) -> None:
            if every > 0 and done % every == 0:
                self.job.latent = denoised.copy()

        images, infotexts, seeds = [], [], []
        for i in range(count):
            if self.interrupt_flag.is_set():
                break
            self.job.image, self.job.step, self.job.skipped, self.job.latent = i, 0, False, None
            self.skip_flag.clear()
            try:
                image = pipe.generate(
                    r.prompt, r.negative_prompt, steps=r.steps, guidance=r.cfg_scale, sampler=r.sampler,
                    schedule=r.schedule, seed=(seed + i) % 2**32, width=r.width, height=r.height,
                    init_image=r.init_images[0] if r.init_images else None, strength=r.denoising_strength,
                    clip_skip=clip_skip, progress=progress, interrupt=self.stopping,
                    on_step=on_step, controlnets=self._controlnets(r.controlnets) or None, **self._extra(r.extra))
            except EdgediffError as exc:
                raise ApiError(422 if isinstance(exc, UsageError) else 500, str(exc), type(exc).__name__) from None
            if r.save:
                try:
                    save_output(self.outputs, "img2img" if r.init_images else "txt2img", image, (seed + i) % 2**32)
                except OSError as exc:
                    raise ApiError(500, f"could not write the image to {self.outputs} ({exc}); serve with another "
                                        "--outputs folder", "OSError") from None
            images.append(image)
            infotexts.append(image.info["parameters"])
            seeds.append((seed + i) % 2**32)
        self.job.interrupted = self.interrupt_flag.is_set()
        self.job.image = len(images)
        info = {
            "prompt": r.prompt, "all_prompts": [r.prompt] * len(images), "negative_prompt": r.negative_prompt,
            "all_negative_prompts": [r.negative_prompt] * len(images), "seed": seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0,
            "width": r.width, "height": r.height,
            "sampler_name": A1111_NAMES.get(sampler),
            "cfg_scale": r.cfg_scale, "steps": r.steps, "batch_size": r.batch_size, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": self.name, "sd_model_hash": self.models.short_hash(self.name),
            "denoising_strength": r.denoising_strength if r.init_images or r.extra.get("hires_scale") else None,
            "clip_skip": clip_skip,
            "extra_generation_params": {"Schedule type": A1111_SCHEDULES.get(r.schedule or "")} if r.schedule else {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": self.job.timestamp,
            "is_using_inpainting_conditioning": False, "version": f"edgediff {__version__}",
            "interrupted": self.job.interrupted, "ignored": r.ignored,
        }
        self.job = Job(timestamp=self.job.timestamp, interrupted=self.job.interrupted)  # idle
        return {"images": [encode_png(im) for im in images] if r.send else [], "info": info}

    def controlnet_models(self) -> dict[str, Path]:
        """The ControlNets of the ControlNet folder by name: converted packages, diffusers folders
        and .safetensors files."""
        folder = self.controlnets_dir
        found = {}
        for path in sorted(folder.iterdir()) if folder is not None and folder.is_dir() else []:
            if path.suffix.lower() == ".safetensors" or (path / "config.json").is_file() or (path / "edgediff.json").is_file():
                found[path.stem if path.is_file() else path.name] = path
        return found

    def _controlnets(self, units: list) -> list:
        """Request units with their model names made the packages that run them."""
        import dataclasses

        if not units:
            return units
        models = self.controlnet_models()
        out = []
        for unit in units:
            name = str(unit.model).split(" [", 1)[0]
            if name not in models:
                raise ApiError(404, f"ControlNet model {unit.model!r} not found (there are: "
                                    f"{', '.join(models) or 'none; serve with --controlnet-dir DIR'})")
            path = models[name]
            if self.controlnet_package is not None:
                path = self.controlnet_package(path)
            out.append(dataclasses.replace(unit, model=path))
        return out

    def _extra(self, extra: dict) -> dict:
        """generate's inpainting and hires arguments, a hires upscaler named by its file (in the
        upscalers folder) given as the loaded upscaler."""
        name = extra.get("hires_upscaler")
        if name is None or name in BUILTIN_UPSCALERS or name.startswith("Latent"):
            return extra
        return {**extra, "hires_upscaler": self._upscaler(name, "hr_upscaler")}

    def stopping(self) -> bool:
        """Asked after every step: stop this image (interrupt or skip)."""
        self.job.skipped = self.job.skipped or self.skip_flag.is_set()
        return self.interrupt_flag.is_set() or self.job.skipped

    def refresh(self) -> None:
        """POST /refresh-checkpoints: the models folder read again (the loaded model stays served)."""
        paths = self.models.scan()
        if self.name is not None and self.name not in paths:
            paths[self.name] = self.models.paths[self.name]
        self.models.paths = paths

    def embeddings(self) -> dict:
        """A1111's /embeddings: the files of the embeddings folder this model takes (loaded) and
        those made for others or unreadable (skipped)."""
        if self.embeddings_dir is None:
            return {"loaded": {}, "skipped": {}}
        with self.model_lock:
            return self.pipe.embedding_list()

    def upscalers(self) -> list[dict]:
        """A1111's /upscalers: None, Lanczos and Nearest, and the ESRGAN-family files of the
        upscalers folder (runtime.upscale)."""
        from edgediff.runtime.upscale import list_upscalers

        plain = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                 for n in BUILTIN_UPSCALERS]
        files = list_upscalers(self.upscalers_dir) if self.upscalers_dir is not None else []
        return plain + [{"name": f.name, "model_name": f.kind, "model_path": str(f.path), "model_url": None,
                         "scale": f.scale} for f in files]

    def upscale(self, image, name: str, scale: float | None = None, size: tuple[int, int] | None = None):
        """`image` made larger by the upscaler A1111 calls `name` (a file of the upscalers folder, or
        Lanczos/Nearest/None, which resize)."""
        from PIL import Image

        if size is None:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if name in BUILTIN_UPSCALERS:
            return image.resize(size, Image.Resampling.NEAREST if name == "Nearest" else Image.Resampling.LANCZOS)
        from edgediff.runtime.upscale import upscale

        return upscale(self._upscaler(name, "upscaler_1"), image, size=size)

    def _upscaler(self, name: str, where: str):
        """The upscaler file of the upscalers folder A1111 calls `name`, loaded (one kept loaded)."""
        from edgediff.runtime.upscale import list_upscalers, load_upscaler

        files = {f.name: f for f in list_upscalers(self.upscalers_dir)} if self.upscalers_dir is not None else {}
        if name not in files:
            raise ApiError(404, f"{where} {name!r} not found (there are: {', '.join([*BUILTIN_UPSCALERS, *files])}"
                                f"{', Latent' if where == 'hr_upscaler' else ''})")
        if name not in self._upscalers:
            self._upscalers = {name: load_upscaler(files[name].path, self.device, self.threads)}
        return self._upscalers[name]

    def loras(self) -> list[dict]:
        """A1111's /loras: every .safetensors under the LoRA folder (what `<lora:NAME>` finds),
        with its header's metadata."""
        from edgediff.runtime.safetensors_file import read_safetensors_header

        if self.lora_dir is None or not Path(self.lora_dir).is_dir():
            return []
        found = []
        for path in sorted(Path(self.lora_dir).rglob("*.safetensors")):
            try:
                metadata = read_safetensors_header(path)[1]
            except (EdgediffError, OSError):
                metadata = {}  # listed all the same: using it gives the reader's message
            found.append({"name": path.stem, "alias": metadata.get("ss_output_name", path.stem), "path": str(path),
                          "metadata": metadata})
        return found

    def memory(self) -> dict:
        """A1111's /memory: this process's resident memory, what the system can still give, and the
        total; no GPU figures (onnxruntime does not report them)."""
        import os

        from edgediff.runtime import memory

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            used = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            free = memory.available()
            ram = {"free": float(free if free is not None else total - used), "used": float(used), "total": float(total)}
        except (OSError, ValueError, IndexError) as exc:
            ram = {"error": f"{exc}"}
        return {"ram": ram, "cuda": {"error": "unavailable: edgediff does not measure GPU memory"}}

    def flags(self) -> dict:
        """A1111's /cmd-flags: how this server was started."""
        return {"api": True, "nowebui": False, "ckpt_dir": str(self.models.folder),
                "lora_dir": str(self.lora_dir) if self.lora_dir else None, "device": self.device,
                "threads": self.threads, "low_memory": self.low_memory, "lenient": self.lenient,
                "outputs": str(self.outputs),
                **{k: getattr(self.limits, k) for k in ("max_body", "max_side", "max_steps", "max_images", "queue")}}

    def progress(self) -> dict:
        job = self.job
        fraction = job.fraction() if job.started else 0.0
        elapsed = time.time() - job.started if job.started else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {"progress": fraction, "eta_relative": eta,
                "state": {"skipped": job.skipped, "interrupted": job.interrupted, "job": "", "job_count": self.admitted,
                          "job_timestamp": job.timestamp or "0", "job_no": job.image,
                          "sampling_step": job.step, "sampling_steps": job.steps},
                "current_image": job.current_image(), "textinfo": None}

    def options(self) -> dict:
        return {"sd_model_checkpoint": f"{self.name} [{self.models.short_hash(self.name)}]",
                "sd_checkpoint_hash": self.models.short_hash(self.name), "samples_format": "png", **self.settings}


def app(service: Service, auth: tuple[str, str] | None = None):
    """The ASGI application (Starlette) over `service`."""
    require("starlette", "serve", "edgediff serve")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    limits = service.limits

    async def body_of(request) -> object:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body):
            raise ApiError(413, f"the request body is over {limits.max_body} bytes")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > limits.max_body:
                raise ApiError(413, f"the request body is over {limits.max_body} bytes")
        try:
            return json.loads(data or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(422, f"the request body is not valid JSON ({exc})") from None

    def generation(img2img: bool):
        async def endpoint(request):
            body = await body_of(request)
            parsed = Request.parse(body, limits, img2img, service.options(), service.lenient)
            service.admit()
            try:
                result = await run_in_threadpool(service.generate, parsed)
            finally:
                service.release()
            if not body.get("include_init_images"):  # as A1111: the request echoed without its images
                body = {**body, **{k: None for k in ("init_images", "mask") if k in body}}
            return JSONResponse({"images": result["images"], "parameters": body, "info": json.dumps(result["info"])})
        return endpoint

    async def sd_models(_request):
        return JSONResponse(service.models.listing())

    async def samplers(_request):
        return JSONResponse([{"name": A1111_NAMES[k], "aliases": [k, f"k_{k}"], "options": {}} for k in SAMPLERS
                             if k in A1111_NAMES])

    async def schedulers(_request):
        return JSONResponse([{"name": k, "label": k.replace("_", " ").title(), "aliases": None,
                              "default_rho": -1, "need_inner_model": False} for k in SCHEDULERS])

    async def options(request):
        if request.method == "POST":
            body = await body_of(request)
            if not isinstance(body, dict):
                raise ApiError(422, "the request body must be a JSON object")
            service.admit()  # a model switch waits for the running job
            try:
                ignored = await run_in_threadpool(service.set_options, body)
            finally:
                service.release()
            return JSONResponse({"ignored": ignored} if ignored else None)
        return JSONResponse(service.options())

    async def progress(_request):
        return JSONResponse(await run_in_threadpool(service.progress))  # a preview is made here

    async def interrupt(_request):
        service.interrupt_flag.set()
        return JSONResponse(None)

    async def skip(_request):
        service.skip_flag.set()
        return JSONResponse(None)

    def answer(what: Callable[[], object]):
        async def endpoint(_request):
            return JSONResponse(await run_in_threadpool(what))
        return endpoint

    # what edgediff has none of, in A1111's shapes
    nothing = {"prompt-styles": [], "sd-vae": [], "face-restorers": [], "hypernetworks": [], "realesrgan-models": [],
               "latent-upscale-modes": []}

    async def extra_single_image(request):
        """A1111's /extra-single-image: one image upscaled (resize_mode 0: by upscaling_resize; 1: to
        upscaling_resize_w x upscaling_resize_h) with upscaler_1."""
        body = await body_of(request)
        if not isinstance(body, dict) or "image" not in body:
            raise ApiError(422, "extra-single-image needs 'image': a base64 image")
        ignored = refuse_or_ignore([n for n, v in body.items() if n in EXTRAS_UNIMPLEMENTED
                                    and not _unset(v, EXTRAS_UNIMPLEMENTED[n])], service.lenient)
        image = decode_image(body["image"], "image")
        name = body.get("upscaler_1") or "None"
        if _field(body, "resize_mode", int, 0, 0, 1) == 1:
            size = (_field(body, "upscaling_resize_w", int, 512, 1, limits.max_side * 4),
                    _field(body, "upscaling_resize_h", int, 512, 1, limits.max_side * 4))
            factor = None
        else:
            size, factor = None, _field(body, "upscaling_resize", float, 2.0, 0.01, 8.0)
        out = await run_in_threadpool(service.upscale, image, name, factor, size)
        info = f"Postprocess upscale {'to' if size else 'by'}: {f'{size[0]}x{size[1]}' if size else factor}, " \
               f"Postprocess upscaler: {name}"
        return JSONResponse({"html_info": info + (f", ignored: {', '.join(ignored)}" if ignored else ""),
                             "image": encode_png(out)})

    async def png_info(request):
        body = await body_of(request)
        if not isinstance(body, dict) or "image" not in body:
            raise ApiError(422, "png-info needs 'image': a base64 PNG")
        from PIL import Image

        text = body["image"]
        raw = text.split(",", 1)[1] if isinstance(text, str) and text.startswith("data:") else text
        try:
            image = Image.open(io.BytesIO(base64.b64decode(raw, validate=True)))
        except Exception as exc:  # PIL and base64 raise several types
            raise ApiError(422, f"image: not a readable base64 image ({exc})") from None
        info = image.info.get("parameters", "")
        return JSONResponse({"info": info, "items": {k: v for k, v in image.info.items() if isinstance(v, str)},
                             "parameters": _parse_parameters(info)})

    async def scripts(_request):
        return JSONResponse({"txt2img": [], "img2img": []})

    async def output_file(request):
        """A file `save_output` wrote (the page's history), never anything outside the folder."""
        from starlette.responses import FileResponse

        root = service.outputs.resolve()
        path = (root / request.path_params["path"]).resolve()
        if path.suffix != ".png" or not path.is_relative_to(root) or not path.is_file():
            raise ApiError(404, f"no image {request.path_params['path']!r} in the outputs folder")
        return FileResponse(path, media_type="image/png", filename=path.name)

    async def page(_request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def on_error(request, exc):
        if isinstance(exc, ApiError):
            return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or ("internal error" if status == 500 else str(exc))
        return JSONResponse(ApiError(status, detail, type(exc).__name__).payload(), status_code=status)

    routes = [
        Route("/", page),
        Route("/sdapi/v1/txt2img", generation(False), methods=["POST"]),
        Route("/sdapi/v1/img2img", generation(True), methods=["POST"]),
        Route("/sdapi/v1/sd-models", sd_models),
        Route("/sdapi/v1/samplers", samplers),
        Route("/sdapi/v1/schedulers", schedulers),
        Route("/sdapi/v1/options", options, methods=["GET", "POST"]),
        Route("/sdapi/v1/progress", progress),
        Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
        Route("/sdapi/v1/png-info", png_info, methods=["POST"]),
        Route("/sdapi/v1/scripts", scripts),
        Route("/sdapi/v1/skip", skip, methods=["POST"]),
        Route("/edgediff/history", answer(lambda: {"images": history(service.outputs)})),
        Route("/edgediff/outputs/{path:path}", output_file),
        Route("/sdapi/v1/loras", answer(service.loras)),
        Route("/sdapi/v1/embeddings", answer(service.embeddings)),
        Route("/sdapi/v1/refresh-embeddings", answer(lambda: None), methods=["POST"]),  # read at every call
        Route("/sdapi/v1/upscalers", answer(service.upscalers)),
        Route("/sdapi/v1/extra-single-image", extra_single_image, methods=["POST"]),
        Route("/controlnet/version", answer(lambda: {"version": 2})),
        Route("/controlnet/model_list", answer(lambda: {"model_list": list(service.controlnet_models())})),
        Route("/controlnet/module_list", answer(lambda: {"module_list": list(CONTROLNET_MODULES), "module_detail": {}})),
        Route("/sdapi/v1/refresh-loras", answer(lambda: None), methods=["POST"]),  # /loras reads the folder each time
        Route("/sdapi/v1/refresh-checkpoints", answer(service.refresh), methods=["POST"]),
        Route("/sdapi/v1/memory", answer(service.memory)),
        Route("/sdapi/v1/cmd-flags", answer(service.flags)),
        *(Route(f"/sdapi/v1/{name}", answer(lambda value=value: value)) for name, value in nothing.items()),
    ]
    middleware = [Middleware(_BasicAuth, credentials=auth)] if auth else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={ApiError: on_error, Exception: on_error, 404: on_error, 405: on_error})


class _BasicAuth:
    """HTTP basic authentication on every route, as A1111's --api-auth."""

    def __init__(self, app, credentials: tuple[str, str]):
        self.app = app
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        self.expected = f"Basic {token}".encode()

    async def __call__(self, scope, receive, send):
        import hmac

        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                from starlette.responses import JSONResponse

                response = JSONResponse(ApiError(401, "Incorrect username or password").payload(), status_code=401,
                                        headers={"WWW-Authenticate": "Basic"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _parse_parameters(text: str) -> dict:
    """A1111's parameters text -> its fields (prompt, negative prompt, then "Key: value, ...")."""
    lines = text.strip().splitlines()
    if not lines:
        return {}
    out = {"Prompt": lines[0]}
    rest = lines[1:]
    if rest and rest[0].startswith("Negative prompt: "):
        out["Negative prompt"] = rest.pop(0).removeprefix("Negative prompt: ")
    if rest:
        import re

        for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', rest[-1]):
            out[key.strip()] = value.strip()
    return out


class Running:
    """A server answering in a background thread (tests, benchmarks): `url`, then `stop()`."""

    def __init__(self, service: Service, auth: tuple[str, str] | None = None, host: str = "127.0.0.1"):
        import socket

        uvicorn = require("uvicorn", "serve", "edgediff serve")
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app(service, auth), host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(400):
            if self.server.started:
                break
            time.sleep(0.025)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(models: Path, model: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          auth: tuple[str, str] | None = None, limits: Limits | None = None, low_memory: bool = False,
          device: str = "auto", threads: int | None = None, lora_dir: Path | None = None,
          runnable: Callable[[Path], Path] | None = None, lenient: bool = False, preview_every: int = 10,
          outputs: Path | None = None, embeddings_dir: Path | None = None, upscalers_dir: Path | None = None,
          controlnets_dir: Path | None = None, controlnet_package: Callable[[Path], Path] | None = None) -> None:
    """Load the model and serve until interrupted; `runnable` opens files other tools wrote;
    `lenient` ignores (and lists in `info`) request fields edgediff does not implement instead of
    answering 422; `preview_every` N: /progress has a preview of the image every N steps (0: none);
    `outputs`: where images asked to be saved go (default: `outputs` beside the models folder);
    `embeddings_dir`, `upscalers_dir`, `controlnets_dir`: textual inversion files, ESRGAN-family
    upscalers and ControlNets (`controlnet_package` builds a folder's or file's graph)."""
    uvicorn = require("uvicorn", "serve", "edgediff serve")
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: a port is 1-65535")
    found = Models(models)
    if model is not None:
        try:
            found.find(model)
        except ApiError as exc:
            raise UsageError(f"--model {model}: {exc.detail}") from None
    service = Service(found, model, limits, low_memory, device, threads, lora_dir, runnable, lenient, preview_every,
                      outputs, embeddings_dir, upscalers_dir, controlnets_dir, controlnet_package)
    print(f"edgediff: serving {models} on http://{host}:{port}/ (A1111 API under /sdapi/v1)", file=sys.stderr,
          flush=True)
    uvicorn.run(app(service, auth), host=host, port=port, log_level="info")

"""`edgediff.json`: the manifest of a package, written by the converter, read by the runtime."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgediff.errors import PackageError
from edgediff.families import Conditioning

FORMAT = "edgediff-package"
FORMAT_VERSION = 1
MANIFEST = "edgediff.json"


@dataclass(frozen=True)
class ComponentEntry:
    file: str  # the .onnx graph, relative to the package (in a .gguf: the metadata key holding it)
    precision: str
    bytes: int  # graph plus external data
    sha256: str  # of the graph file
    data_files: tuple[str, ...] = ()
    notes: dict[str, object] = field(default_factory=dict)  # what the precision pass did
    weights: str = ""  # a weight file bound into the (weight-less) graph at load; "" = in the graph
    weights_prefix: str = ""  # put before the names a bare weight file lacks (a VAE-only file)


@dataclass(frozen=True)
class TextEncoderEntry:
    component: str
    tokenizer: str
    layers: int
    norm_hidden: bool
    pad_token: str
    max_length: int
    pooled: bool
    hidden_layer: int = 1  # the layer the denoiser sees, counted from the last
    kind: str = "clip"  # 'clip' | 'clip_projection' (A1111 chunks, clip skip) | 't5' (one window)
    context: str = "features"  # how its hidden states join the others' (families.TextEncoder)


@dataclass(frozen=True)
class Manifest:
    family: str
    prediction: str  # 'eps' | 'v' | 'flow'
    latent_channels: int
    latent_scale: float
    latent_shift: float
    vae_downscale: int
    components: dict[str, ComponentEntry]
    text_encoders: tuple[TextEncoderEntry, ...]
    defaults: dict[str, object]
    denoiser: str = "unet"  # the component the sampler drives
    size_multiple: int = 8  # image sides are multiples of this
    flow_normal_end: str = "min"  # where a flow model's `normal` spacing ends (families.Family)
    strength_rounding: str = "steps"  # how img2img's strength becomes steps (families.Family)
    role: str = "base"  # 'refiner': img2img or after a base only
    conditioning: Conditioning = Conditioning()  # what the denoiser takes besides text
    source: dict[str, object] = field(default_factory=dict)
    created_by: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def read(cls, package: Path) -> Manifest:
        path = Path(package) / MANIFEST
        if not path.is_file():
            raise PackageError(
                f"{package}: not an edgediff package (no {MANIFEST}); "
                "create one with `edgediff convert SOURCE --output DIR`"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PackageError(f"{path}: unreadable manifest ({exc}); re-run `edgediff convert`") from exc
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        """A manifest from its JSON text (`where` names the file or GGUF key in errors)."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PackageError(f"{where}: unreadable manifest ({exc}); re-run `edgediff convert`") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise PackageError(f"{where}: not an edgediff manifest (format is {found!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise PackageError(
                f"{where}: package format version {raw.get('format_version')} is not supported by this "
                f"edgediff (it reads version {FORMAT_VERSION}); re-convert the model with this version"
            )
        from edgediff.typed import read

        manifest = read(cls, raw, where, PackageError)
        manifest.check(where)
        return manifest

    def check(self, where: str) -> None:
        """What the types do not say: values in range, names that exist, files inside the package."""
        from edgediff.runtime.samplers import SAMPLERS
        from edgediff.runtime.schedules import SCHEDULES

        def bad(message: str):
            return PackageError(f"{where}: {message}; the manifest is damaged: re-run `edgediff convert`")

        if self.prediction not in ("eps", "v", "flow"):
            raise bad(f"'prediction' is {self.prediction!r} (eps, v or flow)")
        for name in ("latent_channels", "vae_downscale", "size_multiple"):
            if getattr(self, name) < 1:
                raise bad(f"'{name}' is {getattr(self, name)} (at least 1)")
        if not self.latent_scale > 0:
            raise bad(f"'latent_scale' is {self.latent_scale} (above 0)")
        if self.denoiser not in self.components:
            raise bad(f"the denoiser '{self.denoiser}' is not among the components ({', '.join(self.components)})")
        for te in self.text_encoders:
            if te.component not in self.components:
                raise bad(f"text encoder '{te.component}' is not among the components")
        adopted = {str(f) for f in self.source.get("files", ())} if isinstance(self.source.get("files"), list) else set()
        for name, entry in self.components.items():
            for rel in (entry.file, *entry.data_files, *([entry.weights] if entry.weights else [])):
                if rel == entry.weights and rel in adopted:
                    continue  # a cached package binding the user's own file, as `source.files` lists
                if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\\" in rel:
                    raise bad(f"component '{name}' names the file {rel!r}, outside the package")
        kinds = {"steps": int, "guidance": (int, float), "sampler": str, "schedule": str, "width": int, "height": int}
        for key, kind in kinds.items():
            value = self.defaults.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise bad(f"defaults.{key} is {value!r}")
        if self.defaults["sampler"] not in SAMPLERS or self.defaults["schedule"] not in SCHEDULES:
            raise bad(f"defaults name an unknown sampler or schedule ({self.defaults['sampler']!r}, "
                      f"{self.defaults['schedule']!r})")
        if self.defaults["steps"] < 1 or self.defaults["width"] < 1 or self.defaults["height"] < 1:
            raise bad("defaults.steps, width and height must be at least 1")

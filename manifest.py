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
        try:
            raw["components"] = {
                k: ComponentEntry(**{**v, "data_files": tuple(v.get("data_files", ()))})
                for k, v in raw["components"].items()
            }
            raw["text_encoders"] = tuple(TextEncoderEntry(**t) for t in raw["text_encoders"])
            extra = raw.get("conditioning", {})
            raw["conditioning"] = Conditioning(**{**extra, "time_ids": tuple(extra.get("time_ids", ()))})
            return cls(**raw)
        except (KeyError, TypeError, AttributeError) as exc:
            raise PackageError(f"{where}: manifest is missing or has malformed fields ({exc})") from exc

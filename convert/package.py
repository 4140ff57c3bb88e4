"""Writing a package: its manifest, tokenizers and scheduler beside the graphs, and atomically:
everything goes into a scratch folder beside the output, which is renamed into place only when
complete; on failure nothing is left behind."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgediff import __version__
from edgediff.errors import UsageError
from edgediff.families import Conditioning, Family, TextEncoder, Video, scheduler_defaults
from edgediff.manifest import MANIFEST, ComponentEntry, Manifest, TextEncoderEntry

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json",
                    "tokenizer_config.json")



def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output(output: Path, overwrite: bool) -> None:
    """Fail before any work if the output cannot be written."""
    if output.exists() and not overwrite:
        raise UsageError(f"{output}: already exists; choose another --output or pass --overwrite")
    parent = next((p for p in output.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{output}: {parent} is a file, not a folder; choose another --output")


@contextlib.contextmanager
def atomic_folder(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces `output`, on any error it is deleted."""
    with _atomic(output, overwrite, folder=True) as scratch:
        yield scratch


@contextlib.contextmanager
def atomic_file(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch file path beside `output`; on success it replaces `output`."""
    with _atomic(output, overwrite, folder=False) as scratch:
        yield scratch


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale(output: Path) -> None:
    """Scratch folders of earlier conversions of `output` whose process is gone (killed by the
    out-of-memory killer or a power cut: no cleanup ran). A full-size model leaves gigabytes."""
    for path in output.parent.glob(f".{output.name}.partial-*"):
        pid = path.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(path)
        except PermissionError:  # alive, another user's
            pass


@contextlib.contextmanager
def _atomic(output: Path, overwrite: bool, folder: bool) -> Iterator[Path]:
    output = Path(output)
    check_output(output, overwrite)
    created = [p for p in reversed(output.parents) if not p.exists()]  # made here, removed on failure
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(output)
    scratch = output.parent / f".{output.name}.partial-{os.getpid()}"
    _remove(scratch)
    if folder:
        scratch.mkdir()
    try:
        yield scratch
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(old)
            scratch.rename(output)
            _remove(old)
        else:
            scratch.rename(output)
    except BaseException:
        _remove(scratch)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


@dataclass(frozen=True)
class Architecture:
    """What a package's manifest needs to know of the model besides its graphs, however they were
    made: its text encoders (spec, layer count, tokenizer folder), scheduler, conditioning and
    latent format."""

    family: Family
    encoders: list[tuple[TextEncoder, int, Path]]
    scheduler_config: dict
    conditioning: Conditioning
    latent_channels: int
    latent_scale: float
    latent_shift: float
    vae_downscale: int
    resolution: int
    info: dict = field(default_factory=dict)
    video: Video | None = None  # an image-to-video model's run defaults (its frame count its own)


def write_manifest(tmp: Path, arch: Architecture, written: dict[str, list[Path]], source: dict) -> Manifest:
    """The manifest, tokenizers, scheduler and model index of the package whose graphs are in `tmp`."""
    from edgediff.convert.load import BUNDLED_CLIP_TOKENIZER

    fam = arch.family
    encoders = []
    for spec, layers, tok_dir in arch.encoders:
        dst = tmp / spec.tokenizer
        dst.mkdir(exist_ok=True)
        for name in _TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, dst / name)
        encoders.append(TextEncoderEntry(
            component=spec.component, tokenizer=spec.tokenizer, layers=layers, norm_hidden=spec.norm_hidden,
            pad_token=spec.pad_token if tok_dir == BUNDLED_CLIP_TOKENIZER else _pad_token(tok_dir, spec.pad_token),
            max_length=spec.max_length,
            pooled=spec.pooled, hidden_layer=spec.hidden_layer, kind=spec.kind, context=spec.context,
        ))
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(arch.scheduler_config, indent=2))
    prediction_type = arch.scheduler_config.get("prediction_type", "epsilon")
    manifest = Manifest(
        family=fam.name,
        prediction="flow" if fam.prediction == "flow" else {"epsilon": "eps", "v_prediction": "v"}.get(
            prediction_type, prediction_type),
        latent_channels=arch.latent_channels,
        latent_scale=arch.latent_scale,
        latent_shift=arch.latent_shift,
        vae_downscale=arch.vae_downscale,
        components={k: _component_entry(v, tmp, "fp32") for k, v in written.items()},
        text_encoders=tuple(encoders),
        denoiser=fam.denoiser,
        size_multiple=fam.size_multiple,
        flow_normal_end=fam.flow_normal_end,
        strength_rounding=fam.strength_rounding,
        role=fam.role,
        conditioning=arch.conditioning,
        defaults={
            "sampler": fam.defaults.sampler, "schedule": fam.defaults.schedule,
            "steps": fam.defaults.steps, "guidance": fam.defaults.guidance,
            "width": arch.resolution, "height": arch.resolution,
            **scheduler_defaults(arch.scheduler_config, arch.conditioning),
            **(dataclasses.asdict(arch.video) if arch.video is not None else {}),  # its own width and height
        },
        source={**source, **arch.info},
        created_by=f"edgediff {__version__}",
    )
    index = {"_class_name": fam.onnx_pipeline, "_edgediff_version": __version__,
             **{name: ["onnx", entry.file] for name, entry in manifest.components.items()}}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _pad_token(tokenizer: Path, default: str) -> str:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return default


def _component_entry(files: list[Path], root: Path, precision: str) -> ComponentEntry:
    from edgediff.convert.package import sha256_file

    graph = files[0]
    return ComponentEntry(
        file=graph.relative_to(root).as_posix(),
        precision=precision,
        bytes=sum(f.stat().st_size for f in files),
        sha256=sha256_file(graph),
        data_files=tuple(f.relative_to(root).as_posix() for f in files[1:]),
    )

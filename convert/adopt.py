"""GGUF files edgediff did not write (stable-diffusion.cpp's convert mode, ComfyUI-GGUF's
denoiser-only files) and the files that supply their other components (`--base`, `--vae`,
`--text-encoder`), made into packages without requantizing anything.

The graphs come from the family's export recipe: the architecture is read from the tensor
shapes, torch modules are built without weights (broadcast zeros) and traced, and their weight
placeholders are named as the files name them. The files' own tensors are then bound as stored:
copied into one GGUF package (`edgediff convert file.gguf --output pkg.gguf`), or referenced from
a small cached package of graphs (`edgediff generate --model file.gguf`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgediff import __version__
from edgediff.errors import SourceError, UsageError
from edgediff.families import DENOISER, Family, bare_denoiser, detect_family, get_family
from edgediff.runtime.gguf_file import GGUFFile
from edgediff.runtime.safetensors_file import SafetensorsFile

VAE = "first_stage_model."


@dataclass
class Part:
    """One component's weights: the file they are in and the prefix its names need."""

    file: object  # GGUFFile | SafetensorsFile
    prefix: str


@dataclass
class Adopted:
    family: Family
    parts: dict[str, Part]  # component -> where its weights are
    pipe: object  # convert.load.TorchPipeline without weights (the architecture)
    files: list[Path]


def _open(path: Path, prefix: str = ""):
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return GGUFFile(path)
    if suffix == ".safetensors":
        file = SafetensorsFile(path, prefix)
        if not prefix and bare_denoiser(file.header):  # a denoiser-only file (BFL's Flux release)
            file = SafetensorsFile(path, DENOISER)
        return file
    raise SourceError(f"{path}: expected a .gguf or .safetensors file here (got '{suffix}')")


def _names(file) -> list[str]:
    return list(file.tensors) if isinstance(file, GGUFFile) else file.names()


def adopt(main: Path, *, base: Path | None = None, vae: Path | None = None,
          text_encoders: Sequence[Path] = (), family: str = "auto",
          prediction: str | None = None) -> Adopted:
    """Assign every component of the model in `main` to the file its weights come from (explicit
    `--vae`/`--text-encoder` first, then `main`, then `base`) and build its architecture."""
    from edgediff.convert.load import weightless_architecture

    first = _open(main)
    others = [(_open(vae, VAE), "vae")] if vae else []
    shapes_main = {n: w.shape for n, w in first.tensors.items()} if isinstance(first, GGUFFile) else {
        n: first.header[n.removeprefix(first.prefix)].shape for n in first.names()}
    fam = get_family(family) if family != "auto" else detect_family(shapes_main, str(main))[0]
    for path, spec in zip(text_encoders, fam.text_encoders, strict=False):
        others.append((_open(path, spec.ldm_prefix), spec.component))
    if len(text_encoders) > len(fam.text_encoders):
        raise UsageError(f"{len(text_encoders)} --text-encoder files given; {fam.title} has "
                         f"{len(fam.text_encoders)} text encoder(s)")
    fallback = [_open(base)] if base else []
    wanted = {fam.denoiser: DENOISER, "vae": VAE, **{te.component: te.ldm_prefix for te in fam.text_encoders}}
    parts: dict[str, Part] = {}
    for component, prefix in wanted.items():
        explicit = [f for f, c in others if c == component]
        for file in [*explicit, first, *fallback]:
            if any(n.startswith(prefix) for n in _names(file)):
                parts[component] = Part(file, prefix)
                break
    missing = [c for c in wanted if c not in parts]
    if missing:
        what = "only the denoiser" if list(parts) == [fam.denoiser] else f"no {', '.join(missing)}"
        raise UsageError(
            f"{main}: the file holds {what} (a denoiser-only file, as ComfyUI-GGUF writes); "
            "pass --base MODEL (the .safetensors or .gguf checkpoint it was made from), or "
            "--vae FILE and --text-encoder FILE for the parts it lacks")
    shapes = {}
    for part in parts.values():
        for name in _names(part.file):
            if name.startswith(part.prefix):
                w = part.file.weight(name)
                if w is not None:
                    shapes[name] = w.shape
    pipe = weightless_architecture(shapes, fam, prediction, where=str(main))
    files = [Path(main), *([Path(vae)] if vae else []), *map(Path, text_encoders), *([Path(base)] if base else [])]
    parts["vae_decoder"] = parts["vae_encoder"] = parts.pop("vae")
    return Adopted(fam, parts, pipe, files)


def _graphs(adopted: Adopted, folder: Path, progress) -> tuple:
    """Export the architecture into `folder` (graphs with weight placeholders) and return its
    manifest and the LDM names of its weights."""
    from edgediff.convert import _export, _ldm_names
    from edgediff.convert.sources import Source

    src = Source(adopted.files[0], "gguf", {})
    manifest = _export(adopted.pipe, src, adopted.files[0], "ldm", folder, progress)
    source = {"path": str(adopted.files[0]), "kind": "gguf", "layout": "ldm",
              "files": [str(p) for p in adopted.files],
              "writer": getattr(adopted.parts[adopted.family.denoiser].file, "writer", "safetensors")}
    return dataclasses.replace(manifest, source=source), _ldm_names(adopted.pipe)


GRAPHS = 2  # the cached graphs' format (2: placeholders keep their weights' state-dict names)


def cache_key(paths: Sequence[Path], family: str, prediction: str | None) -> str:
    digest = hashlib.sha256(f"{__version__} {GRAPHS} {family} {prediction}".encode())
    for p in paths:
        st = Path(p).stat()
        digest.update(f"{Path(p).resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def adopted_package(main: Path, *, base: Path | None = None, vae: Path | None = None,
                    text_encoders: Sequence[Path] = (), family: str = "auto", prediction: str | None = None,
                    progress: Callable[[str], None] | None = None) -> Path:
    """A cached package whose weight-less graphs bind the given files' tensors as they are stored:
    what `edgediff generate --model file.gguf` runs. Built once per set of files."""
    import onnx

    from edgediff.convert.package import atomic_folder
    from edgediff.kernels.bind import strip_weights
    from edgediff.kernels.ldm_names import stored_transposed
    from edgediff.manifest import MANIFEST
    from edgediff.runtime.paths import cache_root

    paths = [Path(main), *([Path(vae)] if vae else []), *map(Path, text_encoders), *([Path(base)] if base else [])]
    for p in paths:
        if not p.is_file():
            raise SourceError(f"{p}: no such file")
    folder = cache_root() / "adopted" / cache_key(paths, family, prediction)
    if (folder / MANIFEST).is_file():
        return folder
    if progress:
        progress(f"{main}: building its graphs once (the weights stay in the file), into {folder}")
    adopted = adopt(main, base=base, vae=vae, text_encoders=text_encoders, family=family, prediction=prediction)
    with atomic_folder(folder, overwrite=True) as tmp:
        manifest, names = _graphs(adopted, tmp, progress)
        components = {}
        for component, entry in manifest.components.items():
            graph = tmp / entry.file
            model = onnx.load(str(graph), load_external_data=False)
            rename = {t.name: names[component](t.name) for t in model.graph.initializer
                      if t.data_type == onnx.TensorProto.FLOAT and t.dims}
            for data in entry.data_files:
                (tmp / data).unlink()
            turned = {k for k, v in rename.items() if stored_transposed(v)}
            onnx.save(strip_weights(model, rename, turned), str(graph))
            part = adopted.parts[component]
            components[component] = dataclasses.replace(
                entry, data_files=(), bytes=graph.stat().st_size, weights=str(Path(part.file.path).resolve()),
                weights_prefix=part.prefix if isinstance(part.file, SafetensorsFile) else "")
        manifest = dataclasses.replace(manifest, components=components)
        (tmp / MANIFEST).write_text(manifest.to_json())
    return folder


def write_adopted_gguf(main: Path, output: Path, *, base: Path | None = None, vae: Path | None = None,
                       text_encoders: Sequence[Path] = (), family: str = "auto", prediction: str | None = None,
                       precision: str | None = None, rules: Sequence = (), overwrite: bool = False,
                       progress: Callable[[str], None] | None = None):
    """One GGUF package holding the files' tensors exactly as stored, or with `precision`
    requantized one tensor at a time (a 12B Flux never in memory whole), the graphs of the
    family's recipe, the manifest and the tokenizer."""
    import tempfile

    from edgediff.convert import full_precision_components
    from edgediff.convert.gguf import gguf_format, write_gguf
    from edgediff.convert.package import atomic_file
    from edgediff.convert.precision import parse_precision

    adopted = adopt(main, base=base, vae=vae, text_encoders=text_encoders, family=family, prediction=prediction)
    formats = None
    if precision is not None:
        fam = adopted.family
        components = fam.components
        precisions = parse_precision(precision, components, "gguf", full_precision_components(fam, fam.vae_fp16))
        formats = {c: gguf_format(p) for c, p in precisions.items()}
    with atomic_file(output, overwrite) as target, tempfile.TemporaryDirectory(
            dir=Path(output).parent, prefix=f".{Path(output).name}.export-") as scratch:
        manifest, names = _graphs(adopted, Path(scratch), progress)

        files = list({id(part.file): part.file for part in adopted.parts.values()}.values())

        def stored(component: str, name: str):
            for file in files:  # the tensor read before is written by now: its mapped pages can go
                file.drop_pages()
            return adopted.parts[component].file.weight(name)

        return write_gguf(Path(scratch), manifest, target, names, formats=formats, rules=rules, stored=stored,
                          progress=progress)


def runnable(model: Path, *, base=None, vae=None, text_encoders=(), progress=None) -> Path:
    """What `edgediff generate --model` opens: an edgediff package as it is, any other GGUF
    file (with the files that complete it) through a cached package of graphs."""
    from edgediff.runtime.package import GGUF_MANIFEST

    if not (base or vae or text_encoders):
        if Path(model).is_dir():
            return model
        if Path(model).is_file() and GGUFFile(model).string(GGUF_MANIFEST) is not None:
            return model
    return adopted_package(Path(model), base=base and Path(base), vae=vae and Path(vae),
                           text_encoders=[Path(p) for p in text_encoders], progress=progress)


def dequantized(main: Path, **kwargs):
    """The model as torch modules holding its weights dequantized to fp32 (to convert a GGUF
    file to ONNX or to other GGUF types)."""
    import numpy as np
    import torch

    from edgediff.convert.load import file_architecture
    from edgediff.kernels.gguf_blocks import dequantize

    adopted = adopt(main, **kwargs)
    state = {}
    for part in {id(p): p for p in adopted.parts.values()}.values():
        for name in _names(part.file):
            if name.startswith(part.prefix) and (w := part.file.weight(name)) is not None:
                state[name] = torch.from_numpy(np.array(dequantize(w.data, w.fmt, w.shape)))
    return file_architecture({k: tuple(v.shape) for k, v in state.items()}, adopted.family,
                            kwargs.get("prediction"), state, str(main))

"""GGUF files edgediff did not write (stable-diffusion.cpp's convert mode, ComfyUI-GGUF's
denoiser-only files) and the files that supply their other components (`--base`, `--vae`,
`--text-encoder`), made into packages without requantizing anything.

The graphs are built from the tensor shapes (kernels.graphs), their weight placeholders named as
the files name them: no torch, no forward pass. The files' own tensors are then bound as stored:
copied into one GGUF package (`edgediff convert file.gguf --output pkg.gguf`), or referenced from
a small cached package of graphs (`edgediff generate --model file.gguf`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

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
    shapes: Mapping[str, tuple[int, ...]]  # every weight the files give, by the name the builders use
    prediction: str | None
    files: list[Path]
    info: dict = dataclasses.field(default_factory=dict)  # for the manifest: EMA weights used, keys dropped


def _open(path: Path, prefix: str = "", allow_pickle: bool = False):
    from edgediff.convert.sources import PICKLE_SUFFIXES, CheckpointFile, _refuse_pickle

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return GGUFFile(path)
    if suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path, allow_pickle)
        return CheckpointFile(path)
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
          prediction: str | None = None, own_vae: bool = True, allow_pickle: bool = False) -> Adopted:
    """Assign every component of the model in `main` to the file its weights come from (explicit
    `--vae`/`--text-encoder` first, then `main`, then `base`); without `own_vae`, the VAE is
    given apart (convert.build.vae_graphs)."""
    first = _open(main, allow_pickle=allow_pickle)
    others = [(_open(vae, VAE), "vae")] if vae else []
    wanted_prefix: dict[str, str] = {}
    shapes_main = {n: w.shape for n, w in first.tensors.items()} if isinstance(first, GGUFFile) else {
        n: first.header[n.removeprefix(first.prefix)].shape for n in first.names()}
    fam = get_family(family) if family != "auto" else detect_family(shapes_main, str(main))[0]
    if fam.denoiser != "unet" and any(n.startswith(DENOISER) for n in shapes_main):  # says what a DiT file lacks
        from edgediff.kernels.dit_names import DIT_CONFIGS

        DIT_CONFIGS[fam.denoiser_class](shapes_main, str(main))
    for path, spec in zip(text_encoders, fam.text_encoders, strict=False):
        file = _open(path, spec.ldm_prefix)
        others.append((file, spec.component))
        if spec.kind == "t5" and any(n.startswith("enc.blk.") for n in _names(file)):  # llama.cpp's names
            wanted_prefix[spec.component] = ""
    if len(text_encoders) > len(fam.text_encoders):
        raise UsageError(f"{len(text_encoders)} --text-encoder files given; {fam.title} has "
                         f"{len(fam.text_encoders)} text encoder(s)")
    fallback = [_open(base)] if base else []
    wanted = {fam.denoiser: DENOISER, **({"vae": VAE} if own_vae else {}),
              **{te.component: te.ldm_prefix for te in fam.text_encoders}, **wanted_prefix}
    if fam.image_encoder is not None:
        wanted[fam.image_encoder.component] = fam.image_encoder.ldm_prefix
    # stable-diffusion.cpp names a text encoder as its GGUF files do (SDXL's `cond_stage_model.1.*`,
    # transformers' names), where single files keep the original layout (`conditioner.embedders.1.*`)
    alternatives = {te.component: te.gguf_prefix for te in fam.text_encoders
                    if te.gguf_prefix != te.ldm_prefix and te.component not in wanted_prefix}
    parts: dict[str, Part] = {}
    for component, prefix in wanted.items():
        explicit = [f for f, c in others if c == component]
        for file in [*explicit, first, *fallback]:
            names = _names(file)
            found = next((p for p in (prefix, alternatives.get(component))
                          if p is not None and any(n.startswith(p) for n in names)), None)
            if found is not None:
                parts[component] = Part(file, found)
                break
    specs = [dataclasses.replace(te, ldm_prefix=parts[te.component].prefix, ldm_layout="hf")
             if te.component in parts and parts[te.component].prefix == alternatives.get(te.component) else te
             for te in fam.text_encoders]
    fam = dataclasses.replace(fam, text_encoders=tuple(specs))
    missing = [c for c in wanted if c not in parts]
    if missing and fam.denoiser != "unet" and not (others or fallback):  # a DiT's transformer alone
        files = " ".join(f"--text-encoder {te.ldm_prefix.split('.')[1].upper()}.safetensors" for te in fam.text_encoders)
        lacking = sorted(c for c in missing if c != "vae") + ["VAE"] * ("vae" in missing)
        raise SourceError(f"{main}: no {', '.join(lacking)} weights (a transformer-only file, as {fam.title} is often "
                          f"shipped); pass {files} (in this order) and --vae VAE.safetensors")
    if missing:
        what = "only the denoiser" if list(parts) == [fam.denoiser] else f"no {', '.join(missing)}"
        raise UsageError(
            f"{main}: the file holds {what} (a denoiser-only file, as ComfyUI-GGUF writes); "
            "pass --base MODEL (the .safetensors or .gguf checkpoint it was made from), or "
            "--vae FILE and --text-encoder FILE for the parts it lacks")
    shapes, info = {}, {}
    for part in parts.values():
        for name in _names(part.file):
            if name.startswith(part.prefix):
                w = part.file.weight(name)
                if w is not None:
                    shapes[name] = w.shape
    if not isinstance(first, GGUFFile):  # a training checkpoint: its EMA weights, and what is dropped
        names = first.names()
        shapes, info["ema"] = _with_ema(first, shapes, names)
        info["dropped_keys"] = sum(not any(n.startswith(p.prefix) for p in parts.values()) for n in names)
    files = [Path(main), *([Path(vae)] if vae else []), *map(Path, text_encoders), *([Path(base)] if base else [])]
    if own_vae:
        parts["vae_decoder"] = parts["vae_encoder"] = parts.pop("vae")
    return Adopted(fam, parts, shapes, prediction, files, info)


def _with_ema(file, shapes: dict, names: list[str]):
    """The U-Net's weights as the EMA copies a training checkpoint keeps beside them
    (`model_ema.<name without dots>`), when it has them: they give the better images."""
    from edgediff.kernels.graphs.builder import View

    ema = {"model_ema." + "".join(n.split(".")[1:]): n for n in shapes if n.startswith(DENOISER)}
    found = {ema[n]: n for n in names if n in ema}
    if not found:
        return shapes, False
    stored = dict(shapes)
    for flat in found.values():
        stored[flat] = file.weight(flat).shape
    return View({n: [(found.get(n, n), 0, -1)] for n in shapes}, stored), True


def _architecture(adopted: Adopted, graphs: dict[str, onnx.ModelProto]):
    """What the manifest says of the model, read from the shapes and the built graphs."""
    from edgediff.convert.load import (
        BUNDLED_CLIP_TOKENIZER,
        BUNDLED_T5_TOKENIZER,
        _prediction_type,
        _resolve_spacing,
    )
    from edgediff.convert.package import Architecture

    fam = adopted.family
    inputs = {i.name: i for i in graphs[fam.denoiser].graph.input}
    conditioning = fam.conditioning
    if "timestep_cond" in inputs:  # an LCM-distilled UNet: guidance is an input of the model
        width = inputs["timestep_cond"].type.tensor_type.shape.dim[1].dim_value
        conditioning = dataclasses.replace(conditioning, guidance_embedding=int(width))
    if "guidance" in inputs:  # Flux dev: the same, as a number
        conditioning = dataclasses.replace(conditioning, guidance_input=True)
    guided = "guidance" in inputs and fam.guided_scheduler_config
    scheduler = dict(fam.guided_scheduler_config if guided else fam.scheduler_config)
    if prediction := adopted.prediction:
        scheduler["prediction_type"] = _prediction_type(prediction, "epsilon")
    encoders = []
    for spec in fam.text_encoders:
        layers = graphs[spec.component].graph.output[0].type.tensor_type.shape.dim[0].dim_value
        encoders.append((spec, int(layers), BUNDLED_T5_TOKENIZER if spec.kind == "t5" else BUNDLED_CLIP_TOKENIZER))
    latent = graphs["vae_decoder"].graph.input[0].type.tensor_type.shape.dim[1].dim_value
    video = fam.video
    if video is not None and re.search(r"(^|[-_. ])xt([-_. ]|$)", Path(adopted.files[0]).stem, re.IGNORECASE):
        video = dataclasses.replace(video, frames=25)  # svd_xt.safetensors: SVD-XT's weights have SVD's shapes
    return Architecture(fam, encoders, _resolve_spacing(scheduler), conditioning, int(latent), fam.latent.scale,
                        fam.latent.shift, fam.latent.downscale, fam.defaults.resolution, video=video)


def _graphs(adopted: Adopted, folder: Path, progress, deep_cache: bool = False, weights: bool = False,
            vae=None):
    """Build every component's graph into `folder` (weights as placeholders under the files'
    names, or with `weights` written from the files as fp32) and write the package's manifest.
    `vae` (convert.build.VaeGraphs): a VAE given apart, instead of the files' own."""
    import time

    from edgediff.convert.build import _float, write_graph
    from edgediff.convert.package import write_manifest
    from edgediff.kernels.graphs.models import model_graphs

    started = time.perf_counter()
    prefixes = {c: part.prefix for c, part in adopted.parts.items()}
    builds = model_graphs(adopted.family, adopted.shapes, prefixes, str(adopted.files[0]), deep_cache, vae is None)
    if vae is not None:
        builds = [*builds, ("vae_decoder", vae.decoder), ("vae_encoder", vae.encoder)]
    graphs, written = {}, {}
    for component, build in builds:
        if progress:
            progress(f"building {component}")
        graphs[component] = build()
        if vae is not None and component.startswith("vae_"):
            read = vae.read
        else:
            part = adopted.parts["unet" if component == "unet_shallow" else component]
            read = lambda n, f=part.file: _float(f, n)  # noqa: E731
        written[component] = write_graph(graphs[component], folder / component / "model.onnx",
                                         read if weights else None)
    kind = {".gguf": "gguf", ".safetensors": "safetensors"}.get(adopted.files[0].suffix.lower(), "checkpoint")
    source = {"path": str(adopted.files[0]), "kind": kind, "layout": "ldm",
              "files": [str(Path(p).resolve()) for p in adopted.files],  # as the components' weights name them
              "writer": getattr(adopted.parts[adopted.family.denoiser].file, "writer", "safetensors"),
              "seconds": round(time.perf_counter() - started, 1), **adopted.info}
    return write_manifest(folder, _architecture(adopted, graphs), written, source)


GRAPHS = 3  # the cached graphs' format (3: built from the shapes, named as the files store them)


def _builders() -> bytes:
    """The graph builders' own source: a cached package's graphs are rebuilt when they change."""
    import edgediff.kernels.graphs as graphs
    from edgediff.kernels import dit_names, ldm_names

    files = sorted(Path(graphs.__file__).parent.glob("*.py")) + [Path(dit_names.__file__), Path(ldm_names.__file__)]
    return b"".join(f.read_bytes() for f in files)


def cache_key(paths: Sequence[Path], family: str, prediction: str | None) -> str:
    digest = hashlib.sha256(f"{__version__} {GRAPHS} {family} {prediction}".encode())
    digest.update(hashlib.sha256(_builders()).digest())
    for p in paths:
        st = Path(p).stat()
        digest.update(f"{Path(p).resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def adopted_package(main: Path, *, base: Path | None = None, vae: Path | None = None,
                    text_encoders: Sequence[Path] = (), family: str = "auto", prediction: str | None = None,
                    progress: Callable[[str], None] | None = None) -> Path:
    """A cached package whose weight-less graphs bind the given files' tensors as they are stored:
    what `edgediff generate --model file.gguf` runs. Built once per set of files."""
    from edgediff.convert.package import atomic_folder
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
        manifest = _graphs(adopted, tmp, progress)
        components = {}
        for component, entry in manifest.components.items():
            part = adopted.parts[component]
            components[component] = dataclasses.replace(
                entry, weights=str(Path(part.file.path).resolve()),
                weights_prefix=part.prefix if isinstance(part.file, SafetensorsFile) else "")
        manifest = dataclasses.replace(manifest, components=components)
        (tmp / MANIFEST).write_text(manifest.to_json())
    return folder


def write_adopted_gguf(main: Path, output: Path, *, base: Path | None = None, vae: Path | None = None,
                       text_encoders: Sequence[Path] = (), family: str = "auto", prediction: str | None = None,
                       precision: str | None = None, rules: Sequence = (), overwrite: bool = False,
                       progress: Callable[[str], None] | None = None, reshape: bool = False,
                       allow_pickle: bool = False, given_vae=None):
    """One GGUF package holding the files' tensors exactly as stored, or with `precision`
    requantized one tensor at a time (a 12B Flux never in memory whole), the graphs of the
    family's recipe, the manifest and the tokenizer."""
    import tempfile

    from edgediff.convert import full_precision_components
    from edgediff.convert.gguf import gguf_format, write_gguf
    from edgediff.convert.package import atomic_file
    from edgediff.convert.precision import parse_precision

    adopted = adopt(main, base=base, vae=vae, text_encoders=text_encoders, family=family, prediction=prediction,
                    allow_pickle=allow_pickle, own_vae=given_vae is None)
    formats = None
    if precision is not None:
        fam = adopted.family
        components = fam.components
        precisions = parse_precision(precision, components, "gguf", full_precision_components(fam, fam.vae_fp16))
        formats = {c: gguf_format(p) for c, p in precisions.items()}
    with atomic_file(output, overwrite) as target, tempfile.TemporaryDirectory(
            dir=Path(output).parent, prefix=f".{Path(output).name}.export-") as scratch:
        manifest = _graphs(adopted, Path(scratch), progress, vae=given_vae)
        files = list({id(part.file): part.file for part in adopted.parts.values()}.values())
        names = {c: _same for c in manifest.components}  # the graphs name the weights as the files do
        graph_names: dict[str, str] = {}  # a VAE given apart: its GGUF names -> its own
        if given_vae is not None:
            files.append(given_vae.file)

            def vae_name(name: str) -> str:
                graph_names[given_vae.gguf_name(name)] = name
                return given_vae.gguf_name(name)

            names["vae_decoder"] = names["vae_encoder"] = vae_name

        def stored(component: str, name: str):
            for file in files:  # the tensor read before is written by now: its mapped pages can go
                file.drop_pages()
            if given_vae is not None and component.startswith("vae_"):
                return given_vae.file.weight(graph_names[name])
            return adopted.parts[component].file.weight(name)

        return write_gguf(Path(scratch), manifest, target, names, formats=formats, rules=rules, stored=stored,
                          progress=progress, reshape=reshape)


def _same(name: str) -> str:
    return name


def runnable(model: str | Path | None = None, *, base=None, vae=None, text_encoders=(), progress=None) -> Path:
    """What `edgediff generate --model` opens: the embedded default model (None) or another
    `builtin:NAME`, converted once into the cache; an edgediff package as it is; any other GGUF or
    single .safetensors file (with the files that complete it) through a cached package of graphs."""
    from edgediff.convert import DEFAULT_MODEL, builtin_package
    from edgediff.runtime.package import GGUF_MANIFEST

    if model is None or str(model).startswith("builtin:"):
        name = DEFAULT_MODEL if model is None else str(model).split(":", 1)[1]
        return builtin_package(name, progress)
    path = Path(model)
    if not (base or vae or text_encoders):
        if path.is_dir() or path.suffix.lower() not in (".gguf", ".safetensors"):
            return path
        if path.suffix.lower() == ".gguf" and path.is_file() and GGUFFile(path).string(GGUF_MANIFEST) is not None:
            return path
    return adopted_package(path, base=base and Path(base), vae=vae and Path(vae),
                           text_encoders=[Path(p) for p in text_encoders], progress=progress)

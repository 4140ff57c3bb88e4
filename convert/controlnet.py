"""ControlNets in the forms people have them: a diffusers ControlNetModel folder, or one
.safetensors file, in LDM's names (`control_model.*`, lllyasviel's ControlNet 1.0/1.1 releases,
with or without the prefix) or in diffusers' (most SDXL ControlNets). Its graph is built from the
weights' shapes (kernels.graphs.controlnet), named as the file stores them, then either written
with its weights into a package of its own (`edgediff convert CONTROLNET --output cn`) or kept
weight-less in a cached package that binds the file as it is (a ControlNet given at generate
time, as convert.adopt does for other single files). No torch.

The family a ControlNet is for is read from its shapes: SDXL's has `label_emb` (the pooled text
and size ids), SD 2.x's a 1024-wide context, SD 1.x's a 768-wide one (smaller, as test models
are: SD 1.x too)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgediff.errors import SourceError, UsageError
from edgediff.families import get_family
from edgediff.kernels.graphs.builder import View
from edgediff.kernels.graphs.controlnet import PREFIX
from edgediff.manifest import MANIFEST, Manifest
from edgediff.runtime.controlnet import ROLE
from edgediff.runtime.safetensors_file import SafetensorsFile

COMPONENT = "controlnet"
WEIGHTS = "diffusion_pytorch_model.safetensors"
GRAPHS = 1  # the cached graphs' format


@dataclass
class ControlNetSource:
    """A ControlNet's weights: the file, its shapes under LDM names (a View of the stored names),
    what the build needs besides them, and the family it is for."""

    path: Path  # what the user gave (folder or file)
    file: SafetensorsFile
    shapes: Mapping[str, tuple[int, ...]]
    build: dict
    family: str

    def graph(self) -> onnx.ModelProto:
        from edgediff.kernels.graphs.controlnet import build_controlnet

        return build_controlnet(self.shapes, prefix=PREFIX, where=str(self.path), **self.build)


def is_controlnet(path: str | Path) -> bool:
    """Whether `path` is a ControlNet (a diffusers ControlNetModel folder, or a .safetensors file
    with a ControlNet's weights), told from its config or its tensor names alone."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return False
        try:
            return "ControlNet" in str(json.loads(config.read_text()).get("_class_name", ""))
        except ValueError:
            return False
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        header = SafetensorsFile(path).header
    except SourceError:
        return False
    return any(n.startswith(("control_model.input_hint_block.", "input_hint_block.", "controlnet_cond_embedding."))
               for n in header)


def open_controlnet(path: str | Path, where: str = "") -> ControlNetSource:
    """The ControlNet at `path`, its shapes under LDM names. `where` names the argument in errors."""
    path = Path(path)
    where = where or str(path)
    config: dict = {}
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{where}: no readable config.json in this folder ({exc}); a diffusers ControlNet "
                              "folder has config.json and diffusion_pytorch_model.safetensors") from exc
        weights = path / WEIGHTS
        if not weights.is_file():
            raise SourceError(f"{where}: no {WEIGHTS} in this folder (a ControlNet saved in another format: "
                              "convert it to safetensors first)")
    elif path.is_file() and path.suffix.lower() == ".safetensors":
        weights = path
    else:
        raise SourceError(f"{where}: expected a diffusers ControlNet folder or a .safetensors file")
    header = SafetensorsFile(weights).header
    if any(n.startswith("controlnet_cond_embedding.") for n in header):  # diffusers' names
        file = SafetensorsFile(weights)
        config = config or _config_from_names(header)
        shapes = _diffusers_view(header, config, where)
    elif any(n.startswith(("control_model.input_hint_block.", "input_hint_block.")) for n in header):
        bare = not any(n.startswith(PREFIX) for n in header)
        file = SafetensorsFile(weights, PREFIX if bare else "")
        shapes = {n: tuple(file.header[n.removeprefix(PREFIX) if bare else n].shape) for n in file.names()
                  if n.startswith(PREFIX)}
    else:
        raise SourceError(f"{where}: no ControlNet weights in this file (neither LDM's `control_model.*` nor "
                          "diffusers' `controlnet_cond_embedding.*`); T2I-Adapters, ControlLoRAs and ControlLLLite "
                          "files are other architectures")
    family = _family(shapes, where)
    build = _build_settings(family, config, shapes)
    return ControlNetSource(path, file, shapes, build, family)


def _config_from_names(header) -> dict:
    """What the LDM table needs of a diffusers-named ControlNet without its config.json: levels,
    layers per block and the hint's depth, read off the names."""
    def count(stem: str) -> int:
        found = {int(n[len(stem):].split(".")[0]) for n in header if n.startswith(stem) and n[len(stem)].isdigit()}
        return max(found) + 1 if found else 0

    levels, blocks = count("down_blocks."), count("down_blocks.0.resnets.")
    hint = count("controlnet_cond_embedding.blocks.")
    config = {"layers_per_block": blocks, "block_out_channels": [0] * levels,
              "conditioning_embedding_out_channels": [0] * (hint // 2 + 1)}
    if "add_embedding.linear_1.weight" in header:
        config["addition_time_embed_dim"] = 256
    return config


def _diffusers_view(header, config: Mapping, where: str) -> View:
    from edgediff.kernels.ldm_names import controlnet_name

    pieces = {}
    for name in header:
        try:
            pieces[controlnet_name(name, config)] = [(name, 0, -1)]
        except (KeyError, IndexError, ValueError):
            raise SourceError(f"{where}: '{name}' is no weight of a ControlNet this version knows (its config may "
                              "describe another layout)") from None
    return View(pieces, {n: tuple(info.shape) for n, info in header.items()})


def _family(shapes: Mapping[str, Sequence[int]], where: str) -> str:
    if PREFIX + "label_emb.0.0.weight" in shapes:
        return "sdxl"
    context = next((tuple(s)[1] for n, s in shapes.items() if n.endswith("attn2.to_k.weight")), None)
    if context is None and PREFIX + "input_blocks.0.0.weight" not in shapes:
        raise SourceError(f"{where}: no '{PREFIX}input_blocks.0.0.weight'; the file is incomplete")
    return "sd2" if context == 1024 else "sd1"


def _build_settings(family: str, config: Mapping, shapes: Mapping[str, Sequence[int]]) -> dict:
    """Heads, groups and SDXL's time ids: the config's word where there is one, else the family's."""
    fam = get_family(family)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")
    if heads is not None and config.get("_class_name"):
        how = dict(heads=heads if isinstance(heads, int) else list(heads), head_dim=None)
    else:
        how = dict(heads=fam.unet_heads, head_dim=None if fam.unet_heads else 64)
    how["groups"] = int(config.get("norm_num_groups") or 32)
    how["time_ids"] = fam.conditioning.time_id_count
    how["time_id_dim"] = int(config.get("addition_time_embed_dim") or 256)
    return how


def _architecture(source: ControlNetSource):
    from edgediff.convert.load import _resolve_spacing
    from edgediff.convert.package import Architecture

    fam = get_family(source.family)
    return Architecture(fam, [], _resolve_spacing(dict(fam.scheduler_config)), fam.conditioning,
                        fam.latent.channels, fam.latent.scale, fam.latent.shift, fam.latent.downscale,
                        fam.defaults.resolution)


def _write(source: ControlNetSource, folder: Path, weights: bool, progress) -> Manifest:
    """The ControlNet's graph (with its weights, or weight-less binding the file) and a manifest
    that says what it is for: role 'controlnet', the family of the models it steers."""
    from edgediff.convert.build import _float, write_graph
    from edgediff.convert.package import write_manifest

    started = time.perf_counter()
    if progress:
        progress(f"building {COMPONENT} (for {get_family(source.family).title})")
    read = (lambda n: _float(source.file, n)) if weights else None
    written = {COMPONENT: write_graph(source.graph(), folder / COMPONENT / "model.onnx", read)}
    info = {"path": str(source.path), "kind": "controlnet", "seconds": round(time.perf_counter() - started, 1)}
    if not weights:
        info["files"] = [str(source.file.path.resolve())]
    manifest = write_manifest(folder, _architecture(source), written, info)
    manifest = dataclasses.replace(manifest, denoiser=COMPONENT, role=ROLE)
    if not weights:
        entry = manifest.components[COMPONENT]
        manifest.components[COMPONENT] = dataclasses.replace(entry, weights=str(source.file.path.resolve()),
                                                             weights_prefix=source.file.prefix)
    (folder / "model_index.json").unlink(missing_ok=True)  # no pipeline of its own
    (folder / MANIFEST).write_text(manifest.to_json())
    return manifest


def convert_controlnet(source: str | Path, output: Path, *, fmt: str = "onnx", precision: str = "fp32",
                       rules: Sequence = (), overwrite: bool = False,
                       progress: Callable[[str], None] | None = None) -> Manifest:
    """A package of one component, the ControlNet, at `precision` (its U-Net's: fp16, int8, int4)."""
    from edgediff.convert import _apply_precisions
    from edgediff.convert.package import atomic_folder
    from edgediff.convert.precision import parse_precision

    src = open_controlnet(source)
    if fmt == "gguf":
        return _write_gguf(src, Path(output), precision, rules, overwrite, progress)
    chosen = parse_precision(precision, ("unet",), fmt)["unet"]  # a ControlNet takes what its U-Net takes
    if chosen == "int8-static":  # its activation ranges would need sampling runs of a base model
        if precision.strip() != "int8":
            raise UsageError(f"--precision {precision}: a ControlNet converted alone has no model to calibrate "
                             "int8-static on; choose int8-weights, int4 or fp16")
        chosen = "int8-weights"
        if progress:
            progress("int8 for a ControlNet is int8-weights (int8-static calibrates on a base model's runs)")
    with atomic_folder(Path(output), overwrite) as tmp:
        manifest = _write(src, tmp, True, progress)
        if chosen != "fp32" or rules:
            manifest = _apply_precisions(tmp, manifest, {COMPONENT: chosen}, rules, progress)
            (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _write_gguf(src: ControlNetSource, output: Path, precision: str, rules: Sequence, overwrite: bool,
                progress) -> Manifest:
    """A GGUF package of the ControlNet: its weight-less graph and its file's tensors, as stored
    or in the block format asked (f32, f16, q8_0, q4_0, ...), one tensor at a time."""
    import tempfile

    from edgediff.convert.gguf import gguf_format, write_gguf
    from edgediff.convert.package import atomic_file

    formats = None if precision in ("fp32", "auto") else {COMPONENT: gguf_format(precision)}
    with atomic_file(output, overwrite) as target, tempfile.TemporaryDirectory(
            dir=output.parent, prefix=f".{output.name}.export-") as scratch:
        manifest = _write(src, Path(scratch), False, progress)
        return write_gguf(Path(scratch), manifest, target, {COMPONENT: lambda name: name}, formats=formats,
                          rules=rules, stored=lambda _component, name: src.file.weight(name), progress=progress)


def controlnet_package(path: str | Path, where: str = "", progress: Callable[[str], None] | None = None) -> Path:
    """What a ControlNet given at generate time runs from: a converted package as it is, or for a
    folder or file, a cached package whose weight-less graph binds its file (built once)."""
    import hashlib

    from edgediff.convert.adopt import _builders
    from edgediff.convert.package import atomic_folder
    from edgediff.runtime.paths import cache_root

    path = Path(path)
    where = where or str(path)
    if not path.exists():
        raise UsageError(f"{where}: no such file or folder")
    if path.is_dir() and (path / MANIFEST).is_file():
        return path
    source = open_controlnet(path, where)
    digest = hashlib.sha256(f"controlnet {GRAPHS}".encode() + hashlib.sha256(_builders()).digest())
    st = source.file.path.stat()
    digest.update(f"{source.file.path.resolve()} {st.st_size} {st.st_mtime_ns} {path.resolve()}".encode())
    folder = cache_root() / "controlnets" / digest.hexdigest()[:16]
    if (folder / MANIFEST).is_file():
        return folder
    if progress:
        progress(f"{path}: building its ControlNet graph once (the weights stay in the file), into {folder}")
    with atomic_folder(folder, overwrite=True) as tmp:
        _write(source, tmp, False, progress)
    return folder

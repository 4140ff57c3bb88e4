"""A diffusers folder's graphs built from its weights' shapes and configs (kernels.graphs), named
as the folder names its tensors (`unet.*`, `transformer.*`, `vae.*`, the text encoders' under
`model.`), with their weights written from the folder's files one tensor at a time. No torch.

The builders speak the single-file layouts (LDM/SGM, BFL, transformers'); a `View` shows them the
folder's tensors under those names, diffusers' separate q, k and v as the rows of the fused
weight they make."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx

from edgediff.errors import SourceError, UsageError
from edgediff.families import DENOISER, Family, TextEncoder
from edgediff.kernels.graphs.builder import View

EXTERNAL_DATA_LIMIT = 1_800_000_000  # protobuf cannot hold 2 GiB: larger graphs keep weights beside
VAE = "first_stage_model."


def folder_configs(folder: Path, family: Family) -> dict[str, dict]:
    """component -> its config.json (the folder's own word on widths, heads and groups)."""
    out = {}
    for spec in family.text_encoders:
        for part in (spec.component, spec.tokenizer):
            if not (folder / part).is_dir():
                what = "the tokenizer of " + spec.component if part == spec.tokenizer else f"needed by {family.title}"
                raise SourceError(f"{folder}: missing {part}/ ({what})")
    image = [family.image_encoder.component] if family.image_encoder else []
    for part in (*(s.component for s in family.text_encoders), *image, family.denoiser, "vae"):
        path = folder / part / "config.json"
        if not path.is_file():
            raise SourceError(f"{folder}: missing {part}/ (needed by {family.title})" if not path.parent.is_dir()
                              else f"{path}: missing (the component's config)")
        try:
            out[part] = json.loads(path.read_text())
        except ValueError as exc:
            raise SourceError(f"{path}: not a JSON config ({exc})") from exc
    return out


def _component_shapes(shapes: Mapping[str, tuple], component: str, prefix: str) -> dict[str, tuple]:
    """The folder's tensors of one component, under `prefix` instead of the component's folder."""
    cut = component + "."
    return {prefix + k[len(cut):]: v for k, v in shapes.items() if k.startswith(cut)}


def unet_view(shapes: Mapping[str, tuple], config: Mapping) -> View:
    from edgediff.kernels.ldm_names import unet_name

    pieces = {}
    for name in _component_shapes(shapes, "unet", ""):
        try:
            canonical = unet_name(name, config)
        except (KeyError, IndexError):  # a weight LDM's table has no row for (LCM's cond_proj): its own name
            canonical = DENOISER + name
        pieces[canonical] = [("unet." + name, 0, -1)]
    return View(pieces, shapes)


def vae_view(shapes: Mapping[str, tuple], config: Mapping) -> View:
    from edgediff.kernels.ldm_names import vae_name

    return View({vae_name(name, config): [("vae." + name, 0, -1)]
                 for name in _component_shapes(shapes, "vae", "")}, shapes)


def dit_view(shapes: Mapping[str, tuple], family: Family, config: Mapping) -> View:
    """The DiT's tensors under its original release's names: each fused tensor as the rows of
    diffusers' separate layers it is made of."""
    from edgediff.kernels.dit_names import flux_pieces, held_parts, sd3_pieces

    table = flux_pieces if family.denoiser_class == "FluxTransformer2DModel" else sd3_pieces
    pieces = {}
    for stored, held in held_parts(table(config, DENOISER)).items():
        ordered = sorted(held, key=lambda h: h[2] or (0, 0))
        pieces[stored] = [("transformer." + name, *(rows or (0, -1))) for name, rows, _ in ordered]
    missing = sorted({n for parts in pieces.values() for n, _, _ in parts} - set(shapes))
    if missing:
        raise SourceError(f"transformer: no tensor '{missing[0]}' that {family.title}'s config says it has; the "
                          "folder is incomplete or its config is for another model")
    return View(pieces, shapes)


def text_spec(spec: TextEncoder, config: Mapping) -> TextEncoder:
    """A folder's text encoder in transformers' names, with its config's activation and heads."""
    if spec.kind == "t5":
        return spec
    width, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return dataclasses.replace(spec, ldm_layout="hf", hidden_act=config.get("hidden_act", spec.hidden_act),
                               head_dim=width // heads)


def folder_graphs(family: Family, shapes: Mapping[str, tuple], configs: Mapping[str, Mapping], where: str,
                  deep_cache: bool = False):
    """(component, build) for every component of a diffusers folder, as models.model_graphs."""
    from edgediff.kernels.graphs.models import (
        denoiser_graphs,
        image_encoder_graph,
        lora_named,
        text_encoder_graph,
    )
    from edgediff.kernels.graphs.vae import build_vae_decoder, build_vae_encoder

    for spec in family.text_encoders:
        te = _component_shapes(shapes, spec.component, "model.")
        if spec.kind == "t5" and "model.shared.weight" not in te and "model.encoder.embed_tokens.weight" in te:
            tied = {k: [(k, 0, -1)] for k in te} | {"model.shared.weight": [("model.encoder.embed_tokens.weight", 0, -1)]}
            te = View(tied, te)  # T5's token embedding, tied to `shared`, saved under the encoder's name
        described = text_spec(spec, configs[spec.component])
        yield spec.component, lambda s=described, t=te: text_encoder_graph(s, t, "model.", where)
    if (image := family.image_encoder) is not None:
        seen, vision = _component_shapes(shapes, image.component, "model."), configs[image.component]
        heads, act = int(vision["num_attention_heads"]), vision.get("hidden_act", image.hidden_act)
        yield image.component, lambda: image_encoder_graph(image, seen, "model.", where, "hf", heads, act)
    config = configs[family.denoiser]
    if family.denoiser == "unet":
        heads = config.get("num_attention_heads") or config["attention_head_dim"]
        how = dict(heads=heads if isinstance(heads, int) else list(heads), head_dim=None,
                   groups=int(config.get("norm_num_groups") or 32), time_id_dim=int(config.get("addition_time_embed_dim") or 256))
        view, builds = unet_view(shapes, config), {"deep_cache": deep_cache, **how}
    else:
        view, builds = dit_view(shapes, family, config), {}
    for component, build in denoiser_graphs(family, view, DENOISER, where, **builds):
        # diffusers' names are the graph's; a LoRA in the original release's finds their rows
        yield component, lambda b=build: lora_named(b(), {}, view)
    vae, groups = vae_view(shapes, configs["vae"]), int(configs["vae"].get("norm_num_groups") or 32)
    yield "vae_decoder", lambda: build_vae_decoder(vae, VAE, where, groups)
    yield "vae_encoder", lambda: build_vae_encoder(vae, VAE, where, groups)


def write_graph(model: onnx.ModelProto, path: Path, read: Callable[[str], np.ndarray] | None) -> list[Path]:
    """Save a built graph at `path`; with `read`, each placeholder filled with its weight (written
    one at a time, beside the graph in `model.onnx_data` when the weights pass protobuf's limit)."""
    from onnx import numpy_helper

    from edgediff.kernels.bind import is_placeholder, keep_lora_names
    from edgediff.kernels.graph import external_tensor

    path.parent.mkdir(parents=True, exist_ok=True)
    if read is None:
        onnx.save_model(model, str(path))
        return [path]
    keep_lora_names(model)
    weights = [t for t in model.graph.initializer if is_placeholder(t)]
    size = sum(4 * int(np.prod(t.dims, dtype=np.int64)) for t in weights)
    external = size > EXTERNAL_DATA_LIMIT
    data = path.parent / (path.name + "_data")
    kept = [t for t in model.graph.initializer if not is_placeholder(t)]
    del model.graph.initializer[:]
    with open(data, "wb") if external else contextlib.nullcontext() as sink:
        for t in weights:
            array = np.ascontiguousarray(read(t.name), dtype=np.float32)
            if tuple(array.shape) != tuple(t.dims):
                raise SourceError(f"{t.name}: shape {tuple(array.shape)} in the files, {tuple(t.dims)} in the config")
            model.graph.initializer.append(external_tensor(array, t.name, sink, data.name) if external
                                           else numpy_helper.from_array(array, t.name))
    model.graph.initializer.extend(kept)
    onnx.save_model(model, str(path))
    if not external:
        return [path]
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(data, 0o666 & ~umask)  # as the graph's own mode
    return [path, data]


def folder_architecture(folder: Path, family: Family, configs: Mapping[str, Mapping], prediction: str | None):
    """What the manifest says of a diffusers folder's model, from its configs."""
    from edgediff.convert.load import _prediction_type, _resolve_spacing
    from edgediff.convert.package import Architecture

    scheduler = dict(family.scheduler_config)
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if prediction:
        scheduler["prediction_type"] = _prediction_type(prediction, "epsilon")
    info = {}
    if (folder / "recipe.json").is_file():  # how a model edgediff trained was made
        info["recipe"] = json.loads((folder / "recipe.json").read_text())
    conditioning = family.conditioning
    if (folder / "model_index.json").is_file():  # SDXL pipelines say whether an empty negative prompt is zeros
        zeros = json.loads((folder / "model_index.json").read_text()).get("force_zeros_for_empty_prompt")
        if zeros is not None:
            conditioning = dataclasses.replace(conditioning, zero_empty_negative=bool(zeros))
    denoiser, vae = configs[family.denoiser], configs["vae"]
    if denoiser.get("time_cond_proj_dim"):  # an LCM-distilled UNet: guidance is an input of the model
        conditioning = dataclasses.replace(conditioning, guidance_embedding=int(denoiser["time_cond_proj_dim"]))
    if denoiser.get("guidance_embeds"):  # Flux dev: the same, as a number
        conditioning = dataclasses.replace(conditioning, guidance_input=True)
    encoders = [(spec, int(configs[spec.component].get("num_hidden_layers") or configs[spec.component]["num_layers"]),
                 folder / spec.tokenizer) for spec in family.text_encoders]
    downscale = 2 ** (len(vae["block_out_channels"]) - 1)
    sample_size = denoiser.get("sample_size")  # native size in latent pixels (Flux has none)
    video = family.video
    if video is not None and denoiser.get("num_frames"):  # SVD-XT's 25
        video = dataclasses.replace(video, frames=int(denoiser["num_frames"]))
    return Architecture(
        family, encoders, _resolve_spacing(scheduler), conditioning, int(vae.get("latent_channels", 4)),
        float(vae.get("scaling_factor", 0.18215)), float(vae.get("shift_factor") or family.latent.shift), downscale,
        int(sample_size) * downscale if isinstance(sample_size, int) else family.defaults.resolution, info, video)


def ldm_names(family: Family, configs: Mapping[str, Mapping]) -> dict[str, Callable[[str], str]]:
    """Graph initializer name -> the tensor's name in single files (LDM/SGM layout for U-Nets,
    the original releases' for DiTs, as stable-diffusion.cpp names them), per component. A DiT
    weight cut from a fused tensor is named by its rows there (`kernels.bind.rows_ref`)."""
    from edgediff.kernels.bind import rows_ref
    from edgediff.kernels.dit_names import flux_pieces, sd3_pieces
    from edgediff.kernels.ldm_names import clip_name, unet_name, vae_name

    config, vae = configs[family.denoiser], configs["vae"]
    if family.denoiser == "unet":
        def unet(n: str) -> str:
            try:
                return unet_name(n.removeprefix("unet."), config)
            except (KeyError, IndexError):  # a weight LDM's table has no row for (LCM's cond_proj): its own name
                return DENOISER + n.removeprefix("unet.")
        names = {"unet": unet, "unet_shallow": unet}
    else:
        table = flux_pieces if family.denoiser_class == "FluxTransformer2DModel" else sd3_pieces
        pieces = table(config, DENOISER)
        names = {family.denoiser: lambda n: rows_ref(pieces[n.removeprefix("transformer.")])}
    names["vae_decoder"] = names["vae_encoder"] = lambda n: vae_name(n.removeprefix("vae."), vae)
    if family.image_encoder is not None:  # transformers' names, as stable-diffusion.cpp names its CLIPs
        names[family.image_encoder.component] = lambda n: "cond_stage_model.transformer." + n.removeprefix("model.")
    for spec in family.text_encoders:
        if spec.kind == "t5":  # transformers' names; `shared` is the embedding tied to encoder.embed_tokens
            names[spec.component] = lambda n, p=spec.gguf_prefix: p + n.removeprefix("model.").replace(
                "encoder.embed_tokens.", "shared.")
        else:
            names[spec.component] = lambda n, p=spec.gguf_prefix, o=spec.ldm_layout == "open_clip": clip_name(
                n.removeprefix("model."), p, o)
    return names


class FolderWeights:
    """A diffusers folder's tensors as fp32 arrays by graph name (`model.*` is the text encoder
    `component`'s), each read when asked for, its mapped pages dropped once read: one tensor
    resident at a time."""

    def __init__(self, source, component: str):
        self.source, self.component = source, component
        self.files: dict = {}

    def __getitem__(self, graph_name: str) -> np.ndarray:
        from edgediff.kernels.gguf_blocks import dequantize
        from edgediff.runtime.safetensors_file import SafetensorsFile

        key = f"{self.component}.{graph_name[len('model.'):]}" if graph_name.startswith("model.") else graph_name
        info = self.source.tensors.get(key)
        w = None
        if info is not None:
            file = self.files.setdefault(info.file, SafetensorsFile(info.file))
            w = file.weight(info.name)
        if w is None:
            raise SourceError(f"{self.source.path}: no float tensor '{key}' for the {self.component} graph")
        array = np.array(dequantize(w.data, w.fmt, w.shape), dtype=np.float32)
        file.drop_pages()
        return array


@dataclasses.dataclass
class VaeGraphs:
    """A VAE given apart from the model (`--vae`): its two graphs, where their weights are read,
    whether it is safe in 16 bits."""

    decoder: Callable[[], onnx.ModelProto]
    encoder: Callable[[], onnx.ModelProto]
    file: object  # the weights' file (runtime.safetensors_file.SafetensorsFile)
    half_safe: bool
    ldm_name: Callable[[str], str] | None  # graph name -> its name in a GGUF package; None: it has none
    where: str = ""

    def read(self, name: str) -> np.ndarray:
        return _float(self.file, name)

    def __getitem__(self, name: str) -> np.ndarray:  # what write_gguf reads a component's weights through
        return self.read(name)

    def gguf_name(self, name: str) -> str:
        if self.ldm_name is None:
            raise UsageError(f"{self.where}: a tiny autoencoder goes into ONNX packages only (stable-diffusion.cpp "
                             "takes TAESD as a file of its own, --taesd); convert to --format onnx or without --vae")
        return self.ldm_name(name)


def vae_graphs(path: Path, family: Family, scale: float, shift: float, latent: int, downscale: int) -> VaeGraphs:
    """The graphs of a VAE in any form users have it: a diffusers folder (AutoencoderKL, or a tiny
    autoencoder such as TAESD, which takes the model's latents as they are scaled and shifted for
    the full VAE), or one .safetensors file in diffusers' or LDM's names. `latent` and `downscale`
    are the model's: a VAE with others is refused."""
    from edgediff.kernels.graphs.tiny_vae import build_tiny_vae_decoder, build_tiny_vae_encoder
    from edgediff.kernels.graphs.vae import build_vae_decoder, build_vae_encoder
    from edgediff.runtime.safetensors_file import SafetensorsFile

    path, config = Path(path), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"--vae {path}: a folder here must be a diffusers VAE (config.json and its weights)")
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as exc:
            raise SourceError(f"--vae {path}: config.json is not a diffusers config ({exc})") from exc
        weights = path / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise SourceError(f"--vae {path}: no diffusion_pytorch_model.safetensors in it")
    elif path.suffix.lower() == ".safetensors" and path.is_file():
        weights = path
    else:
        raise SourceError(f"--vae {path}: expected a diffusers VAE folder or a .safetensors file")
    header = SafetensorsFile(weights).header
    where = f"--vae {path}"
    tiny = config.get("_class_name") == "AutoencoderTiny"
    if tiny or any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")) for k in header):
        file = SafetensorsFile(weights, "vae.")
        shapes = {"vae." + k: tuple(v.shape) for k, v in header.items()}
        if tiny:
            mine = (int(config.get("latent_channels", 4)), 2 ** (len(config.get("decoder_block_out_channels", (64,) * 4)) - 1))
            if mine != (latent, downscale):
                raise SourceError(f"{where}: this tiny autoencoder has {mine[0]} latent channels and scales by "
                                  f"{mine[1]}; the model's VAE has {latent} and {downscale} (TAESD is for SD 1.x/2.x, "
                                  "TAESDXL for SDXL, TAESD3 for SD3, TAEF1 for Flux)")
            how = dict(scale=scale, shift=shift, where=where)
            return VaeGraphs(lambda: build_tiny_vae_decoder(shapes, "vae.", **how),
                             lambda: build_tiny_vae_encoder(shapes, "vae.", **how), file, False, None, where)
        levels = 1 + max(int(k.split(".")[2]) for k in header if k.startswith("decoder.up_blocks."))
        blocks = 1 + max(int(k.split(".")[4]) for k in header if k.startswith("encoder.down_blocks.0.resnets."))
        config = {"layers_per_block": blocks, "block_out_channels": [0] * levels, **config}
        view = vae_view(shapes, config)
        half = config.get("force_upcast", True) is False  # SDXL's fp16-fix VAE says it is safe
        ldm = {pieces[0][0]: name for name, pieces in view.pieces.items()}.__getitem__
    else:  # LDM's names, with or without `first_stage_model.`
        file = SafetensorsFile(weights, VAE)
        view, half, ldm = {n: tuple(file.header[n.removeprefix(VAE)].shape) for n in file.names()}, False, str
        if VAE + "decoder.conv_in.weight" not in view:
            raise SourceError(f"{where}: no VAE weights in this file (neither diffusers' nor LDM's names)")
    groups = int(config.get("norm_num_groups") or 32)
    return VaeGraphs(lambda: build_vae_decoder(view, VAE, where, groups), lambda: build_vae_encoder(view, VAE, where, groups),
                     file, half, ldm, where)


def _float(file, name: str) -> np.ndarray:
    """A file tensor as fp32 (dequantized from its block format), its mapped pages dropped after."""
    from edgediff.kernels.gguf_blocks import dequantize

    w = file.weight(name)
    if w is None:
        raise SourceError(f"{file.path}: no float tensor '{name}'")
    array = np.array(dequantize(w.data, w.fmt, w.shape), dtype=np.float32)
    file.drop_pages()
    return array

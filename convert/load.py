"""Source -> torch modules in diffusers' layout (UNet, VAE, text encoders) plus the scheduler
config and tokenizer folders. Single-file (LDM layout) checkpoints are renamed with diffusers'
own converters; the architecture is read from tensor shapes, the rest from the family table."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgediff.convert.sources import Source
from edgediff.errors import SourceError, require
from edgediff.families import DENOISER, Conditioning, Family, TextEncoder, bare_denoiser

BUNDLED_CLIP_TOKENIZER = Path(__file__).parent / "data" / "clip_tokenizer"
BUNDLED_T5_TOKENIZER = Path(__file__).parent / "data" / "t5_tokenizer"
_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."


@dataclass
class TorchPipeline:
    family: Family
    text_encoders: list[tuple[TextEncoder, object, Path]]  # spec, module, tokenizer folder
    denoiser: object  # the UNet or the DiT
    vae: object
    scheduler_config: dict
    info: dict = field(default_factory=dict)
    conditioning: Conditioning | None = None  # the family's unless the source says otherwise
    # component -> what fills its (empty) module with weights; run by `ready` just before the
    # module is exported, so a single file's components are in memory one at a time
    loaders: dict = field(default_factory=dict)
    weightless: bool = False  # its parameters are broadcast zeros: export the graphs, not the weights

    def ready(self, component: str) -> None:
        load = self.loaders.pop(component, None)
        if load is not None:
            load()

    def __post_init__(self):
        self.conditioning = self.conditioning or self.family.conditioning
        width = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        if width:  # an LCM-distilled UNet: guidance is an input of the model
            self.conditioning = replace(self.conditioning, guidance_embedding=int(width))
        if getattr(self.denoiser.config, "guidance_embeds", False):  # Flux dev: the same, as a number
            self.conditioning = replace(self.conditioning, guidance_input=True)


TEXT_MODELS = {"clip": "CLIPTextModel", "clip_projection": "CLIPTextModelWithProjection", "t5": "T5EncoderModel"}


def _prediction_type(value: str | None, default: str) -> str:
    return {"eps": "epsilon", "v": "v_prediction", None: default}.get(value, value)


def _quiet() -> None:
    """diffusers/transformers log loading hints and draw progress bars; the CLI has its own."""
    for name in ("diffusers", "transformers"):
        logging = require(name, "convert", "Converting a model").utils.logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def load_torch_pipeline(source: Source, family: Family, prediction: str | None = None,
                        weightless: bool = False) -> TorchPipeline:
    """The source's torch modules; `weightless` (diffusers folders): the architecture alone, for
    graphs whose weights are written from the folder's files one tensor at a time."""
    _quiet()
    if source.kind == "diffusers":
        return _load_diffusers(source, family, prediction, weightless)
    if source.kind in ("safetensors", "checkpoint"):
        return _load_ldm(source, family, prediction)
    raise SourceError(
        f"{source.path}: converting from {source.kind} files is not supported yet; "
        "convert from the diffusers folder or the .safetensors checkpoint instead"
    )


def _load_diffusers(source: Source, family: Family, prediction: str | None, weightless: bool = False) -> TorchPipeline:
    torch = require("torch", "convert", "Converting a model")
    diffusers = require("diffusers", "convert", "Converting a model")
    transformers = require("transformers", "convert", "Converting a model")
    folder = source.path

    def module(cls, path: Path, **dtype):
        if weightless:  # built from its config alone; the weights are read from the folder later
            config = cls.config_class.from_pretrained(path) if hasattr(cls, "config_class") else cls.load_config(path)
            return cls(config) if hasattr(cls, "config_class") else cls.from_config(config)
        return cls.from_pretrained(path, **dtype)

    encoders = []
    with _empty_parameters() if weightless else contextlib.nullcontext():
        for spec in family.text_encoders:
            if not (folder / spec.component).is_dir():
                raise SourceError(f"{folder}: missing {spec.component}/ (needed by {family.title})")
            model = module(getattr(transformers, TEXT_MODELS[spec.kind]), folder / spec.component, dtype=torch.float32)
            tokenizer = folder / spec.tokenizer
            if not tokenizer.is_dir():
                raise SourceError(f"{folder}: missing {spec.tokenizer}/ (the tokenizer of {spec.component})")
            encoders.append((spec, model, tokenizer))
        for part in (family.denoiser, "vae"):
            if not (folder / part).is_dir():
                raise SourceError(f"{folder}: missing {part}/ (needed by {family.title})")
        denoiser = module(getattr(diffusers, family.denoiser_class), folder / family.denoiser, torch_dtype=torch.float32)
        vae = module(diffusers.AutoencoderKL, folder / "vae", torch_dtype=torch.float32)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = dict(family.scheduler_config)
    if sched_path.is_file():
        scheduler = json.loads(sched_path.read_text())
    if prediction:
        scheduler["prediction_type"] = _prediction_type(prediction, "epsilon")
    info = {}
    if (folder / "recipe.json").is_file():  # how a model edgediff trained was made
        info["recipe"] = json.loads((folder / "recipe.json").read_text())
    conditioning = family.conditioning
    index = folder / "model_index.json"
    if index.is_file():  # SDXL pipelines say whether an empty negative prompt is zeros
        zeros = json.loads(index.read_text()).get("force_zeros_for_empty_prompt")
        if zeros is not None:
            conditioning = replace(conditioning, zero_empty_negative=bool(zeros))
    pipe = TorchPipeline(family, encoders, denoiser, vae, _resolve_spacing(scheduler), info, conditioning)
    return _without_weights(pipe) if weightless else pipe


def _resolve_spacing(config: dict) -> dict:
    """Record the spacing the config's own scheduler class uses when the file leaves it out."""
    if not config.get("timestep_spacing"):
        name = config.get("_class_name", "")
        linspace = ("Euler", "Heun", "DPMSolver", "UniPC", "KDPM2", "LMS")
        config = dict(config, timestep_spacing="linspace" if name.startswith(linspace) else "leading")
    return config


def _load_state(source: Source) -> dict:
    torch = require("torch", "convert", "Converting a model")
    if source.kind == "checkpoint":
        data = torch.load(source.path, map_location="cpu", weights_only=True, mmap=True)
        return dict(data.get("state_dict", data))
    from safetensors.torch import load_file

    state = load_file(str(source.path))
    return {DENOISER + k: v for k, v in state.items()} if bare_denoiser(state) else state  # as sources name them


def _pick_ema(state: dict) -> tuple[dict, bool]:
    """Use the EMA copy of each UNet weight when the file holds one (it gives better images)."""
    ema_keys = {k for k in state if k.startswith("model_ema.")}
    used = False
    for key in [k for k in state if k.startswith(_LDM_UNET)]:
        flat = "model_ema." + "".join(key.split(".")[1:])
        if flat in ema_keys:
            state[key] = state[flat]
            used = True
    return state, used


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _unet_ldm_config(shapes: dict, family: Family) -> dict:
    p = _LDM_UNET
    model_channels, in_channels = shapes[p + "input_blocks.0.0.weight"][:2]
    levels, mults, attn, depths = [], [], [], []
    i, level_blocks, level_has_attn, level_depth = 1, 0, False, 1
    while p + f"input_blocks.{i}.0.in_layers.0.weight" in shapes or p + f"input_blocks.{i}.0.op.weight" in shapes:
        if p + f"input_blocks.{i}.0.op.weight" in shapes:  # downsample ends a level
            levels.append(level_blocks)
            attn.append(level_has_attn)
            depths.append(level_depth)
            level_blocks, level_has_attn, level_depth = 0, False, 1
        else:
            if level_blocks == 0:
                mults.append(shapes[p + f"input_blocks.{i}.0.out_layers.3.weight"][0] // model_channels)
            level_blocks += 1
            if p + f"input_blocks.{i}.1.proj_in.weight" in shapes:
                level_has_attn = True
                level_depth = _count(shapes, re.escape(p + f"input_blocks.{i}.1.transformer_blocks.") + r"(\d+)\.")
        i += 1
    levels.append(level_blocks)
    attn.append(level_has_attn)
    depths.append(level_depth)
    proj = next(k for k in shapes if k.startswith(p) and k.endswith("proj_in.weight"))
    context = next(shapes[k][1] for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    params = {
        "in_channels": in_channels,
        "out_channels": shapes[p + "out.2.weight"][0],
        "model_channels": model_channels,
        "channel_mult": mults,
        "num_res_blocks": levels[0],
        "attention_resolutions": [2**k for k, a in enumerate(attn) if a],
        "context_dim": context,
        "use_linear_in_transformer": len(shapes[proj]) == 2,
        "transformer_depth": depths[0] if len(set(depths)) == 1 else depths,
    }
    if p + "label_emb.0.0.weight" in shapes:
        params.update(num_classes="sequential", adm_in_channels=shapes[p + "label_emb.0.0.weight"][1])
    if family.unet_heads:
        params["num_heads"] = family.unet_heads
    else:
        params["num_head_channels"] = family.unet_head_channels
    return params


def _vae_ldm_config(shapes: dict) -> dict:
    p = _LDM_VAE + "encoder."
    ch, in_ch = shapes[p + "conv_in.weight"][:2]
    n_levels = _count(shapes, re.escape(p + "down.") + r"(\d+)\.")
    mults = [shapes[p + f"down.{i}.block.0.conv2.weight"][0] // ch for i in range(n_levels)]
    return {
        "ch": ch,
        "in_channels": in_ch,
        "out_ch": shapes[_LDM_VAE + "decoder.conv_out.weight"][0],
        "ch_mult": mults,
        "num_res_blocks": _count(shapes, re.escape(p + "down.0.block.") + r"(\d+)\."),
        "z_channels": shapes[_LDM_VAE + "decoder.conv_in.weight"][1],
    }


def _clip_from_ldm(shapes: dict, spec: TextEncoder):
    """A transformers CLIP text model of the architecture the single-file `shapes` describe
    (transformers' names, or OpenCLIP's with fused q/k/v)."""
    transformers = require("transformers", "convert", "Converting a model")

    open_clip = spec.ldm_layout == "open_clip"
    p = spec.ldm_prefix + ("" if open_clip else "text_model.")
    names = (("token_embedding.weight", "positional_embedding", "transformer.resblocks.", "mlp.c_fc.weight")
             if open_clip else ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                                "encoder.layers.", "mlp.fc1.weight"))
    token, position, layers, fc1 = names
    if p + token not in shapes:
        raise SourceError(f"the checkpoint has no text encoder weights ({spec.ldm_prefix}*)")
    if open_clip and spec.kind != "clip_projection":
        raise SourceError(
            f"reading SD 2.x's OpenCLIP text encoder ({spec.ldm_prefix}*) from single files is not supported "
            "yet; convert the diffusers folder of this model instead"
        )
    vocab, hidden = shapes[p + token]
    config = transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes[p + layers + "0." + fc1][0],
        num_hidden_layers=_count(shapes, re.escape(p + layers) + r"(\d+)\."),
        num_attention_heads=max(1, hidden // spec.head_dim),
        max_position_embeddings=shapes[p + position][0],
        hidden_act=spec.hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        projection_dim=shapes[p + "text_projection"][1] if open_clip else shapes.get(
            spec.ldm_prefix + "text_projection.weight", (hidden,))[0],
    )
    return getattr(transformers, TEXT_MODELS[spec.kind])(config)


def _clip_weights(model, spec: TextEncoder, state: dict) -> dict:
    """The text encoder's weights in `state` (single-file names) under the model's own names."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    sub = {k: v for k, v in state.items() if k.startswith(spec.ldm_prefix)}
    if spec.ldm_layout == "open_clip":
        weights = convert_open_clip_checkpoint(model, sub, prefix=spec.ldm_prefix)
    else:
        weights = convert_ldm_clip_checkpoint(sub, remove_prefix=spec.ldm_prefix)
    weights.pop("text_model.embeddings.position_ids", None)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return weights


def _text_time_config(unet_config: dict, shapes: dict, family: Family) -> None:
    """SDXL's `label_emb` is text_time conditioning: the pooled text and the family's time ids,
    each id in addition_time_embed_dim channels (diffusers only infers this for full-size models)."""
    adm = shapes.get(_LDM_UNET + "label_emb.0.0.weight")
    if adm is None or not family.conditioning.time_ids:
        return
    pooled = next((shapes[te.ldm_prefix + "text_projection"][1] for te in family.text_encoders
                   if te.pooled and te.ldm_prefix + "text_projection" in shapes), 1280)
    ids = family.conditioning.time_id_count
    unet_config.update(class_embed_type=None, addition_embed_type="text_time",
                       addition_time_embed_dim=(adm[1] - pooled) // ids,
                       projection_class_embeddings_input_dim=adm[1])


@contextlib.contextmanager
def _empty_parameters():
    """Modules built inside get their parameters on the meta device: no memory, no random init
    (buffers stay real); `_load_strict(..., assign=True)` gives them the file's tensors."""
    torch = require("torch", "convert", "Converting a model")
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _load_strict(module, weights: dict, what: str, assign: bool = False) -> None:
    """Load `weights` (as fp32) into `module`; with `assign` its parameters become the given
    tensors (a file's memory-mapped ones stay mapped, nothing is copied)."""
    if assign:
        weights = {k: v.float() for k, v in weights.items()}
    try:
        result = module.load_state_dict(weights, strict=False, assign=assign)
    except RuntimeError as exc:  # size mismatches: shapes the standard architecture does not have
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise SourceError(f"the {what} weights do not fit the architecture read from the checkpoint "
                          f"({'; '.join(lines[:2]) or str(exc)[:200]}{' ...' if len(lines) > 2 else ''}); the file "
                          "may be damaged, pruned in an unusual way, or of an unsupported variant") from None
    if result.missing_keys or result.unexpected_keys:
        raise SourceError(
            f"the {what} weights do not fit the architecture read from the checkpoint "
            f"(missing: {result.missing_keys[:5]}, unexpected: {result.unexpected_keys[:5]}); "
            "the file may be damaged or of an unsupported variant"
        )


def _load_ldm(source: Source, family: Family, prediction: str | None) -> TorchPipeline:
    state, ema = _pick_ema(_load_state(source))
    kept = tuple([_LDM_UNET, _LDM_VAE] + [te.ldm_prefix for te in family.text_encoders])
    dropped = sorted(k for k in state if not k.startswith(kept))
    pipe = file_architecture({k: tuple(v.shape) for k, v in state.items()}, family, prediction, state,
                             str(source.path))
    pipe.info.update(ema=ema, dropped_keys=len(dropped))
    return pipe


def _ldm_original(shapes: dict, family: Family) -> dict:
    """The parts of an LDM yaml config that diffusers' single-file converters read."""
    return {"model": {"params": {"first_stage_config": {"params": {"ddconfig": _vae_ldm_config(shapes)}},
                                 "scale_factor": family.latent.scale}}}


_DIFFUSERS_VAE = ("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")


def ldm_vae_file(path: Path) -> bool:
    """A VAE file in LDM's names (or a GGUF), which single-file models take as one more weight
    source; anything else goes through `load_vae`."""
    if path.suffix.lower() == ".gguf":
        return True
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    from edgediff.runtime.safetensors_file import SafetensorsFile

    return not any(k.startswith(_DIFFUSERS_VAE) for k in SafetensorsFile(path).header)


def load_vae(path: Path, family: Family, current):
    """The VAE given with `--vae` in place of `current` (the model's own): a diffusers VAE folder,
    whose config says whether it is safe in fp16 (`force_upcast`), or a .safetensors file in
    diffusers' names (configured as `current`) or in LDM names (configured from its shapes)."""
    torch = require("torch", "convert", "Converting a model")
    diffusers = require("diffusers", "convert", "Converting a model")
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"--vae {path}: a folder here must be a diffusers VAE (config.json and its weights)")
        try:
            kind = json.loads((path / "config.json").read_text()).get("_class_name")
        except (ValueError, AttributeError) as exc:
            raise SourceError(f"--vae {path}: config.json is not a diffusers config ({exc})") from exc
        if kind == "AutoencoderTiny":
            return tiny_vae(diffusers.AutoencoderTiny.from_pretrained(path, torch_dtype=torch.float32), current, path)
        return diffusers.AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)
    if path.suffix.lower() != ".safetensors":
        raise SourceError(f"--vae {path}: expected a diffusers VAE folder or a .safetensors file")
    state = load_file(str(path))
    if any(k.startswith(_DIFFUSERS_VAE) for k in state):
        vae = diffusers.AutoencoderKL.from_config(current.config)
        _load_strict(vae, state, "VAE")
        return vae.eval()
    state = {k if k.startswith(_LDM_VAE) else _LDM_VAE + k: v for k, v in state.items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if _LDM_VAE + "encoder.conv_in.weight" not in shapes or _LDM_VAE + "decoder.conv_in.weight" not in shapes:
        raise SourceError(f"--vae {path}: no VAE weights in this file (neither diffusers' nor LDM's names)")
    vae, fill = ldm_vae(shapes, family, state)
    fill()
    return vae.eval()


def tiny_vae(tiny, current, path: Path):
    """A tiny autoencoder (TAESD, TAESDXL, TAESD3, TAEF1: ~1/20 of the full decoder's work) in the
    full VAE's place: the same graph inputs and outputs, so the package and runtime need nothing
    new. TAESD works on the denoiser's latents (the full VAE's latents scaled and shifted) and
    is deterministic (its encoder's log-variance is given as -30: the runtime's sample is the mean)."""
    import torch

    mine, theirs = tiny.config, current.config
    down = [2 ** (len(c.block_out_channels) - 1) for c in (mine, theirs)]
    if mine.latent_channels != theirs.latent_channels or down[0] != down[1]:
        raise SourceError(f"--vae {path}: this tiny autoencoder has {mine.latent_channels} latent channels and "
                          f"scales by {down[0]}; the model's VAE has "
                          f"{theirs.latent_channels} and {down[1]} (TAESD is for SD 1.x/2.x, TAESDXL for SDXL, "
                          "TAESD3 for SD3, TAEF1 for Flux)")
    scale, shift = float(theirs.scaling_factor), float(getattr(theirs, "shift_factor", None) or 0.0)

    class TinyVae(torch.nn.Module):
        config = theirs  # the latent format stays the model's

        def __init__(self):
            super().__init__()
            self.tiny, self.quant_conv = tiny.eval(), None

        def set_attn_processor(self, _processor) -> None:  # no attention
            pass

        def decode(self, z, return_dict: bool = False):
            return (self.tiny.decoder((z - shift) * scale),)

        def encoder(self, x):
            mean = self.tiny.encoder(x) / scale + shift
            return torch.cat([mean, torch.full_like(mean, -30.0)], 1)

    return TinyVae()


def ldm_vae(shapes: dict, family: Family, state: dict | None):
    """The VAE that LDM-named `shapes` describe (16-channel ones without quant convolutions too)
    and what fills it from `state`."""
    torch = require("torch", "convert", "Converting a model")
    diffusers = require("diffusers", "convert", "Converting a model")
    from diffusers.loaders import single_file_utils as sfu

    meta = state if state is not None else {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    config = sfu.create_vae_diffusers_config_from_ldm(_ldm_original(shapes, family), meta,
                                                      image_size=family.defaults.resolution,
                                                      scaling_factor=family.latent.scale)
    config.update(use_quant_conv=_LDM_VAE + "quant_conv.weight" in shapes,
                  use_post_quant_conv=_LDM_VAE + "post_quant_conv.weight" in shapes,
                  shift_factor=family.latent.shift or None)
    vae = diffusers.AutoencoderKL(**config)
    return vae, lambda: _load_strict(vae, sfu.convert_ldm_vae_checkpoint(state, config), "VAE", True)


def file_architecture(shapes: dict, family: Family, prediction: str | None = None, state: dict | None = None,
                      where: str = "the model") -> TorchPipeline:
    """The torch modules a single file (or a set of component files) describes, by family."""
    if family.denoiser != "unet":
        from edgediff.convert.dit import dit_architecture

        return dit_architecture(shapes, family, prediction, state, where)
    return ldm_architecture(shapes, family, prediction, state, where)


def weightless_architecture(shapes: dict, family: Family, prediction: str | None = None,
                            where: str = "the model") -> TorchPipeline:
    """The architecture `shapes` describe with no weights in memory (a 12B-parameter Flux would
    take 48 GB as random fp32 weights)."""
    with _empty_parameters():
        return _without_weights(file_architecture(shapes, family, prediction, where=where))


def _without_weights(pipe: TorchPipeline) -> TorchPipeline:
    """Each (meta) parameter becomes one zero broadcast to its shape as its module is exported:
    enough to trace the graphs, whose weights come from the files."""
    torch = require("torch", "convert", "Converting a model")

    def zeros(module) -> None:
        for owner in module.modules():
            for name, p in list(owner._parameters.items()):
                if p is not None and p.is_meta:
                    owner._parameters[name] = torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape),
                                                                 requires_grad=False)

    modules = {spec.component: m for spec, m, _ in pipe.text_encoders}
    modules.update({pipe.family.denoiser: pipe.denoiser, "vae": pipe.vae})
    pipe.loaders = {component: (lambda m=m: zeros(m)) for component, m in modules.items()}
    pipe.weightless = True
    return pipe


def ldm_architecture(shapes: dict, family: Family, prediction: str | None = None, state: dict | None = None,
                     where: str = "the model") -> TorchPipeline:
    """Torch modules of the architecture that LDM-named `shapes` describe, holding the weights of
    `state`, or random weights when it is None (graphs exported from them are then bound to the
    file's own weights: nothing is dequantized or copied to build them)."""
    torch = require("torch", "convert", "Converting a model")
    diffusers = require("diffusers", "convert", "Converting a model")
    from diffusers.loaders import single_file_utils as sfu

    for needed, what in ((_LDM_UNET, "UNet"), (_LDM_VAE, "VAE")):
        if not any(k.startswith(needed) for k in shapes):
            raise SourceError(f"{where}: the checkpoint has no {what} weights ({needed}*)")
    original = _ldm_original(shapes, family)
    original["model"]["params"]["unet_config"] = {"params": _unet_ldm_config(shapes, family)}
    meta = state if state is not None else {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, meta)
    _text_time_config(unet_config, shapes, family)
    # with weights: empty modules now, each filled from the file when it is exported
    with _empty_parameters() if state is not None else contextlib.nullcontext():
        encoders = [(te, _clip_from_ldm(shapes, te), BUNDLED_CLIP_TOKENIZER) for te in family.text_encoders]
        unet = diffusers.UNet2DConditionModel(**unet_config)
        vae, load_vae = ldm_vae(shapes, family, state)
    loaders = {}
    if state is not None:
        loaders["unet"] = lambda: _load_strict(unet, sfu.convert_ldm_unet_checkpoint(state, unet_config), "UNet", True)
        loaders["vae"] = load_vae
        for spec, model, _ in encoders:
            loaders[spec.component] = lambda s=spec, m=model: _load_strict(m, _clip_weights(m, s, state),
                                                                           "text encoder", True)
    for module in (unet, vae, *(m for _, m, _ in encoders)):
        module.eval()
    scheduler = dict(family.scheduler_config)
    if prediction:
        scheduler["prediction_type"] = _prediction_type(prediction, "epsilon")
    return TorchPipeline(family, encoders, unet, vae, _resolve_spacing(scheduler), loaders=loaders)

"""Single files of the DiT families (Flux in BFL's names, SD3 in Stability's; the tables are
kernels.dit_names') and T5 encoders as ComfyUI stores them (transformers' names): their configs
read off the shapes, and torch modules of them for the traced exporter."""

from __future__ import annotations

import re
from collections.abc import Mapping

from edgediff.errors import SourceError
from edgediff.families import DENOISER
from edgediff.kernels.dit_names import (
    Pieces,
    _count,
    flux_config,
    flux_pieces,
    sd3_config,
    sd3_pieces,
)


def gather(pieces: Pieces, read) -> dict:
    """diffusers' state dict from file tensors: `read(name)` gives a torch tensor."""
    import torch

    out = {}
    for dst, parts in pieces.items():
        tensors = [read(name) for name, _, _ in parts]
        out[dst] = torch.cat([t if end == -1 else t[start:end] for t, (_, start, end) in zip(tensors, parts, strict=True)])
    return out


def scatter(pieces: Pieces, state: Mapping[str, object]) -> dict:
    """The file's tensors from diffusers' state dict (the inverse of `gather`)."""
    import torch

    parts: dict[str, list[tuple[int, object]]] = {}
    for dst, sources in pieces.items():
        offset = 0
        for name, start, end in sources:
            size = state[dst].shape[0] if end == -1 else end - start
            parts.setdefault(name, []).append((0 if end == -1 else start, state[dst][offset:offset + size]))
            offset += size
    return {name: torch.cat([t for _, t in sorted(chunks, key=lambda c: c[0])]).contiguous()
            for name, chunks in parts.items()}


def t5_config(shapes: Mapping[str, tuple[int, ...]], prefix: str, where: str) -> dict:
    """T5EncoderModel's config from a file's shapes (transformers' names under `prefix`)."""
    p = prefix + "encoder.block.0.layer."
    try:
        buckets, heads = shapes[p + "0.SelfAttention.relative_attention_bias.weight"]
        gated = p + "1.DenseReluDense.wi_0.weight" in shapes
        return dict(
            vocab_size=shapes[prefix + "shared.weight"][0], d_model=shapes[prefix + "shared.weight"][1],
            num_layers=_count(shapes, re.escape(prefix) + r"encoder\.block\.(\d+)\."), num_heads=heads,
            d_kv=shapes[p + "0.SelfAttention.q.weight"][0] // heads, relative_attention_num_buckets=buckets,
            d_ff=shapes[p + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight")][0],
            feed_forward_proj="gated-gelu" if gated else "relu",
        )
    except KeyError as exc:
        raise SourceError(f"{where}: not a T5 encoder in transformers' names (no {exc}); pass the "
                          "t5xxl .safetensors file") from None


def dit_architecture(shapes: Mapping[str, tuple[int, ...]], family, prediction: str | None = None,
                     state: dict | None = None, where: str = "the model"):
    """Torch modules of the SD3 or Flux model that single-file `shapes` describe (the transformer
    in its original names, text encoders under the family's prefixes, the VAE in LDM's), empty and
    filled from `state` as each is exported, or random when `state` is None."""
    import contextlib

    from edgediff.convert.load import (
        BUNDLED_CLIP_TOKENIZER,
        BUNDLED_T5_TOKENIZER,
        TorchPipeline,
        _clip_from_ldm,
        _clip_weights,
        _empty_parameters,
        _load_strict,
        _resolve_spacing,
        ldm_vae,
    )
    from edgediff.errors import require

    diffusers = require("diffusers", "convert", "Converting a model")
    transformers = require("transformers", "convert", "Converting a model")
    read_config, pieces = DIT_TABLES[family.denoiser_class]
    config = read_config(shapes, where)
    missing = [te.component for te in family.text_encoders if not any(k.startswith(te.ldm_prefix) for k in shapes)]
    missing += [] if any(k.startswith("first_stage_model.") for k in shapes) else ["VAE"]
    if missing:
        files = " ".join(f"--text-encoder {te.ldm_prefix.split('.')[1].upper()}.safetensors" for te in family.text_encoders)
        raise SourceError(f"{where}: no {', '.join(missing)} weights (a transformer-only file, as {family.title} "
                          f"is often shipped); pass {files} (in this order) and --vae VAE.safetensors")
    with _empty_parameters() if state is not None else contextlib.nullcontext():
        transformer = getattr(diffusers, family.denoiser_class)(**config)
        encoders = []
        for te in family.text_encoders:
            if te.kind == "t5":
                model = transformers.T5EncoderModel(transformers.T5Config(**t5_config(shapes, te.ldm_prefix, where)))
                encoders.append((te, model, BUNDLED_T5_TOKENIZER))
            else:
                encoders.append((te, _clip_from_ldm(shapes, te), BUNDLED_CLIP_TOKENIZER))
        vae, load_vae = ldm_vae(shapes, family, state)
    loaders = {}
    if state is not None:
        loaders["transformer"] = lambda: _load_strict(
            transformer, gather(pieces(config, DENOISER), state.__getitem__), "transformer", True)
        loaders["vae"] = load_vae
        for spec, model, _ in encoders:
            weights = (lambda s=spec: _t5_weights(state, s.ldm_prefix)) if spec.kind == "t5" else (
                lambda s=spec, m=model: _clip_weights(m, s, state))
            loaders[spec.component] = lambda m=model, w=weights: _load_strict(m, w(), "text encoder", True)
    for module in (transformer, vae, *(m for _, m, _ in encoders)):
        module.eval()
    guided = config.get("guidance_embeds") and family.guided_scheduler_config
    scheduler = dict(family.guided_scheduler_config if guided else family.scheduler_config)
    return TorchPipeline(family, encoders, transformer, vae, _resolve_spacing(scheduler), loaders=loaders)


def _t5_weights(state: Mapping[str, object], prefix: str) -> dict:
    weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    weights.setdefault("encoder.embed_tokens.weight", weights.get("shared.weight"))  # tied in transformers
    return weights


# the denoiser class -> (its config from a file's shapes, where its weights lie in the file)
DIT_TABLES = {"FluxTransformer2DModel": (flux_config, flux_pieces), "SD3Transformer2DModel": (sd3_config, sd3_pieces)}

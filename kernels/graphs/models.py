"""Every component of a family's model, built from the weights' shapes: which builder makes
which component, with the family row's settings. The one place a family's graphs come from."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import onnx

from edgediff.families import DENOISER, Family, ImageEncoder, TextEncoder

VAE = "first_stage_model."
Shapes = Mapping[str, Sequence[int]]


def text_encoder_graph(spec: TextEncoder, shapes: Shapes, prefix: str, where: str) -> onnx.ModelProto:
    if spec.kind == "t5":
        from edgediff.kernels.graphs.t5 import build_t5

        return build_t5(shapes, prefix, where)
    from edgediff.kernels.graphs.clip import build_clip

    return build_clip(shapes, prefix, spec.ldm_layout, hidden_act=spec.hidden_act, head_dim=spec.head_dim,
                      norm_hidden=spec.norm_hidden, projection=spec.kind == "clip_projection", where=where)


def image_encoder_graph(spec: ImageEncoder, shapes: Shapes, prefix: str, where: str, layout: str | None = None,
                        heads: int | None = None, hidden_act: str | None = None) -> onnx.ModelProto:
    """An image-to-video family's image encoder, in the single file's layout unless told."""
    from edgediff.kernels.graphs.clip_vision import build_clip_vision

    if heads is None:  # a single file does not say: its width in heads of the family's width
        width = shapes.get(prefix + "class_embedding")
        heads = max(1, width[0] // spec.head_dim) if width else 1
    return build_clip_vision(shapes, prefix, layout or spec.ldm_layout, heads=heads,
                             hidden_act=hidden_act or spec.hidden_act, where=where)


def denoiser_graphs(family: Family, shapes: Shapes, prefix: str, where: str, deep_cache: bool = False,
                    **unet) -> Iterator[tuple[str, Callable[[], onnx.ModelProto]]]:
    """(component, build) of the denoiser, and of DeepCache's shallow U-Net when asked. `unet`:
    what a config says of a U-Net that its shapes do not (heads, groups, time-id width)."""
    if family.denoiser_class == "UNetSpatioTemporalConditionModel":
        from edgediff.kernels.graphs.unet import build_video_unet

        ids = family.conditioning.time_id_count
        adm = shapes.get(prefix + "label_emb.0.0.weight")  # the ids side by side, each embedded alike (256)
        how = dict(heads=family.unet_heads, head_dim=None if family.unet_heads else 64, prefix=prefix, where=where,
                   time_ids=ids, time_id_dim=adm[1] // ids if adm else 256)
        how.update({k: v for k, v in unet.items() if k in ("heads", "head_dim", "groups", "time_id_dim")})
        yield family.denoiser, lambda: build_video_unet(shapes, **how)
    elif family.denoiser_class == "FluxTransformer2DModel":
        from edgediff.kernels.graphs.flux import build_flux

        yield family.denoiser, lambda: build_flux(shapes, prefix, where)
    elif family.denoiser_class == "SD3Transformer2DModel":
        from edgediff.kernels.graphs.mmdit import build_mmdit

        yield family.denoiser, lambda: build_mmdit(shapes, prefix, where)
    else:
        from edgediff.kernels.graphs.unet import build_unet, build_unet_shallow

        ids = family.conditioning.time_id_count
        how = dict(heads=family.unet_heads, head_dim=None if family.unet_heads else 64, prefix=prefix, where=where,
                   time_ids=ids)
        how.update(unet)
        how.setdefault("time_id_dim", _time_id_width(family, shapes, prefix, ids))
        # every package's U-Net takes a ControlNet's residuals (zeros without one: kernels.graphs.unet)
        yield "unet", lambda: build_unet(shapes, deep_cache=deep_cache, control=True, **how)
        if deep_cache:
            yield "unet_shallow", lambda: build_unet_shallow(shapes, **how)


def _time_id_width(family: Family, shapes: Shapes, prefix: str, ids: int) -> int:
    """SDXL's width per time id: `label_emb`'s input is the pooled text (the projection width of
    the pooled text encoder) and the ids' embeddings side by side (256 each in SDXL)."""
    adm = shapes.get(prefix + "label_emb.0.0.weight")
    pooled = next((s for s in family.text_encoders if s.pooled), None)
    if adm is None or pooled is None or not ids:
        return 256
    # OpenCLIP's [width, projection], also under stable-diffusion.cpp's transformers-like names
    projection = shapes.get(pooled.ldm_prefix + "text_projection") or shapes.get(
        pooled.ldm_prefix + "text_model.text_projection")
    width = projection[1] if projection else shapes.get(pooled.ldm_prefix + "text_projection.weight", (1280,))[0]
    return (adm[1] - width) // ids


def model_graphs(family: Family, shapes: Shapes, prefixes: Mapping[str, str], where: str,
                 deep_cache: bool = False, vae: bool = True) -> Iterator[tuple[str, Callable[[], onnx.ModelProto]]]:
    """(component, build) for every component, in the order a package lists them, each weight
    also known by the name LoRAs give it. `prefixes`: component -> where its weights' names
    start (the LDM/SGM single-file prefixes by default)."""
    from edgediff.kernels.graphs.vae import build_vae_decoder, build_vae_encoder

    for spec in family.text_encoders:
        prefix = prefixes.get(spec.component, spec.ldm_prefix)
        yield spec.component, lambda s=spec, p=prefix: lora_named(
            text_encoder_graph(s, shapes, p, where), _text_lora_names(s, shapes, p), shapes)
    if (spec := family.image_encoder) is not None:
        prefix = prefixes.get(spec.component, spec.ldm_prefix)
        yield spec.component, lambda s=spec, p=prefix: image_encoder_graph(s, shapes, p, where)
    prefix = prefixes.get(family.denoiser, DENOISER)
    for component, build in denoiser_graphs(family, shapes, prefix, where, deep_cache):
        yield component, lambda b=build: lora_named(b(), _denoiser_lora_names(family, shapes, prefix, where), shapes)
    if vae:
        prefix = prefixes.get("vae_decoder", VAE)
        yield "vae_decoder", lambda: build_vae_decoder(shapes, prefix, where)
        yield "vae_encoder", lambda: build_vae_encoder(shapes, prefix, where)


def lora_named(model: onnx.ModelProto, names: Mapping[str, object], shapes: Shapes) -> onnx.ModelProto:
    """Each placeholder given the name LoRAs call its weight (a name, or the parts of a fused one);
    under a `View`, also the rows of the builder's layers each stored tensor is (a LoRA in BFL's
    names finds diffusers' to_q as rows of `img_attn.qkv`)."""
    from edgediff.kernels.bind import is_placeholder, name_for_loras
    from edgediff.kernels.graphs.builder import View

    held: dict[str, list] = {}
    if isinstance(shapes, View):  # the builders' names -> the stored tensors' (a checkpoint's EMA copies)
        names = {shapes.pieces[n][0][0] if len(shapes.pieces.get(n, ())) == 1 else n: v for n, v in names.items()}
        for name, pieces in shapes.pieces.items():
            whole, offset = len(pieces) == 1 and pieces[0][2] == -1, 0
            for stored, start, end in pieces:
                size = (shapes.stored_shapes[stored][0] if end == -1 else end - start)
                held.setdefault(stored, []).append(
                    (name, None if whole else (offset, offset + size), None if end == -1 else (start, end)))
                offset += size
    for t in model.graph.initializer:
        known = names.get(t.name)
        if is_placeholder(t) and (known or t.name in held):
            alias, parts = (known, ()) if isinstance(known, str) else ("", known or ())
            name_for_loras(t, alias, [*parts, *(p for p in held.get(t.name, ()) if p[0] != t.name)])
    return model


def _text_lora_names(spec: TextEncoder, shapes: Shapes, prefix: str) -> dict[str, object]:
    from edgediff.kernels.ldm_names import clip_lora_names

    if spec.kind == "t5":  # transformers' names under the prefix (llama.cpp's keep their own)
        return {n: n[len(prefix):] for n in shapes if prefix and n.startswith(prefix)}
    return clip_lora_names(shapes, prefix, spec.ldm_layout)


def _denoiser_lora_names(family: Family, shapes: Shapes, prefix: str, where: str) -> dict[str, object]:
    """diffusers' names of the denoiser's weights: a U-Net's by the LDM table, a DiT's fused
    q/k/v as the rows diffusers' separate layers are."""
    from edgediff.kernels import dit_names
    from edgediff.kernels.ldm_names import unet_diffusers_names

    if family.denoiser == "unet":
        return unet_diffusers_names(shapes)
    read, pieces = {"FluxTransformer2DModel": (dit_names.flux_config, dit_names.flux_pieces),
                    "SD3Transformer2DModel": (dit_names.sd3_config, dit_names.sd3_pieces)}[family.denoiser_class]
    config = read(shapes, where)
    if family.denoiser_class == "FluxTransformer2DModel":
        width = config["num_attention_heads"] * config["attention_head_dim"]
        config["mlp_ratio"] = shapes[prefix + "double_blocks.0.img_mlp.0.weight"][0] / width
    out: dict[str, object] = {}
    for stored, held in dit_names.held_parts(pieces(config, prefix)).items():
        whole = [name for name, _, at in held if at is None]
        out[stored] = whole[0] if whole else held
    return out

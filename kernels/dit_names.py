"""Where each diffusers weight of a DiT lies in its original release's files: Flux in Black
Forest Labs' names (fused q/k/v, `double_blocks.*`, `single_blocks.*`, as BFL, ComfyUI and
stable-diffusion.cpp store it), SD3/SD3.5 in Stability's MMDiT names (`joint_blocks.*`).

One table per layout maps every diffusers weight to the rows of the file tensors it is cut from,
so the same data reads a file, writes one (the tests' fixtures) and tells a LoRA in diffusers'
names which rows of a fused tensor it changes, whatever the widths. diffusers has a reader
(`convert_flux_transformer_checkpoint_to_diffusers`) but it assumes the full-size widths."""

from __future__ import annotations

import re
from collections.abc import Mapping

from edgediff.errors import SourceError
from edgediff.families import DENOISER

# diffusers name -> [(file name, first row, end row)], concatenated along the first axis
Pieces = dict[str, list[tuple[str, int, int]]]

_FLUX_PLAIN = {  # diffusers prefix -> BFL prefix, each with .weight and .bias
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_GUIDANCE = {"time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                  "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def flux_pieces(config: Mapping[str, object], prefix: str = "") -> Pieces:
    """Where each weight of a FluxTransformer2DModel with this config lies in a BFL file."""
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = int(width * float(config.get("mlp_ratio", 4.0)))
    out: Pieces = {}

    def whole(dst: str, src: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = [(f"{prefix}{src}.{p}", 0, -1)]

    def rows(dst: str, src: str, start: int, end: int) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = [(f"{prefix}{src}.{p}", start, end)]

    for dst, src in {**_FLUX_PLAIN, **(_FLUX_GUIDANCE if config.get("guidance_embeds") else {})}.items():
        whole(dst, src)
    for i in range(int(config["num_layers"])):
        block, bfl = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for dst, src in _DOUBLE.items():
            whole(block + dst, bfl + src)
        for dst, src in _DOUBLE_NORMS.items():
            out[f"{block}{dst}.weight"] = [(f"{prefix}{bfl}{src}.scale", 0, -1)]
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            rows(f"{block}attn.{img}", bfl + "img_attn.qkv", j * width, (j + 1) * width)
            rows(f"{block}attn.{txt}", bfl + "txt_attn.qkv", j * width, (j + 1) * width)
    for i in range(int(config["num_single_layers"])):
        block, bfl = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            rows(block + name, bfl + "linear1", j * width, (j + 1) * width)
        rows(block + "proj_mlp", bfl + "linear1", 3 * width, 3 * width + mlp)
        whole(block + "proj_out", bfl + "linear2")
        whole(block + "norm.linear", bfl + "modulation.lin")
        out[f"{block}attn.norm_q.weight"] = [(f"{prefix}{bfl}norm.query_norm.scale", 0, -1)]
        out[f"{block}attn.norm_k.weight"] = [(f"{prefix}{bfl}norm.key_norm.scale", 0, -1)]
    for p in ("weight", "bias"):  # BFL's final modulation is (shift, scale); diffusers' (scale, shift)
        src = f"{prefix}final_layer.adaLN_modulation.1.{p}"
        out[f"norm_out.linear.{p}"] = [(src, width, 2 * width), (src, 0, width)]
    return out


def sd3_pieces(config: Mapping[str, object], prefix: str = "") -> Pieces:
    """Where each weight of an SD3Transformer2DModel lies in an SD3/SD3.5 single file (Stability's
    MMDiT names: `joint_blocks.N.{x,context}_block.*`, fused q/k/v)."""
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    layers = int(config["num_layers"])
    out: Pieces = {}

    def whole(dst: str, src: str, params=("weight", "bias")) -> None:
        for p in params:
            out[f"{dst}.{p}"] = [(f"{prefix}{src}.{p}", 0, -1)]

    def swapped(dst: str, src: str) -> None:  # (shift, scale) in the file, (scale, shift) in diffusers
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = [(f"{prefix}{src}.{p}", width, 2 * width), (f"{prefix}{src}.{p}", 0, width)]

    def qkv(dst: str, names, src: str) -> None:
        for j, name in enumerate(names):
            for p in ("weight", "bias"):
                out[f"{dst}{name}.{p}"] = [(f"{prefix}{src}.{p}", j * width, (j + 1) * width)]

    out["pos_embed.pos_embed"] = [(f"{prefix}pos_embed", 0, -1)]
    whole("pos_embed.proj", "x_embedder.proj")
    for n in (1, 2):
        whole(f"time_text_embed.timestep_embedder.linear_{n}", f"t_embedder.mlp.{2 * n - 2}")
        whole(f"time_text_embed.text_embedder.linear_{n}", f"y_embedder.mlp.{2 * n - 2}")
    whole("context_embedder", "context_embedder")
    whole("proj_out", "final_layer.linear")
    swapped("norm_out.linear", "final_layer.adaLN_modulation.1")
    qk_norm = config.get("qk_norm")
    for i in range(layers):
        block, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == layers - 1  # its context stream ends: no output projection or MLP
        qkv(block + "attn.", ("to_q", "to_k", "to_v"), x + "attn.qkv")
        qkv(block + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj"), c + "attn.qkv")
        whole(block + "attn.to_out.0", x + "attn.proj")
        whole(block + "norm1.linear", x + "adaLN_modulation.1")
        (swapped if last else whole)(block + "norm1_context.linear", c + "adaLN_modulation.1")
        whole(block + "ff.net.0.proj", x + "mlp.fc1")
        whole(block + "ff.net.2", x + "mlp.fc2")
        if not last:
            whole(block + "attn.to_add_out", c + "attn.proj")
            whole(block + "ff_context.net.0.proj", c + "mlp.fc1")
            whole(block + "ff_context.net.2", c + "mlp.fc2")
        if qk_norm:
            for dst, src in (("attn.norm_q", x + "attn.ln_q"), ("attn.norm_k", x + "attn.ln_k"),
                             ("attn.norm_added_q", c + "attn.ln_q"), ("attn.norm_added_k", c + "attn.ln_k")):
                whole(block + dst, src, ("weight",))
        if i in tuple(config.get("dual_attention_layers") or ()):
            qkv(block + "attn2.", ("to_q", "to_k", "to_v"), x + "attn2.qkv")
            whole(block + "attn2.to_out.0", x + "attn2.proj")
            if qk_norm:
                whole(block + "attn2.norm_q", x + "attn2.ln_q", ("weight",))
                whole(block + "attn2.norm_k", x + "attn2.ln_k", ("weight",))
    return out


def held_parts(pieces: Pieces) -> dict[str, list[tuple[str, tuple[int, int] | None, tuple[int, int] | None]]]:
    """The inverse of a table: file tensor -> (diffusers weight, its rows or None for all, the
    rows of the file tensor it is, or None when it is the whole tensor)."""
    out: dict[str, list] = {}
    for name, sources in pieces.items():
        offset = 0
        whole = len(sources) == 1 and sources[0][2] == -1
        for stored, start, end in sources:
            if whole:
                out.setdefault(stored, []).append((name, None, None))
                continue
            size = end - start
            out.setdefault(stored, []).append((name, None if len(sources) == 1 else (offset, offset + size), (start, end)))
            offset += size
    return out


def _count(names, pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(found) + 1 if found else 0


def flux_config(shapes: Mapping[str, tuple[int, ...]], where: str) -> dict:
    """FluxTransformer2DModel's config from a BFL file's shapes (names with DENOISER)."""
    p = DENOISER
    try:
        width, packed = shapes[p + "img_in.weight"]
        head = shapes[p + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return dict(
            patch_size=1, in_channels=packed, num_layers=_count(shapes, re.escape(p) + r"double_blocks\.(\d+)\."),
            num_single_layers=_count(shapes, re.escape(p) + r"single_blocks\.(\d+)\."),
            attention_head_dim=head, num_attention_heads=width // head,
            joint_attention_dim=shapes[p + "txt_in.weight"][1],
            pooled_projection_dim=shapes[p + "vector_in.in_layer.weight"][1],
            guidance_embeds=p + "guidance_in.in_layer.weight" in shapes,
            axes_dims_rope=_rope_axes(head),
        )
    except KeyError as exc:
        raise SourceError(f"{where}: not a Flux transformer in BFL's names (no {exc})") from None


def _rope_axes(head: int) -> tuple[int, int, int]:
    """Flux's rotary axes (16, 56, 56) for 128-wide heads: the first axis an eighth, the others
    half the rest each (the tiny test models keep the rule)."""
    first = head // 8
    return first, (head - first) // 2, (head - first) // 2


def sd3_config(shapes: Mapping[str, tuple[int, ...]], where: str) -> dict:
    """SD3Transformer2DModel's config from a single file's shapes (names with DENOISER): 64-wide
    heads, as every SD3 and SD3.5 model has."""
    p = DENOISER
    try:
        width, channels, patch, _ = shapes[p + "x_embedder.proj.weight"]
        names = [n.removeprefix(p) for n in shapes if n.startswith(p)]
        return dict(
            sample_size=128, patch_size=patch, in_channels=channels,
            out_channels=shapes[p + "final_layer.linear.weight"][0] // (patch * patch),
            num_layers=_count(names, r"joint_blocks\.(\d+)\."), attention_head_dim=64, num_attention_heads=width // 64,
            joint_attention_dim=shapes[p + "context_embedder.weight"][1],
            caption_projection_dim=shapes[p + "context_embedder.weight"][0],
            pooled_projection_dim=shapes[p + "y_embedder.mlp.0.weight"][1],
            pos_embed_max_size=int(round(shapes[p + "pos_embed"][1] ** 0.5)),
            qk_norm="rms_norm" if any(".ln_q." in n for n in names) else None,
            dual_attention_layers=tuple(sorted({int(n.split(".")[1]) for n in names if ".attn2." in n})),
        )
    except KeyError as exc:
        raise SourceError(f"{where}: not an SD3 transformer in Stability's names (no {exc})") from None


# the denoiser class -> its config read from a single file's shapes
DIT_CONFIGS = {"FluxTransformer2DModel": flux_config, "SD3Transformer2DModel": sd3_config}

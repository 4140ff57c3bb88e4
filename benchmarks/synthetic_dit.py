"""Full-size DiTs with random weights as the one GGUF file edgediff's converter (and
stable-diffusion.cpp's) writes for them: the transformer in its original release's names, the text
encoders under `text_encoders.*`, the VAE in LDM's names, matrices in a block format. The models are
built on torch's meta device and each tensor's blocks are drawn as random codes and written in
turn, so a 12B-parameter Flux never exists as floats (48 GB) and the file is made in minutes.

    edgediff bench synthetic_dit flux-schnell OUT.gguf [q4_0|q8_0]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from edgediff.benchmarks.synthetic import _CLIP_L, SD15, SDXL

_T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
_VAE16 = dict(SD15["vae"], latent_channels=16, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False)
# black-forest-labs/FLUX.1-schnell and stabilityai/stable-diffusion-3.5-medium configs
DIT_ARCHITECTURES = {
    "flux-schnell": {
        "family": "flux",
        "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        "text": (_CLIP_L, _T5_XXL),
        "vae": dict(_VAE16, scaling_factor=0.3611, shift_factor=0.1159),
    },
    "sd35-medium": {
        "family": "sd3",
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                            qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
        "text": (_CLIP_L, SDXL["text_2"], _T5_XXL),
        "vae": dict(_VAE16, scaling_factor=1.5305, shift_factor=0.0609),
    },
}
_CODE_STD = {"q4_0": 4.61, "q8_0": 73.9}  # std of uniformly drawn codes


def architecture(name: str, tiny: dict | None = None):
    """The modules of architecture `name` on torch's meta device (`tiny` overrides its configs):
    family, text_encoders [(spec, module, tokenizer)], denoiser, vae."""
    import types

    import diffusers
    import torch
    import transformers

    from edgediff.convert.load import BUNDLED_CLIP_TOKENIZER, BUNDLED_T5_TOKENIZER
    from edgediff.families import get_family

    arch = {**DIT_ARCHITECTURES[name], **(tiny or {})}
    family = get_family(arch["family"])
    with torch.device("meta"):
        denoiser = getattr(diffusers, family.denoiser_class)(**arch["transformer"])
        vae = diffusers.AutoencoderKL(**arch["vae"])
        encoders = []
        for spec, config in zip(family.text_encoders, arch["text"], strict=True):
            if spec.kind == "t5":
                model = transformers.T5EncoderModel(transformers.T5Config(**config))
            else:
                model = getattr(transformers, "CLIPTextModelWithProjection" if spec.kind == "clip_projection"
                                else "CLIPTextModel")(transformers.CLIPTextConfig(**config))
            encoders.append((spec, model, BUNDLED_T5_TOKENIZER if spec.kind == "t5" else BUNDLED_CLIP_TOKENIZER))
    return types.SimpleNamespace(family=family, text_encoders=encoders, denoiser=denoiser, vae=vae)


def planned(pipe, kind: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, ggml type) of every tensor of the file, as edgediff's GGUF writer names and
    types them at `kind`."""
    from edgediff.convert import _ldm_shape
    from edgediff.convert.build import ldm_names
    from edgediff.convert.gguf import _file_tensors, gguf_format, stored_format
    from edgediff.convert.precision import parse_precision
    from edgediff.kernels.ldm_names import stored_transposed

    fam = pipe.family
    modules = {**{spec.component: ("model.", m) for spec, m, _ in pipe.text_encoders},
               fam.denoiser: ("transformer.", pipe.denoiser), "vae_decoder": ("vae.", pipe.vae)}
    precisions = parse_precision(kind, list(modules), "gguf")
    names = ldm_names(fam, {fam.denoiser: dict(pipe.denoiser.config), "vae": dict(pipe.vae.config)})
    out = []
    for component, (prefix, module) in modules.items():
        by_name: dict[str, tuple] = {}
        for n, p in module.state_dict(keep_vars=True).items():  # T5's tied embedding once, as `shared`
            if p.is_floating_point():
                by_name.setdefault(names[component](prefix + n), (prefix + n, tuple(p.shape)))
        inits = list(by_name.values())
        for name, (dims, sources) in _file_tensors(inits, names[component]).items():
            dims = dims[::-1] if stored_transposed(name) else dims
            fmt = stored_format(sources[0][0], dims, gguf_format(precisions[component]), ())
            out.append((name, _ldm_shape(name, dims) if component == "vae_decoder" else dims, fmt.name))
    return out


def random_tensor(name: str, shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Weights of a plausible scale (std 1/sqrt(fan-in); norm scales 1) as the file stores them:
    floats, or Q4_0/Q8_0 blocks of random codes with one scale (f16 d, then the codes)."""
    fan_in = math.prod(shape[1:]) or 1
    if kind in ("f32", "f16"):
        one = len(shape) == 1 and ("norm" in name or name.endswith(".scale"))
        data = np.ones(shape, np.float32) if one else rng.standard_normal(shape, np.float32) / math.sqrt(fan_in)
        return data.astype(np.float16 if kind == "f16" else np.float32)
    rows, blocks = shape[0], fan_in // 32
    scale = np.frombuffer(np.float16(1 / (_CODE_STD[kind] * math.sqrt(fan_in))).tobytes(), np.uint8)
    if kind == "q4_0":
        codes = rng.integers(0, 256, (rows, blocks, 16), dtype=np.uint8)
    else:
        codes = rng.integers(-127, 128, (rows, blocks, 32), dtype=np.int8).view(np.uint8)
    out = np.empty((rows, blocks, 2 + codes.shape[2]), np.uint8)
    out[..., :2] = scale
    out[..., 2:] = codes
    return out.reshape(rows, -1)


def write(name: str, path: Path, kind: str = "q4_0", seed: int = 0, tiny: dict | None = None) -> Path:
    """Write the GGUF file of architecture `name` at `path`, one tensor at a time."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from edgediff.convert.gguf import _stored_bytes
    from edgediff.kernels.gguf_blocks import FORMATS

    if kind not in _CODE_STD:
        raise SystemExit(f"unknown type '{kind}'; choose one of: {', '.join(_CODE_STD)}")
    pipe = architecture(name, tiny)
    plan = planned(pipe, kind)
    writer = GGUFWriter(str(path), arch=pipe.family.name)
    writer.add_quantization_version(2)
    for tensor, shape, fmt in plan:
        dtype = np.float16 if fmt == "f16" else np.float32
        writer.add_tensor_info(tensor, shape, np.dtype(dtype), _stored_bytes(shape, FORMATS[fmt]),
                               raw_dtype=None if fmt in ("f32", "f16") else GGMLQuantizationType[fmt.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for tensor, shape, fmt in plan:
        writer.write_tensor_data(random_tensor(tensor, shape, fmt, rng))
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="edgediff bench synthetic_dit", description=__doc__.split("\n\n")[0])
    parser.add_argument("architecture", choices=DIT_ARCHITECTURES)
    parser.add_argument("output", type=Path, help="the .gguf file to write")
    parser.add_argument("type", nargs="?", default="q4_0", choices=_CODE_STD, help="block type (default q4_0)")
    args = parser.parse_args(argv)
    print(write(args.architecture, args.output, args.type))
    return 0


if __name__ == "__main__":
    sys.exit(main())

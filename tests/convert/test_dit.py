"""The DiT single-file tables: Flux's BFL names against diffusers' own reader at full width."""

from __future__ import annotations

from edgediff.families import DENOISER
from edgediff.kernels.dit_names import flux_config, flux_pieces

from ldm_checkpoint import gather, scatter


def test_flux_table_reads_as_diffusers_does():
    """diffusers' reader only knows the full-size widths (3072, MLP x4): build a full-width Flux
    with one block of each kind in BFL's names (int8 values, so 0.7 GB) and compare every tensor
    with ours; then our writer gives the file back."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = dict(num_layers=1, num_single_layers=1, num_attention_heads=24, attention_head_dim=128,
                  guidance_embeds=True)
    shapes = {"img_in": (3072, 64), "txt_in": (3072, 4096), "time_in.in_layer": (3072, 256),
              "time_in.out_layer": (3072, 3072), "vector_in.in_layer": (3072, 768),
              "vector_in.out_layer": (3072, 3072), "guidance_in.in_layer": (3072, 256),
              "guidance_in.out_layer": (3072, 3072), "final_layer.linear": (64, 3072),
              "final_layer.adaLN_modulation.1": (6144, 3072), "single_blocks.0.linear1": (21504, 3072),
              "single_blocks.0.linear2": (3072, 15360), "single_blocks.0.modulation.lin": (9216, 3072)}
    for side in ("img", "txt"):
        shapes.update({f"double_blocks.0.{side}_mod.lin": (18432, 3072), f"double_blocks.0.{side}_attn.qkv": (9216, 3072),
                       f"double_blocks.0.{side}_attn.proj": (3072, 3072), f"double_blocks.0.{side}_mlp.0": (12288, 3072),
                       f"double_blocks.0.{side}_mlp.2": (3072, 12288)})
    generator = torch.Generator().manual_seed(0)
    bfl = {}
    for name, shape in shapes.items():
        bfl[name + ".weight"] = torch.randint(-128, 127, shape, dtype=torch.int8, generator=generator)
        bfl[name + ".bias"] = torch.randint(-128, 127, shape[:1], dtype=torch.int8, generator=generator)
    for norm in ("double_blocks.0.img_attn.norm", "double_blocks.0.txt_attn.norm", "single_blocks.0.norm"):
        for kind in ("query_norm", "key_norm"):
            bfl[f"{norm}.{kind}.scale"] = torch.randint(-128, 127, (128,), dtype=torch.int8, generator=generator)

    ours = gather(flux_pieces(config), bfl.__getitem__)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = scatter(flux_pieces(config), ours)
    assert set(back) == set(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)
    read = flux_config({DENOISER + k: tuple(v.shape) for k, v in bfl.items()}, "test")
    assert {k: read[k] for k in config} == config and read["axes_dims_rope"] == (16, 56, 56)


def test_sd3_table_reads_as_diffusers_does(tiny_source):
    """Our SD3/SD3.5 table writes a file diffusers' own reader turns back into the same weights
    (its reader needs no fixed widths, so the tiny models do), with q/k norms and dual attention."""
    import json

    import torch
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    from edgediff.kernels.dit_names import sd3_config, sd3_pieces

    for name in ("sd3", "sd35"):
        folder = tiny_source(name) / "transformer"
        config = json.loads((folder / "config.json").read_text())
        state = load_file(folder / "diffusion_pytorch_model.safetensors")
        file = scatter(sd3_pieces(config, DENOISER), state)
        theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(file))
        assert set(theirs) == set(state) and all(torch.equal(theirs[k], state[k]) for k in state)
        assert all(torch.equal(v, state[k]) for k, v in gather(sd3_pieces(config, DENOISER), file.__getitem__).items())
        read = sd3_config({k: tuple(v.shape) for k, v in file.items()}, "test")
        assert {k: read[k] for k in read if k in config and k != "sample_size"} == {
            k: (tuple(config[k]) if isinstance(config[k], list) else config[k])
            for k in read if k in config and k != "sample_size"}

"""The built U-Net graphs against diffusers' UNet2DConditionModel through the reference
wrappers (UNetGraph, ShallowUNetGraph): tiny seeded models of SD 1.x, 2.x, SDXL base and
refiner, other widths and heads, and LCM, in LDM names, at two latent sizes, one odd."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import SourceError
from edgediff.families import get_family
from edgediff.kernels.graphs.unet import COND_PROJ, SHALLOW_LAYERS, build_unet, build_unet_shallow
from edgediff.kernels.ldm_names import ldm_shape, unet_name

from built import run
from reference import added_conditioning, torch_wrappers
from tiny_models import CONFIGS

torch = pytest.importorskip("torch")

PREFIX = "model.diffusion_model."
SIZES = ((8, 8), (9, 7))  # latent sizes; 9x7 is a multiple of neither 2 nor 4
# how each family gives its heads: SD 1.x a count, SD 2.x/SDXL a head width; "sdxl-wide" has
# neither (4 and 8 heads on widths 32 and 48): a count per level
HEADS = {"sd1": dict(heads=8), "sd1-deep": dict(heads=4), "sd1-lcm": dict(heads=8), "sd2-v": dict(head_dim=16),
         "sdxl": dict(head_dim=64), "sdxl-refiner": dict(head_dim=64), "sdxl-wide": dict(heads=(4, 8))}


def _reference(name: str, seed: int = 0):
    """(diffusers UNet, its weights under LDM names, the build keywords, the extra inputs' widths)."""
    from diffusers import UNet2DConditionModel


    cfg = CONFIGS[name]
    context = sum(cfg[key]["hidden_size"] for key in ("text", "text_2") if key in cfg)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=context,
                                **cfg["unet"]).eval()
    with torch.no_grad():  # zero-initialised layers (conv_out, proj_out) and unit norms get values of their own
        for param in unet.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    config = dict(unet.config)
    weights = {}
    for key, value in unet.state_dict().items():
        # LCM's projection has no LDM name: diffusers' converter script keeps it as it is
        ldm = PREFIX + COND_PROJ if key == COND_PROJ else unet_name(key, config)
        array = value.numpy()
        weights[ldm] = array.reshape(ldm_shape(ldm, array.shape))
    conditioning = get_family(cfg["family"]).conditioning
    kwargs = dict(HEADS[name], groups=config["norm_num_groups"])
    if config["addition_embed_type"] == "text_time":
        kwargs.update(time_ids=conditioning.time_id_count, time_id_dim=config["addition_time_embed_dim"])
    return unet, weights, kwargs, added_conditioning(unet.config, conditioning)


def _shapes(weights):
    return {name: array.shape for name, array in weights.items()}


def _feeds(unet, extras, size, rng):
    feeds = {"sample": rng.standard_normal((2, unet.config.in_channels, *size), dtype=np.float32),
             "timestep": np.array([999.0, 261.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 5, unet.config.cross_attention_dim), dtype=np.float32)}
    for extra, width in extras.items():
        if extra == "time_ids":  # sizes and crops as SDXL gives them, an aesthetic score for the refiner
            feeds[extra] = np.array([[1024, 768, 0, 32, 1024, 1024][:width], [512, 512, 16, 0, 6, 640][:width]],
                                    np.float32)
        elif extra == "timestep_cond":
            feeds[extra] = rng.standard_normal((2, width), dtype=np.float32) * 3
        else:
            feeds[extra] = rng.standard_normal((2, width), dtype=np.float32)
    return feeds


def _close(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float(np.abs(got - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    assert err <= 1e-4 * scale, f"{what}: max error {err} at magnitude {scale}"
    return err / scale


@pytest.mark.parametrize("name", ["sd1", "sd1-deep", "sd2-v", "sdxl", "sdxl-wide", "sdxl-refiner", "sd1-lcm"])
def test_unet_matches_diffusers(name):
    import reference

    assert SHALLOW_LAYERS == reference.SHALLOW_LAYERS
    UNetGraph, ShallowUNetGraph = torch_wrappers()[1]
    unet, weights, kwargs, extras = _reference(name)
    shapes = _shapes(weights)
    full = build_unet(shapes, deep_cache=True, **kwargs)
    plain = build_unet(shapes, **kwargs)
    shallow = build_unet_shallow(shapes, **kwargs)
    names = ["sample", "timestep", "encoder_hidden_states", *extras]
    assert [i.name for i in full.graph.input] == [i.name for i in plain.graph.input] == names
    assert [i.name for i in shallow.graph.input] == [*names, "deep_feature"]
    assert [o.name for o in full.graph.output] == ["out_sample", "deep_feature"]
    assert [o.name for o in plain.graph.output] == [o.name for o in shallow.graph.output] == ["out_sample"]
    feature_ref = UNetGraph(unet, tuple(extras), feature=True)
    shallow_ref = ShallowUNetGraph(unet, tuple(extras))
    rng = np.random.default_rng(1)
    for size in SIZES:
        feeds = _feeds(unet, extras, size, rng)
        args = [torch.from_numpy(v) for v in feeds.values()]
        with torch.no_grad():
            want, want_feature = (t.numpy() for t in feature_ref(*args))
        got, got_feature = run(full, weights, feeds)
        _close(got, want, f"{name} {size} out_sample")
        _close(got_feature, want_feature, f"{name} {size} deep_feature")
        (got_plain,) = run(plain, weights, feeds)
        assert np.array_equal(got_plain, got)
        # the shallow branch from the reference's deep feature, against the reference's
        feature = want_feature + rng.standard_normal(want_feature.shape, dtype=np.float32)  # not the run's own
        with torch.no_grad():
            want_shallow = shallow_ref(*args, torch.from_numpy(feature)).numpy()
        (got_shallow,) = run(shallow, weights, {**feeds, "deep_feature": feature})
        _close(got_shallow, want_shallow, f"{name} {size} shallow out_sample")
        assert got_shallow.shape == (2, unet.config.out_channels, *size)


def test_missing_tensor_is_named():
    _, weights, kwargs, _ = _reference("sdxl")
    shapes = _shapes(weights)
    for name in (PREFIX + "output_blocks.1.1.transformer_blocks.1.attn2.to_k.weight",
                 PREFIX + "label_emb.0.2.weight", PREFIX + "time_embed.0.weight",
                 PREFIX + "input_blocks.0.0.weight"):
        partial = {k: v for k, v in shapes.items() if k != name}
        with pytest.raises(SourceError, match=name.replace(".", r"\.")) as info:
            build_unet(partial, where="unet.safetensors", **kwargs)
        assert "unet.safetensors" in str(info.value)
    with pytest.raises(SourceError, match=r"input_blocks\.0\.0\.weight"):  # no U-Net at all
        build_unet_shallow({k: v for k, v in shapes.items() if not k.startswith(PREFIX)}, **kwargs)


def test_heads_must_be_given():
    _, weights, _, _ = _reference("sd1")
    with pytest.raises(ValueError, match="head"):
        build_unet(_shapes(weights))
    with pytest.raises(SourceError, match="7-wide heads"):
        build_unet(_shapes(weights), head_dim=7)


@pytest.mark.parametrize("name", ["svd", "svd-deep"])
def test_video_unet_matches_diffusers(name):
    """SVD's spatio-temporal U-Net, from SGM-named shapes, against diffusers'
    UNetSpatioTemporalConditionModel: two videos, frames on the second axis, the conditioning
    frame's latent joined to each. diffusers gives the resnets of its CrossAttnDownBlockSpatioTemporal
    GroupNorms of eps 1e-6 where SGM's VideoUNet (what SVD was trained with, and the graph) has 1e-5:
    the reference takes SGM's here (unpatched, they differ by ~1e-4)."""
    torch = pytest.importorskip("torch")
    from edgediff.kernels.graphs.unet import build_video_unet
    from edgediff.kernels.ldm_names import unet_name

    from tiny_models import svd_modules

    _, unet, _ = svd_modules(name)
    for module in unet.modules():
        if isinstance(module, torch.nn.GroupNorm) and module.eps == 1e-6 and module.num_groups == 32:
            module.eps = 1e-5
    config = dict(unet.config)
    weights = {unet_name(k, config): v.numpy() for k, v in unet.state_dict().items()}
    model = build_video_unet({k: v.shape for k, v in weights.items()}, heads=list(config["num_attention_heads"]),
                             time_id_dim=config["addition_time_embed_dim"])
    rng = np.random.default_rng(0)
    batch, frames, h, w = 2, config["num_frames"], 5, 6
    feeds = {"sample": rng.standard_normal((batch, frames, 4, h, w)).astype(np.float32),
             "image_latents": rng.standard_normal((batch, 4, h, w)).astype(np.float32),
             "timestep": np.array([0.3, -1.2], np.float32),
             "encoder_hidden_states": rng.standard_normal((batch, 1, config["cross_attention_dim"])).astype(np.float32),
             "time_ids": np.array([[6, 127, 0.02], [3, 40, 0.1]], np.float32)}
    (got,) = run(model, weights, feeds)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        joined = torch.cat([t["sample"], t["image_latents"][:, None].expand(batch, frames, 4, h, w)], 2)
        want = unet(joined, t["timestep"], t["encoder_hidden_states"], t["time_ids"]).sample.numpy()
    assert got.shape == want.shape == (batch, frames, 4, h, w)
    assert np.abs(got - want).max() <= 1e-4
    with torch.no_grad():  # frames matter: the same frames in another order are not the same video
        swapped = unet(joined.flip(1), t["timestep"], t["encoder_hidden_states"], t["time_ids"]).sample.flip(1).numpy()
    assert np.abs(swapped - want).max() > 1e-2

"""The CLIP text encoder graph written from shapes against transformers' CLIPTextModel and
CLIPTextModelWithProjection: tiny seeded models, their weights named as single files name them
(transformers' names with and without `text_model.`, OpenCLIP's with fused q/k/v), every layer's
hidden states (normed and not) and the pooled or projected output."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import SourceError
from edgediff.kernels.graphs.clip import build_clip
from edgediff.kernels.ldm_names import clip_name

from built import run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS = 49407
BASE = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=EOS, pad_token_id=1)
# the tiny configs' encoders (tests/tiny_models.py): SD 1.x's, SDXL's second, SD3's two
SD1 = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=1, intermediate_size=128, hidden_act="quick_gelu")
SD2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, hidden_act="gelu")
XL2 = dict(SD1, hidden_act="gelu", projection_dim=32)
SD3_L = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=1, intermediate_size=64, projection_dim=16,
             hidden_act="quick_gelu")
SD3_G = dict(SD3_L, hidden_size=48, hidden_act="gelu", projection_dim=24)
WIDE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, projection_dim=8,
            hidden_act="gelu")  # 8-wide heads: head_dim=8


def _model(config: dict, projection: bool, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(transformers.CLIPTextConfig(**(BASE | config | extra))).eval()
    with torch.no_grad():  # transformers' init leaves the layer norms at 1 and 0: vary them too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(batch: int = 2, sequence: int = 77, seed: int = 1) -> np.ndarray:
    """Random tokens, each row ended at a different place and padded with end-of-text (so the
    first EOS, not the last, is the pooled one)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, EOS - 1, (batch, sequence))
    ids[:, 0] = EOS - 1
    for b in range(batch):
        ids[b, 3 + 2 * b:] = EOS
    return ids


def _reference(model, ids: np.ndarray, norm_hidden: bool):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
        layers = out.hidden_states[1:]
        if norm_hidden:
            norm = getattr(model, "text_model", model).final_layer_norm
            layers = [norm(h) for h in layers]
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return torch.stack(layers).numpy(), pooled.numpy()


def _hf_state(model, prefix: str, text_model: bool = True) -> dict:
    """As LDM files name it (kernels.ldm_names.clip_name), or without `text_model.`."""
    out = {}
    for key, value in model.state_dict().items():
        name = clip_name(key, prefix)
        out[name if text_model else name.replace("text_model.", "")] = value.numpy()
    return out


def _open_clip_state(model, prefix: str) -> dict:
    from edgediff.benchmarks.single_file import open_clip_state

    return {k: v.numpy() for k, v in open_clip_state(model.state_dict(), prefix).items()}


def _check(state: dict, model, prefix: str, layout: str, *, norm_hidden: bool, projection: bool, head_dim: int = 64,
           ids: np.ndarray | None = None, eos_token_id: int = EOS):
    ids = _ids() if ids is None else ids
    shapes = {k: v.shape for k, v in state.items()}
    graph = build_clip(shapes, prefix, layout, hidden_act=model.config.hidden_act, head_dim=head_dim,
                       norm_hidden=norm_hidden, projection=projection, eos_token_id=eos_token_id)
    hidden, pooled = run(graph, state, {"input_ids": ids})
    want_hidden, want_pooled = _reference(model, ids, norm_hidden)
    assert hidden.shape == want_hidden.shape and pooled.shape == want_pooled.shape
    err = max(np.abs(hidden - want_hidden).max(), np.abs(pooled - want_pooled).max())
    assert err < 1e-4, err
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    width = model.config.hidden_size
    assert dims["hidden_states"] == [model.config.num_hidden_layers, "batch", "sequence", width]
    assert dims["pooled_output"] == ["batch", model.config.projection_dim if projection else width]
    return err


@pytest.mark.parametrize("norm_hidden", [True, False])
def test_hf_layout(norm_hidden):
    """SD 1.x's encoder as LDM files hold it (quick_gelu), at 77 tokens and at 9."""
    model = _model(SD1, projection=False)
    prefix = "cond_stage_model.transformer."
    state = _hf_state(model, prefix)
    _check(state, model, prefix, "hf", norm_hidden=norm_hidden, projection=False)
    _check(state, model, prefix, "hf", norm_hidden=norm_hidden, projection=False, ids=_ids(3, 9, seed=2))


@pytest.mark.parametrize("config,head_dim", [(XL2, 64), (SD3_L, 64), (SD3_G, 64), (WIDE, 8)])
def test_hf_layout_projection(config, head_dim):
    """The projected encoders (gelu and quick_gelu, one head and four), with and without the
    `text_model.` part of the names."""
    model = _model(config, projection=True)
    for prefix, text_model in (("conditioner.embedders.1.model.", True), ("text_encoders.clip_g.transformer.", False)):
        state = _hf_state(model, prefix, text_model)
        assert (prefix + "text_model.encoder.layers.0.mlp.fc1.weight" in state) == text_model
        _check(state, model, prefix, "hf", norm_hidden=False, projection=True, head_dim=head_dim)


def test_hf_layout_unprojected_pooled_of_projected_model():
    """projection=False on a file that has the projection: the pooled output, unprojected."""
    model = _model(XL2, projection=True)
    prefix = "cond_stage_model.transformer."
    state = _hf_state(model, prefix)
    base = transformers.CLIPTextModel(model.config).eval()
    base.load_state_dict({k.removeprefix("text_model."): v for k, v in model.state_dict().items()
                          if k.startswith("text_model.")})
    _check(state, base, prefix, "hf", norm_hidden=True, projection=False)


def test_hf_layout_stored_transposed_projection():
    """stable-diffusion.cpp's files: transformers' names, OpenCLIP's [width, embed] projection
    as `text_model.text_projection`."""
    model = _model(XL2, projection=True)
    prefix = "cond_stage_model.1.transformer."
    state = {clip_name(k, prefix, open_clip=True): v.numpy() for k, v in model.state_dict().items()}
    name = prefix + "text_model.text_projection"
    state[name] = np.ascontiguousarray(state[name].T)
    assert state[name].shape == (64, 32)
    _check(state, model, prefix, "hf", norm_hidden=False, projection=True)


@pytest.mark.parametrize("config,projection,norm_hidden,head_dim", [
    (SD2, False, True, 32),  # SD 2.x: 64 wide in two heads, gelu
    (SD2, False, False, 32),
    (XL2, True, False, 64),  # SDXL's second encoder
    (dict(SD3_G, hidden_act="quick_gelu"), True, True, 64),
    (WIDE, True, False, 8),
])
def test_open_clip_layout(config, projection, norm_hidden, head_dim):
    model = _model(config, projection=projection)
    prefix = "conditioner.embedders.1.model."
    state = _open_clip_state(model, prefix)
    assert state[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * config["hidden_size"],
                                                                                   config["hidden_size"])
    _check(state, model, prefix, "open_clip", norm_hidden=norm_hidden, projection=projection, head_dim=head_dim,
           ids=_ids(2, 13, seed=3))


def test_open_clip_fused_qkv_is_one_matmul():
    model = _model(SD2, projection=False)
    prefix = "cond_stage_model.model."
    shapes = {k: v.shape for k, v in _open_clip_state(model, prefix).items()}
    graph = build_clip(shapes, prefix, "open_clip", hidden_act="gelu", head_dim=32, norm_hidden=True,
                       projection=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MultiHeadAttention") == 2 and ops.count("Split") == 2
    # the fused weight is read whole: one Transpose of it, no Slice or Gather of it
    users = [n for n in graph.graph.node if prefix + "transformer.resblocks.0.attn.in_proj_weight" in n.input]
    assert [n.op_type for n in users] == ["Transpose"]


def test_eos_position():
    """No EOS in a row pools position 0 (as transformers has it); eos_token_id 2 (configs before
    transformers' fix) pools at the largest id."""
    ids = _ids(3, 11, seed=4)
    ids[2, :] = 5  # no end-of-text at all
    model = _model(SD3_L, projection=True)
    prefix = "cond_stage_model.transformer."
    _check(_hf_state(model, prefix), model, prefix, "hf", norm_hidden=True, projection=True, ids=ids)
    old = _model(SD3_L, projection=True, eos_token_id=2)
    assert old.text_model.eos_token_id == 2
    ids = _ids(2, 11, seed=5)
    ids[0, 6:] = 0  # padded after the end with a smaller id than the end's
    _check(_hf_state(old, prefix), old, prefix, "hf", norm_hidden=False, projection=True, ids=ids, eos_token_id=2)


@pytest.mark.parametrize("layout,missing", [
    ("hf", "text_model.encoder.layers.1.mlp.fc2.weight"),
    ("hf", "text_model.final_layer_norm.weight"),
    ("hf", "text_projection.weight"),
    ("open_clip", "transformer.resblocks.0.attn.in_proj_weight"),
    ("open_clip", "positional_embedding"),
    ("open_clip", "text_projection"),
])
def test_missing_tensor(layout, missing):
    model = _model(XL2, projection=True)
    prefix = "cond_stage_model.transformer."
    state = _hf_state(model, prefix) if layout == "hf" else _open_clip_state(model, prefix)
    shapes = {k: v.shape for k, v in state.items() if k != prefix + missing}
    assert len(shapes) == len(state) - 1
    with pytest.raises(SourceError, match="no tensor '" + (prefix + missing).replace(".", r"\.") + "'"):
        build_clip(shapes, prefix, layout, hidden_act="gelu", norm_hidden=True, projection=True, where="x.safetensors")


def test_no_text_encoder():
    with pytest.raises(SourceError, match="token_embedding"):
        build_clip({"model.diffusion_model.x": (1,)}, "cond_stage_model.transformer.", "hf", hidden_act="quick_gelu",
                   norm_hidden=True, projection=False)

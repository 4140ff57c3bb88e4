"""Torch modules -> one ONNX graph per component, with the input/output contract the runtime
relies on. Uses torch.onnx's TorchScript exporter without constant folding and without
merging weights of equal value, so every weight is its own initializer under its state-dict name
(what the quantizers and GGUF binding look weights up by); onnxruntime folds constants itself
when it loads the graph.

Attention is written as one `com.microsoft.MultiHeadAttention` node instead of the
MatMul-Softmax-MatMul that torch traces: onnxruntime runs it as flash attention on the CPU (CUDA has
its own kernels for it), so the queries x keys score matrix (1 GiB per layer for SD 1.5 at
512x512) never exists; the quantizers leave it in float."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgediff.errors import require
from edgediff.kernels.bind import placeholder
from edgediff.kernels.graph import external_tensor

OPSET = 18
# DeepCache's shallow branch recomputes the last up block's last two layers (and the first down
# layer whose output one of them joins), its paper's finest setting for SD (branch 0, layer 0)
SHALLOW_LAYERS = 2
EXTERNAL_DATA_LIMIT = 1_800_000_000  # protobuf cannot hold 2 GiB: larger graphs keep weights beside


@dataclass(frozen=True)
class Contract:
    """Names and dynamic axes of one component's graph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


TEXT_ENCODER = Contract(
    ("input_ids",),
    ("hidden_states", "pooled_output"),
    {"input_ids": {0: "batch"}, "hidden_states": {1: "batch"}, "pooled_output": {0: "batch"}},
)
T5_ENCODER = Contract(("input_ids",), ("hidden_states",), {"input_ids": {0: "batch"}, "hidden_states": {1: "batch"}})
UNET = Contract(
    ("sample", "timestep", "encoder_hidden_states"),
    ("out_sample",),
    {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "sequence"},
        "out_sample": {0: "batch", 2: "height", 3: "width"},
    },
)
VAE_DECODER = Contract(
    ("latent_sample",),
    ("sample",),
    {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "height", 3: "width"}},
)
VAE_ENCODER = Contract(
    ("sample",),
    ("latent_parameters",),
    {"sample": {0: "batch", 2: "height", 3: "width"}, "latent_parameters": {0: "batch", 2: "height", 3: "width"}},
)


def _wrappers():
    torch = require("torch", "convert", "Exporting to ONNX")

    class TextEncoderGraph(torch.nn.Module):
        """All hidden layers stacked (so clip-skip is chosen at run time) plus the pooled output."""

        def __init__(self, model, norm_hidden: bool):
            super().__init__()
            self.model, self.norm_hidden = model, norm_hidden

        def forward(self, input_ids):
            if self.model.config.model_type == "t5":  # its last layer, normed, is all it gives
                return self.model(input_ids=input_ids).last_hidden_state[None]
            out = self.model(input_ids=input_ids, output_hidden_states=True)
            layers = out.hidden_states[1:]
            if self.norm_hidden:
                norm = getattr(self.model, "text_model", self.model).final_layer_norm
                layers = [norm(h) for h in layers]
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            return torch.stack(layers, 0), pooled

    class UNetGraph(torch.nn.Module):
        """The UNet with its added conditioning (SDXL's `text_embeds`, `time_ids`, LCM's
        `timestep_cond`) as named inputs; with `feature`, also the deep features the shallow
        branch reuses (what enters the last up block's last SHALLOW_LAYERS layers, before their
        skip connections join)."""

        def __init__(self, unet, extras: tuple[str, ...], feature: bool = False):
            super().__init__()
            self.unet, self.extras, self.feature = unet, extras, feature

        def forward(self, sample, timestep, encoder_hidden_states, *extras):
            added = dict(zip(self.extras, extras, strict=True))
            kwargs = {"timestep_cond": added.pop("timestep_cond")} if "timestep_cond" in added else {}
            run = lambda: self.unet(sample, timestep, encoder_hidden_states, return_dict=False,  # noqa: E731
                                    **({"added_cond_kwargs": added} if added else {}), **kwargs)[0]
            if not self.feature:
                return run()
            seen = []
            skip = self.unet.config.block_out_channels[0]  # conv_in's and the first down layers' width
            layer = self.unet.up_blocks[-1].resnets[-SHALLOW_LAYERS]
            hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, :args[0].shape[1] - skip]))
            try:
                out = run()
            finally:
                hook.remove()
            return out, seen[0]

    class ShallowUNetGraph(torch.nn.Module):
        """DeepCache's shallow branch (Ma et al. 2023): the time embedding, conv_in, the first
        SHALLOW_LAYERS - 1 down layers (whose outputs are the skips it needs), then the last
        SHALLOW_LAYERS up layers fed `deep_feature` from an earlier step's full run, and conv_out."""

        def __init__(self, unet, extras: tuple[str, ...]):
            super().__init__()
            self.unet, self.extras = unet, extras

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            *extras, feature = rest
            u, added = self.unet, dict(zip(self.extras, extras, strict=True))
            emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), added.pop("timestep_cond", None))
            aug = u.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
            emb = emb + aug if aug is not None else emb
            if u.time_embed_act is not None:
                emb = u.time_embed_act(emb)

            def layer(block, j, h):
                h = block.resnets[j](h, emb)
                if getattr(block, "attentions", None):
                    h = block.attentions[j](h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
                return h

            skips = [u.conv_in(sample)]
            for j in range(SHALLOW_LAYERS - 1):
                skips.append(layer(u.down_blocks[0], j, skips[-1]))
            h, up = feature, u.up_blocks[-1]
            for j in range(len(up.resnets) - SHALLOW_LAYERS, len(up.resnets)):
                h = layer(up, j, torch.cat([h, skips.pop()], 1))
            if u.conv_norm_out is not None:
                h = u.conv_act(u.conv_norm_out(h))
            return u.conv_out(h)

    class TransformerGraph(torch.nn.Module):
        """A DiT under the UNet's contract: `sample`, `timestep` (0..1000), the text context, and
        the pooled text as `text_embeds` (SD3's `pooled_projections`)."""

        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds):
            return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=text_embeds, return_dict=False)[0]

    class FluxGraph(torch.nn.Module):
        """Flux under the same contract, with unpacked latents in and out: the 2x2 patches are
        packed and the position ids made here, from the latent's size (as FluxPipeline packs
        them); its timestep (and dev's guidance) are taken /1000 and x1 as FluxPipeline gives them."""

        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, *guidance):
            b, c, h, w = sample.shape
            packed = sample.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
            rows = torch.arange(h // 2, dtype=sample.dtype)[:, None].expand(h // 2, w // 2)
            cols = torch.arange(w // 2, dtype=sample.dtype)[None, :].expand(h // 2, w // 2)
            img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, dtype=sample.dtype)
            out = self.transformer(hidden_states=packed, encoder_hidden_states=encoder_hidden_states,
                                   pooled_projections=text_embeds, timestep=timestep / 1000, img_ids=img_ids,
                                   txt_ids=txt_ids, guidance=guidance[0] if guidance else None, return_dict=False)[0]
            return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    class VaeDecoderGraph(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    class VaeEncoderGraph(torch.nn.Module):
        """Mean and log-variance (the `moments`), so the runtime samples the latent itself."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, sample):
            moments = self.vae.encoder(sample)
            if self.vae.quant_conv is not None:
                moments = self.vae.quant_conv(moments)
            return moments

    return TextEncoderGraph, (UNetGraph, ShallowUNetGraph), {"SD3Transformer2DModel": TransformerGraph, "FluxTransformer2DModel": FluxGraph}, \
        VaeDecoderGraph, VaeEncoderGraph


@functools.cache
def _multi_head_attention():
    """attention(q, k, v) on [B, S, heads * D] that exports as one com.microsoft MultiHeadAttention."""
    torch = require("torch", "convert", "Exporting to ONNX")

    class MultiHeadAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, heads: int):
            batch = query.shape[0]

            def split(x):
                return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

            out = torch._C._nn.scaled_dot_product_attention(split(query), split(key), split(value))
            return out.transpose(1, 2).reshape(batch, -1, value.shape[-1])

        @staticmethod
        def symbolic(g, query, key, value, heads: int):
            return g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads
                        ).setType(query.type())

    return MultiHeadAttention


@contextlib.contextmanager
def _fused_sdpa():
    """torch's scaled_dot_product_attention on [B, heads, S, D] (the DiTs' joint attention, any
    attention diffusers runs itself) traced as one MultiHeadAttention node when it has no mask and
    the default scale: onnxruntime's flash attention instead of a tokens x tokens score matrix per
    head (2 GB per Flux layer at 1024x1024). Masked or causal attention (CLIP, T5) stays as it is."""
    torch = require("torch", "convert", "Exporting to ONNX")
    functional = torch.nn.functional
    stock = functional.scaled_dot_product_attention
    mha = _multi_head_attention()

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if (attn_mask is not None or is_causal or scale is not None or enable_gqa or query.dim() != 4
                or key.shape[1] != query.shape[1]):
            return stock(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        heads, dim = int(query.shape[1]), int(query.shape[3])
        out = mha.apply(*(x.transpose(1, 2).flatten(2) for x in (query, key, value)), heads)
        # a view from the output's own sizes: `unflatten` would let the tracer fold its length
        return out.view(out.shape[0], out.shape[1], heads, dim).transpose(1, 2)

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = stock


def _fused_attention():
    """A diffusers attention processor whose product of queries, keys and values exports as one
    MultiHeadAttention node; attention it cannot express (masks, spatial or q/k norms) goes
    through diffusers' own processor."""
    require("torch", "convert", "Exporting to ONNX")
    from diffusers.models.attention_processor import AttnProcessor2_0

    MultiHeadAttention = _multi_head_attention()

    class FusedAttention:
        stock = AttnProcessor2_0()

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     temb=None, *args, **kwargs):
            if (attention_mask is not None or attn.spatial_norm is not None
                    or attn.norm_q is not None or attn.norm_k is not None):
                return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            residual = hidden_states
            image = hidden_states.shape if hidden_states.ndim == 4 else None
            if image:
                hidden_states = hidden_states.flatten(2).transpose(1, 2)
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if encoder_hidden_states is not None and attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            out = MultiHeadAttention.apply(attn.to_q(hidden_states), attn.to_k(context),
                                           attn.to_v(context), attn.heads)
            out = attn.to_out[1](attn.to_out[0](out))
            if image:
                out = out.transpose(1, 2).reshape(image)
            if attn.residual_connection:
                out = out + residual
            return out / attn.rescale_output_factor

    return FusedAttention()


@contextlib.contextmanager
def _traceable_rotary():
    """diffusers' rotary embedding reshapes by `*x.shape[:-1]`, which the tracer records as
    constants (a Flux graph would then run at the traced size only); the same product with the
    sizes left to the graph."""
    torch = require("torch", "convert", "Exporting to ONNX")
    from diffusers.models.transformers import transformer_flux

    stock = transformer_flux.apply_rotary_emb

    def rotary(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        if not use_real or use_real_unbind_dim != -1:
            return stock(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = (f[None, None] if sequence_dim == 2 else f[None, :, None] for f in freqs_cis)
        real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(3)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    transformer_flux.apply_rotary_emb = rotary
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = stock


def _rms_norm_symbolic():
    """`aten::rms_norm` (torch.nn.RMSNorm, Flux's q/k norms) has no ONNX form before opset 23:
    written out as x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    torch = require("torch", "convert", "Exporting to ONNX")
    from torch.onnx import symbolic_helper

    def rms_norm(g, x, normalized_shape, weight, eps):
        shape = symbolic_helper._maybe_get_const(normalized_shape, "is")
        if len(shape) != 1:
            return symbolic_helper._unimplemented("rms_norm", "normalized over more than one axis", x)
        eps = symbolic_helper._maybe_get_const(eps, "f")
        eps = torch.finfo(torch.float32).eps if symbolic_helper._is_none(eps) or eps is None else float(eps)
        mean = g.op("ReduceMean", g.op("Mul", x, x), g.op("Constant", value_t=torch.tensor([-1])), keepdims_i=1)
        out = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps)))))
        return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)

    torch.onnx.register_custom_op_symbolic("aten::rms_norm", rms_norm, OPSET)


def export_graph(module, args: tuple, contract: Contract, path: Path, weights: bool = True) -> list[Path]:
    """Export `module` to `path` (weights beside it in `model.onnx_data` when too large), or
    without `weights` as a graph whose weights are placeholders (`kernels.bind`), bound from
    the source files when it runs. Returns the files written.

    The graph is traced without its weights (`export_params=False`), then each weight is
    written from the module's own tensor, one at a time: no second copy of the model exists
    while converting, which is what lets a 10 GB SDXL UNet convert in the memory of a laptop."""
    torch = require("torch", "convert", "Exporting to ONNX")
    onnx = require("onnx", "convert", "Exporting to ONNX")
    from onnx import TensorProto, numpy_helper

    path.parent.mkdir(parents=True, exist_ok=True)
    _rms_norm_symbolic()
    module.eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings(), _fused_sdpa():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(raw), dynamo=False, opset_version=OPSET, export_params=False,
                input_names=list(contract.inputs), output_names=list(contract.outputs),
                dynamic_axes=contract.dynamic_axes, do_constant_folding=False,
                keep_initializers_as_inputs=True,  # every weight an input under its state-dict name, none merged
            )
        model = onnx.load(str(raw))
    state = module.state_dict()
    names = [i.name for i in model.graph.input if i.name in state]
    inputs = [i for i in model.graph.input if i.name not in state]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    if not weights:  # float weights are bound later; other buffers (integer ids) keep their values
        model.graph.initializer.extend(
            placeholder(n, TensorProto.FLOAT, state[n].shape) if state[n].is_floating_point()
            else numpy_helper.from_array(state[n].detach().contiguous().numpy(), n) for n in names)
        onnx.save_model(model, str(path))
        return [path]
    size = sum(state[n].numel() * state[n].element_size() for n in names)
    external = size > EXTERNAL_DATA_LIMIT
    data = path.parent / (path.name + "_data")
    with open(data, "wb") if external else contextlib.nullcontext() as sink:
        for name in names:
            array = state[name].detach().contiguous().numpy()
            model.graph.initializer.append(external_tensor(array, name, sink, data.name) if external
                                           else numpy_helper.from_array(array, name))
    onnx.save_model(model, str(path))
    if not external:
        return [path]
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(data, 0o666 & ~umask)  # as the graph's own mode
    return [path, data]


def added_conditioning(config, conditioning) -> dict[str, int]:
    """The UNet's inputs besides sample, timestep and text, with their widths: SDXL's pooled text
    and `time_ids` (each id embedded in `addition_time_embed_dim` channels), LCM's guidance
    embedding `timestep_cond`."""
    extras = {}
    if config.addition_embed_type == "text_time":
        ids = conditioning.time_id_count
        extras.update(text_embeds=config.projection_class_embeddings_input_dim - ids * config.addition_time_embed_dim,
                      time_ids=ids)
    if config.time_cond_proj_dim:
        extras["timestep_cond"] = config.time_cond_proj_dim
    return extras


def _release(module):
    """What the pipeline keeps of an exported module: its config. Once the caller drops its own
    reference the weights are freed (a diffusers folder's are mapped from the file, and mapped
    pages count as resident once read), so one component at a time is in memory: converting
    full-size SDXL peaks at the UNet's 10 GB plus the exporter's own, not at the whole model."""
    import types

    return types.SimpleNamespace(config=module.config)


def _export_unet(graphs, unet, conditioning, out_dir: Path, graph=export_graph,
                 deep_cache: bool = False) -> dict[str, list[Path]]:
    """The UNet's graph; with `deep_cache`, it also gives its deep features, and the shallow
    branch that reuses them is written as `unet_shallow`."""
    torch = require("torch", "convert", "Exporting to ONNX")
    UNetGraph, ShallowUNetGraph = graphs
    unet.set_attn_processor(_fused_attention())
    channels = unet.config.in_channels
    context = unet.config.cross_attention_dim
    # An odd latent size makes diffusers trace explicit upsample sizes, so the graph works for
    # every latent size, not only multiples of 2**levels.
    side = 2 ** (len(unet.config.block_out_channels) - 1) + 1
    extras = added_conditioning(unet.config, conditioning)
    axes = {**UNET.dynamic_axes, **{name: {0: "batch"} for name in extras}}
    args = (torch.randn(1, channels, side, side), torch.tensor([999.0]), torch.randn(1, 77, context),
            *(torch.randn(1, width) for width in extras.values()))
    feature = {"deep_feature": {0: "batch", 2: "height", 3: "width"}}
    written = {"unet": graph(
        UNetGraph(unet, tuple(extras), feature=deep_cache), args,
        Contract(UNET.inputs + tuple(extras), UNET.outputs + tuple(feature if deep_cache else ()),
                 {**axes, **(feature if deep_cache else {})}),
        out_dir / "unet" / "model.onnx")}
    if deep_cache:
        with torch.no_grad():
            deep = UNetGraph(unet, tuple(extras), feature=True)(*args)[1]
        written["unet_shallow"] = graph(
            ShallowUNetGraph(unet, tuple(extras)), (*args, deep),
            Contract(UNET.inputs + tuple(extras) + ("deep_feature",), UNET.outputs, {**axes, **feature}),
            out_dir / "unet_shallow" / "model.onnx")
    return written


def export_components(pipe, out_dir: Path, progress=None, deep_cache: bool = False) -> dict[str, list[Path]]:
    """Export every component of a TorchPipeline under `out_dir` in optimum's folder layout,
    releasing each module once it is written."""
    torch = require("torch", "convert", "Exporting to ONNX")
    TextEncoderGraph, UNetGraph, dit_graphs, VaeDecoderGraph, VaeEncoderGraph = _wrappers()
    written: dict[str, list[Path]] = {}
    graph = functools.partial(export_graph, weights=not pipe.weightless)

    def step(name: str) -> None:
        if progress:
            progress(name)

    for i, (spec, model, tokenizer) in enumerate(pipe.text_encoders):
        step(spec.component)
        pipe.ready(spec.component)
        ids = torch.zeros((1, spec.max_length), dtype=torch.int64)
        written[spec.component] = graph(
            TextEncoderGraph(model, spec.norm_hidden), (ids,), T5_ENCODER if spec.kind == "t5" else TEXT_ENCODER,
            out_dir / spec.component / "model.onnx",
        )
        pipe.text_encoders[i] = (spec, _release(model), tokenizer)
        del model

    name = pipe.family.denoiser
    pipe.ready(name)
    pipe.ready("vae")
    denoiser, vae = pipe.denoiser, pipe.vae
    step(name)
    if name == "unet":
        written.update(_export_unet(UNetGraph, denoiser, pipe.family.conditioning, out_dir, graph, deep_cache))
    else:
        config = denoiser.config
        flux = pipe.family.denoiser_class == "FluxTransformer2DModel"
        extras = ("text_embeds", "guidance") if pipe.conditioning.guidance_input else ("text_embeds",)
        contract = Contract(UNET.inputs + extras, UNET.outputs,
                            {**UNET.dynamic_axes, **{e: {0: "batch"} for e in extras}})
        channels = config.in_channels // 4 if flux else config.in_channels  # Flux counts packed channels
        with _traceable_rotary():
            written[name] = graph(
                dit_graphs[pipe.family.denoiser_class](denoiser),
                (torch.randn(1, channels, 8, 8), torch.tensor([999.0]), torch.randn(1, 7, config.joint_attention_dim),
                 torch.randn(1, config.pooled_projection_dim), *([torch.tensor([3.5])] if len(extras) > 1 else [])),
                contract, out_dir / name / "model.onnx",
            )
    pipe.denoiser = _release(denoiser)
    del denoiser
    vae.set_attn_processor(_fused_attention())
    latent = vae.config.latent_channels
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    step("vae_decoder")
    written["vae_decoder"] = graph(
        VaeDecoderGraph(vae), (torch.randn(1, latent, 8, 8),), VAE_DECODER,
        out_dir / "vae_decoder" / "model.onnx",
    )
    step("vae_encoder")
    written["vae_encoder"] = graph(
        VaeEncoderGraph(vae), (torch.randn(1, vae.config.in_channels, 8 * down, 8 * down),), VAE_ENCODER,
        out_dir / "vae_encoder" / "model.onnx",
    )
    pipe.vae = _release(vae)
    return written

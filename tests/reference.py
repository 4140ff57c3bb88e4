"""Reference pipelines: diffusers built from the same tiny models, for parity tests; and what a
package's graphs store, read back with onnx."""

from __future__ import annotations

import re

import numpy as np

PROMPT = "a red circle on a blue background, high quality"
NEGATIVE = "blurry, low quality"


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit images (inf when identical)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def diffusers_pipeline(folder, img2img: bool = False):
    """The pipeline class the folder's model_index.json names (its image-to-image twin when
    `img2img`)."""
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    cls = AutoPipelineForImage2Image if img2img else DiffusionPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if "XL" not in _class_name(folder) else {}
    pipe = cls.from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _class_name(folder) -> str:
    import json
    from pathlib import Path

    return json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]


def _at_timesteps(cls, timesteps_fn):
    """A diffusers scheduler class that samples at our schedule's timesteps (for schedulers
    that take no custom timesteps); the update rule stays diffusers' own."""
    import torch

    class AtTimesteps(cls):
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            super().set_timesteps(num_inference_steps, device, **kw)
            t = timesteps_fn(num_inference_steps)
            table = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
            sigmas = np.interp(t, np.arange(len(table)), table)
            self.sigmas = torch.from_numpy(np.append(sigmas, 0.0)).float()
            self.timesteps = torch.from_numpy(t.astype(np.int64))

    return AtTimesteps


def diffusers_scheduler(sampler: str, schedule: str, config, ours_schedule):
    """The diffusers scheduler (built from the model's scheduler config) that `sampler` with
    `schedule` must reproduce, and extra pipeline arguments."""
    import diffusers as d

    from edgediff.runtime.schedules import spaced_timesteps

    def timesteps(n):
        return spaced_timesteps(ours_schedule, n)

    if str(config.get("_class_name", "")).startswith("FlowMatch"):  # rectified flow (SD3, Flux)
        cls = {"euler": d.FlowMatchEulerDiscreteScheduler, "heun": d.FlowMatchHeunDiscreteScheduler}[sampler]
        return cls.from_config(config), {}

    # diffusers draws karras sigmas between the extremes of the spaced timesteps: linspace
    # spacing reaches t = 999 and t = 0, the full range karras is defined on
    leading = {"timestep_spacing": "linspace" if schedule == "karras" else ours_schedule.timestep_spacing}
    karras = {"use_karras_sigmas": True} if schedule == "karras" else {}
    if sampler in ("euler", "euler_a", "heun", "ddim"):
        cls = {"euler": d.EulerDiscreteScheduler, "euler_a": d.EulerAncestralDiscreteScheduler,
               "heun": d.HeunDiscreteScheduler, "ddim": d.DDIMScheduler}[sampler]
        return cls.from_config(config, **leading, **karras), {}
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        algo = {"algorithm_type": "sde-dpmsolver++"} if sampler == "dpmpp_2m_sde" else {}
        sched = d.DPMSolverMultistepScheduler.from_config(config, **algo, **karras)
        return sched, ({"timesteps": timesteps} if schedule == "normal" else {})
    if sampler == "unipc":
        return _at_timesteps(d.UniPCMultistepScheduler, timesteps).from_config(config), {}
    if sampler == "lcm":
        return d.LCMScheduler.from_config(config), {}
    raise KeyError(sampler)


def onnx_graph(package, component="unet", external=False):
    """A component's graph read back with onnx (its weights too with `external`)."""
    import onnx

    return onnx.load(str(package / component / "model.onnx"), load_external_data=external)


def state_name(initializer: str) -> str:
    """The state-dict name of a weight the precision passes renamed (folded, quantized)."""
    return re.sub(r"(\.transposed)?(_Q\d)?$", "", initializer)


def stored_types(package, component="unet") -> dict[str, str]:
    """The type each Conv/MatMul/Gemm weight of a component is stored in, read back from its
    graph: the initializer behind the node (through DequantizeLinear, Transpose, Cast), and for
    MatMulNBits the code width its packed blocks hold ('INT4', 'INT8'); keyed by state-dict name."""
    import onnx

    model = onnx_graph(package, component)
    inits = {t.name: t for t in model.graph.initializer}
    made_by = {out: node for node in model.graph.node for out in node.output}
    types = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            b = inits[node.input[1]]
            # B is [N, blocks, block * bits / 8] bytes: the layout says the width, not only the attribute
            assert tuple(b.dims) == (attrs["N"], -(-attrs["K"] // attrs["block_size"]),
                                     attrs["block_size"] * attrs["bits"] // 8), node.name
            assert b.data_type == onnx.TensorProto.UINT8
            types[state_name(b.name)] = f"INT{attrs['bits']}"
        elif node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1:
            name = node.input[1]
            while name not in inits and name in made_by and made_by[name].op_type in (
                    "DequantizeLinear", "Transpose", "Cast"):
                name = made_by[name].input[0]
            if name in inits:
                types[state_name(name)] = onnx.TensorProto.DataType.Name(inits[name].data_type)
    assert types, f"no weights found in {component}"
    return types


SHALLOW_LAYERS = 2  # DeepCache's shallow branch (kernels.graphs.unet)


def torch_wrappers():
    """The torch modules edgediff's graphs are held to: diffusers/transformers models under the
    graphs' contracts (text encoders' stacked layers, the U-Net's added conditioning and DeepCache
    branches, the DiTs' packing). (TextEncoderGraph, (UNetGraph, ShallowUNetGraph), DiTs by class,
    VaeDecoderGraph, VaeEncoderGraph)."""
    import torch


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

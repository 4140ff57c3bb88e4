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

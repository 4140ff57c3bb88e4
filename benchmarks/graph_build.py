"""How long building each component's graph takes for the full-size architectures: the shapes of
SD 1.5, SDXL, SD3.5-medium and FLUX.1-schnell (modules on torch's meta device: no weights), in
a diffusers folder's names (what `edgediff convert FOLDER` builds) and, for the DiTs, in their
single files' names (what `edgediff generate --model FILE.gguf` builds once).

    edgediff bench graph_build
"""

from __future__ import annotations

import time


def _folder(name: str):
    """(family, the folder's tensor shapes by `component.name`, the components' configs)."""
    import diffusers
    import torch
    import transformers

    from edgediff.benchmarks.synthetic import ARCHITECTURES
    from edgediff.benchmarks.synthetic_dit import DIT_ARCHITECTURES
    from edgediff.families import get_family

    arch = {**ARCHITECTURES, **DIT_ARCHITECTURES}[name]
    family = get_family(arch.get("family", "sd1"))
    texts = arch["text"] if isinstance(arch["text"], tuple) else (arch["text"], *([arch["text_2"]] if "text_2" in arch else []))
    configs, shapes = {}, {}
    with torch.device("meta"):
        modules = {"vae": diffusers.AutoencoderKL(**arch["vae"])}
        denoiser = arch.get("transformer", arch.get("unet"))
        modules[family.denoiser] = getattr(diffusers, family.denoiser_class)(**denoiser)
        for spec, config in zip(family.text_encoders, texts, strict=True):
            if spec.kind == "t5":
                modules[spec.component] = transformers.T5EncoderModel(transformers.T5Config(**config))
            else:
                cls = transformers.CLIPTextModelWithProjection if spec.kind == "clip_projection" else \
                    transformers.CLIPTextModel
                modules[spec.component] = cls(transformers.CLIPTextConfig(**config))
    for component, module in modules.items():
        configs[component] = dict(module.config) if hasattr(module.config, "keys") else module.config.to_dict()
        shapes.update({f"{component}.{k}": tuple(v.shape) for k, v in module.state_dict().items()
                       if v.is_floating_point()})
    return family, shapes, configs


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="edgediff bench graph_build", description=__doc__.split("\n\n")[0]).parse_args(argv)
    from edgediff.convert.build import folder_graphs
    from edgediff.kernels.graphs.models import model_graphs

    rows = []
    for name in ("sd15", "sdxl", "sd35-medium", "flux-schnell"):
        family, shapes, configs = _folder(name)
        layouts = [("diffusers folder", folder_graphs(family, shapes, configs, name))]
        if family.denoiser != "unet":
            from edgediff.benchmarks.synthetic_dit import architecture, planned

            files = {n: s for n, s, _ in planned(architecture(name), "q4_0")}
            layouts.append(("single files / GGUF", model_graphs(family, files, {}, name)))
        for layout, graphs in layouts:
            total, nodes = 0.0, 0
            for component, build in graphs:
                started = time.perf_counter()
                model = build()
                size = len(model.SerializeToString())
                seconds = time.perf_counter() - started
                total += seconds
                nodes += len(model.graph.node)
                print(f"{name:13} {layout:20} {component:15} {seconds:6.2f} s  {len(model.graph.node):6} nodes  "
                      f"{size / 1e6:5.1f} MB", flush=True)
            rows.append((name, layout, total, nodes))
    print("\n| model | layout | all graphs built | nodes |\n| --- | --- | --- | --- |")
    for name, layout, total, nodes in rows:
        print(f"| {name} | {layout} | {total:.2f} s | {nodes} |")
    return 0


if __name__ == "__main__":
    main()

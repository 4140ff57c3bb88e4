"""edgediff from Python: `edgediff.Pipeline(model)` opens whatever `edgediff generate --model` does.

`edgediff.runtime.Pipeline` opens packages only (the runtime imports nothing from the converter);
this one first makes a package of anything else, as the CLI does, and caches it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from edgediff.runtime.pipeline import Pipeline as PackagePipeline


class Pipeline(PackagePipeline):
    """A Pipeline on a package folder or .gguf, `builtin:NAME` (None: the embedded default model),
    or a GGUF or single .safetensors file another tool wrote (its graphs built once and cached);
    `base`, `vae` and `text_encoders` complete a file that lacks them (a denoiser-only GGUF).
    Every other option is runtime.Pipeline's."""

    def __init__(self, model: str | Path | None = None, *, base: str | Path | None = None,
                 vae: str | Path | None = None, text_encoders: Sequence[str | Path] = (),
                 progress: Callable[[str], None] | None = None, **options):
        from edgediff.convert.adopt import runnable

        super().__init__(runnable(model, base=base, vae=vae, text_encoders=text_encoders, progress=progress),
                         **options)

    def generate(self, *args, controlnets=None, **kwargs):
        """runtime.Pipeline.generate, with ControlNets given as folders or files too."""
        return super().generate(*args, controlnets=adopted_controlnets(controlnets), **kwargs)


def adopted_controlnets(units):
    """ControlNet units whose models are folders or files another tool wrote, as units of the
    packages that run them (convert.controlnet builds the graph once and caches it)."""
    import dataclasses

    from edgediff.convert.controlnet import controlnet_package
    from edgediff.runtime.controlnet import ControlNetUnit, option

    if not units:
        return units
    listed = [units] if isinstance(units, ControlNetUnit) else list(units)
    return [dataclasses.replace(u, model=controlnet_package(u.model, f"{option()} {u.model}"))
            if isinstance(u, ControlNetUnit) else u for u in listed]

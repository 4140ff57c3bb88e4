"""The runtime: onnxruntime sessions driven by a NumPy sampler loop. Never imports torch."""

from edgediff.runtime.pipeline import Pipeline, Timings

__all__ = ["Pipeline", "Timings"]

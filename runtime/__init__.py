"""The runtime: onnxruntime sessions driven by a NumPy sampler loop. Never imports torch.

`Pipeline` is imported on first use, so reading a file (`runtime.gguf_file`,
`runtime.safetensors_file`) does not load the whole pipeline."""

__all__ = ["Pipeline", "Timings"]


def __getattr__(name: str):
    if name in __all__:
        from edgediff.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'edgediff.runtime' has no attribute '{name}'")

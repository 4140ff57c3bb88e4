"""edgediff: quantized edge inference for diffusion image models.

`edgediff.Pipeline(model).generate(prompt)` runs a package, `builtin:NAME`, or a GGUF or
single-file checkpoint another tool wrote. Subpackages: `edgediff.convert` (checkpoints to
packages), `edgediff.runtime` (onnxruntime + NumPy; never imports torch), `edgediff.kernels`.
"""

from edgediff.errors import EdgediffError

__version__ = "0.1.0"
__all__ = ["EdgediffError", "Pipeline", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":  # on first use: `import edgediff` stays light
        from edgediff.api import Pipeline

        return Pipeline
    raise AttributeError(f"module 'edgediff' has no attribute '{name}'")

"""edgediff: quantized edge inference for diffusion image models.

Subpackages: `edgediff.convert` (checkpoints to packages; needs the `convert` extra),
`edgediff.runtime` (onnxruntime + NumPy; never imports torch), `edgediff.kernels`.
"""

from edgediff.errors import EdgediffError

__version__ = "0.1.0"
__all__ = ["EdgediffError", "__version__"]

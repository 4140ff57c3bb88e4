"""Running a built graph in the tests: its placeholders filled from a dict of arrays (the
file's tensors by name), then onnxruntime on the CPU."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from edgediff.kernels.bind import is_placeholder


def filled(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The graph with every placeholder replaced by its weight (shapes checked)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = []
    for t in out.graph.initializer:
        if is_placeholder(t):
            array = np.asarray(weights[t.name], np.float32)
            assert tuple(array.shape) == tuple(t.dims), (t.name, array.shape, tuple(t.dims))
            t = numpy_helper.from_array(array, t.name)
        inits.append(t)
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def ldm_vae_weights(state_dict: Mapping, config: Mapping) -> dict[str, np.ndarray]:
    """A diffusers VAE's weights (torch tensors or arrays) under their LDM/SGM names and shapes."""
    from edgediff.kernels.ldm_names import ldm_shape, vae_name

    weights = {}
    for key, value in state_dict.items():
        name = vae_name(key, config)
        array = np.asarray(value)
        weights[name] = array.reshape(ldm_shape(name, array.shape))
    return weights


def run(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    model = filled(model, weights)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))

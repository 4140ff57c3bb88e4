"""`--accuracy-level`: explicit levels apply to every repacked weight; `auto` takes int8
activations for 4-bit weights only, and only where this machine's kept probe measured them
faster."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
from onnx import helper

from edgediff.errors import UsageError
from edgediff.kernels.bind import Weight, bind, placeholder
from edgediff.kernels.gguf_blocks import FORMATS, quantize
from edgediff.runtime import accuracy
from edgediff.runtime.graph_cache import cpu_features


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """Write this machine's kept probe result; auto_level reads it instead of measuring."""
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path))
    monkeypatch.delenv(accuracy.AUTO_ENV, raising=False)
    accuracy.auto_level.cache_clear()

    def kept(level0_s: float, level4_s: float) -> None:
        path = tmp_path / "probes" / "matmulnbits.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        key = {"onnxruntime": onnxruntime.__version__, "cpu": cpu_features()}
        path.write_text(json.dumps({"key": key, "level0_s": level0_s, "level4_s": level4_s}))
        accuracy.auto_level.cache_clear()

    yield kept
    accuracy.auto_level.cache_clear()


def test_auto_takes_int8_activations_for_4_bit_weights_where_measured_faster(probe):
    probe(2.0, 1.0)
    assert accuracy.resolve("auto") == {4: 4, 8: 0}
    probe(1.1, 1.0)  # within FASTER: not worth the memory and the error
    assert accuracy.resolve("auto") == {4: 0, 8: 0}
    assert accuracy.resolve("4") == 4 and accuracy.resolve(0) == 0
    with pytest.raises(UsageError, match="--accuracy-level must be one of auto, 0, 4"):
        accuracy.resolve("8")


def test_the_level_is_set_per_repacked_bit_width():
    rng = np.random.default_rng(0)
    shapes = {"a": ("q4_0", (32, 64)), "b": ("q8_0", (64, 32))}  # x [1, 64] -> a -> [1, 32] -> b -> [1, 64]
    stored = {n: Weight(n, FORMATS[k], s, quantize(rng.standard_normal(s), FORMATS[k])) for n, (k, s) in shapes.items()}
    nodes = [helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]), helper.make_node("MatMul", ["x", "at"], ["h"]),
             helper.make_node("Gemm", ["h", "b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 64])],
                              [helper.make_tensor_value_info("y", 1, [1, 64])],
                              [placeholder(n, 1, s) for n, (_, s) in shapes.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    def levels(choice):
        bound = bind(model, stored.get, "t", accuracy_level=choice)
        so = onnxruntime.SessionOptions()
        so.add_external_initializers(list(bound.arrays), [onnxruntime.OrtValue.ortvalue_from_numpy(a)
                                                          for a in bound.arrays.values()])
        onnxruntime.InferenceSession(bound.model.SerializeToString(), so).run(None, {"x": np.ones((1, 64), np.float32)})
        return {n.input[1].split(".")[0]: next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
                for n in bound.model.graph.node if n.op_type == "MatMulNBits"}

    assert levels({4: 4, 8: 0}) == {"a": 4, "b": 0}
    assert levels(4) == {"a": 4, "b": 4} and levels(0) == {"a": 0, "b": 0}

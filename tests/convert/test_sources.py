"""Reading sources: headers validated before anything is allocated, pickles never unpickled
without the explicit flag, and each refusal says what, where and what to do."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgediff.convert.sources import open_source, read_safetensors_header, summarize
from edgediff.errors import SourceError, UnsafeFileError


def _good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": np.zeros((4, 8), np.float32), "b": np.ones(3, np.float16)}, str(path))
    return path


def _with_header(tmp_path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_good_header(tmp_path):
    tensors, _ = read_safetensors_header(_good(tmp_path))
    assert tensors["a"].shape == (4, 8) and tensors["b"].dtype == "F16"


def test_truncated_file(tmp_path):
    path = _good(tmp_path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(SourceError, match=r"bad.safetensors|good.safetensors.*truncated"):
        read_safetensors_header(path)


def test_shorter_than_a_header(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(SourceError, match="tiny.safetensors: truncated safetensors file"):
        open_source(path)


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(SourceError, match="claims 1000000000000 bytes.*download it again"):
        open_source(path)


def test_garbled_header(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe not json!!!!" + b"\0" * 32)
    with pytest.raises(SourceError, match="garbled safetensors header"):
        open_source(path)


@pytest.mark.parametrize(("entry", "message"), [
    ({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "16 needed"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "truncated"),
    ({"dtype": "F32", "shape": [2]}, "data_offsets"),
])
def test_invalid_entries_name_the_tensor(tmp_path, entry, message):
    path = _with_header(tmp_path, {"weight.x": entry}, b"\0" * 8)
    with pytest.raises(SourceError, match=f"tensor 'weight.x'.*{message}"):
        open_source(path)


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(SourceError, match="overlap"):
        open_source(_with_header(tmp_path, header, b"\0" * 12))


class _Exploit:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_is_refused_and_never_loaded(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": _Exploit(marker)}))
    with pytest.raises(UnsafeFileError, match="pickle-based.*--allow-pickle"):
        open_source(path)
    assert not marker.exists()


def test_allow_pickle_still_refuses_code(tmp_path):
    """With the flag, torch.load(weights_only=True) rejects anything but tensors."""
    pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _Exploit(marker)}))
    with pytest.raises(SourceError, match="weights-only"):
        open_source(path, allow_pickle=True)
    assert not marker.exists()


def test_allow_pickle_reads_a_plain_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}}, path)
    source = open_source(path, allow_pickle=True)
    assert source.shapes == {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(SourceError, match="nope.safetensors: no such file"):
        open_source(tmp_path / "nope.safetensors")
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    with pytest.raises(SourceError, match="unknown model file type '.onnx'"):
        open_source(other)


def test_empty_folder_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(SourceError, match="not a diffusers model"):
        open_source(tmp_path)


def test_gguf_names_and_shapes(tmp_path):
    """A ComfyUI-style GGUF (denoiser only, prefix stripped, F32 small tensors, Q8_0 weights)."""
    import gguf

    path = tmp_path / "unet.gguf"
    writer = gguf.GGUFWriter(str(path), "sd1")
    w = np.random.default_rng(0).standard_normal((320, 64)).astype(np.float32)
    writer.add_tensor("input_blocks.0.0.weight", gguf.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_array("comfy.gguf.orig_shape.input_blocks.0.0.weight", [320, 4, 4, 4])
    writer.add_tensor("input_blocks.1.1.proj_in.weight", np.zeros((320, 320, 1, 1), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = open_source(path)
    assert source.kind == "gguf"
    first = source.tensors["model.diffusion_model.input_blocks.0.0.weight"]
    assert first.shape == (320, 4, 4, 4) and first.dtype == "Q8_0"  # ComfyUI's true shape
    assert source.tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert summarize(source)["denoiser"]["bytes"] == 320 * 64 // 32 * 34 + 320 * 320 * 4


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(SourceError, match="corrupt or truncated GGUF header"):
        open_source(path)


@pytest.mark.parametrize("metadata", [["a", "list"], {"format": 3}, "text"])
def test_metadata_that_is_not_a_string_map(tmp_path, metadata):
    path = _with_header(tmp_path, {"__metadata__": metadata, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                        b"\0" * 4)
    with pytest.raises(SourceError, match="__metadata__ is not a map of strings"):
        read_safetensors_header(path)


@pytest.mark.parametrize(("index", "message"), [
    ("{not json", "not a valid safetensors index"),
    (json.dumps([1, 2]), "not a valid safetensors index"),
    (json.dumps({"weight_map": {}}), "'weight_map' is not a map"),
    (json.dumps({"weight_map": {"a": 3}}), "'weight_map' is not a map"),
    (json.dumps({"weight_map": {"a": "missing.safetensors"}}), "'missing.safetensors' it names is missing"),
    (json.dumps({"weight_map": {"a": "../../etc/hostname"}}), "is not a file name beside the index"),
    (json.dumps({"weight_map": {"a": "/etc/hostname"}}), "is not a file name beside the index"),
])
def test_a_bad_sharded_index(tmp_path, index, message):
    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    with pytest.raises(SourceError, match=message):
        open_source(tmp_path / "model")

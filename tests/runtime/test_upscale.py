"""Upscaling: the restricted torch.save reader (equal to torch.load on a state dict, in both of
torch's formats; a pickle asking for anything else refused without running it), tiny random
upscalers from .pth and .safetensors run against their torch references, tiled against whole,
the scale rules, listing a folder, bad files, and `edgediff upscale` end to end."""

from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from edgediff.cli import main
from edgediff.errors import SourceError, UnsafeFileError
from edgediff.runtime import pickle_tensors
from edgediff.runtime.upscale import describe, list_upscalers, load_upscaler, upscale, upscale_array

from tiny_upscalers import old_esrgan_names, psnr, tiny

torch = pytest.importorskip("torch")


def _save_pth(state: dict, path, legacy: bool = False, wrap: str | None = "params_ema"):
    tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items())
    torch.save({wrap: tensors} if wrap else tensors, path, _use_new_zipfile_serialization=not legacy)
    return path


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """[1, 3, H, W] in [0, 1], smooth as photographs are (random pixels make every seam loud)."""
    rng = np.random.default_rng(seed)
    small = rng.random((3, height // 4 + 2, width // 4 + 2))
    big = np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC))
                    for c in small])
    return np.clip(big, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_equals_torch_load(tmp_path, legacy):
    state = collections.OrderedDict(
        weight=torch.randn(4, 3, 3, 3), half=torch.randn(5).half(), bf16=torch.randn(6).bfloat16(),
        view=torch.arange(10.0)[2:7], transposed=torch.randn(3, 4).t(), ints=torch.arange(4), scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3), parameter=torch.nn.Parameter(torch.ones(2)))
    path = tmp_path / "state.pth"
    torch.save({"params_ema": state, "iteration": 7, "name": "x"}, path, _use_new_zipfile_serialization=not legacy)
    expected = torch.load(path, weights_only=True)
    got = pickle_tensors.load(path)
    assert got["iteration"] == 7 and got["name"] == "x"
    assert list(got["params_ema"]) == list(expected["params_ema"])
    for name, tensor in expected["params_ema"].items():
        ref = tensor.detach()
        ref = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
        array = got["params_ema"][name]
        assert array.dtype == ref.dtype and array.shape == ref.shape and np.array_equal(array, ref), name
    shapes = pickle_tensors.load(path, data=False)["params_ema"]
    assert shapes["weight"] == pickle_tensors.Shape((4, 3, 3, 3), np.dtype(np.float32))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["zip", "pickle"])
def test_reader_refuses_code_without_running_it(tmp_path, form):
    marker = tmp_path / "ran"
    program = pickle.dumps({"conv_first.weight": _Payload(marker)}, protocol=2)
    path = tmp_path / "evil.pth"
    if form == "zip":  # laid out as torch.save lays out its zip
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", program)
            archive.writestr("archive/version", "3\n")
    else:
        path.write_bytes(program)
    with pytest.raises(UnsafeFileError, match=r"evil\.pth: its pickle asks for '(posix|os|nt)\.system', which is not "
                                              "a tensor.*ran nothing"):
        pickle_tensors.load(path)
    with pytest.raises(UnsafeFileError):
        load_upscaler(path)
    assert not marker.exists()


def test_reader_refuses_damaged_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a pickle at all")
    with pytest.raises(SourceError, match="garbage.pth: not a readable torch.save file"):
        pickle_tensors.load(garbage)
    path = _save_pth({"w": np.ones((64, 64), np.float32)}, tmp_path / "cut.pth", legacy=True)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SourceError, match="cut.pth: .*truncated"):
        pickle_tensors.load(path)
    repeated = tmp_path / "repeated.pth"
    torch.save({"w": torch.zeros(3).expand(1000, 3)}, repeated)  # 3 stored elements seen as 3000
    with pytest.raises(SourceError, match=r"repeated.pth: a tensor of shape \[1000, 3\] made from a storage of 3"):
        pickle_tensors.load(repeated)


@pytest.mark.parametrize("kind,scale,fmt", [("rrdb", 4, "pth"), ("rrdb", 2, "safetensors"), ("compact", 4, "legacy"),
                                            ("rrdb", 4, "old-names")])
def test_upscaler_file_matches_torch(tmp_path, kind, scale, fmt):
    model, state = tiny(kind, scale)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        path = tmp_path / "model.safetensors"
        save_file(state, path)
    else:
        names = old_esrgan_names(state) if fmt == "old-names" else state
        path = _save_pth(names, tmp_path / "model.pth", legacy=fmt == "legacy", wrap=None if fmt == "old-names" else "params_ema")
    upscaler = load_upscaler(path, "cpu", threads=1)
    assert (upscaler.name, upscaler.scale, upscaler.arch.kind) == ("model", scale, describe(path).kind)
    image = _smooth_image(20, 28)
    got = upscale_array(upscaler, image, tile=0)
    with torch.no_grad():
        ref = model(torch.from_numpy(image)).numpy()
    assert psnr(got, ref) >= 45


@pytest.mark.parametrize("kind,scale,size", [("rrdb", 4, (72, 88)), ("rrdb", 2, (75, 61)), ("compact", 4, (64, 96))])
def test_tiled_matches_whole(tmp_path, kind, scale, size):
    """Tiles of 32 input pixels sharing 8 against the whole image (odd sizes: an x2 RRDBNet
    pixel-unshuffles, so the image and its tiles are padded to even sizes)."""
    _, state = tiny(kind, scale)
    upscaler = load_upscaler(_save_pth(state, tmp_path / "m.pth"), "cpu", threads=1)
    image = _smooth_image(*size)
    whole = upscale_array(upscaler, image, tile=0)
    tiles = upscale_array(upscaler, image, tile=32, overlap=8)
    assert whole.shape == tiles.shape == (1, 3, size[0] * scale, size[1] * scale)
    assert psnr(tiles, whole) >= 40


def test_scale_and_size(tmp_path):
    _, state = tiny("rrdb", 2)
    upscaler = load_upscaler(_save_pth(state, tmp_path / "x2.pth"), "cpu", threads=1)
    image = Image.fromarray((_smooth_image(10, 14)[0].transpose(1, 2, 0) * 255).astype(np.uint8))
    assert upscale(upscaler, image).size == (28, 20)  # the model's scale
    assert upscale(upscaler, image, 1.5).size == (21, 15)  # one pass, then Lanczos down
    assert upscale(upscaler, image, 5).size == (70, 50)  # three passes (x8), then down
    assert upscale(upscaler, image, size=(40, 30)).size == (40, 30)
    once = upscale_array(upscaler, np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 255, tile=0)
    expected = (np.clip(once[0], 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(upscale(upscaler, image, tile=0)), expected)


def test_unknown_architecture_file(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "swinir.safetensors"
    save_file({"layers.0.residual_group.blocks.0.attn.qkv.weight": np.zeros((24, 8), np.float32)}, path)
    with pytest.raises(SourceError, match="swinir.safetensors: not an upscaler edgediff knows.*1 tensors.*"
                                          "'layers.0.residual_group.blocks.0.attn.qkv.weight' \\[24, 8\\]"):
        load_upscaler(path)
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"")
    with pytest.raises(SourceError, match="model.ckpt: not an upscaler file edgediff reads"):
        load_upscaler(other)


def test_list_upscalers(tmp_path):
    from safetensors.numpy import save_file

    _save_pth(tiny("rrdb", 4)[1], tmp_path / "4x-Real.pth")
    save_file(tiny("compact", 2)[1], tmp_path / "2x-compact.safetensors")
    save_file({"something.else": np.zeros(3, np.float32)}, tmp_path / "not-one.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    found = list_upscalers(tmp_path)
    assert [(u.name, u.kind, u.scale) for u in found] == [("2x-compact", "SRVGGNetCompact", 2), ("4x-Real", "RRDBNet", 4)]


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_cli_upscale(tmp_path, capsys):
    model = _save_pth(tiny("compact", 4)[1], tmp_path / "4x-tiny.pth")
    source = tmp_path / "in.png"
    Image.fromarray((_smooth_image(30, 40)[0].transpose(1, 2, 0) * 255).astype(np.uint8)).save(source)
    out = tmp_path / "out.png"
    code, stdout, _ = _cli(capsys, "upscale", str(source), "--model", str(model), "-o", str(out), "--tile", "16",
                           "--device", "cpu", "--threads", "1")
    assert code == 0 and f"wrote {out} (160x120 from 40x30; 4x-tiny: SRVGGNetCompact x4)" in stdout
    with Image.open(out) as img:
        assert img.size == (160, 120)
        assert img.text["parameters"] == "Postprocess upscale by: 4, Postprocess upscaler: 4x-tiny"
    code, stdout, _ = _cli(capsys, "upscale", str(source), "--model", str(model), "-o", str(tmp_path / "o.jpg"),
                           "--scale", "2")
    assert code == 0
    with Image.open(tmp_path / "o.jpg") as img:
        assert img.size == (80, 60) and img.format == "JPEG"


_WITHOUT_TORCH = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'torchvision', 'safetensors'):
            raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, Refuse())
from edgediff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_upscale_without_torch(tmp_path):
    """A .pth upscaler runs with torch (and the safetensors package) unimportable."""
    import subprocess
    import sys
    from pathlib import Path

    model = _save_pth(tiny("rrdb", 2)[1], tmp_path / "2x.pth", legacy=True)
    source = tmp_path / "in.png"
    Image.new("RGB", (9, 7), (10, 200, 30)).save(source)
    done = subprocess.run([sys.executable, "-P", "-c", _WITHOUT_TORCH, "upscale", str(source), "--model", str(model),
                           "-o", str(tmp_path / "out.webp"), "--device", "cpu"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[3], timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "out.webp") as img:
        assert img.size == (18, 14)


def test_cli_upscale_errors(tmp_path, capsys):
    model = _save_pth(tiny("compact", 2)[1], tmp_path / "m.pth")
    source = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(source)
    unknown = tmp_path / "other.safetensors"
    from safetensors.numpy import save_file

    save_file({"x.weight": np.zeros((2, 2), np.float32)}, unknown)
    cases = [
        (["upscale", str(tmp_path / "none.png"), "--model", str(model), "-o", str(tmp_path / "o.png")], 2,
         "IMAGE .*none.png: no such file"),
        (["upscale", str(source), "--model", str(tmp_path / "none.pth"), "-o", str(tmp_path / "o.png")], 2,
         "--model .*none.pth: no such file"),
        (["upscale", str(source), "--model", str(unknown), "-o", str(tmp_path / "o.png")], 1,
         "other.safetensors: not an upscaler edgediff knows"),
        (["upscale", str(model), "--model", str(model), "-o", str(tmp_path / "o.png")], 2, "not a readable image"),
        (["upscale", str(source), "--model", str(model), "-o", str(tmp_path / "o.gif")], 2, "cannot tell the image type"),
        (["upscale", str(source), "--model", str(model), "-o", str(tmp_path / "o.png"), "--tile", "-1"], 2,
         "--tile -1: give a tile side in input pixels, or 0"),
    ]
    for argv, exit_code, message in cases:
        code, _, err = _cli(capsys, *argv)
        assert code == exit_code and len(err.strip().splitlines()) == 1, (argv, err)
        assert re.search(message, err), (message, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "m.pth", "other.safetensors"]

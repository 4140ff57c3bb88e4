"""What `pip install edgediff` (no extras) does with torch, diffusers and transformers made
unimportable: every family converts and runs, the files users download run as they are, their
graphs built from the weights' shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgediff.runtime import Pipeline

from ldm_checkpoint import write_flux_files, write_ldm_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# an import hook that refuses the reference libraries, then the CLI
_WITHOUT = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'torchvision'):
            raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, Refuse())
from edgediff.cli import main
sys.exit(main(sys.argv[1:]))
"""
ARGS = ["--prompt", "a red cube", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--device", "cpu"]


def _edgediff(args: list[str], cache: Path) -> None:
    env = {**os.environ, "EDGEDIFF_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-P", "-c", _WITHOUT, *args], env=env, cwd=ROOT.parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def _same(png: Path, image) -> bool:
    return np.array_equal(np.asarray(Image.open(png)), np.asarray(image))


@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl", "sd3", "flux-dev"])
def test_every_family_converts_and_runs_without_torch(tiny_source, tiny_package, tmp_path, name):
    """A diffusers folder converts (to ONNX, and to a q8_0 GGUF) and draws the image the test
    environment's package of it draws."""
    for out, extra in ((tmp_path / "pkg", []), (tmp_path / "pkg.gguf", ["--precision", "q8_0"])):
        _edgediff(["convert", str(tiny_source(name)), "--output", str(out), *extra], tmp_path / "cache")
        _edgediff(["generate", "--model", str(out), *ARGS, "--output", str(tmp_path / "out.png")], tmp_path / "cache")
        if not extra:
            image = Pipeline(tiny_package(name), device="cpu").generate("a red cube", steps=2, width=64, height=64,
                                                                        seed=3)
            assert _same(tmp_path / "out.png", image)


def test_single_files_run_without_torch(tiny_source, tmp_path):
    """An SD 1.x single file and Flux's four files (BFL transformer, clip_l, t5xxl, ae) draw,
    without torch, the image they draw with it installed; the single file also converts."""
    from edgediff.convert.adopt import adopted_package

    sd1 = write_ldm_checkpoint(tiny_source("sd1"), tmp_path / "sd1.safetensors")
    flux = write_flux_files(tiny_source("flux-schnell"), tmp_path / "flux")
    runs = {
        "sd1": ([str(sd1)], {}),
        "flux": ([str(flux["flux"]), "--text-encoder", str(flux["clip_l"]), "--text-encoder", str(flux["t5xxl"]),
                  "--vae", str(flux["ae"])],
                 dict(text_encoders=[flux["clip_l"], flux["t5xxl"]], vae=flux["ae"])),
    }
    for name, (model, others) in runs.items():
        out = tmp_path / f"{name}.png"
        _edgediff(["generate", "--model", *model, *ARGS, "--output", str(out)], tmp_path / "cache")
        with_torch = Pipeline(adopted_package(Path(model[0]), **others), device="cpu").generate(
            "a red cube", steps=2, width=64, height=64, seed=3)
        assert _same(out, with_torch), name
    _edgediff(["convert", str(sd1), "--output", str(tmp_path / "sd1-int8"), "--precision", "int8"], tmp_path / "cache")
    _edgediff(["generate", "--model", str(tmp_path / "sd1-int8"), *ARGS, "--output", str(tmp_path / "i.png")],
              tmp_path / "cache")

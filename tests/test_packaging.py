"""The distribution: `pip install .` builds a wheel that imports in a fresh environment with its
subpackages and data, and the runtime never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_does_not_import_torch():
    code = ("import sys, edgediff.runtime, edgediff.runtime.pipeline, edgediff.runtime.gguf_file, "
            "edgediff.kernels.bind; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _imported(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_layers_import_only_downwards():
    """kernels imports neither runtime nor convert; runtime imports nothing from convert (DESIGN.md)."""
    for layer, above in (("kernels", ("edgediff.runtime", "edgediff.convert")), ("runtime", ("edgediff.convert",))):
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            up = {m for m in _imported(path) if m.startswith(above)}
            assert not up, f"{rel} imports {sorted(up)}"


def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True)
    (wheel,) = dist.glob("edgediff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("edgediff/__init__.py", "edgediff/cli.py", "edgediff/runtime/pipeline.py",
                     "edgediff/convert/build.py", "edgediff/kernels/graphs/flux.py",
                     "edgediff/convert/data/clip_tokenizer/vocab.json",
                     "edgediff/convert/builtin/tiny-sd1/unet/config.json"):
        assert expected in names, expected
    assert not any(n.startswith(("edgediff/tests/", "tests/", "edgediff/.venv")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # dependencies come from this environment; edgediff itself only from the wheel
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import edgediff, edgediff.runtime, edgediff.convert, edgediff.kernels; "
             "print(edgediff.__file__)")
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout
    assert out.startswith(str(venv))
    version = subprocess.run([str(venv / "bin" / "edgediff"), "--version"], check=True,
                             capture_output=True, text=True, env=env).stdout
    assert version.strip() == "edgediff 0.1.0"

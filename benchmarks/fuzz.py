"""Coverage-guided fuzzing of the readers that take untrusted files (atheris, libFuzzer for Python):
safetensors headers, GGUF files, package manifests, LoRA files. Each starts from a corpus of
valid small files; a reader may refuse its input only with an EdgediffError; any other
exception, a hang (--timeout) or memory past --rss-limit-mb is a finding.

    edgediff bench fuzz safetensors --seconds 60
    edgediff bench fuzz all --seconds 600 --out fuzz-results

Needs `pip install atheris`. A finding is saved as crash-* in the working folder (libFuzzer's
way); make it a regression test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

READERS = ("safetensors", "gguf", "manifest", "lora")
MAX_LEN = 1 << 16  # inputs up to 64 KiB: every header field, little tensor data


def corpus(reader: str, folder: Path) -> Path:
    """Valid small files for `reader` to start from."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if reader in ("safetensors", "lora"):
        from safetensors.numpy import save_file

        if reader == "safetensors":
            save_file({"a": rng.standard_normal((4, 8)).astype(np.float32), "b": np.ones(3, np.float16)},
                      str(folder / "plain.safetensors"), metadata={"format": "pt"})
        else:
            save_file({"lora_unet_x_to_q.lora_down.weight": rng.standard_normal((2, 8)).astype(np.float32),
                       "lora_unet_x_to_q.lora_up.weight": rng.standard_normal((8, 2)).astype(np.float32),
                       "lora_unet_x_to_q.alpha": np.array(2.0, np.float32),
                       "unet.y.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float16),
                       "unet.y.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float16)},
                      str(folder / "lora.safetensors"))
    elif reader == "gguf":
        import gguf

        w = gguf.GGUFWriter(str(folder / "small.gguf"), "edgediff-fuzz")
        w.add_string("edgediff.note", "corpus")
        w.add_uint32("edgediff.count", 3)
        w.add_tensor("a", rng.standard_normal((4, 32)).astype(np.float32))
        w.add_tensor("b", gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        (folder / "manifest.json").write_text(json.dumps(_manifest()))
    return folder


def _manifest() -> dict:
    entry = {"file": "unet/model.onnx", "precision": "fp32", "bytes": 10, "sha256": "0" * 64, "data_files": [],
             "notes": {}, "weights": "", "weights_prefix": ""}
    return {"family": "sd1", "prediction": "eps", "latent_channels": 4, "latent_scale": 0.18215, "latent_shift": 0.0,
            "vae_downscale": 8, "components": {"unet": entry, "text_encoder": dict(entry, file="text_encoder/model.onnx")},
            "text_encoders": [{"component": "text_encoder", "tokenizer": "tokenizer", "layers": 12, "norm_hidden": True,
                               "pad_token": "<|endoftext|>", "max_length": 77, "pooled": False}],
            "defaults": {"steps": 20, "guidance": 7.5, "sampler": "euler_a", "schedule": "normal", "width": 512,
                         "height": 512}, "format": "edgediff-package", "format_version": 1}


def target(reader: str):
    """The function libFuzzer calls with each input: the reader, EdgediffError its only way out."""
    from edgediff.errors import EdgediffError

    scratch = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    suffix = {"safetensors": ".safetensors", "lora": ".safetensors", "gguf": ".gguf"}.get(reader, ".json")
    path = scratch / f"input{suffix}"

    def read(data: bytes) -> None:
        if reader == "manifest":
            from edgediff.manifest import Manifest

            with contextlib.suppress(EdgediffError):
                Manifest.parse(data.decode("utf-8", "replace"), "fuzz")
            return
        path.write_bytes(data)
        try:
            if reader == "safetensors":
                from edgediff.runtime.safetensors_file import SafetensorsFile

                file = SafetensorsFile(path)
                for name in file.names():
                    w = file.weight(name)
                    if w is not None:
                        np.asarray(w.data).sum()  # touch the data the header claims
            elif reader == "gguf":
                from edgediff.runtime.gguf_file import GGUFFile

                file = GGUFFile(path)
                for key in file.keys:
                    file.field(key)
                file.writer  # noqa: B018 - reads the metadata it looks at
                for w in file.tensors.values():
                    np.asarray(w.data).sum()
            else:
                from edgediff.runtime.lora import read_lora

                lora = read_lora(path)
                for layer in lora.layers.values():
                    if layer.kind == "lora":
                        up, down = layer.factors()
                        layer.delta((up.shape[0], int(np.prod(down.shape[1:]))))
        except EdgediffError:
            pass

    return read


def run(reader: str, seconds: int, workdir: Path, rss_limit_mb: int = 2048, timeout_s: int = 10,
        runs: int = 0, seed: int = 0) -> int:
    """Fuzz one reader in this process for `seconds`, or exactly `runs` inputs from `seed` (the
    same inputs on every machine: what the tests use); atheris exits the process when done."""
    import atheris

    with atheris.instrument_imports(include=["edgediff", "gguf"]):  # coverage of what the readers run
        import edgediff.manifest
        import edgediff.runtime.gguf_file
        import edgediff.runtime.lora
        import edgediff.runtime.safetensors_file
        import edgediff.typed  # noqa: F401
    fuzz = target(reader)
    seeds = corpus(reader, workdir / f"corpus-{reader}")
    limit = [f"-runs={runs}", f"-seed={seed}"] if runs else [f"-max_total_time={seconds}"]
    args = [sys.argv[0], str(seeds), *limit, f"-max_len={MAX_LEN}",
            f"-rss_limit_mb={rss_limit_mb}", f"-timeout={timeout_s}", f"-artifact_prefix={workdir}/",
            "-print_final_stats=1"]
    atheris.Setup(args, fuzz)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgediff bench fuzz", description=__doc__.splitlines()[0])
    p.add_argument("reader", choices=(*READERS, "all"))
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--out", default=".", help="folder for the corpus and any crash-* finding")
    p.add_argument("--rss-limit-mb", type=int, default=2048)
    p.add_argument("--runs", type=int, default=0, help="exactly this many inputs instead of --seconds")
    p.add_argument("--seed", type=int, default=1, help="with --runs: the mutation seed")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reader != "all":
        return run(args.reader, args.seconds, out, args.rss_limit_mb, runs=args.runs, seed=args.seed)
    failed = 0
    for reader in READERS:  # one process each: libFuzzer ends the process it runs in
        done = subprocess.run([sys.executable, "-P", "-m", "edgediff.benchmarks.fuzz", reader, "--seconds", str(args.seconds),
                               "--out", str(out), "--rss-limit-mb", str(args.rss_limit_mb)])
        print(f"{reader}: {'no finding' if done.returncode == 0 else f'FINDING (exit {done.returncode})'}", flush=True)
        failed += done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The real CLIP BPE vocabulary, derived from the data file the open-clip-torch wheel ships.

The wheel is fetched once from PyPI with `pip download --no-deps` (it is read as a zip, never
installed: installing it would pull torchvision) and cached under .cache/ in the repository.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
CACHE = Path(os.environ.get("EDGEDIFF_TEST_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 end-of-word bytes, merges, 2 specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


@lru_cache(maxsize=1)
def bpe_lines() -> list[str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("open_clip_torch-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), OPEN_CLIP_WHEEL],
            check=True,
        )
        wheels = sorted(CACHE.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as whl:
        data = whl.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    return gzip.decompress(data).decode("utf-8").split("\n")


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    merges = bpe_lines()[1 : N_MERGES + 1]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A tokenizer folder as SD repositories ship it (vocab.json, merges.txt, configs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {**special, "model_max_length": 77, "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder

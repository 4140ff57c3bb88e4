"""CLIP BPE tokenization with `tokenizers`, built exactly as transformers' CLIPTokenizer builds it
(NFC, whitespace collapsed, lower case, CLIP's pre-split regex, byte-level BPE with `</w>`)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from edgediff.errors import PackageError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_tokenizer(vocab_json: str, merges_txt: str) -> Tokenizer:
    """From the texts of vocab.json and merges.txt."""
    vocab = json.loads(vocab_json)
    lines = merges_txt.splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")


def load_clip_tokenizer(folder: Path) -> Tokenizer:
    """A tokenizer folder as diffusers/transformers write it: tokenizer.json, or vocab.json + merges.txt."""
    folder = Path(folder)
    files = {n: (folder / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES if (folder / n).is_file()}
    return tokenizer_from_texts(files, str(folder))


def tokenizer_from_texts(files: dict[str, str], where: str) -> Tokenizer:
    """The same from file texts (a GGUF package stores them in its metadata)."""
    if "vocab.json" in files and "merges.txt" in files:
        return clip_tokenizer(files["vocab.json"], files["merges.txt"])
    if "tokenizer.json" in files:
        return Tokenizer.from_str(files["tokenizer.json"])
    raise PackageError(
        f"{where}: no tokenizer found (expected vocab.json + merges.txt, or tokenizer.json); "
        "re-run `edgediff convert` to rebuild the package"
    )


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


def clip_tokenizer_from_files(vocab_json: Path, merges_txt: Path) -> Tokenizer:
    vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
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


def load_clip_tokenizer(folder: Path) -> Tokenizer:
    """A tokenizer folder as diffusers/transformers write it: tokenizer.json, or vocab.json + merges.txt."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return clip_tokenizer_from_files(folder / "vocab.json", folder / "merges.txt")
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    raise PackageError(
        f"{folder}: no tokenizer found (expected vocab.json + merges.txt, or tokenizer.json); "
        "re-run `edgediff convert` to rebuild the package"
    )


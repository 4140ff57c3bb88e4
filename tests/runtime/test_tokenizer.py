"""Tokenization matches transformers' CLIPTokenizer on the real CLIP vocabulary."""

from __future__ import annotations

import pytest

from edgediff.runtime.tokenizer import load_clip_tokenizer

from clip_vocab import write_clip_tokenizer

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
    "  lots   of\twhitespace\n\nand newlines  ",
    "punctuation!!! what?! (parentheses) [brackets] {braces} <angles>",
    "emphasis (word:1.2) and ((double)) [less]",
    "emoji 🐱🚀✨ and 👩‍👩‍👧 family",
    "日本語のプロンプト、富士山と桜",
    "中文提示词：一只猫坐在窗台上",
    "русский текст: кошка на окне",
    "Ελληνικά γράμματα και ένα σκυλί",
    "عربي: قطة على النافذة",
    "हिंदी में एक बिल्ली",
    "café naïve résumé façade Æsir",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "contractions: it's, don't, we're, they've, I'm, you'll, he'd",
    "CamelCaseWordsAndSNAKE_case_words",
    "hyphen-ated words and under_scores and dots.in.words",
    "url https://example.com/path?query=1&b=2",
    "email someone@example.org",
    "html &amp; entities &lt;b&gt;",
    "tabs\tand\u00a0non-breaking\u2003spaces",
    "zero\u200bwidth joiner",
    "combining e\u0301 versus \u00e9 (NFC)",
    "ＦＵＬＬＷＩＤＴＨ letters",
    "a" * 300,
    "word " * 100,
    "red, green, blue, " * 30,
    "<|startoftext|> inline special <|endoftext|>",
    "",
    "   ",
    "!!!???...,,,",
    "a very long prompt about a castle on a hill at sunset with dramatic clouds, volumetric light, "
    "highly detailed, 8k, trending on artstation, by greg rutkowski and alphonse mucha, "
    "intricate, elegant, sharp focus, illustration, concept art, matte painting",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return load_clip_tokenizer(folder), CLIPTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_transformers(tokenizers, prompt):
    ours, theirs = tokenizers
    expected = theirs(prompt, add_special_tokens=False).input_ids
    assert ours.encode(prompt, add_special_tokens=False).ids == expected


def test_there_are_at_least_30_prompts():
    assert len(PROMPTS) >= 30


def test_bundled_tokenizer_is_the_real_clip_vocabulary(tmp_path):
    """The copy shipped for single-file checkpoints equals the one derived from open_clip."""
    from pathlib import Path

    import edgediff.convert

    bundled = Path(edgediff.convert.__file__).parent / "data" / "clip_tokenizer"
    derived = write_clip_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (bundled / name).read_bytes() == (derived / name).read_bytes()


def test_tokenizer_json_only_folder(tokenizers, tmp_path):
    """transformers 5 saves a CLIP tokenizer as tokenizer.json alone; both forms read the same."""
    ours, theirs = tokenizers
    theirs.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    from_json = load_clip_tokenizer(tmp_path)
    for prompt in PROMPTS:
        assert from_json.encode(prompt, add_special_tokens=False).ids == ours.encode(
            prompt, add_special_tokens=False).ids


def test_folder_without_tokenizer(tmp_path):
    from edgediff.errors import PackageError

    with pytest.raises(PackageError, match="no tokenizer found"):
        load_clip_tokenizer(tmp_path)

"""A1111-style prompt chunking: 75-token windows, comma backtrack, equal-length contexts."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import UsageError
from edgediff.runtime import text
from edgediff.runtime.tokenizer import BOS, EOS, load_clip_tokenizer

from clip_vocab import write_clip_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_clip_tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def test_short_prompt_is_one_window(tok):
    pad = tok.token_to_id(EOS)
    (chunk,) = text.chunk_prompt(tok, "a photo of a cat", 77, pad)
    assert len(chunk) == 77
    assert chunk[:7] == [tok.token_to_id(BOS), 320, 1125, 539, 320, 2368, tok.token_to_id(EOS)]
    assert chunk[7:] == [pad] * 70


def test_openclip_pads_with_its_own_token(tok):
    (chunk,) = text.chunk_prompt(tok, "a cat", 77, pad_id=0)
    assert chunk[3] == tok.token_to_id(EOS) and chunk[4:] == [0] * 73


def test_long_prompt_is_chunked_not_cut(tok):
    ids = tok.encode("word " * 100, add_special_tokens=False).ids
    chunks = text.chunk_prompt(tok, "word " * 100, 77, tok.token_to_id(EOS))
    assert len(chunks) == 2
    body = [t for c in chunks for t in c[1:-1] if t != tok.token_to_id(EOS)]
    assert body == ids  # every token kept, in order


def test_comma_backtrack_moves_the_phrase_to_the_next_window(tok):
    comma = tok.token_to_id(",</w>")
    prompt = "cat " * 70 + ", " + "big red dog " * 3
    chunks = text.chunk_prompt(tok, prompt, 77, tok.token_to_id(EOS))
    first = chunks[0][1:]
    assert first[70] == comma and first[71] == tok.token_to_id(EOS)  # cut after the comma
    assert chunks[1][1:10] == tok.encode("big red dog " * 3, add_special_tokens=False).ids


def test_empty_prompt_is_one_window(tok):
    (chunk,) = text.chunk_prompt(tok, "", 77, tok.token_to_id(EOS))
    assert chunk[0] == tok.token_to_id(BOS) and set(chunk[1:]) == {tok.token_to_id(EOS)}


def test_pad_chunks_equalises_lengths(tok):
    pad = tok.token_to_id(EOS)
    long = text.chunk_prompt(tok, "word " * 160, 77, pad)
    short = text.pad_chunks(text.chunk_prompt(tok, "a cat", 77, pad), len(long), tok, pad)
    assert len(long) == len(short) == 3
    assert short[1] == [tok.token_to_id(BOS), tok.token_to_id(EOS)] + [pad] * 75


def test_encode_chunks_concatenates_and_checks_clip_skip():
    hidden = np.arange(3 * 2 * 77 * 4, dtype=np.float32).reshape(3, 2, 77, 4)  # layers, chunks

    def run(ids):
        assert ids.shape == (2, 77)
        return {"hidden_states": hidden, "pooled_output": np.ones((2, 8), np.float32)}

    context, pooled = text.encode_chunks(run, [[0] * 77, [0] * 77], clip_skip=2)
    assert context.shape == (1, 154, 4)
    np.testing.assert_array_equal(context[0, 77:], hidden[1, 1])
    assert pooled.shape == (1, 8)
    with pytest.raises(UsageError, match="between 1 and 3"):
        text.encode_chunks(run, [[0] * 77, [0] * 77], clip_skip=4)

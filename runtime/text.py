"""Prompt to conditioning: for CLIP, A1111-style 75-token chunks, each encoded as its own 77-token
window and concatenated, so long prompts are not cut, and clip-skip picks an earlier hidden layer;
for T5, one window as the reference pipelines use it. `join` combines the encoders' outputs."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from tokenizers import Tokenizer

from edgediff.errors import UsageError
from edgediff.runtime.tokenizer import BOS, EOS

# A1111 `comma_padding_backtrack`: when a chunk fills up, a comma within the last 20 tokens
# ends the chunk there, so a phrase is not split across two windows.
COMMA_BACKTRACK = 20
# (a prompt's token ids, a position) -> (ids in place of the tokens there, how many) or None
Words = Callable[[list[int], int], "tuple[list[int], int] | None"]


def chunk_prompt(tok: Tokenizer, prompt: str, max_length: int, pad_id: int,
                 words: Words | None = None) -> list[list[int]]:
    """Token ids of `prompt` in chunks of max_length - 2, each wrapped as BOS ... EOS PAD...

    `words(ids, position)` may replace the tokens at a position (a textual inversion embedding's
    name: runtime.embeddings): (the ids in their place, how many tokens they replace), or None.
    Those ids stay in one chunk, as A1111 keeps an embedding's vectors: a chunk they would
    overflow ends before them."""
    body = max_length - 2
    ids = tok.encode(prompt, add_special_tokens=False).ids
    comma = tok.token_to_id(",</w>")
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1
    position = 0
    while position < len(ids):
        token = ids[position]
        if token == comma:
            last_comma = len(current)
        elif len(current) == body and last_comma != -1 and len(current) - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1
            chunks.append(current[:cut])
            current = current[cut:]
            last_comma = -1
        if len(current) == body:
            chunks.append(current)
            current, last_comma = [], -1
        found = words(ids, position) if words is not None else None
        if found is None:
            current.append(token)
            position += 1
            continue
        replaced, used = found
        if len(current) + len(replaced) > body:
            chunks.append(current)
            current, last_comma = [], -1
        current += replaced
        position += used
    if current or not chunks:
        chunks.append(current)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    return [[bos, *c, eos] + [pad_id] * (body - len(c)) for c in chunks]


def pad_chunks(chunks: list[list[int]], count: int, tok: Tokenizer, pad_id: int) -> list[list[int]]:
    """Append empty chunks so prompt and negative prompt give contexts of equal length."""
    length = len(chunks[0])
    empty = [tok.token_to_id(BOS), tok.token_to_id(EOS)] + [pad_id] * (length - 2)
    return chunks + [empty] * (count - len(chunks))


def encode_chunks(
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    chunks: list[list[int]],
    clip_skip: int,
    hidden_layer: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the text encoder on each chunk; concatenate the chosen hidden layer along tokens.

    The layer is `hidden_layer` from the last (the one the model was trained on), and
    `clip_skip - 1` more. Returns context [1, chunks*max_length, D] and the first chunk's pooled
    output (or None).
    """
    outputs = run(np.asarray(chunks, dtype=np.int64))
    hidden = outputs["hidden_states"]  # [layers, chunks, T, D]
    most = hidden.shape[0] - hidden_layer + 1
    if not 1 <= clip_skip <= most:
        raise UsageError(f"--clip-skip must be between 1 and {most} for this model (got {clip_skip})")
    chosen = hidden[-(hidden_layer + clip_skip - 1)]
    context = chosen.reshape(1, -1, chosen.shape[-1]).astype(np.float32)
    pooled = outputs.get("pooled_output")
    return context, (None if pooled is None else pooled[:1].astype(np.float32))


def window_ids(tok: Tokenizer, prompt: str, max_length: int, pad_id: int) -> list[int]:
    """A T5 prompt as the reference pipelines give it: one window of `max_length` tokens ending
    in its EOS, padded; a longer prompt is cut, with a warning saying what was lost."""
    ids = tok.encode(prompt).ids  # the tokenizer's post-processor appends </s>
    if len(ids) > max_length:
        lost = tok.decode(ids[max_length - 1:-1])
        warnings.warn(f"the prompt is longer than the T5 window of {max_length} tokens; cut: '{lost}'", stacklevel=3)
        ids = ids[:max_length - 1] + ids[-1:]
    return ids + [pad_id] * (max_length - len(ids))


def join(encoded: Sequence[tuple[object, np.ndarray, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """The denoiser's text inputs from each encoder's (entry, context, pooled), by each entry's
    `context` rule: side by side in features, or after the others as more tokens (their features
    zero-padded to its width, SD3); pooled outputs in use side by side as `text_embeds`."""
    context = None
    for entry, hidden, _ in encoded:
        if entry.context == "none":
            continue
        if context is None:
            context = hidden
        elif entry.context == "features":
            context = np.concatenate([context, hidden], -1)
        else:
            width = max(context.shape[-1], hidden.shape[-1])
            context = np.concatenate([_pad_features(context, width), _pad_features(hidden, width)], 1)
    out = {"encoder_hidden_states": context}
    pooled = [p for entry, _, p in encoded if entry.pooled]
    if pooled:
        out["text_embeds"] = np.concatenate(pooled, -1)
    return out


def _pad_features(x: np.ndarray, width: int) -> np.ndarray:
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

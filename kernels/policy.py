"""Which weights keep high precision: one function, user rules first (as stable-diffusion.cpp's
`tensor_should_be_converted` and ComfyUI-GGUF decide).

Defaults keep what is small or sensitive: 1-D tensors (biases, norm scales), tensors of at most
1024 values, normalisation layers, embeddings (token, position, time), the first and last
convolutions. Everything else gets the precision asked for, a DiT's adaLN modulation matrices
too (a quarter of Flux's weights; ComfyUI-GGUF and stable-diffusion.cpp quantize them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from edgediff.errors import UsageError

KEEP = "keep"  # stay at the graph's float precision
SMALL = 1024
SENSITIVE = (
    r"norm[^.]*\.(?!linear\.)",  # normalisation layers, not a DiT's adaLN modulation (`norm1.linear`)
    r"embed",  # token/position embeddings, time_embedding, add_embedding
    r"(^|\.)shared\.",  # T5's token embedding
    r"(^|\.)conv_in\.",
    r"(^|\.)conv_out\.",
    # the same roles under the files' names (graphs built from them keep those names)
    r"(^|\.)label_emb\.",  # LDM's add_embedding
    r"(^|\.)(time|vector|guidance|txt|img)_in\.",  # BFL's embedders
    r"(^|\.)token_embd\.",  # llama.cpp's T5 token embedding
    r"diffusion_model\.input_blocks\.0\.0\.",  # LDM's conv_in
    r"diffusion_model\.out\.2\.",  # LDM's conv_out
)


@dataclass(frozen=True)
class Rule:
    """`pattern` (a regular expression searched in the tensor name) gets `precision`."""

    pattern: str
    precision: str

    @classmethod
    def parse(cls, text: str) -> Rule:
        """'REGEX=PRECISION', as given on the command line."""
        pattern, sep, precision = text.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"--keep/--rule '{text}': expected REGEX=PRECISION, e.g. 'attn2=fp32'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"rule '{text}': '{pattern}' is not a regular expression ({exc})") from exc
        return cls(pattern, precision)


def precision_for(name: str, shape: Sequence[int], wanted: str, rules: Sequence[Rule] = ()) -> str:
    """The precision tensor `name` of `shape` gets when the component is converted to `wanted`;
    KEEP means it stays as it is."""
    for rule in rules:
        if re.search(rule.pattern, name):
            return rule.precision
    if len(shape) <= 1 or math.prod(shape) <= SMALL:
        return KEEP
    if any(re.search(p, name) for p in SENSITIVE):
        return KEEP
    return wanted

"""SDXL's extra conditioning: time ids in the order the family lists them, checked sizes."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import UsageError
from edgediff.families import FAMILIES
from edgediff.runtime.conditioning import SizeConditioning, stack, time_ids


def test_time_ids_follow_the_family_row():
    base, refiner = FAMILIES["sdxl"].conditioning, FAMILIES["sdxl-refiner"].conditioning
    size = SizeConditioning(original_size=(512, 384), crop=(8, 16))
    assert time_ids(base, size, 1024, 768).tolist() == [[512, 384, 8, 16, 1024, 768]]
    assert time_ids(refiner, SizeConditioning(), 1024, 768).tolist() == [[1024, 768, 0, 0, 6.0]]
    assert time_ids(refiner, SizeConditioning(), 64, 64, negative=True).tolist() == [[64, 64, 0, 0, 2.5]]
    scored = SizeConditioning(aesthetic_score=7.0, negative_aesthetic_score=1.0)
    assert time_ids(refiner, scored, 64, 64, negative=True)[0, -1] == 1.0
    assert time_ids(FAMILIES["sd1"].conditioning, size, 64, 64) is None


def test_stack_puts_the_negative_first():
    cond = {"a": np.ones((1, 2)), "b": np.full((1, 1), 2.0)}
    uncond = {"a": np.zeros((1, 2)), "b": np.zeros((1, 1))}
    both = stack([uncond, cond])
    assert both["a"].tolist() == [[0, 0], [1, 1]] and both["b"].tolist() == [[0], [2]]


@pytest.mark.parametrize(("size", "message"), [
    (SizeConditioning(original_size=(0, 64)), "original_size must be two positive integers"),
    (SizeConditioning(target_size=(64.5, 64)), "target_size must be two positive integers"),
    (SizeConditioning(original_size=(64,)), "original_size must be two positive integers"),
    (SizeConditioning(crop=(-1, 0)), "crop must be two integers >= 0"),
])
def test_sizes_that_are_not_positive_integers_are_refused(size, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        size.check()

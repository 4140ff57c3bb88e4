"""typed.read checks what it is given against the dataclass's annotations."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from edgediff.errors import UsageError
from edgediff.typed import read


@dataclass(frozen=True)
class Inner:
    size: int


@dataclass(frozen=True)
class Outer:
    name: str
    ratio: float = 1.0
    sizes: tuple[int, ...] = ()
    threads: int | None = None
    inner: Inner = Inner(1)
    extra: dict[str, str] = field(default_factory=dict)


def test_values_of_the_right_types_make_the_dataclass():
    got = read(Outer, {"name": "a", "ratio": 2, "sizes": [1, 2], "threads": None, "inner": {"size": 3},
                       "extra": {"k": "v"}}, "f", UsageError)
    assert got == Outer("a", 2.0, (1, 2), None, Inner(3), {"k": "v"}) and isinstance(got.ratio, float)


@pytest.mark.parametrize(("raw", "message"), [
    ({"name": 3}, "'name' must be a string"),
    ({"name": "a", "ratio": "2"}, "'ratio' must be a number"),
    ({"name": "a", "ratio": float("inf")}, "'ratio' must be a finite number"),
    ({"name": "a", "ratio": True}, "'ratio' must be a number"),
    ({"name": "a", "sizes": [1, "2"]}, r"'sizes\[1\]' must be an integer"),
    ({"name": "a", "sizes": 4}, "'sizes' must be a list"),
    ({"name": "a", "threads": "2"}, "'threads' must be an integer"),
    ({"name": "a", "inner": {"size": 1.5}}, "'inner.size' must be an integer"),
    ({"name": "a", "inner": {}}, "inner lacks 'size'"),
    ({"name": "a", "extra": {"k": 1}}, "'extra.k' must be a string"),
    ({"ratio": 1.0}, "Outer lacks 'name'"),
    ({"name": "a", "nmae": "b"}, "unknown key 'nmae'"),
    (["name"], "Outer must be a table of keys"),
])
def test_wrong_values_name_the_field(raw, message):
    with pytest.raises(UsageError, match=message):
        read(Outer, raw, "f", UsageError)

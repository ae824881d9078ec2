"""Parsing what another party sent (a network client, a peer, a registry): bounded, so that no
input makes a parser raise anything but ``ValueError`` or take more than linear time.

Python's own parsers are too lenient for that: ``str.isdigit()`` is true for "²", which
``int()`` refuses; ``int()`` takes "+1", " 1", "1_0" and any Unicode digits, and raises past
4300 digits; ``json.loads`` recurses once per nesting level (``RecursionError``), takes NaN and
Infinity, and turns 4000 digits into an integer.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DIGITS = 20  # any unsigned 64-bit number


def decimal(text: str, max_digits: int = MAX_DIGITS) -> int | None:
    """``text`` as a number if it is 1 to ``max_digits`` ASCII digits and nothing else."""
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def _json_int(text: str) -> int:
    if len(text.removeprefix("-")) > MAX_DIGITS:
        raise ValueError(f"a JSON number has more than {MAX_DIGITS} digits")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a JSON number is out of range")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_json(data: bytes | str) -> Any:
    """The JSON document in ``data``; ValueError for anything else, including nesting deeper
    than the interpreter's recursion limit, numbers of more than ``MAX_DIGITS`` digits, NaN
    and Infinity."""
    try:
        return json.loads(
            data,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None

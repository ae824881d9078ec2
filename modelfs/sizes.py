"""Sizes as operators write them: ``100G``, ``512MiB``, ``1.5t`` or plain bytes (binary units)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """The bytes ``text`` names; ValueError, saying what a size looks like, if it names none."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 100G, 512M, 1073741824)")
    number, unit = match.groups()
    factor = 1024 ** ("kmgtp".index(unit.lower()) + 1) if unit else 1
    return int(float(number) * factor)


def format_size(size: int) -> str:
    """``size`` bytes as messages show them: ``512 B``, ``17.9 MiB``, ``4.0 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in "KMGTP":
        value /= 1024
        if value < 1024 or unit == "P":
            break
    return f"{value:.1f} {unit}iB"

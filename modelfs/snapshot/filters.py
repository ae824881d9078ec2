"""containerd's filter syntax, as ``List`` receives it, over a snapshot's fields (pure).

A request carries several filter strings: a snapshot matches if it matches any of them, and a
string matches if every comma-separated selector in it does. A selector is a field path
(``name``, ``parent``, ``kind``, ``labels.KEY``; a part may be double-quoted, as a label key with
dots must be), optionally an operator (``==``, ``!=``, ``~=`` a regular expression searched in the
value) and a value (bare up to the next comma, or double-quoted). A selector with no operator
asks that the field be present. containerd's unpacker finds the snapshot a remote snapshotter
made with ``labels."containerd.io/snapshot.ref"==CHAINID,parent==PARENT``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modelfs.errors import ModelfsError


class FilterError(ModelfsError):
    """A filter string that does not parse."""


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    operator: str  # "" (present), "==", "!=" or "~="
    value: str


# A snapshot's field, by path: its value, or None where it has no such field.
Fields = Callable[[tuple[str, ...]], str | None]

_BARE = re.compile(r"[^,\s]+")  # a bare value: anything up to a comma or a blank


def _quoted(text: str, at: int) -> tuple[str, int]:
    """The double-quoted string starting at ``at`` (backslash escapes a quote or a backslash)."""
    out = []
    index = at + 1
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            out.append(text[index + 1])
            index += 2
        elif char == '"':
            return "".join(out), index + 1
        else:
            out.append(char)
            index += 1
    raise FilterError(f"filter {text!r}: unterminated quote")


def _part(text: str, at: int, pattern: re.Pattern[str]) -> tuple[str, int]:
    if text.startswith('"', at):
        return _quoted(text, at)
    match = pattern.match(text, at)
    if match is None:
        raise FilterError(f"filter {text!r}: expected a name or value at {at}")
    return match.group(), match.end()


_FIELD = re.compile(r"[A-Za-z0-9_\-/:@+]+")  # a field path's part: no dot, no operator


def _selector(text: str, at: int) -> tuple[Selector, int]:
    path = []
    while True:
        part, at = _part(text, at, _FIELD)
        path.append(part)
        if not text.startswith(".", at):
            break
        at += 1
    operator = next((op for op in ("==", "!=", "~=") if text.startswith(op, at)), "")
    if not operator:
        return Selector(tuple(path), "", ""), at
    value, at = _part(text, at + 2, _BARE)
    if operator == "~=":
        try:
            re.compile(value)
        except re.error as error:
            raise FilterError(f"filter {text!r}: bad regular expression: {error}") from None
    return Selector(tuple(path), operator, value), at


def parse(text: str) -> tuple[Selector, ...]:
    """The selectors of one filter string (all must match); FilterError if it does not parse."""
    selectors = []
    at = 0
    text = text.strip()
    while True:
        selector, at = _selector(text, at)
        selectors.append(selector)
        if at == len(text):
            return tuple(selectors)
        if text[at] != ",":
            raise FilterError(f"filter {text!r}: unexpected {text[at]!r} at {at}")
        at += 1


def _matches(selector: Selector, fields: Fields) -> bool:
    value = fields(selector.path)
    if selector.operator == "":
        return value is not None
    if selector.operator == "==":
        return value == selector.value
    if selector.operator == "!=":
        return value != selector.value
    return value is not None and re.search(selector.value, value) is not None


def matcher(filters: Sequence[str]) -> Callable[[Fields], bool]:
    """A test of a snapshot's fields against the filters (no filters: everything matches)."""
    parsed = [parse(text) for text in filters if text.strip()]
    if not parsed:
        return lambda fields: True
    return lambda fields: any(all(_matches(s, fields) for s in one) for one in parsed)

"""A safetensors file's header, checked before any byte of the file is served. Pure.

The format: 8 bytes, little-endian, the header's length N; N bytes of JSON, an object of
tensors (``dtype``, ``shape``, ``data_offsets`` [begin, end] into the data after the header) and
an optional ``__metadata__`` of strings; then the data. A loader that trusts a lying header
reads outside a tensor or outside the file, so every promise the header makes is checked
against the file's size.
"""

from __future__ import annotations

import itertools
import math
import struct

from modelfs.untrusted import loads_json

PREFIX = 8
MAX_HEADER = 100 << 20  # the safetensors library's own limit

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def header_length(prefix: bytes, file_size: int) -> tuple[int | None, str | None]:
    """The header's length from the file's first 8 bytes, or None and what is wrong."""
    if file_size < PREFIX or len(prefix) < PREFIX:
        return None, f"is {file_size} bytes, shorter than a safetensors header's length field"
    (length,) = struct.unpack("<Q", prefix[:PREFIX])
    if length > MAX_HEADER:
        return None, f"declares a header of {length} bytes, more than {MAX_HEADER}"
    if PREFIX + length > file_size:
        return None, (
            f"declares a header of {length} bytes, past the end of the file ({file_size} bytes)"
        )
    return length, None


def header_problems(header: bytes, file_size: int) -> list[str]:
    """What is wrong with the header (the bytes after the length field); [] if nothing."""
    try:
        document = loads_json(header)
    except (ValueError, UnicodeDecodeError) as error:
        return [f"header is not JSON within its declared length ({error})"]
    if not isinstance(document, dict):
        return ["header is not a JSON object"]
    problems = []
    metadata = document.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        problems.append("__metadata__ is not an object of strings")
    data_size = file_size - PREFIX - len(header)
    spans: list[tuple[int, int, str]] = []
    for name, tensor in document.items():
        problem = _tensor_problem(tensor, data_size)
        if problem is not None:
            problems.append(f"tensor {name!r}: {problem}")
        else:
            begin, end = tensor["data_offsets"]
            spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (begin, _, following) in itertools.pairwise(spans):
        if begin < end:
            problems.append(f"tensors {name!r} and {following!r} overlap (at byte {begin})")
    return problems


def _tensor_problem(tensor: object, data_size: int) -> str | None:
    if not isinstance(tensor, dict):
        return "not an object"
    dtype, shape, offsets = tensor.get("dtype"), tensor.get("shape"), tensor.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"shape {shape!r} is not a list of sizes"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        return f"data_offsets {offsets!r} is not [begin, end]"
    begin, end = offsets
    if not 0 <= begin <= end:
        return f"data_offsets [{begin}, {end}] are out of order"
    if end > data_size:
        return f"data_offsets [{begin}, {end}] run past the file's data ({data_size} bytes)"
    expected = math.prod(shape) * DTYPE_SIZES[str(dtype)]
    if end - begin != expected:
        return f"holds {end - begin} bytes, but {dtype} of shape {shape} is {expected} bytes"
    return None

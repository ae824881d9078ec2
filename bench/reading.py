"""How every case reads a model's files: start to end, as ``cat`` does."""

from __future__ import annotations

from pathlib import Path

READ_SIZE = 1 << 20


def read_all(paths: list[Path]) -> int:
    """Read every file start to end in 1 MiB reads; the bytes read."""
    buffer = bytearray(READ_SIZE)
    total = 0
    for path in paths:
        with path.open("rb", buffering=0) as file:
            while count := file.readinto(buffer):
                total += count
    return total

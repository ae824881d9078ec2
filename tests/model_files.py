"""Model files for tests: well formed, so the mount's default scan policy serves them."""

from __future__ import annotations

import json
import os
import struct

_HEADER = 128  # bytes of header JSON, padded with spaces (JSON allows them)


def random_safetensors(size: int) -> bytes:
    """A safetensors file of exactly ``size`` bytes: one U8 tensor of random bytes."""
    length = size - 8 - _HEADER
    header = json.dumps({"w": {"dtype": "U8", "shape": [length], "data_offsets": [0, length]}})
    return struct.pack("<Q", _HEADER) + header.encode().ljust(_HEADER) + os.urandom(length)

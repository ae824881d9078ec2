"""Scanning one file through the reader it is given: a safetensors header, or a pickle.

A safetensors file costs its header (8 bytes, then the header: KiB). A pickle is scanned by
``picklescan`` (the scanner Hugging Face's hub runs; chosen over fickling and modelscan in
docs/trust.md): a zip-wrapped torch checkpoint costs its zip directory and its pickle members
only (224 KiB of a 13 MB checkpoint), a legacy torch file or a plain pickle its bytes up to the
end of its pickles. The reader is async (the mount's fetcher); the scanner is not, so it runs in
a worker thread that asks for bytes back on the trio thread.
"""

from __future__ import annotations

import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

import trio

from modelfs.errors import ModelfsError
from modelfs.trust.safetensors import PREFIX, header_length, header_problems
from modelfs.trust.scan_policy import PICKLE, SAFETENSORS

Read = Callable[[int, int], Awaitable[bytes]]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # protocol 2 and later begin with PROTO and the protocol's number
_PROTOCOLS = range(2, 6)
_READ_BUFFER = 1 << 20


@dataclass
class FileScan:
    """What scanning a file found, and what it cost."""

    path: str
    kind: str
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


async def scan_file(path: str, kind: str, size: int, read: Read) -> FileScan:
    """Scan the file ``path`` (``kind``: PICKLE or SAFETENSORS) of ``size`` bytes."""
    started = time.monotonic()
    result = FileScan(path, kind)

    async def counted(offset: int, length: int) -> bytes:
        data = await read(offset, length)
        result.bytes_read += len(data)
        return data

    if kind == SAFETENSORS:
        result.problems = await _safetensors(size, counted)
    elif kind == PICKLE:
        result.problems = await _pickle(path, size, counted)
    result.seconds = time.monotonic() - started
    return result


async def _safetensors(size: int, read: Read) -> list[str]:
    length, problem = header_length(await read(0, min(PREFIX, size)), size)
    if length is None:
        return [str(problem)]
    return header_problems(await read(PREFIX, length), size)


async def _pickle(path: str, size: int, read: Read) -> list[str]:
    if size == 0:
        return ["is empty, not a pickle"]
    head = await read(0, min(4, size))
    suffix = PurePosixPath(path).suffix.lower()
    is_pickle = len(head) > 1 and head[0] == _PICKLE_PROTO and head[1] in _PROTOCOLS
    if suffix == ".bin" and not (head.startswith(_ZIP_MAGIC) or is_pickle):
        return []  # a .bin of another format (raw weights): nothing a pickle loader reads
    reader: IO[bytes] = io.BufferedReader(_ReaderFile(read, size), _READ_BUFFER)
    return await trio.to_thread.run_sync(_picklescan, reader, path, suffix)


def _picklescan(data: IO[bytes], path: str, suffix: str) -> list[str]:
    # Imported here: a mount that scans no pickle does not pay for it.
    from picklescan.scanner import SafetyLevel, scan_bytes

    try:
        result = scan_bytes(data, path, suffix)
    except ModelfsError:
        raise  # the bytes did not come (the registry): the next read scans again
    except Exception as error:  # the scanner failed on the bytes: refuse what it cannot read
        return [f"cannot be scanned as a pickle ({type(error).__name__}: {error})"]
    problems = [
        f"imports {item.module}.{item.name} ("
        + ("dangerous" if item.safety == SafetyLevel.Dangerous else "outside the safe list")
        + ")"
        for item in result.globals
        if item.safety != SafetyLevel.Innocuous
    ]
    if result.scan_err and not problems:
        problems.append("cannot be read as a pickle (the scanner failed on it)")
    return problems


class _ReaderFile(io.RawIOBase):
    """A seekable read-only file over an async reader, for a worker thread."""

    def __init__(self, read: Read, size: int) -> None:
        self._read = read
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        length = min(len(buffer), self._size - self._position)
        if length <= 0:
            return 0
        data = trio.from_thread.run(self._read, self._position, length)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

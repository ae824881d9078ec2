"""The file that holds the cache's piece bytes: slot ``n`` is the ``slot_size`` bytes at
``n * slot_size``. Which piece is in which slot, and its checksum, is the index's business
(``modelfs.cache.store``); this part only moves bytes.

Pieces go in and out with direct I/O (``O_DIRECT``) where the buffer, length and offset allow it,
as they do for whole pieces in the mount's page-aligned piece buffers. Through the page cache,
storing a piece cost this machine ~1 CPU-second per GB in the kernel (allocating page-cache pages
and copying into them, then writing them back); direct I/O hands the buffer to the disk, ~0.06.
Reads likewise skip a copy, and leave the page cache to the model's readers. A write or read that
cannot go direct (a short last piece, a buffer of ``bytes``, a filesystem without ``O_DIRECT``)
goes through the page cache; both kinds of access stay coherent (the kernel writes back and
drops cached pages of a range before a direct access to it).

Durability is the index's commit: LMDB syncs its own file, which on Linux flushes the disk's
write cache, and with it the direct writes that completed before. A buffered write can still be
lost in a power cut; the piece's checksum, checked on every read, turns that into a miss.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path

# Direct I/O needs the buffer, the offset and the length aligned to the device's logical block
# size; 4096 covers every device in use.
_DIRECT_ALIGNMENT = 4096
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
Transfer = Callable[[int, list[memoryview], int], int]


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int]:
    call = ctypes.CDLL(None, use_errno=True).fallocate
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return call


class PieceFile:
    """Fixed-size slots in one file; thread-safe (positional reads and writes only)."""

    def __init__(self, path: Path, slot_size: int) -> None:
        self.path = path
        self.slot_size = slot_size
        self._buffered = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._direct: int | None = None
        if slot_size % _DIRECT_ALIGNMENT == 0:
            try:
                self._direct = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as error:
                if error.errno != errno.EINVAL:  # no O_DIRECT here (tmpfs): buffered only
                    raise

    def close(self) -> None:
        for fd in (self._buffered, self._direct):
            if fd is not None:
                os.close(fd)

    def write(self, slot: int, data: bytes | bytearray | memoryview) -> None:
        """Put ``data`` (at most ``slot_size`` bytes) at the start of ``slot``."""
        view = memoryview(data).cast("B")
        if self._move(os.pwritev, view, slot * self.slot_size) != len(view):
            raise OSError(errno.EIO, f"a short write to {self.path}")

    def read_into(self, slot: int, into: bytearray | memoryview) -> int:
        """Fill ``into`` from the start of ``slot``; the bytes read (fewer past the file's end)."""
        return self._move(os.preadv, memoryview(into).cast("B"), slot * self.slot_size)

    def read(self, slot: int, length: int) -> bytes:
        """``length`` bytes from the start of ``slot`` (fewer past the file's end)."""
        return os.pread(self._buffered, length, slot * self.slot_size)

    def free(self, slot: int) -> None:
        """Give the slot's disk blocks back: a freed slot holds nothing until it is written."""
        flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate()(self._buffered, flags, slot * self.slot_size, self.slot_size) != 0:
            code = ctypes.get_errno()
            if code != errno.EOPNOTSUPP:  # kept: the slot is written over when reused
                raise OSError(code, f"cannot free a slot of {self.path}: {os.strerror(code)}")

    def _move(self, call: Transfer, view: memoryview, offset: int) -> int:
        """Read or write (``os.preadv``/``os.pwritev``) all of ``view`` at ``offset``, direct
        when it can be; the bytes moved (fewer only for a read past the end of the file)."""
        done = 0
        if self._direct is not None and view and len(view) % _DIRECT_ALIGNMENT == 0:
            try:
                done = call(self._direct, [view], offset)
            except OSError as error:
                if error.errno != errno.EINVAL:  # EINVAL: a buffer that is not aligned
                    raise
        while done < len(view):
            moved = call(self._buffered, [view[done:]], offset + done)
            if moved == 0:
                break
            done += moved
        return done

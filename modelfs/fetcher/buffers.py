"""Piece-sized receive buffers, touched once and reused: the memory behind fetched pieces.

Every piece fetched needs a few MiB to land in. From malloc's heap, such blocks fragment it: a
cold read of a 2 GiB model grew the heap to 240 MB with under 90 MB in use, and the mount's peak
RSS grew with the model. From a fresh anonymous mapping each, every piece costs a page fault per
4 KiB, and fresh pages are slow to write to on a VM (here 0.3 GB/s, against 10 GB/s for pages
already touched). A pooled buffer is mapped once, outside the heap, and reused.

One pool serves the process (``PIECE_BUFFERS``): the registry's range GETs receive into it and
the piece fetcher copies cached pieces out of LMDB into it. A buffer is free again once nothing
refers to it: the pool hands out a ``memoryview`` of it, and
that view and every slice of it hold a reference to the buffer (CPython counts them), so a
buffer some reader, hash or cache write still holds is never handed out again. Only the trio
thread takes buffers; any thread may let them go.
"""

from __future__ import annotations

import mmap
import sys

from modelfs.pieces import DEFAULT_PIECE_SIZE


def _references(buffers: list[mmap.mmap], index: int) -> int:
    # One call shape for the probe and for every check, so the count they see is the same.
    return sys.getrefcount(buffers[index])


class BufferPool:
    """At most ``capacity`` reusable buffers of ``size`` bytes; beyond that, plain ones."""

    def __init__(self, size: int, capacity: int) -> None:
        self.size = size
        self.capacity = capacity
        self._buffers: list[mmap.mmap] = []
        probe = [mmap.mmap(-1, 1)]
        self._unreferenced = _references(probe, 0)  # held by the pool's list alone

    def take(self, length: int) -> memoryview | bytearray:
        """A writable buffer of exactly ``length`` bytes, contents undefined."""
        if length > self.size:
            return bytearray(length)
        for index in range(len(self._buffers)):
            if _references(self._buffers, index) == self._unreferenced:
                return memoryview(self._buffers[index])[:length]
        if len(self._buffers) < self.capacity:
            # Private: a shared anonymous mapping would be tmpfs memory, counted apart.
            self._buffers.append(
                mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            )
            return memoryview(self._buffers[-1])[:length]
        return bytearray(length)  # every pooled buffer is in use: more readers than usual


# Up to 8 fetches in flight, 12 pieces held in memory by the piece fetcher, and those readers,
# the blob hash and the cache writer still hold.
PIECE_BUFFERS = BufferPool(DEFAULT_PIECE_SIZE, 32)

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

The pool is the mount's memory bound. Before it grows past ``capacity`` it asks its holders
(the piece fetchers) to let go of pieces they keep only to save work, oldest first: pieces held
for readers that the cache can give again, pieces waiting for their blob's hash that are stored
already. Only when nothing can be spared (every buffer is still being received, written or
read) does it hand out a plain buffer, so what stays above the bound is what is in flight, and
that is set by the connection and queue counts, not by the model's size.
"""

from __future__ import annotations

import mmap
import sys
import weakref
from typing import Protocol

from modelfs.pieces import DEFAULT_PIECE_SIZE


def _references(buffers: list[mmap.mmap], index: int) -> int:
    # One call shape for the probe and for every check, so the count they see is the same.
    return sys.getrefcount(buffers[index])


class BufferHolder(Protocol):
    def spare_buffer(self) -> bool:
        """Let go of one buffer held only to save work; False when there is none."""
        ...


class BufferPool:
    """At most ``capacity`` reusable buffers of ``size`` bytes; beyond that, plain ones."""

    def __init__(self, size: int, capacity: int) -> None:
        self.size = size
        self.capacity = capacity
        self._buffers: list[mmap.mmap] = []
        # Handed out past the bound because every pooled buffer was in flight (metrics).
        self.plain_buffers = 0
        # Weak: a mount's fetcher goes with its mount, and the pool is the process's.
        self._holders: weakref.WeakSet[BufferHolder] = weakref.WeakSet()
        probe = [mmap.mmap(-1, 1)]
        self._unreferenced = _references(probe, 0)  # held by the pool's list alone

    def add_holder(self, holder: BufferHolder) -> None:
        """Ask ``holder`` to spare buffers before the pool goes past its capacity."""
        self._holders.add(holder)

    def take(self, length: int) -> memoryview | bytearray:
        """A writable buffer of exactly ``length`` bytes, contents undefined."""
        if length > self.size:
            return bytearray(length)
        free = self._free()
        if free is None and len(self._buffers) >= self.capacity:
            free = self._spared()
        if free is not None:
            return memoryview(self._buffers[free])[:length]
        if len(self._buffers) < self.capacity:
            # Private: a shared anonymous mapping would be tmpfs memory, counted apart.
            self._buffers.append(
                mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            )
            return memoryview(self._buffers[-1])[:length]
        self.plain_buffers += 1
        return bytearray(length)  # every buffer is in flight: more readers than usual

    @property
    def mapped(self) -> int:
        """Pooled buffers mapped so far: the share of the memory bound in use at its peak."""
        return len(self._buffers)

    def _free(self) -> int | None:
        for index in range(len(self._buffers)):
            if _references(self._buffers, index) == self._unreferenced:
                return index
        return None

    def _spared(self) -> int | None:
        """A buffer freed by asking the holders to spare theirs, one at a time."""
        for holder in list(self._holders):
            while holder.spare_buffer():
                # A spared piece may be held elsewhere as well (a reader, the cache writer).
                free = self._free()
                if free is not None:
                    return free
        return None


# Up to 8 fetches in flight and about as many pieces on their way to the cache; the pieces held
# for readers and for the blob hash are spared past this.
PIECE_BUFFERS = BufferPool(DEFAULT_PIECE_SIZE, 20)

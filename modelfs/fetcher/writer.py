"""Write-behind: fetched pieces go to their readers first and to the cache from a writer task.

While ``CacheWriter.running`` is active, a fetched piece is queued (a fetch waits for room, so
pieces never pile up) and a writer task stores up to ``WRITES_PER_TRANSACTION`` at a time
(``PieceCache.put_many``: one LMDB commit records them all); until then a queued piece counts as
cached (served, hashed, not fetched again). The writer asks inside the transaction that records
them whether the piece is still good (its blob did not fail its check since the piece was
fetched), so no piece of a failed blob is stored after its blob was dropped. Without
``running``, each piece is stored as it is put.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from modelfs.cache import PieceCache, PieceWrite
from modelfs.errors import CacheError
from modelfs.sources.interface import BlobBytes
from modelfs.sources.stats import MountStats, error_kind

log = logging.getLogger(__name__)

# Pieces waiting for the writer before a fetch waits for room; the most it stores at a time (one
# commit records them all).
QUEUED_WRITES = 4
WRITES_PER_TRANSACTION = 4


@dataclass(frozen=True)
class QueuedWrite(PieceWrite):
    """A fetched piece on its way to the cache, with its blob's rejections when it was fetched:
    if its blob failed its check since, the piece is not stored."""

    rejections: int = 0


class CacheWriter:
    """Stores fetched pieces in ``cache``; see the module's docstring.

    ``still_good(write)`` is asked inside the transaction that records it (writer thread);
    ``stored_whole(digest, size)`` is awaited when a piece completed its blob in the cache.
    """

    def __init__(
        self,
        cache: PieceCache,
        stats: MountStats,
        still_good: Callable[[QueuedWrite], bool],
        stored_whole: Callable[[str, int], Awaitable[None]],
    ) -> None:
        self._cache = cache
        self._stats = stats
        self._still_good = still_good
        self._stored_whole = stored_whole
        self._writes: trio.MemorySendChannel[QueuedWrite] | None = None
        self._queued: dict[tuple[str, int], BlobBytes] = {}

    def queued(self, key: tuple[str, int]) -> BlobBytes | None:
        """The piece if it is on its way to the cache (found there as if cached)."""
        return self._queued.get(key)

    def queued_indexes(self, digest: str) -> set[int]:
        """The pieces of a blob on their way to the cache (a few: fetches wait for room)."""
        return {index for queued, index in self._queued if queued == digest}

    def drop_blob(self, digest: str) -> None:
        """Forget the queued pieces of a blob that failed its check (the writer skips them)."""
        for key in [key for key in self._queued if key[0] == digest]:
            del self._queued[key]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """A writer task for the pieces put meanwhile. On leaving, the queued pieces are stored;
        on cancellation they are dropped."""
        send, receive = trio.open_memory_channel[QueuedWrite](QUEUED_WRITES)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_queued, receive)
                self._writes = send
                try:
                    yield
                finally:
                    self._writes = None
                    send.close()  # the writer stores what is queued, then ends
        except BaseExceptionGroup as group:
            # A mount's one-line error must not arrive wrapped in a group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._queued.clear()  # stored, or dropped by a cancellation

    async def put(self, write: QueuedWrite) -> None:
        """Queue the piece for the writer (waiting for room), or store it now without one."""
        if not await self._queue(write):
            await self._store([write])

    async def _queue(self, write: QueuedWrite) -> bool:
        if self._writes is None:
            return False
        self._queued[(write.digest, write.index)] = write.data
        try:
            # Shielded: a piece that arrived is kept even if its reader went away (an unmount
            # cancels prefetch); the writer drains the queue, so the wait is short.
            with trio.CancelScope(shield=True):
                await self._writes.send(write)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._dequeue(write)
            return False  # ``running`` ended while this waited for room
        return True

    async def _write_queued(self, receive: trio.MemoryReceiveChannel[QueuedWrite]) -> None:
        async with receive:
            async for write in receive:
                batch = [write]
                while len(batch) < WRITES_PER_TRANSACTION:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await self._store(batch)
                except CacheError as error:
                    # Its readers have their bytes: the pieces are fetched again when next read.
                    for dropped in batch:
                        self._dequeue(dropped)
                    self._stats.failed(error_kind(error), str(error))
                    log.error("%s; %d pieces were not cached", error, len(batch))

    async def _store(self, writes: list[QueuedWrite]) -> None:
        """Store pieces in one transaction, except those of a blob that failed since."""
        results = await trio.to_thread.run_sync(self._cache.put_many, writes, self._still_good)
        for write, result in zip(writes, results, strict=True):
            self._dequeue(write)
            # A cache out of use (its index damaged) said so once, when it was found.
            if not result.stored and self._still_good(write) and self._cache.damage is None:
                log.warning(
                    "cache full: piece %d of %s served without caching", write.index, write.digest
                )
            if result.blob_complete:
                await self._stored_whole(write.digest, write.blob_size)

    def _dequeue(self, write: QueuedWrite) -> None:
        key = (write.digest, write.index)
        if self._queued.get(key) is write.data:  # not a later fetch of the same piece
            del self._queued[key]

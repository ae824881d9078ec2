"""The piece fetcher: turns "bytes [offset, offset+size) of blob B" into pieces, each fetched once.

Order of sources for a piece: a few recently used pieces held in memory, then the node's LMDB
cache, then the blob source (registry or layout). A piece several readers want at once is fetched
by the first; the others wait on its result. When a put completes a blob, the whole blob is
checked against its sha256 digest before the read that completed it returns; a mismatch drops
every piece of the blob and fails that read, so no byte proven wrong is served.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from modelfs.cache import PieceCache
from modelfs.errors import IntegrityError, ModelfsError
from modelfs.fetcher.source import BlobSource
from modelfs.fs.tree import BlobRef
from modelfs.pieces import piece_span, pieces_covering

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """One fetch that other readers of the same piece wait on."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: ModelfsError | None = None


@dataclass
class FetchStats:
    """Counters of where bytes came from (for status, metrics and tests)."""

    source_bytes: int = 0
    cache_bytes: int = 0
    source_requests: int = 0


class PieceFetcher:
    """Reads byte ranges of blobs through the cache, fetching missing pieces from a source."""

    def __init__(
        self,
        source: BlobSource,
        cache: PieceCache,
        *,
        max_concurrent: int = 8,
        memory_pieces: int = 8,
        on_rejected: Callable[[str], None] = lambda digest: None,
    ) -> None:
        self.source = source
        self.cache = cache
        self.stats = FetchStats()
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._memory: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._memory_pieces = memory_pieces
        # Told the digest of a blob that failed its check, so its readers' caches can be purged.
        self._on_rejected = on_rejected
        self._in_flight: dict[tuple[str, int], _InFlight] = {}
        self._verified: set[str] = set()
        # Blobs that failed their digest check, each with the lock of its recheck.
        self._suspect: dict[str, trio.Lock] = {}

    async def read(self, blob: BlobRef, offset: int, size: int) -> bytes | memoryview:
        """``size`` bytes of ``blob`` from ``offset``, fewer only where the blob ends."""
        indexes = pieces_covering(offset, size, blob.size, self.cache.piece_size)
        if not indexes:
            return b""
        piece_size = self.cache.piece_size
        if len(indexes) == 1:
            data = await self.piece(blob, indexes[0])
            start = offset - indexes[0] * piece_size
            return memoryview(data)[start : start + size]
        parts: list[bytes] = [b""] * len(indexes)

        async def fetch_into(slot: int, index: int) -> None:
            parts[slot] = await self.piece(blob, index)

        async with trio.open_nursery() as nursery:
            for slot, index in enumerate(indexes):
                nursery.start_soon(fetch_into, slot, index)
        joined = b"".join(parts)
        start = offset - indexes[0] * piece_size
        return memoryview(joined)[start : start + size]

    async def piece(self, blob: BlobRef, index: int) -> bytes:
        """One whole piece, from memory, the cache, a fetch under way, or the source."""
        if blob.digest in self._suspect:
            await self._recheck(blob)
        return await self._piece(blob, index)

    async def _recheck(self, blob: BlobRef) -> None:
        """A blob that failed its digest check is served again only once it checks out whole."""
        async with self._suspect[blob.digest]:
            if blob.digest not in self._suspect:
                return  # another reader rechecked it while we waited
            async with trio.open_nursery() as nursery:
                for index in self.cache.missing(blob.digest, blob.size):
                    nursery.start_soon(self._piece, blob, index)
            if blob.digest in self._verified or self.cache.is_verified(blob.digest):
                del self._suspect[blob.digest]
            else:
                raise IntegrityError(
                    f"blob {blob.digest} could not be checked whole (is --cache-size smaller "
                    "than the file?); it failed its digest check before, so it is not served"
                )

    async def _piece(self, blob: BlobRef, index: int) -> bytes:
        key = (blob.digest, index)
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
            return data
        data = self.cache.get(blob.digest, index)
        if data is not None:
            self.stats.cache_bytes += len(data)
            await self._verify_once(blob)
            self._remember(key, data)
            return data
        waiting = self._in_flight.get(key)
        if waiting is not None:
            await waiting.done.wait()
            if waiting.error is not None:
                raise waiting.error
            if waiting.data is None:  # the fetching reader was cancelled: fetch it ourselves
                return await self._piece(blob, index)
            return waiting.data
        flight = _InFlight()
        self._in_flight[key] = flight
        try:
            flight.data = await self._fetch(blob, index)
            self._remember(key, flight.data)
            return flight.data
        except ModelfsError as error:
            flight.error = error
            raise
        finally:
            del self._in_flight[key]
            flight.done.set()

    async def _fetch(self, blob: BlobRef, index: int) -> bytes:
        start, length = piece_span(index, blob.size, self.cache.piece_size)
        async with self._limiter:
            data = await self.source.read_range(blob.digest, start, length)
        if len(data) != length:
            raise IntegrityError(
                f"{self.source.name}: blob {blob.digest} gave {len(data)} bytes for a piece of "
                f"{length} at offset {start}; the registry's copy may be damaged"
            )
        self.stats.source_bytes += length
        self.stats.source_requests += 1
        put = await trio.to_thread.run_sync(self.cache.put, blob.digest, index, data, blob.size)
        if put.blob_complete:
            await self._verify(blob)
        elif not put.stored:
            log.warning("cache full: piece %d of %s served without caching", index, blob.digest)
        return data

    async def _verify_once(self, blob: BlobRef) -> None:
        """A blob found complete but unchecked (a process died before checking it) is checked."""
        if blob.digest in self._verified:
            return
        if self.cache.is_verified(blob.digest):
            self._verified.add(blob.digest)
        elif self.cache.is_complete(blob.digest, blob.size):
            await self._verify(blob)

    async def _verify(self, blob: BlobRef) -> None:
        """Hash the whole blob from the cache; drop it and fail if it does not match its digest."""
        algorithm, _, expected = blob.digest.partition(":")
        if algorithm != "sha256":
            raise IntegrityError(f"blob {blob.digest}: only sha256 digests can be checked")

        def hash_blob() -> str | None:
            hasher = hashlib.sha256()
            for data in self.cache.iter_blob(blob.digest, blob.size):
                if data is None:
                    return None
                hasher.update(data)
            return hasher.hexdigest()

        actual = await trio.to_thread.run_sync(hash_blob)
        if actual is None:
            return  # a piece was evicted or dropped meanwhile: checked when complete again
        if actual != expected:
            self.cache.drop_blob(blob.digest)
            self._suspect.setdefault(blob.digest, trio.Lock())
            self._on_rejected(blob.digest)
            for key in [key for key in self._memory if key[0] == blob.digest]:
                del self._memory[key]
            log.error(
                "blob %s from %s does not match its digest (got sha256:%s); "
                "its pieces were dropped",
                blob.digest,
                self.source.name,
                actual,
            )
            raise IntegrityError(
                f"blob {blob.digest} from {self.source.name} does not match its digest; "
                "dropped from the cache, the next read fetches it again"
            )
        self.cache.mark_verified(blob.digest, blob.size)
        self._verified.add(blob.digest)

    def _remember(self, key: tuple[str, int], data: bytes) -> None:
        self._memory[key] = data
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_pieces:
            self._memory.popitem(last=False)

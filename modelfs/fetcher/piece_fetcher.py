"""The piece fetcher: turns "bytes [offset, offset+size) of blob B" into pieces, each fetched once.

Order of sources for a piece: the latest pieces fetched, held in memory, then the node's LMDB cache,
then the blob source (registry or layout). A piece several readers want at once is fetched by the
first; the others wait on its result.

Fetches take connection slots by priority: a read waiting on the piece (``DEMAND``) goes before
the readahead of a sequential reader (``READAHEAD``), which goes before hints and whole-model
prefetch (``BACKGROUND``). Lower priorities are capped below the total, so prefetch never holds
every connection, and a demand read promotes a queued prefetch of the piece it waits for.

Prefetch plans its work with ``prefetch_jobs``: consecutive pieces found nowhere are claimed at
once and fetched in runs, one range request per run when the source can (``PieceRuns``: the
registry), each piece handed on as it lands. A read of a claimed piece waits for it, as for any
fetch under way.

Each blob is hashed while its pieces arrive, in order (out-of-order pieces are caught up from
memory or the cache). The piece that completes the hash completes the check: a blob is marked
verified only once it hashed whole to its digest; a mismatch drops every piece of the blob and
fails the read (or prefetch) that completed it, so no byte proven wrong is served again.

A piece fetched goes to its readers before it is stored: inside ``writing()`` a writer task
stores the queued pieces, several at a time, and until then a queued piece counts as cached
(served, hashed, not fetched again). The writer asks inside the transaction that records them
whether the piece's blob failed its check since the piece was fetched, so no piece of a failed
blob is stored after its blob was dropped.

Pieces that nothing vouches for before their blob is whole (from peers, for a model without a
piece index, when the source says so: ``UnvouchedPieces``) are never served piece by piece: the
first read of such a blob fetches it whole and checks it first. If it fails, the source takes it
from the registry only and it is fetched again; a piece of the failed try that lands late drops
itself, so the next try cannot keep it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import partial

import trio

from modelfs.artifact.tree import BlobRef, FileNode
from modelfs.cache import PieceCache, piece_checksum
from modelfs.errors import IntegrityError, ModelfsError, PieceAlteredError, StreamLostError
from modelfs.fetcher.blob_hash import BlobHash, BlobHashes
from modelfs.fetcher.index import IndexCheckedPieces, PieceIndexLookup, matches_index
from modelfs.fetcher.recent import RecentPieces
from modelfs.fetcher.slots import ConnectionSlots, Priority, Ticket
from modelfs.fetcher.writer import CacheWriter, QueuedWrite
from modelfs.pieces import piece_runs, piece_span, pieces_covering
from modelfs.sources.buffers import PIECE_BUFFERS
from modelfs.sources.interface import (
    BlobBytes,
    BlobSource,
    Deliver,
    PieceRuns,
    UnvouchedPieces,
)
from modelfs.sources.stats import (
    CACHE,
    ON_DEMAND,
    PEER,
    PREFETCH,
    REGISTRY,
    SELF_COUNTED,
    MountStats,
    attributing,
    error_kind,
)

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """One fetch that other readers of the same piece wait on."""

    ticket: Ticket
    done: trio.Event = field(default_factory=trio.Event)
    data: BlobBytes | None = None
    error: ModelfsError | None = None


# A planned fetch (``PieceFetcher.prefetch_jobs``), for the caller to run in a task of its own.
Job = Callable[[], Awaitable[None]]

# Consecutive pieces a prefetch fetches in one request, at most: 16 MiB of 4 MiB pieces. A
# registry spends CPU on every request (docker-registry here: ~4 CPU-s to serve 2 GiB as 4 MiB
# ranges, ~2.6 as 16 MiB ones), and on this machine its CPU is the mount's.
RUN_PIECES = 4


# Tries of a read whose piece was altered in transit, or whose blob must be checked again.
_TRIES = 2


def _unless_registry(served_by: list[str]) -> str | None:
    # The registry and its mirrors count what they send themselves (``MeteredRepository``).
    return None if served_by[0] in SELF_COUNTED else served_by[0]


class PieceFetcher:
    """Reads byte ranges of blobs through the cache, fetching missing pieces from a source."""

    def __init__(
        self,
        source: BlobSource,
        cache: PieceCache,
        *,
        connections: int = 8,
        readahead_connections: int = 6,
        background_connections: int = 4,
        memory_pieces: int = 12,
        on_rejected: Callable[[str], None] = lambda digest: None,
        stats: MountStats | None = None,
        source_kind: str = REGISTRY,
        index: PieceIndexLookup | None = None,
        serve_unverified: bool = False,
    ) -> None:
        """``index``: where the model's piece index is found (a source that checks indexed
        pieces itself is its own); ``serve_unverified``: serve the pieces of a blob without an
        index before the blob is checked whole (a reader may get bytes the check then fails)."""
        self.source = source
        self.cache = cache
        self._source_checks_index = isinstance(source, IndexCheckedPieces)
        self._index = source if isinstance(source, IndexCheckedPieces) else index
        self._serve_unverified = serve_unverified
        # Bytes a registry sends are counted by the metered repository itself (pieces and
        # whole blobs alike); the fetcher counts the other sources, and cache loads.
        self.stats = MountStats() if stats is None else stats
        self._source_kind = source_kind  # what ``source`` is, unless the registry served
        # Where a blob's bytes came from, as messages name it: in a cluster, peers too.
        self._supplier = f"peers or {source.name}" if source_kind == PEER else source.name
        self._slots = ConnectionSlots(
            connections,
            {
                Priority.READAHEAD: readahead_connections,
                Priority.BACKGROUND: background_connections,
            },
        )
        self._recent = RecentPieces(memory_pieces)
        # Told the digest of a blob that failed its check, so its readers' caches can be purged.
        self._on_rejected = on_rejected
        self._unvouched = source if isinstance(source, UnvouchedPieces) else None
        self._runs = source if isinstance(source, PieceRuns) else None
        self._rejections: dict[str, int] = {}  # digest -> times it failed its check
        self._in_flight: dict[tuple[str, int], _InFlight] = {}
        self._hashes = BlobHashes(cache.piece_size, self._read_back)
        self._verified: set[str] = set()
        # Of those, the ones this process hashed whole: each piece's checksum as hashed, for the
        # cache to vouch for exactly those bytes once it holds them all.
        self._hashed: dict[str, list[int]] = {}
        # Blobs that failed their digest check, each with the lock of its recheck.
        self._suspect: dict[str, trio.Lock] = {}
        self._writer = CacheWriter(cache, self.stats, self._still_good, self._stored_whole)
        PIECE_BUFFERS.add_holder(self)

    def writing(self) -> AbstractAsyncContextManager[None]:
        """Store fetched pieces in a writer task, so no reader waits for an LMDB write
        (``CacheWriter``); without it, each fetch stores its piece."""
        return self._writer.running()

    async def read(
        self, blob: BlobRef, offset: int, size: int, priority: Priority = Priority.DEMAND
    ) -> bytes | memoryview:
        """``size`` bytes of ``blob`` from ``offset``, fewer only where the blob ends."""
        indexes = pieces_covering(offset, size, blob.size, self.cache.piece_size)
        if not indexes:
            return b""
        piece_size = self.cache.piece_size
        if len(indexes) == 1:
            data = await self.piece(blob, indexes[0], priority)
            start = offset - indexes[0] * piece_size
            return memoryview(data)[start : start + size]
        parts: list[BlobBytes] = [b""] * len(indexes)
        failed: list[ModelfsError] = []

        async def fetch_into(slot: int, index: int, cancel_scope: trio.CancelScope) -> None:
            try:
                parts[slot] = await self.piece(blob, index, priority)
            except ModelfsError as error:
                # The read fails with one error, not a group of them: the first; the rest stop.
                failed.append(error)
                cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for slot, index in enumerate(indexes):
                nursery.start_soon(fetch_into, slot, index, nursery.cancel_scope)
        if failed:
            raise failed[0]
        # One copy, of just the bytes asked for.
        end = offset + size
        return b"".join(
            memoryview(part)[max(offset - index * piece_size, 0) : end - index * piece_size]
            for index, part in zip(indexes, parts, strict=True)
        )

    async def read_file(self, node: FileNode, offset: int, size: int) -> bytes | memoryview:
        """``size`` bytes of a file from ``offset``, its layer fetched first if it is deferred.
        A decompressed stream that lost a piece (``StreamLostError``) is made again, and the
        bytes read once more."""
        await node.locate()
        try:
            return await self.read(node.blob, node.offset + offset, size)
        except StreamLostError as lost:
            log.warning("%s: %s", node.path, lost)
            await node.locate()
            return await self.read(node.blob, node.offset + offset, size)

    async def piece(
        self, blob: BlobRef, index: int, priority: Priority = Priority.DEMAND
    ) -> BlobBytes:
        """One whole piece whose bytes something vouched for, from memory, the cache, a fetch
        under way, or the source: checked against the piece index as it landed, or its whole
        blob checked first (``_whole_first``). A piece altered in transit is fetched again once.
        """
        for attempt in range(_TRIES):
            if await self._whole_before_serving(blob):
                await self._whole_first(blob)
            try:
                data = await self._piece(blob, index, priority)
            except PieceAlteredError:
                if attempt == _TRIES - 1:
                    raise
                continue
            if blob.digest in self._verified or await self._checked_by_piece(blob):
                return data
            # A piece of a checked blob was evicted and fetched again: the blob is checked again.
        raise IntegrityError(
            f"blob {blob.digest} could not be checked whole (is --cache-size smaller than the "
            "file?); it must be before it is served, so it is not"
        )

    @property
    def serve_unverified(self) -> bool:
        return self._serve_unverified

    def rejections(self, digest: str) -> int:
        """How often the blob failed its check in this process."""
        return self._rejections.get(digest, 0)

    async def check_whole(self, blob: BlobRef) -> None:
        """Have a blob without a piece index checked whole now, fetching what is missing (a
        ``serve_unverified`` reader at the end of its file); raises if it fails twice."""
        if blob.digest in self._verified or await self._indexed(blob) is not None:
            return
        if not self.cache.is_verified(blob.digest):
            self._suspect.setdefault(blob.digest, trio.Lock())
            await self._whole_first(blob)

    async def look_up_index(self, manifest_digest: str) -> None:
        """Look up the piece index of the manifest the model was pinned to, now (once), rather
        than on the first read."""
        if self._index is not None:
            self._index.pin(manifest_digest)
            await self._index.piece_index()

    async def _checked_by_piece(self, blob: BlobRef) -> bool:
        """Whether the blob's pieces are served one by one: each checked against the piece
        index, or (``serve_unverified``) unchecked until the blob is whole."""
        return self._serve_unverified or await self._indexed(blob) is not None

    async def _indexed(self, blob: BlobRef) -> tuple[str, ...] | None:
        """The piece index's digest of each piece of the blob; None if it has none for it."""
        index = None if self._index is None else await self._index.piece_index()
        if index is None or index.piece_size != self.cache.piece_size:
            return None
        pieces = index.blobs.get(blob.digest)
        return None if pieces is None or pieces.size != blob.size else pieces.pieces

    async def _whole_before_serving(self, blob: BlobRef) -> bool:
        """Whether the blob must be fetched whole and checked before a byte of it is served: it
        failed its check before, or nothing vouches for its pieces one by one."""
        if blob.digest in self._suspect:
            return True
        if blob.digest in self._verified:
            return False
        unvouched = self._unvouched is not None and (
            await self._unvouched.whole_before_serving(blob.digest)
        )
        if not unvouched and await self._checked_by_piece(blob):
            return False
        if self.cache.is_verified(blob.digest):
            self._verified.add(blob.digest)
            return False
        self._suspect.setdefault(blob.digest, trio.Lock())
        return True

    async def prefetch(self, blob: BlobRef, index: int, priority: Priority) -> None:
        """Have the piece in the cache; readahead also keeps it in memory for its reader."""
        if blob.digest in self._suspect or (blob.digest, index) in self._recent:
            return
        # Background prefetch only fills the cache; readahead also loads cached pieces to memory.
        if priority == Priority.BACKGROUND and (
            (blob.digest, index) in self._in_flight
            or self._writer.queued((blob.digest, index)) is not None
            or self.cache.has(blob.digest, index)
        ):
            return
        await self._piece(blob, index, priority)

    async def _whole_first(self, blob: BlobRef) -> None:
        """Serve the blob only once it checked out whole: it failed its check before, or its
        pieces may come from peers nothing vouches for."""
        async with self._suspect[blob.digest]:
            if blob.digest not in self._suspect:
                return  # another reader checked it while we waited
            # A failed blob of unvouched pieces comes from the registry next; one more try for
            # pieces of the failed one still landing (they drop themselves).
            unvouched = self._unvouched is not None and (
                await self._unvouched.whole_before_serving(blob.digest)
            )
            for _ in range(3 if unvouched else 2):  # a second try for a blob altered in transit
                good = await self._fetch_whole(blob)
                if blob.digest in self._verified or self.cache.is_verified(blob.digest):
                    del self._suspect[blob.digest]
                    return
                if good and blob.size > self.cache.max_size:
                    break  # it cannot be whole in the cache: trying again fetches it again
                # Else another process dropped pieces of it meanwhile (its own check of them
                # failed): they are fetched again.
            if not good:
                raise IntegrityError(
                    f"blob {blob.digest} from {self._supplier} does not match its digest; "
                    "dropped from the cache, the next read fetches it again"
                )
            raise IntegrityError(
                f"blob {blob.digest} could not be checked whole (is --cache-size smaller than "
                "the file?); it must be before it is served, so it is not"
            )

    async def _fetch_whole(self, blob: BlobRef) -> bool:
        """Fetch the blob's missing pieces and check it; False if it failed its check."""
        rejected = False
        failed: list[ModelfsError] = []

        async def fetch(index: int) -> None:
            nonlocal rejected
            try:
                await self._piece(blob, index, Priority.DEMAND)
            except IntegrityError:
                rejected = True  # the others finish: none lands after the next try started
            except ModelfsError as error:
                failed.append(error)  # raised alone once the others finished, not as a group

        async with trio.open_nursery() as nursery:
            for index in self.cache.missing(blob.digest, blob.size):
                nursery.start_soon(fetch, index)
        if failed:
            raise failed[0]
        if not rejected:
            try:
                await self._verify_once(blob)  # complete in the cache, never checked
            except IntegrityError:
                rejected = True
        return not rejected

    async def _piece(self, blob: BlobRef, index: int, priority: Priority) -> BlobBytes:
        key = (blob.digest, index)
        data = self._recent.get(key)
        if data is not None:
            return data
        data = self._writer.queued(key)  # fetched, on its way to the cache
        if data is not None:
            if priority != Priority.BACKGROUND:
                self._recent.remember(key, data)
            return data
        waiting = self._in_flight.get(key)
        if waiting is not None:
            self._slots.promote(waiting.ticket, priority)
            await waiting.done.wait()
            if waiting.error is not None:
                raise waiting.error
            if waiting.data is None:  # the fetching task was cancelled: fetch it ourselves
                return await self._piece(blob, index, priority)
            return waiting.data
        flight = self._in_flight[key] = _InFlight(Ticket(priority))
        try:
            data = await self._from_cache(blob, index)
            if data is None:
                await self._fetch(blob, index, [flight])
            else:
                if flight.ticket.priority != Priority.BACKGROUND:
                    self._recent.remember(key, data)
                self._settle(key, flight, data)
        except ModelfsError as error:
            if not flight.done.is_set():  # else ``_fetch`` settled it and counted the failure
                self.stats.failed(error_kind(error), str(error))
                self._settle(key, flight, error=error)
            raise
        finally:
            self._settle(key, flight)  # cancelled: its waiters fetch it themselves
        assert flight.data is not None  # ``_fetch`` returns only once every piece landed
        return flight.data

    def prefetch_jobs(self, blob: BlobRef, indexes: Sequence[int], priority: Priority) -> list[Job]:
        """The work that prefetches ``indexes`` of ``blob``, for the caller to run in its tasks.

        Consecutive pieces that are nowhere yet (not in memory, queued, in flight or cached) are
        claimed now and fetched in runs of up to ``RUN_PIECES``, one request each when the source
        can; any other piece is a job of its own (a cache load, or a piece whose fetch is under
        way). A reader of a claimed piece waits for its run, and raises its priority, so every
        job must be started (a job cancelled before it began lets go of its claims).
        """
        if blob.digest in self._suspect:
            return []
        jobs: list[Job] = []
        missing: list[tuple[str, int]] = []
        for index in indexes:
            key = (blob.digest, index)
            if (
                key in self._recent
                or self._writer.queued(key) is not None
                or key in self._in_flight
                or self.cache.has(blob.digest, index)
            ):
                jobs.append(partial(self.prefetch, blob, index, priority))
            else:
                missing.append(key)
        for _, run in piece_runs(missing, RUN_PIECES if self._runs is not None else 1):
            ticket = Ticket(priority)  # one connection for the run: one ticket for its pieces
            flights = [_InFlight(ticket) for _ in run]
            for index, flight in zip(run, flights, strict=True):
                self._in_flight[(blob.digest, index)] = flight
            jobs.append(partial(self._fetch, blob, run[0], flights))
        return jobs

    async def _from_cache(self, blob: BlobRef, index: int) -> BlobBytes | None:
        """The cached piece if something vouched for it (or ``serve_unverified``): a piece
        stored unvouched is checked against the piece index here, else fetched again."""
        if not self.cache.has(blob.digest, index):
            return None
        started = time.monotonic()
        indexed = await self._indexed(blob)
        if indexed is not None:
            data = await self._cache_get(blob, index, expected=indexed[index])
        else:
            data = await self._cache_get(blob, index)
            if data is None and self.cache.has(blob.digest, index):
                # Stored before its blob was checked (by any process): the blob is checked
                # (again) before ``piece`` serves it, unless these are the very bytes this
                # process hashed it over (its mark waits for the writer); not fetched again.
                data = await self._cache_get(blob, index, unvouched=True)
                if data is None or not self._hashed_over(blob.digest, index, data):
                    self._unverify(blob.digest)
        if data is None:
            return None  # evicted meanwhile, unvouched, or a corrupt entry: fetched instead
        self.stats.timed(CACHE, time.monotonic() - started)
        self.stats.fetched(CACHE, len(data))
        if indexed is None:
            await self._verify_once(blob)
        return data

    async def _fetch(self, blob: BlobRef, first: int, flights: list[_InFlight]) -> None:
        """Fetch the consecutive pieces from ``first``, one per flight (claimed by the caller,
        all with one ticket), and settle each flight as its piece lands.

        A landed piece is queued for the cache and handed to its blob's hash before its readers
        get it. On an error the pieces not landed yet fail with it; on cancellation their
        readers fetch them themselves.
        """
        piece_size = self.cache.piece_size
        start = first * piece_size
        lengths = [
            piece_span(first + place, blob.size, piece_size)[1] for place in range(len(flights))
        ]
        rejections = self._rejections.get(blob.digest, 0)
        ticket = flights[0].ticket

        async def land(place: int, data: BlobBytes) -> None:
            index = first + place
            if len(data) != lengths[place]:
                raise IntegrityError(
                    f"{self.source.name}: blob {blob.digest} gave {len(data)} bytes for a piece "
                    f"of {lengths[place]} at offset {index * piece_size}; the registry's copy may "
                    "be damaged"
                )
            vouched = await self._check_landed(blob, index, data)
            # Handed to the hash before it is in the cache, so the hash never reads it back.
            state = None if vouched else self._hash_state_for(blob, index, data)
            write = QueuedWrite(
                blob.digest, index, data, blob.size, vouched=vouched, rejections=rejections
            )
            # Queued holding the connection: a writer that falls behind holds fetching back,
            # rather than fetched pieces piling up in tasks waiting for room.
            await self._writer.put(write)
            if state is not None:
                # A prefetch hands its piece to the hash without queueing for it: waiting, each
                # held its piece, and with sha256 behind on a busy machine 46 pieces (184 MiB)
                # piled up.
                await self._advance_hash(blob, state, wait=ticket.priority == Priority.DEMAND)
            if self._rejections.get(blob.digest, 0) != rejections:
                # Its blob failed while this piece was on its way (it is not stored).
                raise IntegrityError(
                    f"blob {blob.digest} from {self._supplier} does not match its digest; "
                    "dropped from the cache, the next read fetches it again"
                )
            if ticket.priority != Priority.BACKGROUND:
                self._recent.remember((blob.digest, index), data)
            self._settle((blob.digest, index), flights[place], data)

        try:
            if blob.cache_only:
                raise await self._stream_lost(blob, first)
            async with self._slots.slot(ticket):
                purpose = ON_DEMAND if ticket.priority == Priority.DEMAND else PREFETCH
                for _ in flights:
                    self.stats.fetch_started(purpose)
                await self._read_pieces(blob.digest, start, lengths, land)
            if not all(flight.done.is_set() for flight in flights):
                raise IntegrityError(
                    f"{self.source.name}: blob {blob.digest} gave fewer pieces than asked from "
                    f"offset {start}; the registry's copy may be damaged"
                )
        except ModelfsError as error:
            self.stats.failed(error_kind(error), str(error))
            for place, flight in enumerate(flights):
                self._settle((blob.digest, first + place), flight, error=error)
            raise
        finally:
            for place, flight in enumerate(flights):
                self._settle((blob.digest, first + place), flight)

    async def _stream_lost(self, blob: BlobRef, index: int) -> StreamLostError:
        """A piece of a stream only the cache holds is gone from it (evicted, or dropped as
        damaged), and no source has it: the stream is dropped whole, so that the next read of
        its file makes it again (``modelfs.mount.model.DecompressedStream``)."""
        await trio.to_thread.run_sync(self.cache.drop_blob, blob.digest)
        return StreamLostError(
            f"piece {index} of {blob.digest} is gone from the cache; its layer is fetched and "
            "decompressed again"
        )

    async def _read_pieces(
        self, digest: str, start: int, lengths: list[int], deliver: Deliver
    ) -> None:
        """The pieces from the source, in one request when it can, else one range at a time.

        What a source other than the registry sent is counted here (the registry counts its own).
        """
        if self._runs is not None:
            with attributing(self._source_kind) as served_by:
                counted = self.stats.counting(partial(_unless_registry, served_by), deliver)
                await self._runs.read_pieces(digest, start, lengths, counted)
            return
        for place, length in enumerate(lengths):
            with attributing(self._source_kind) as served_by:
                counted = self.stats.counting(partial(_unless_registry, served_by), deliver)
                data = await self.source.read_range(digest, start, length)
            await counted(place, data)
            start += length

    def _settle(
        self,
        key: tuple[str, int],
        flight: _InFlight,
        data: BlobBytes | None = None,
        error: ModelfsError | None = None,
    ) -> None:
        """The fetch of ``key`` is over: its waiters get ``data`` or ``error``; neither (it was
        cancelled), and they fetch it themselves. Only the first settling counts."""
        if flight.done.is_set():
            return
        flight.data, flight.error = data, error
        if self._in_flight.get(key) is flight:
            del self._in_flight[key]
        flight.done.set()

    def _still_good(self, write: QueuedWrite) -> bool:
        # Asked by the writer's thread inside its transaction; ``_reject`` counts before it drops.
        return self._rejections.get(write.digest, 0) == write.rejections

    async def _stored_whole(self, digest: str, size: int) -> None:
        if digest in self._verified:  # its hash completed before its last piece was stored
            await self._mark_verified(digest, size)

    async def _check_landed(self, blob: BlobRef, index: int, data: BlobBytes) -> bool:
        """Check a piece fresh from the source against the piece index: True if it matched
        (or the source checked it so), False if the blob has no index (its hash checks it)."""
        indexed = await self._indexed(blob)
        if indexed is None:
            return False
        if self._source_checks_index:
            return True
        if not await matches_index(data, indexed[index]):
            log.error(
                "piece %d of blob %s from %s does not match the piece index; fetching it again",
                index,
                blob.digest,
                self.source.name,
            )
            raise PieceAlteredError(
                f"piece {index} of blob {blob.digest} from {self.source.name} does not match the "
                "piece index twice: the registry's copy or a proxy on the way alters it"
            )
        return True

    def _hash_state_for(self, blob: BlobRef, index: int, data: BlobBytes) -> BlobHash | None:
        """The hash a piece fresh from the source goes to (None: its blob is checked already)."""
        if blob.digest in self._verified:
            if self.cache.is_verified(blob.digest):
                return None  # another process fetched it too; the cache's copy was checked
            self._unverify(blob.digest)  # a piece was evicted and is back: check again
        return self._hashes.feed(blob, index, data)

    async def _verify_once(self, blob: BlobRef) -> None:
        """A blob whose pieces are all at hand but unchecked is checked: one a process died
        before checking, or one whose check is under way or was undone (``_from_cache``) while
        its last pieces wait for the writer; a hash under way is waited for, not begun again."""
        if blob.digest in self._verified:
            return
        if self.cache.is_verified(blob.digest):
            self._verified.add(blob.digest)
        elif self._at_hand(blob):
            await self._advance_hash(blob, self._hashes.start(blob.digest))

    def _at_hand(self, blob: BlobRef) -> bool:
        """Whether every piece of the blob is in the cache or queued for it. The cache marks a
        blob checked only once it holds every piece, so until the queued ones are stored its
        stored pieces look unchecked: a read of one then must not find the blob unfit."""
        if self.cache.is_complete(blob.digest, blob.size):
            return True
        queued = self._writer.queued_indexes(blob.digest)
        return bool(queued) and set(self.cache.missing(blob.digest, blob.size)) <= queued

    async def _advance_hash(self, blob: BlobRef, state: BlobHash, wait: bool = True) -> None:
        """Hash the blob as far as its pieces are at hand (``BlobHashes.advance``); once whole,
        mark it verified, or reject it."""
        actual = await self._hashes.advance(blob, state, wait)
        if actual is None:
            return
        if f"sha256:{actual}" != blob.digest:
            raise self._reject(blob, actual)
        self._verified.add(blob.digest)  # first: no task starts hashing it again meanwhile
        self._hashed[blob.digest] = state.checksums
        log.debug("blob %s matches its digest", blob.digest)
        await self._mark_verified(blob.digest, blob.size)
        if self._unvouched is not None:
            self._unvouched.blob_checked(blob.digest, True)

    async def _read_back(self, blob: BlobRef, index: int) -> BlobBytes | None:
        """A piece the hash needs: on its way to the cache, or in it (vouched for or not)."""
        queued = self._writer.queued((blob.digest, index))
        if queued is not None:
            return queued
        return await self._cache_get(blob, index, unvouched=True)

    async def _mark_verified(self, digest: str, size: int) -> None:
        """Have the cache vouch for the blob's pieces this process hashed, once it holds them
        all (until then, the writer's last store of the blob asks again)."""
        checksums = self._hashed.get(digest)
        if checksums is None:
            return  # the cache vouched for it already (another process checked it)
        # A write transaction, synced to disk: not on the event loop, where every read waits.
        await trio.to_thread.run_sync(self.cache.mark_verified, digest, size, checksums)

    def _hashed_over(self, digest: str, index: int, data: BlobBytes) -> bool:
        """Whether ``data`` is the piece this process hashed its blob over, whole and right."""
        checksums = self._hashed.get(digest)
        # Of the bytes read, not the cache's record: the record may have changed since the read.
        return checksums is not None and checksums[index] == piece_checksum(data)

    def _unverify(self, digest: str) -> None:
        """The blob is to be checked again before its pieces are served."""
        self._verified.discard(digest)
        self._hashed.pop(digest, None)

    def _reject(self, blob: BlobRef, actual: str) -> IntegrityError:
        """Drop a blob that hashed wrong; its pieces are served again only once it checks out."""
        # Counted first: a write transaction that begins after the drop sees the count.
        self._rejections[blob.digest] = self._rejections.get(blob.digest, 0) + 1
        self.cache.drop_blob(blob.digest)
        self._suspect.setdefault(blob.digest, trio.Lock())
        self._on_rejected(blob.digest)
        if self._unvouched is not None:
            self._unvouched.blob_checked(blob.digest, False)
        self._recent.drop_blob(blob.digest)
        self._writer.drop_blob(blob.digest)  # the writer skips them
        log.error(
            "blob %s from %s does not match its digest (got sha256:%s); its pieces were dropped",
            blob.digest,
            self._supplier,
            actual,
        )
        return IntegrityError(
            f"blob {blob.digest} from {self._supplier} does not match its digest; "
            "dropped from the cache, the next read fetches it again"
        )

    async def _cache_get(
        self,
        blob: BlobRef,
        index: int,
        *,
        unvouched: bool = False,
        expected: str | None = None,
    ) -> BlobBytes | None:
        """The cached piece as ``PieceCache.get`` gives it, or ``get_checked`` with the piece
        index's ``expected`` digest."""
        _, length = piece_span(index, blob.size, self.cache.piece_size)
        buffer = PIECE_BUFFERS.take(length)  # here: buffers are taken on the trio thread only
        if expected is not None:
            return await trio.to_thread.run_sync(
                self.cache.get_checked, blob.digest, index, expected, buffer
            )
        get = partial(self.cache.get, unvouched=unvouched)
        return await trio.to_thread.run_sync(get, blob.digest, index, buffer)

    def spare_buffer(self) -> bool:
        """Let go of one piece kept only to save work, for the buffer pool at its bound.

        The oldest piece held for readers goes first (the cache or its writer has it, unless the
        cache was full: then its next read fetches it again); then the
        furthest piece waiting for its blob's hash that is stored already (the hash reads it back
        from the cache when it gets there).
        """
        if self._recent.drop_oldest():
            return True
        return self._hashes.spare_one(lambda digest, i: self._writer.queued((digest, i)) is None)

"""A blob source that takes whole pieces from peers (as the scheduler says) before the registry.

``with_peers`` wraps the mount's registry repository: it runs this node's peer server, keeps
the node registered with the scheduler, announces the pieces the node stores and reports peers
that fail. For each run of whole pieces the fetcher asks for, ``PeerSource.read_pieces`` asks
the scheduler piece by piece, tries the candidates it names, and takes the pieces the scheduler
leaves to this node from the registry together, one range request for consecutive ones. It falls
back to the registry whenever anything fails or the wait budget runs out: no scheduler, no peers
or a dead peer means the registry, never a hang. Every piece, from a peer or the registry, is
checked against the piece index (which came from the registry).

Without an index, peers are used only if the operator allows it (``--peers-without-index``).
Nothing can check a single piece then, so the fetcher serves no byte of such a blob before the
whole blob matched its digest (``UnvouchedPieces``). A blob that fails is purged, taken from the
registry only from then on, and every peer that supplied pieces of it is reported (which of them
lied cannot be told). Pieces this node took from peers are offered on only once their blob
checked out; those it took from the registry, at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import trio

from modelfs.cache.store import PieceCache
from modelfs.errors import IntegrityError
from modelfs.fetcher.index import IndexLookup, PieceIndex, matches_index
from modelfs.peer.client import PeerClient, PeerFailure
from modelfs.peer.options import ClusterOptions
from modelfs.peer.server import PeerServer
from modelfs.pieces import piece_count, piece_span
from modelfs.scheduler.client import SchedulerClient
from modelfs.scheduler.ranking import Action, Decision, FailureKind, NodeInfo
from modelfs.sources.interface import (
    BlobBytes,
    BlobSource,
    Deliver,
    FetchedManifest,
    read_as_run,
)
from modelfs.sources.registry import RegistryRepository
from modelfs.sources.stats import PEER, mark_served_by

log = logging.getLogger(__name__)

ANNOUNCE_TRIES = 200  # x ANNOUNCE_PERIOD: how long a piece may take to reach the cache
ANNOUNCE_PERIOD = 0.01
AVOID_SECONDS = 10.0  # a peer that failed this node is not asked again by it for this long
AVOID_LIAR_SECONDS = 3600.0  # ... or this, once it sent bytes that failed a check
ANNOUNCE_BATCH = 1000  # pieces per announcement (the scheduler takes up to 10 000)


@dataclass
class PeerStats:
    """Where piece bytes came from, and which peers sent bad ones (for metrics and status)."""

    peer_bytes: int = 0
    registry_bytes: int = 0
    rejected_by_peer: dict[str, int] = field(default_factory=dict)


class PeerSource:
    """``BlobSource`` over a registry repository, with peers tried first for whole pieces."""

    def __init__(
        self,
        origin: RegistryRepository,
        selector: str,
        cache: PieceCache,
        scheduler: SchedulerClient,
        peers: PeerClient,
        failures: trio.MemoryReceiveChannel[PeerFailure],
        options: ClusterOptions,
    ) -> None:
        self.origin = origin
        self.stats = PeerStats()
        self._cache = cache
        self._scheduler = scheduler
        self._peers = peers
        self._options = options
        self._failures = failures
        self._lookup = IndexLookup(origin, selector, cache)
        self._held_announced = False
        # Blobs without an index: who supplied pieces (peer -> a piece it sent), the pieces
        # from peers not offered on yet, and blobs that failed (registry only from then on).
        self._suppliers: dict[str, dict[str, int]] = {}
        self._unannounced: dict[str, set[int]] = {}
        self._registry_only: set[str] = set()
        self._avoided: dict[str, float] = {}  # peer -> trio time until which it is skipped
        self.server = PeerServer(
            cache,
            options.secret,
            self.expected,
            tls=None if options.tls is None else options.tls.server_context(),
            max_connections=options.max_connections,
        )
        self._announce_send, self._announce_receive = trio.open_memory_channel[tuple[str, int]](
            math.inf
        )

    @property
    def name(self) -> str:
        return self.origin.name

    async def get_manifest(self, selector: str) -> FetchedManifest:
        return await self.origin.get_manifest(selector)

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        return await self.origin.get_blob(digest, max_size)

    def stream_blob(self, digest: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self.origin.stream_blob(digest)

    def expected(self, digest: str, index: int) -> str | None:
        found = self._lookup.index
        return None if found is None else found.expected(digest, index)

    def pin(self, digest: str) -> None:
        self._lookup.pin(digest)

    async def piece_index(self) -> PieceIndex | None:
        """The model's piece index, looked up once (bounded in time; None if there is none)."""
        index = await self._lookup.piece_index()
        if index is not None and not self._held_announced:
            self._held_announced = True
            self._announce_held(index)
        return index

    def _announce_held(self, index: PieceIndex) -> None:
        """Pieces left in the cache by earlier mounts are offered to peers too."""
        for digest, blob in index.blobs.items():
            missing = set(self._cache.missing(digest, blob.size))
            for piece in range(piece_count(blob.size, index.piece_size)):
                if piece not in missing:
                    self._announce_send.send_nowait((digest, piece))

    async def whole_before_serving(self, digest: str) -> bool:
        """Pieces of it may come from peers with nothing to check them by (``UnvouchedPieces``)."""
        if not self._options.without_index:
            return False
        index = await self.piece_index()
        return index is None or digest not in index.blobs

    def blob_checked(self, digest: str, good: bool) -> None:
        suppliers = self._suppliers.pop(digest, {})
        from_peers = self._unannounced.pop(digest, set())
        if good:
            for piece in from_peers:  # the peer server serves them now: offer them
                self._announce_send.send_nowait((digest, piece))
            return
        self._registry_only.add(digest)
        if suppliers:  # the fetcher's own line names the source this wraps: the registry
            log.error(
                "blob %s failed its check with pieces from peers %s (and %s): the peers are "
                "reported, and the blob comes from the registry only from now on",
                digest,
                ", ".join(sorted(suppliers)),
                self.origin.name,
            )
        for peer, piece in suppliers.items():
            self._peers.fail(
                PeerFailure(
                    peer,
                    digest,
                    piece,
                    "sent pieces of a blob that does not match its digest (no piece index)",
                    FailureKind.CORRUPT,
                )
            )

    async def read_range(self, digest: str, start: int, length: int) -> BlobBytes:
        return await read_as_run(self, digest, start, length)

    async def read_pieces(
        self, digest: str, start: int, lengths: Sequence[int], deliver: Deliver
    ) -> None:
        """Consecutive pieces, in order: each from a peer when the scheduler names one; those it
        leaves to this node come from the registry together, in one request (one per piece
        costs the registry several times the CPU)."""
        index = await self.piece_index()
        first, expected = self._indexed_pieces(index, digest, start, lengths)
        if first >= 0:
            await self._indexed_run(digest, first, expected, start, lengths, deliver)
        elif await self.whole_before_serving(digest):
            for place, length in enumerate(lengths):
                await deliver(place, await self._unindexed_piece(digest, start, length))
                start += length
        else:
            await self.origin.read_pieces(digest, start, lengths, deliver)

    async def _indexed_run(
        self,
        digest: str,
        first: int,
        expected: list[str],
        start: int,
        lengths: Sequence[int],
        deliver: Deliver,
    ) -> None:
        place = 0
        while place < len(lengths):
            piece, offset = first + place, start + sum(lengths[:place])
            decision = await self._scheduler.ask(digest, piece)
            count = await self._source_run(digest, piece, len(lengths) - place, decision)
            if count:
                await self._registry_run(
                    digest,
                    piece,
                    expected[place : place + count],
                    offset,
                    lengths[place : place + count],
                    deliver,
                    place,
                )
            else:
                assert decision is not None  # peers, or wait: ``_source_run`` said so
                data = await self._from_peers_or_registry(
                    digest, piece, expected[place], offset, lengths[place], decision
                )
                await deliver(place, data)
                count = 1
            place += count

    async def _registry_run(
        self,
        digest: str,
        first: int,
        expected: list[str],
        start: int,
        lengths: Sequence[int],
        deliver: Deliver,
        base: int,
    ) -> None:
        """Pieces ``first``... from the registry in one request, each checked against the index
        and offered to peers before ``deliver`` gets it (at ``base`` plus its place)."""

        async def checked(place: int, data: BlobBytes) -> None:
            self.stats.registry_bytes += len(data)
            if not await matches_index(data, expected[place]):
                raise self._altered(digest, first + place)
            self._offer(digest, first + place)
            await deliver(base + place, data)

        await self.origin.read_pieces(digest, start, lengths, checked)

    async def _source_run(
        self, digest: str, piece: int, most: int, decision: Decision | None
    ) -> int:
        """How many pieces from ``piece`` (at most ``most``) this node takes from the registry
        in one request: none if the scheduler names peers or says wait, else the piece and
        those after it that the scheduler also leaves to this node (all, if it is unreachable)."""
        if decision is None:
            return most
        if decision.action is not Action.SOURCE:
            return 0
        count = 1
        while count < most:
            after = await self._scheduler.ask(digest, piece + count, wait=False)
            if after is None or after.action is not Action.SOURCE:
                break
            count += 1
        return count

    async def _unindexed_piece(self, digest: str, start: int, length: int) -> BlobBytes:
        """A range of a blob without an index, whose bytes are served only once it is whole
        and checked: a whole cache piece may come from peers, anything else from the registry."""
        piece_size = self._cache.piece_size
        if digest in self._registry_only or start % piece_size or not 0 < length <= piece_size:
            return await self.origin.read_range(digest, start, length)
        return await self._from_peers_or_registry(digest, start // piece_size, None, start, length)

    async def _from_peers_or_registry(
        self,
        digest: str,
        piece: int,
        expected: str | None,
        start: int,
        length: int,
        decision: Decision | None = None,
    ) -> BlobBytes:
        """One whole piece: from a peer the scheduler names, else (none within the wait budget)
        from the registry. ``expected``: its digest from the index; None, unvouched."""
        found = await self._from_peers(digest, piece, expected, length, decision)
        if found is None:
            received: list[BlobBytes] = []

            async def checked(_place: int, data: BlobBytes) -> None:
                # Checked as it is handed over: a registry mirror that sent it learns it was
                # altered, and is passed over for the blob (modelfs.sources.mirrors).
                self.stats.registry_bytes += len(data)
                if expected is not None and not await matches_index(data, expected):
                    raise self._altered(digest, piece)
                received.append(data)

            await self.origin.read_pieces(digest, start, [length], checked)
            self._offer(digest, piece)
            return received[0]
        peer, data = found
        mark_served_by(PEER)  # a registry request earlier in the same run marked it otherwise
        self.stats.peer_bytes += len(data)
        if expected is None:  # vouched for, and offered on, once its blob checks out
            self._suppliers.setdefault(digest, {}).setdefault(peer, piece)
            self._unannounced.setdefault(digest, set()).add(piece)
        else:
            self._offer(digest, piece)
        return data

    def _altered(self, digest: str, piece: int) -> IntegrityError:
        return IntegrityError(
            f"piece {piece} of blob {digest} from {self.origin.name} does not match the "
            "piece index: the registry or a proxy altered it; retry"
        )

    def _offer(self, digest: str, piece: int) -> None:
        """Serve the piece to peers, and tell the scheduler once it is stored."""
        self.server.vouch(digest, piece)
        self._announce_send.send_nowait((digest, piece))

    @staticmethod
    def _indexed_pieces(
        index: PieceIndex | None, digest: str, start: int, lengths: Sequence[int]
    ) -> tuple[int, list[str]]:
        """(first piece number, expected digest of each) when the ranges are whole indexed
        pieces; (-1, []) otherwise."""
        blob = None if index is None else index.blobs.get(digest)
        if index is None or blob is None or start % index.piece_size or start >= blob.size:
            return -1, []
        first, offset = start // index.piece_size, start
        for place, length in enumerate(lengths):
            if piece_span(first + place, blob.size, index.piece_size) != (offset, length):
                return -1, []
            offset += length
        return first, list(blob.pieces[first : first + len(lengths)])

    async def _from_peers(
        self,
        digest: str,
        piece: int,
        expected: str | None,
        length: int,
        decision: Decision | None = None,
    ) -> tuple[str, bytes] | None:
        """(peer, bytes) of the piece from the first candidate that sends it right, or None.
        ``decision``: the scheduler's answer already asked for, else it is asked here."""
        with trio.move_on_after(self._options.wait_budget):
            while True:
                if decision is None:
                    decision = await self._scheduler.ask(digest, piece)
                if decision is None or decision.action is Action.SOURCE:
                    return None
                if decision.action is Action.PEERS:
                    # Each candidate once; none sent it: the registry at once, not a retry loop.
                    return await self._from_candidates(
                        decision.peers, digest, piece, expected, length
                    )
                await trio.sleep(decision.retry_after)
                decision = None
        log.info("piece %d of %s: no peer within %.1f s", piece, digest, self._options.wait_budget)
        return None

    async def _from_candidates(
        self,
        candidates: tuple[str, ...],
        digest: str,
        piece: int,
        expected: str | None,
        length: int,
    ) -> tuple[str, bytes] | None:
        """(peer, bytes) from the first candidate this node has not seen fail lately that sends
        the piece right; a peer that fails (busy, slow, wrong) is skipped for ``AVOID_SECONDS``."""
        now = trio.current_time()
        for peer in [peer for peer in candidates if self._avoided.get(peer, 0.0) <= now]:
            data = await self._peers.fetch_piece(peer, digest, piece, expected)
            if data is not None and len(data) != length:
                reason = f"sent {len(data)} bytes for a piece of {length}"
                self._peers.fail(PeerFailure(peer, digest, piece, reason, FailureKind.CORRUPT))
                data = None
            if data is None:
                self._avoided[peer] = trio.current_time() + AVOID_SECONDS
                continue
            self._avoided.pop(peer, None)
            if digest in self._registry_only:
                return None  # its blob failed while this piece travelled
            return peer, data
        return None

    async def announce_stored(self) -> None:
        """Announce pieces once they are in the cache (a peer asking sooner would get 404)."""
        waiting: dict[tuple[str, int], int] = {}
        while True:
            if not waiting:
                key = await self._announce_receive.receive()
                waiting[key] = 0
            while True:
                try:
                    waiting.setdefault(self._announce_receive.receive_nowait(), 0)
                except trio.WouldBlock:
                    break
            stored = [key for key in waiting if self._cache.has(*key)]
            for key in stored:
                del waiting[key]
            for key in [key for key, tries in waiting.items() if tries >= ANNOUNCE_TRIES]:
                del waiting[key]  # never stored (cache full): nothing to offer
            for key in waiting:
                waiting[key] += 1
            for start in range(0, len(stored), ANNOUNCE_BATCH):
                await self._scheduler.announce(stored[start : start + ANNOUNCE_BATCH])
            if waiting:
                await trio.sleep(ANNOUNCE_PERIOD)

    async def send_reports(self) -> None:
        async for failure in self._failures:
            if failure.kind is FailureKind.CORRUPT:
                rejected = self.stats.rejected_by_peer
                rejected[failure.peer] = rejected.get(failure.peer, 0) + 1
                # This node saw it lie: whatever the scheduler weighs, it asks it no more.
                self._avoided[failure.peer] = trio.current_time() + AVOID_LIAR_SECONDS
            await self._scheduler.report(failure.peer, failure.digest, failure.index, failure.kind)


@asynccontextmanager
async def with_peers(
    cluster: ClusterOptions,
    origin: BlobSource,
    selector: str,
    cache: PieceCache,
    register_first: bool = False,
) -> AsyncIterator[BlobSource]:
    """A ``PeerSource`` over ``origin``; ``origin`` itself for a layout (no peers to ask).
    ``register_first``: registered with the scheduler before it is used (a preheat, which asks
    for every piece at once: an unregistered node is sent to the registry without a slot); a
    mount does not wait for it (its listing would wait on a scheduler that does not answer)."""
    if not isinstance(origin, RegistryRepository):
        yield origin
        return
    node = NodeInfo(cluster.advertised, cluster.zone, cluster.rack)
    try:
        async with (
            SchedulerClient(cluster.scheduler_url, cluster.secret, node) as scheduler,
            trio.open_nursery() as nursery,
        ):
            failures_send, failures_receive = trio.open_memory_channel[PeerFailure](math.inf)
            async with PeerClient(
                cluster.secret,
                report=failures_send.send_nowait,
                timeout=cluster.peer_timeout,
                tls=None if cluster.tls is None else cluster.tls.client_context(),
            ) as peers:
                source = PeerSource(
                    origin, selector, cache, scheduler, peers, failures_receive, cluster
                )
                await nursery.start(source.server.serve, *cluster.listen)
                if register_first:
                    await scheduler.register()
                nursery.start_soon(scheduler.keep_registered)
                nursery.start_soon(source.announce_stored)
                nursery.start_soon(source.send_reports)
                try:
                    yield source
                finally:
                    log.info(
                        "bytes from peers %d, from the registry %d, rejected pieces by peer %s",
                        source.stats.peer_bytes,
                        source.stats.registry_bytes,
                        source.stats.rejected_by_peer,
                    )
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The mount's own error (one line for the user) must not arrive wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise

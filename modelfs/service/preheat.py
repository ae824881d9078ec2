"""Preheat: every piece of a model fetched into the node's cache, without mounting it.

With ``hints_only``, only the pieces a mount would prefetch first: the model's recorded read
profile, else the built-in hints. Resumable by construction: only the pieces the cache is
missing are fetched, so an interrupted preheat run again picks up where it stopped. Pieces go
through the PieceFetcher, so each blob is checked against its digest on the way in (once it is
whole), exactly as a mount would check it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from modelfs.artifact.tree import BlobRef, FileNode
from modelfs.cache import PieceCache
from modelfs.fetcher.index import IndexLookup
from modelfs.fetcher.manifests import resolve_manifest
from modelfs.fetcher.piece_fetcher import RUN_PIECES, PieceFetcher
from modelfs.fetcher.slots import Priority
from modelfs.mount.model import Model, load_model
from modelfs.mount.session import MountOptions, open_source
from modelfs.peer.options import ClusterOptions
from modelfs.pieces import piece_runs, piece_span
from modelfs.prefetch.hints import Hint, hinted_pieces
from modelfs.prefetch.prefetcher import feed_hints
from modelfs.prefetch.profile import recorded_profile
from modelfs.reference import LayoutReference, Reference
from modelfs.sources.hosts import DEFAULT_HOSTS_DIR
from modelfs.sources.interface import BlobSource

PARALLEL_RUNS = 8  # fetched at once, each on its own connection
LINGER_QUIET = 1.0  # in a cluster, a preheat done serves on until peers are this quiet
LINGER_MOST = 60.0


@dataclass(frozen=True)
class PreheatPlan:
    """What a model still needs: its pinned digest, and the missing pieces of each blob."""

    digest: str
    missing: list[tuple[BlobRef, int]]
    missing_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class SourceSettings:
    """How to reach the registry a reference names."""

    plain_http: bool = False
    insecure: bool = False
    timeout: float = 30.0
    retries: int = 3
    hosts_dir: Path | None = DEFAULT_HOSTS_DIR  # containerd's: the registry's mirrors


def _open_source(
    reference: Reference | LayoutReference, settings: SourceSettings
) -> AbstractAsyncContextManager[BlobSource]:
    # open_source reads only the reference and connection settings; no mountpoint is involved.
    return open_source(
        MountOptions(
            reference=reference,
            mountpoint=Path(),
            plain_http=settings.plain_http,
            insecure=settings.insecure,
            timeout=settings.timeout,
            retries=settings.retries,
            hosts_dir=settings.hosts_dir,
        )
    )


async def resolve_digest(
    reference: Reference | LayoutReference, cache: PieceCache, settings: SourceSettings
) -> str:
    """The manifest digest ``reference`` names now (asked of the source for a tag)."""
    async with _open_source(reference, settings) as source:
        return (await resolve_manifest(source, reference.selector, cache)).digest


def _pieces_bytes(cache: PieceCache, pieces: list[tuple[BlobRef, int]]) -> int:
    return sum(piece_span(index, blob.size, cache.piece_size)[1] for blob, index in pieces)


def plan_missing(cache: PieceCache, digest: str, blobs: list[BlobRef]) -> PreheatPlan:
    """Every piece of ``blobs`` the cache lacks."""
    missing = [(blob, index) for blob in blobs for index in cache.missing(blob.digest, blob.size)]
    return PreheatPlan(
        digest, missing, _pieces_bytes(cache, missing), sum(blob.size for blob in blobs)
    )


def plan_pieces(cache: PieceCache, digest: str, wanted: list[tuple[BlobRef, int]]) -> PreheatPlan:
    """The ``wanted`` pieces the cache lacks, in their order."""
    missing = [(blob, index) for blob, index in wanted if not cache.has(blob.digest, index)]
    return PreheatPlan(digest, missing, _pieces_bytes(cache, missing), _pieces_bytes(cache, wanted))


async def _hinted(model: Model, source: BlobSource, fetcher: PieceFetcher) -> list[Hint]:
    """The hints a mount would prefetch first (reading what the built-in ones need to)."""
    hints: list[Hint] = []

    async def read(node: FileNode, offset: int, size: int) -> bytes | memoryview:
        return await fetcher.read(node.blob, node.offset + offset, size)

    async def collect(batch: list[Hint]) -> None:
        hints.extend(batch)

    await feed_hints(model.tree, read, partial(recorded_profile, source, model.digest), collect)
    return hints


async def preheat(
    reference: Reference | LayoutReference,
    cache: PieceCache,
    settings: SourceSettings,
    on_plan: Callable[[PreheatPlan], None],
    on_piece: Callable[[int], None],
    hints_only: bool = False,
    cluster: ClusterOptions | None = None,
) -> PreheatPlan:
    """Fetch what the cache lacks of ``reference``; ``on_piece`` gets each piece's size. In a
    ``cluster``, pieces come from peers first, as a mount's do, and this process serves what
    it holds to them meanwhile (on ``cluster.listen``)."""
    async with AsyncExitStack() as stack:
        origin = await stack.enter_async_context(_open_source(reference, settings))
        source = origin
        if cluster is not None:
            # The peer and scheduler modules only for a preheat in a cluster.
            from modelfs.peer.source import with_peers

            source = await stack.enter_async_context(
                with_peers(cluster, origin, reference.selector, cache, register_first=True)
            )
        fetcher = PieceFetcher(source, cache, index=IndexLookup(origin, reference.selector, cache))
        model = await load_model(source, reference.selector, cache, fetcher)
        await fetcher.look_up_index(model.digest)
        if hints_only:
            hints = await _hinted(model, origin, fetcher)
            wanted = [(node.blob, index) for node, index in hinted_pieces(hints, cache.piece_size)]
            plan = plan_pieces(cache, model.digest, wanted)
        else:
            plan = plan_missing(cache, model.digest, model.blobs)
        on_plan(plan)
        # Consecutive missing pieces in runs, each fetched with one request.
        runs = piece_runs(plan.missing, RUN_PIECES)
        work_send, work_receive = trio.open_memory_channel[tuple[BlobRef, list[int]]](len(runs))
        for item in runs:
            work_send.send_nowait(item)
        work_send.close()

        async def worker() -> None:
            async for blob, run in work_receive:
                # Claimed and run at once; a failure ends preheat, and its claims with it.
                for job in fetcher.prefetch_jobs(blob, run, Priority.DEMAND):
                    await job()
                for index in run:
                    on_piece(piece_span(index, blob.size, cache.piece_size)[1])

        # After the plan and the hints' own reads: what they read is in the cache, not queued.
        async with fetcher.writing(), trio.open_nursery() as nursery:
            for _ in range(PARALLEL_RUNS):
                nursery.start_soon(worker)
        if not hints_only:
            # A tar layer listed from headers nothing vouched for is checked now, from the
            # cache, so the mount that follows finds its list there.
            for node in model.tree.files():
                await node.locate()
        if source is not origin:
            await _serve_while_asked(source)
    return plan


async def _serve_while_asked(source: BlobSource) -> None:
    """Serve peers on until none has asked for a piece in ``LINGER_QUIET`` (at most
    ``LINGER_MOST``): nodes preheating the same model at once take from this one what it
    fetched last, rather than each going to the registry for it once it is gone."""
    from modelfs.peer.source import PeerSource

    if not isinstance(source, PeerSource):
        return
    with trio.move_on_after(LINGER_MOST):
        done = trio.current_time()
        while trio.current_time() - max(done, source.server.last_asked) < LINGER_QUIET:
            await trio.sleep(LINGER_QUIET / 10)

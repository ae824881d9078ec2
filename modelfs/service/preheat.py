"""Preheat: every piece of a model fetched into the node's cache, without mounting it.

Resumable by construction: only the pieces the cache is missing are fetched, so an interrupted
preheat run again picks up where it stopped. Pieces go through the PieceFetcher, so each blob is
checked against its digest on the way in, exactly as a mount would check it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import trio

from modelfs.cache import PieceCache
from modelfs.fetcher.pieces import PieceFetcher
from modelfs.fetcher.source import BlobSource
from modelfs.fs.model import load_model, resolve_manifest
from modelfs.fs.mount import MountOptions, open_source
from modelfs.fs.tree import BlobRef
from modelfs.pieces import piece_span
from modelfs.reference import LayoutReference, Reference

PARALLEL_PIECES = 8


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
        )
    )


async def resolve_digest(
    reference: Reference | LayoutReference, cache: PieceCache, settings: SourceSettings
) -> str:
    """The manifest digest ``reference`` names now (asked of the source for a tag)."""
    async with _open_source(reference, settings) as source:
        return (await resolve_manifest(source, reference.selector, cache)).digest


def plan_missing(cache: PieceCache, digest: str, blobs: list[BlobRef]) -> PreheatPlan:
    missing = [(blob, index) for blob in blobs for index in cache.missing(blob.digest, blob.size)]
    missing_bytes = sum(
        piece_span(index, blob.size, cache.piece_size)[1] for blob, index in missing
    )
    return PreheatPlan(digest, missing, missing_bytes, sum(blob.size for blob in blobs))


async def preheat(
    reference: Reference | LayoutReference,
    cache: PieceCache,
    settings: SourceSettings,
    on_plan: Callable[[PreheatPlan], None],
    on_piece: Callable[[int], None],
) -> PreheatPlan:
    """Fetch what the cache lacks of ``reference``; ``on_piece`` gets each piece's size."""
    async with _open_source(reference, settings) as source:
        fetcher = PieceFetcher(source, cache)
        model = await load_model(source, reference.selector, cache, fetcher)
        plan = plan_missing(cache, model.digest, model.blobs)
        on_plan(plan)
        work_send, work_receive = trio.open_memory_channel[tuple[BlobRef, int]](len(plan.missing))
        for item in plan.missing:
            work_send.send_nowait(item)
        work_send.close()

        async def worker() -> None:
            async for blob, index in work_receive:
                await fetcher.piece(blob, index)
                on_piece(piece_span(index, blob.size, cache.piece_size)[1])

        async with trio.open_nursery() as nursery:
            for _ in range(PARALLEL_PIECES):
                nursery.start_soon(worker)
    return plan

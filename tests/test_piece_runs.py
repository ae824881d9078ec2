"""Runs of pieces (``PieceFetcher.prefetch_jobs``): consecutive pieces in one range GET.

Real registry behind the counting and faulting proxy, real LMDB. A run is claimed when it is
planned, lands piece by piece, and every piece is checked as one fetched alone would be.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.artifact.tree import BlobRef
from modelfs.cache import PieceCache
from modelfs.errors import IntegrityError
from modelfs.fetcher.piece_fetcher import RUN_PIECES, PieceFetcher
from modelfs.fetcher.slots import Priority
from modelfs.modelpack import layer_media_type
from modelfs.sources.registry import RegistryClient

PIECE = 64 << 10
REPOSITORY = "tests/runs"
DATA = os.urandom(10 * PIECE - 123)  # ten pieces, the last one short
BLOB = BlobRef("sha256:" + hashlib.sha256(DATA).hexdigest(), len(DATA))


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> None:
    push_artifact(registry.host, REPOSITORY, "v1", [Layer(layer_media_type("weight", "raw"), DATA)])


def piece(index: int) -> bytes:
    return DATA[index * PIECE : (index + 1) * PIECE]


def run_fetcher(
    host: str, cache: PieceCache, body: Callable[[PieceFetcher], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with RegistryClient(host, plain_http=True) as client:
            # Pieces served as they land (no piece index): the runs are what is tested here.
            fetcher = PieceFetcher(client.repository(REPOSITORY), cache, serve_unverified=True)
            with trio.fail_after(60):
                async with fetcher.writing():
                    await body(fetcher)

    trio.run(main)


async def run_all(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(job)


def test_missing_pieces_come_in_runs_of_one_get_each(
    proxy: Proxy, pushed: None, tmp_path: Path
) -> None:
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=PIECE)
    assert RUN_PIECES == 4

    async def body(fetcher: PieceFetcher) -> None:
        assert bytes(await fetcher.read(BLOB, 2 * PIECE, 10)) == piece(2)[:10]
        proxy.reset()
        await run_all(fetcher.prefetch_jobs(BLOB, range(10), Priority.READAHEAD))
        for index in range(10):
            assert bytes(await fetcher.piece(BLOB, index)) == piece(index)

    run_fetcher(proxy.host, cache, body)
    # Piece 2 was there already; the others came in runs of at most four, each run one GET.
    asked = sorted(
        proxy.blob_requests, key=lambda r: int((r.range or "bytes=-1-").split("=")[1].split("-")[0])
    )
    assert [r.range for r in asked] == [
        f"bytes=0-{2 * PIECE - 1}",
        f"bytes={3 * PIECE}-{7 * PIECE - 1}",
        f"bytes={7 * PIECE}-{len(DATA) - 1}",
    ]
    assert proxy.blob_bytes == len(DATA) - PIECE
    assert cache.is_verified(BLOB.digest)
    assert b"".join(cache.get(BLOB.digest, index) or b"" for index in range(10)) == DATA


def test_a_reader_of_a_claimed_piece_waits_for_its_run(
    proxy: Proxy, pushed: None, tmp_path: Path
) -> None:
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=PIECE)

    async def body(fetcher: PieceFetcher) -> None:
        proxy.reset()
        jobs = fetcher.prefetch_jobs(BLOB, range(4, 8), Priority.BACKGROUND)
        assert len(jobs) == 1
        got: list[bytes] = []

        async def read() -> None:
            got.append(bytes(await fetcher.read(BLOB, 6 * PIECE + 5, 100)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(0.2)
            assert got == [] and proxy.blob_requests == []  # it waits on the claimed run
            nursery.start_soon(jobs[0])
        assert got == [piece(6)[5:105]]

    run_fetcher(proxy.host, cache, body)
    assert [r.range for r in proxy.blob_requests] == [f"bytes={4 * PIECE}-{8 * PIECE - 1}"]


def test_a_run_cut_short_goes_on_where_it_stopped(
    proxy: Proxy, pushed: None, tmp_path: Path
) -> None:
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=PIECE)

    async def body(fetcher: PieceFetcher) -> None:
        proxy.reset()
        proxy.cut_blobs(after=PIECE + 1000)
        await run_all(fetcher.prefetch_jobs(BLOB, range(4), Priority.READAHEAD))
        for index in range(4):
            assert bytes(await fetcher.piece(BLOB, index)) == piece(index)

    run_fetcher(proxy.host, cache, body)
    # Nothing asked for twice: the cut piece resumes from the byte it stopped at.
    assert [r.range for r in proxy.blob_requests] == [
        f"bytes=0-{4 * PIECE - 1}",
        f"bytes={PIECE + 1000}-{2 * PIECE - 1}",
        f"bytes={2 * PIECE}-{3 * PIECE - 1}",
        f"bytes={3 * PIECE}-{4 * PIECE - 1}",
    ]


def test_a_run_of_a_blob_that_fails_its_digest_fails_its_readers_and_keeps_nothing(
    proxy: Proxy, pushed: None, tmp_path: Path
) -> None:
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=PIECE)
    proxy.tamper = True  # same length, different bytes: only the digest check notices

    async def body(fetcher: PieceFetcher) -> None:
        for job in fetcher.prefetch_jobs(BLOB, range(8), Priority.READAHEAD):
            await job()
        failed = []

        async def read_last() -> None:
            try:
                await fetcher.read(BLOB, len(DATA) - 10, 10)
            except IntegrityError as error:
                failed.append(str(error))

        async with trio.open_nursery() as nursery:
            jobs = fetcher.prefetch_jobs(BLOB, range(8, 10), Priority.READAHEAD)
            nursery.start_soon(read_last)  # waits on the run that completes the hash
            await trio.sleep(0.1)
            with pytest.raises(IntegrityError, match="does not match its digest"):
                await jobs[0]()
        assert len(failed) == 1 and "does not match its digest" in failed[0]

    try:
        run_fetcher(proxy.host, cache, body)
    finally:
        proxy.tamper = False
    assert cache.missing(BLOB.digest, BLOB.size) == list(range(10))
    assert cache.stats().size == 0


def test_a_run_cancelled_before_it_began_lets_its_readers_fetch_for_themselves(
    proxy: Proxy, pushed: None, tmp_path: Path
) -> None:
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=PIECE)

    async def body(fetcher: PieceFetcher) -> None:
        proxy.reset()
        jobs = fetcher.prefetch_jobs(BLOB, range(4), Priority.READAHEAD)
        with trio.CancelScope() as scope:
            scope.cancel()
            await run_all(jobs)
        assert bytes(await fetcher.piece(BLOB, 2)) == piece(2)

    run_fetcher(proxy.host, cache, body)
    assert [r.range for r in proxy.blob_requests] == [f"bytes={2 * PIECE}-{3 * PIECE - 1}"]

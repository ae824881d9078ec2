"""The fetcher's cache writer (``PieceFetcher.writing``): real registry, real LMDB.

Readers get their pieces before they are stored; what is stored is what a reader without the
writer would have left in the cache, and never a piece of a blob that failed its digest check.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.artifact.tree import BlobRef
from modelfs.cache import PieceCache, PieceWrite, PutResult
from modelfs.errors import IntegrityError
from modelfs.fetcher.blob_hash import BlobHash
from modelfs.fetcher.piece_fetcher import PieceFetcher
from modelfs.fetcher.slots import Priority
from modelfs.modelpack import layer_media_type
from modelfs.pieces import piece_count, piece_span
from modelfs.sources.registry import RegistryClient

PIECE = 64 << 10
REPOSITORY = "tests/writer"
SMALL = os.urandom(4 * PIECE + 100)  # 5 pieces: one being written, four queued
LARGE = os.urandom(40 * PIECE + 7)
W = TypeVar("W", bound=PieceWrite)


def blob_of(data: bytes) -> BlobRef:
    return BlobRef("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> None:
    raw = layer_media_type("weight", "raw")
    push_artifact(registry.host, REPOSITORY, "v1", [Layer(raw, SMALL), Layer(raw, LARGE)])


class GatedCache(PieceCache):
    """A real cache whose writes wait until ``gate`` is set (at most 30 s)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 64 << 20, piece_size=PIECE)
        self.gate = threading.Event()

    def put_many(
        self, writes: Sequence[W], keep: Callable[[W], bool] = lambda write: True
    ) -> list[PutResult]:
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return super().put_many(writes, keep)

    async def open_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self.gate.set()


def run_fetcher(
    host: str, cache: PieceCache, body: Callable[[PieceFetcher], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with RegistryClient(host, plain_http=True) as client:
            with trio.fail_after(60):
                # Pieces served as they land (no piece index): the writer is what is tested.
                source = client.repository(REPOSITORY)
                await body(PieceFetcher(source, cache, serve_unverified=True))

    trio.run(main)


def stored(cache: PieceCache, blob: BlobRef) -> dict[int, bytes]:
    count = piece_count(blob.size, PIECE)
    pieces = (cache.get(blob.digest, index, unvouched=True) for index in range(count))
    return {index: data for index, data in enumerate(pieces) if data is not None}


def expected_piece(data: bytes, index: int) -> bytes:
    start, length = piece_span(index, len(data), PIECE)
    return data[start : start + length]


def test_pieces_read_while_writing_are_cached_and_verified_after_it(
    registry: Registry, pushed: None, tmp_path: Path
) -> None:
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=PIECE)
    blob = blob_of(LARGE)

    async def body(fetcher: PieceFetcher) -> None:
        async with fetcher.writing():
            assert await fetcher.read(blob, 0, blob.size) == LARGE

    run_fetcher(registry.host, cache, body)
    assert cache.missing(blob.digest, blob.size) == []
    assert cache.is_verified(blob.digest)  # its hash completed before its last piece was stored
    assert b"".join(stored(cache, blob).values()) == LARGE


def test_reader_gets_its_bytes_while_the_writer_is_blocked(
    proxy: Proxy, pushed: None, tmp_path: Path
) -> None:
    cache = GatedCache(tmp_path / "cache")
    blob = blob_of(LARGE)
    count = piece_count(blob.size, PIECE)

    async def body(fetcher: PieceFetcher) -> None:
        try:
            async with fetcher.writing():
                proxy.reset()
                assert await fetcher.read(blob, 10, 100) == LARGE[10:110]
                assert not cache.has(blob.digest, 0)
                # Background prefetch keeps no piece in memory: this one is only queued.
                await fetcher.prefetch(blob, 1, Priority.BACKGROUND)
                assert not cache.has(blob.digest, 1)
                # Queued counts as cached: neither prefetched nor fetched again.
                await fetcher.prefetch(blob, 1, Priority.BACKGROUND)
                assert await fetcher.piece(blob, 1) == expected_piece(LARGE, 1)
                assert proxy.blob_bytes == 2 * PIECE

                # With writes blocked, a sequential reader is held back by the bounded queue.
                async with trio.open_nursery() as nursery:
                    read_all_done = trio.Event()

                    async def read_all() -> None:
                        for index in range(2, count):
                            assert await fetcher.piece(blob, index) == expected_piece(LARGE, index)
                        read_all_done.set()

                    nursery.start_soon(read_all)
                    await trio.sleep(1)
                    assert not read_all_done.is_set()
                    assert proxy.blob_bytes < blob.size // 2
                    cache.gate.set()
        finally:
            cache.gate.set()

    run_fetcher(proxy.host, cache, body)
    assert b"".join(stored(cache, blob).values()) == LARGE
    assert proxy.blob_bytes == blob.size  # each piece fetched once


def test_blob_failing_its_digest_leaves_no_piece_even_with_writes_queued(
    proxy: Proxy, pushed: None, tmp_path: Path
) -> None:
    cache = GatedCache(tmp_path / "cache")
    blob = blob_of(SMALL)
    count = piece_count(blob.size, PIECE)
    proxy.tamper = True  # same length, different bytes: only the digest check notices

    async def body(fetcher: PieceFetcher) -> None:
        try:
            async with fetcher.writing():
                for index in range(count - 1):
                    await fetcher.piece(blob, index)  # served: nothing proves it wrong yet
                assert not cache.has(blob.digest, 0)  # all queued behind the closed gate
                with pytest.raises(IntegrityError, match="does not match its digest"):
                    await fetcher.piece(blob, count - 1)  # completes the hash
                cache.gate.set()
        finally:
            cache.gate.set()

    try:
        run_fetcher(proxy.host, cache, body)
    finally:
        proxy.tamper = False
    assert stored(cache, blob) == {}
    assert cache.missing(blob.digest, blob.size) == list(range(count))
    assert cache.stats().size == 0
    assert cache.blob_states() == []


def test_cancelled_writing_leaves_the_cache_consistent(
    registry: Registry, pushed: None, tmp_path: Path
) -> None:
    cache = GatedCache(tmp_path / "cache")
    blob = blob_of(SMALL)

    async def body(fetcher: PieceFetcher) -> None:
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as scope:
                    async with fetcher.writing():
                        for index in range(5):  # one being written, the others queued
                            await fetcher.piece(blob, index)
                        # Opened after the cancellation reached the writer.
                        nursery.start_soon(cache.open_after, 0.2)
                        scope.cancel()
                        await trio.sleep_forever()
                assert scope.cancelled_caught
        finally:
            cache.gate.set()

    run_fetcher(registry.host, cache, body)
    present = stored(cache, blob)
    assert present  # the transaction under way when cancelled was committed
    for index, data in present.items():
        assert data == expected_piece(SMALL, index)
    checksum = 8  # stored with each piece
    assert cache.stats().size == sum(len(data) + checksum for data in present.values())
    assert cache.stats().pieces == len(present)
    [state] = cache.blob_states()
    assert state.present == len(present)
    assert not state.verified


def test_a_fetched_piece_is_stored_even_when_its_reader_is_cancelled(
    proxy: Proxy, pushed: None, tmp_path: Path
) -> None:
    """An unmount cancels prefetch: pieces already fetched, waiting for room in the queue,
    are stored all the same (the next mount would fetch them again otherwise)."""
    cache = GatedCache(tmp_path / "cache")
    blob = blob_of(LARGE)

    async def body(fetcher: PieceFetcher) -> None:
        try:
            async with fetcher.writing(), trio.open_nursery() as outer:
                proxy.reset()
                outer.start_soon(cache.open_after, 1.5)  # after the readers' cancellation
                with trio.move_on_after(1):  # the session an unmount cancels
                    async with trio.open_nursery() as readers:
                        for index in range(16):
                            readers.start_soon(fetcher.prefetch, blob, index, Priority.READAHEAD)
        finally:
            cache.gate.set()

    run_fetcher(proxy.host, cache, body)
    present = stored(cache, blob)
    # More than the writer's batch and queue hold: readers waiting for room were cancelled.
    assert len(present) > 8, sorted(present)
    assert proxy.bytes_by_blob[blob.digest] == len(present) * PIECE  # every fetched piece kept
    for index, data in present.items():
        assert data == expected_piece(LARGE, index)


class GatedHash:
    """sha256 whose updates wait until ``gate`` is set (at most 30 s), in the hash's thread."""

    def __init__(self, gate: threading.Event) -> None:
        self._gate = gate
        self._inner = hashlib.sha256()

    def update(self, data: bytes) -> None:
        assert self._gate.wait(timeout=30), "the test never opened the gate"
        self._inner.update(data)

    def hexdigest(self) -> str:
        return self._inner.hexdigest()


def test_prefetched_pieces_do_not_wait_for_a_busy_hash(
    registry: Registry, pushed: None, tmp_path: Path
) -> None:
    """While a read holds the blob's hash, readahead returns with its pieces (each waiting one
    held its piece: they piled up in memory); the hash still gets to every piece after."""
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=PIECE)
    blob = blob_of(LARGE)
    gate = threading.Event()

    async def body(fetcher: PieceFetcher) -> None:
        state = fetcher._hashes.start(
            blob.digest,
            BlobHash(hasher=GatedHash(gate)),  # type: ignore[arg-type]
        )
        try:
            async with fetcher.writing(), trio.open_nursery() as nursery:
                nursery.start_soon(fetcher.read, blob, 0, 10)  # hashes piece 0, in the gate
                while not state.lock.locked():
                    await trio.sleep(0.01)
                with trio.fail_after(10):
                    for index in range(1, 10):
                        await fetcher.prefetch(blob, index, Priority.READAHEAD)
                assert state.next_index == 0  # nothing hashed yet: they did not wait
                gate.set()
            assert await fetcher.read(blob, 0, blob.size) == LARGE
        finally:
            gate.set()

    run_fetcher(registry.host, cache, body)
    assert cache.is_verified(blob.digest)

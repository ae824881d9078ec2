"""The pool of piece buffers: a buffer is handed out again only once nothing refers to it."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import trio
from registry_tools import Layer, Registry, push_artifact

from modelfs.artifact.tree import BlobRef
from modelfs.cache import PieceCache
from modelfs.fetcher import piece_fetcher
from modelfs.modelpack import layer_media_type
from modelfs.sources import rangeget
from modelfs.sources.buffers import BufferPool
from modelfs.sources.registry import RegistryClient


def test_a_buffer_is_reused_once_every_view_of_it_is_gone() -> None:
    pool = BufferPool(size=64, capacity=4)
    first = pool.take(10)
    first[:] = b"A" * 10
    part = first[2:4]  # a slice holds the buffer as well
    del first
    second = pool.take(10)
    second[:] = b"B" * 10
    assert bytes(part) == b"AA"  # the slice's bytes were not handed out again
    del part
    third = pool.take(10)
    assert bytes(third) == b"A" * 10  # the same memory, not zeroed: it was reused
    assert bytes(second) == b"B" * 10


def test_a_buffer_exported_to_other_code_is_not_handed_out_again() -> None:
    # What the pool's reference count rests on: C code that keeps a view's memory (numpy, a
    # hash in a thread, an LMDB put) holds the view, so the buffer counts as in use meanwhile.
    pool = BufferPool(size=64, capacity=1)
    view = pool.take(8)
    view[:] = b"12345678"
    array = np.frombuffer(view, dtype=np.uint8)
    del view
    assert isinstance(pool.take(8), bytearray)  # the only buffer is still in use
    del array
    assert isinstance(pool.take(8), memoryview)


def test_beyond_its_capacity_or_its_size_the_pool_gives_plain_buffers() -> None:
    pool = BufferPool(size=64, capacity=2)
    held = [pool.take(64), pool.take(64)]
    extra = pool.take(64)
    assert isinstance(extra, bytearray) and len(extra) == 64
    large = pool.take(65)
    assert isinstance(large, bytearray) and len(large) == 65
    # Counted for the metrics: buffers mapped, and those handed out past the capacity (a piece
    # larger than the pool's buffers is not one).
    assert (pool.mapped, pool.plain_buffers) == (2, 1)
    assert all(isinstance(b, memoryview) and len(b) == 64 and not b.readonly for b in held)
    held.pop()
    assert isinstance(pool.take(64), memoryview)  # one came back to the pool


class Keeper:
    """Keeps buffers it could do without, and gives them up when asked, if it may."""

    def __init__(self, may_spare: bool) -> None:
        self.kept: list[memoryview | bytearray] = []
        self.may_spare = may_spare

    def spare_buffer(self) -> bool:
        if self.may_spare and self.kept:
            self.kept.pop(0)
            return True
        return False


def test_at_its_capacity_the_pool_asks_its_holders_to_spare_a_buffer() -> None:
    pool = BufferPool(size=64, capacity=2)
    keeper = Keeper(may_spare=True)
    pool.add_holder(keeper)
    keeper.kept = [pool.take(64), pool.take(64)]
    keeper.kept[0][:1] = b"A"
    keeper.kept[1][:1] = b"B"
    again = pool.take(64)
    assert isinstance(again, memoryview)  # a pooled buffer, not a third block of memory
    assert len(keeper.kept) == 1 and bytes(keeper.kept[0][:1]) == b"B"
    assert bytes(again[:1]) == b"A"  # the oldest, spared and handed out again


def test_what_nothing_can_spare_is_not_handed_out_again() -> None:
    pool = BufferPool(size=64, capacity=2)
    keeper = Keeper(may_spare=False)
    pool.add_holder(keeper)
    keeper.kept = [pool.take(64), pool.take(64)]
    assert isinstance(pool.take(64), bytearray)
    assert len(keeper.kept) == 2
    sparing = Keeper(may_spare=True)
    pool.add_holder(sparing)
    sparing.kept = [keeper.kept.pop()]  # also held by the one that may spare
    keeper.kept.append(sparing.kept[0])
    assert isinstance(pool.take(64), bytearray)  # spared, but still held: not reused
    assert sparing.kept == []


def test_holders_go_with_their_owner() -> None:
    pool = BufferPool(size=64, capacity=1)
    keeper = Keeper(may_spare=True)
    pool.add_holder(keeper)
    del keeper
    assert isinstance(pool.take(64), memoryview)
    assert isinstance(pool.take(64), memoryview)  # nothing refers to the first one any more


class CountingPool(BufferPool):
    """Counts the buffers it hands out from the pool and the plain ones."""

    pooled = 0
    plain = 0

    def take(self, length: int) -> memoryview | bytearray:
        buffer = super().take(length)
        self.pooled += isinstance(buffer, memoryview)
        self.plain += isinstance(buffer, bytearray)
        return buffer


def test_readers_get_their_bytes_while_few_buffers_go_round(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three pooled buffers for 25 pieces read at random by 16 readers at once, each holding its
    bytes while the others read: cold (received from a real registry) and warm (copied out of
    LMDB), every byte a reader gets is the blob's own."""
    piece = 64 << 10
    data = os.urandom(24 * piece + 123)
    raw = layer_media_type("weight", "raw")
    push_artifact(registry.host, "tests/buffers", "v1", [Layer(raw, data)])
    blob = BlobRef("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    pool = CountingPool(size=piece, capacity=3)
    monkeypatch.setattr(rangeget, "PIECE_BUFFERS", pool)
    monkeypatch.setattr(piece_fetcher, "PIECE_BUFFERS", pool)
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=piece)
    spans = [(random.randrange(len(data)), random.randrange(1, 3 * piece)) for _ in range(200)]
    wrong: list[tuple[int, int]] = []

    async def read_spans(fetcher: piece_fetcher.PieceFetcher, todo: list[tuple[int, int]]) -> None:
        while todo:
            offset, size = todo.pop()
            got = await fetcher.read(blob, offset, size)
            await trio.sleep(0)  # others read, and reuse every buffer no one holds
            if bytes(got) != data[offset : offset + size]:
                wrong.append((offset, size))

    async def main() -> None:
        async with RegistryClient(registry.host, plain_http=True) as client:
            fetcher = piece_fetcher.PieceFetcher(
                client.repository("tests/buffers"), cache, memory_pieces=2, serve_unverified=True
            )
            async with fetcher.writing(), trio.open_nursery() as nursery:
                todo = list(spans)
                for _ in range(16):
                    nursery.start_soon(read_spans, fetcher, todo)

    for phase in ("cold", "warm"):
        taken = pool.pooled
        trio.run(main)
        assert wrong == [], phase
        assert pool.pooled - taken > 3, phase  # the three buffers went round
        assert cache.missing(blob.digest, blob.size) == []
    cache.close()


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_a_fetcher_spares_the_pieces_it_keeps_to_stay_in_the_pool(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """One reader, one connection, a pool of 3 buffers. Read forward, the fetcher would keep 12
    pieces for readers; read backward, every piece waits for the ones before it to be hashed.
    Either way it gives up the pieces the cache has before the pool hands out a plain buffer,
    the reader's bytes are the blob's, and the blob still checks out whole."""
    piece = 64 << 10
    data = os.urandom(16 * piece)
    raw = layer_media_type("weight", "raw")
    push_artifact(registry.host, "tests/spare", order, [Layer(raw, data)])
    blob = BlobRef("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    pool = CountingPool(size=piece, capacity=3)
    monkeypatch.setattr(rangeget, "PIECE_BUFFERS", pool)
    monkeypatch.setattr(piece_fetcher, "PIECE_BUFFERS", pool)
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=piece)
    indexes = list(range(16)) if order == "forward" else list(reversed(range(16)))

    async def main() -> None:
        async with RegistryClient(registry.host, plain_http=True) as client:
            fetcher = piece_fetcher.PieceFetcher(
                client.repository("tests/spare"),
                cache,
                connections=1,
                memory_pieces=12,
                serve_unverified=True,
            )
            for index in indexes:
                got = await fetcher.read(blob, index * piece, piece)
                assert bytes(got) == data[index * piece : (index + 1) * piece], index
                del got

    trio.run(main)
    assert pool.plain == 0
    assert cache.is_verified(blob.digest)
    cache.close()

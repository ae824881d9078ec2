"""The pool of piece buffers: a buffer is handed out again only once nothing refers to it."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import trio
from registry_tools import Layer, Registry, push_artifact

from modelfs.cache import PieceCache
from modelfs.fetcher import pieces, rangeget
from modelfs.fetcher.buffers import BufferPool
from modelfs.fetcher.registry import RegistryClient
from modelfs.fs.tree import BlobRef
from modelfs.modelpack import layer_media_type


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


def test_beyond_its_capacity_or_its_size_the_pool_gives_plain_buffers() -> None:
    pool = BufferPool(size=64, capacity=2)
    held = [pool.take(64), pool.take(64)]
    extra = pool.take(64)
    assert isinstance(extra, bytearray) and len(extra) == 64
    large = pool.take(65)
    assert isinstance(large, bytearray) and len(large) == 65
    assert all(isinstance(b, memoryview) and len(b) == 64 and not b.readonly for b in held)
    held.pop()
    assert isinstance(pool.take(64), memoryview)  # one came back to the pool


class CountingPool(BufferPool):
    """Counts the buffers it hands out from the pool (not the plain ones)."""

    pooled = 0

    def take(self, length: int) -> memoryview | bytearray:
        buffer = super().take(length)
        self.pooled += isinstance(buffer, memoryview)
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
    monkeypatch.setattr(pieces, "PIECE_BUFFERS", pool)
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=piece)
    spans = [(random.randrange(len(data)), random.randrange(1, 3 * piece)) for _ in range(200)]
    wrong: list[tuple[int, int]] = []

    async def read_spans(fetcher: pieces.PieceFetcher, todo: list[tuple[int, int]]) -> None:
        while todo:
            offset, size = todo.pop()
            got = await fetcher.read(blob, offset, size)
            await trio.sleep(0)  # others read, and reuse every buffer no one holds
            if bytes(got) != data[offset : offset + size]:
                wrong.append((offset, size))

    async def main() -> None:
        async with RegistryClient(registry.host, plain_http=True) as client:
            fetcher = pieces.PieceFetcher(
                client.repository("tests/buffers"), cache, memory_pieces=2
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

"""``BlobHashes`` alone: a blob's sha256 fed piece by piece in any order, in milliseconds."""

from __future__ import annotations

import hashlib
import os

import trio

from modelfs.artifact.tree import BlobRef
from modelfs.fetcher.blob_hash import HASH_AHEAD, BlobHashes
from modelfs.sources.interface import BlobBytes

PIECE = 1024


def pieces_of(data: bytes) -> list[bytes]:
    return [data[start : start + PIECE] for start in range(0, len(data), PIECE)]


def blob_of(data: bytes) -> BlobRef:
    return BlobRef("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


class Stored:
    """What the hash may read back: pieces put here, and which it asked for."""

    def __init__(self) -> None:
        self.pieces: dict[int, bytes] = {}
        self.asked: list[int] = []

    async def read_back(self, blob: BlobRef, index: int) -> BlobBytes | None:
        self.asked.append(index)
        return self.pieces.get(index)


def test_pieces_in_any_order_hash_to_the_blobs_digest() -> None:
    data = os.urandom(5 * PIECE + 7)
    blob, pieces = blob_of(data), pieces_of(data)
    stored = Stored()
    hashes = BlobHashes(PIECE, stored.read_back)

    async def main() -> list[str | None]:
        results = []
        for index in (2, 0, 4, 1, 5, 3):
            state = hashes.feed(blob, index, pieces[index])
            results.append(await hashes.advance(blob, state))
        return results

    results = trio.run(main)
    assert results[:-1] == [None] * 5  # not whole until the last piece came
    assert f"sha256:{results[-1]}" == blob.digest
    assert stored.asked == [0, 1, 1, 3, 3]  # each stop asked for the piece it needed next


def test_pieces_far_ahead_are_read_back_when_the_hash_gets_there() -> None:
    data = os.urandom((HASH_AHEAD + 3) * PIECE)
    blob, pieces = blob_of(data), pieces_of(data)
    stored = Stored()
    hashes = BlobHashes(PIECE, stored.read_back)

    async def main() -> str | None:
        far = HASH_AHEAD + 2
        hashes.feed(blob, far, pieces[far])  # too far ahead: not held
        stored.pieces[far] = pieces[far]  # but stored, as the writer would have
        actual = None
        for index in range(far):
            actual = await hashes.advance(blob, hashes.feed(blob, index, pieces[index]))
        return actual

    assert f"sha256:{trio.run(main)}" == blob.digest


def test_a_piece_behind_the_hash_restarts_it_and_a_held_piece_can_be_spared() -> None:
    data = os.urandom(4 * PIECE)
    blob, pieces = blob_of(data), pieces_of(data)
    hashes = BlobHashes(PIECE, Stored().read_back)

    async def main() -> None:
        first = hashes.feed(blob, 0, pieces[0])
        assert await hashes.advance(blob, first) is None and first.next_index == 1
        hashes.feed(blob, 3, pieces[3])
        assert hashes.spare_one(lambda digest, index: False) is False  # not stored: kept
        assert hashes.spare_one(lambda digest, index: True) is True
        restarted = hashes.feed(blob, 0, pieces[0])  # fetched again after an eviction
        assert restarted is not first and restarted.next_index == 0

    trio.run(main)

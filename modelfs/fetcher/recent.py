"""The pieces held in memory for their readers: the latest fetched, oldest dropped first.

First in, first out rather than least recently used: a sequential reader has finished with the
older pieces (the kernel's page cache keeps what it read), while the pieces prefetched ahead of
it are the newest and not read yet.
"""

from __future__ import annotations

from modelfs.sources.interface import BlobBytes

PieceKey = tuple[str, int]  # (blob digest, piece index)


class RecentPieces:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._pieces: dict[PieceKey, BlobBytes] = {}  # in the order fetched

    def __contains__(self, key: PieceKey) -> bool:
        return key in self._pieces

    def get(self, key: PieceKey) -> BlobBytes | None:
        return self._pieces.get(key)

    def remember(self, key: PieceKey, data: BlobBytes) -> None:
        self._pieces[key] = data
        while len(self._pieces) > self._capacity:
            self.drop_oldest()

    def drop_oldest(self) -> bool:
        """Let go of the oldest piece; False if none is held."""
        if not self._pieces:
            return False
        del self._pieces[next(iter(self._pieces))]
        return True

    def drop_blob(self, digest: str) -> None:
        for key in [key for key in self._pieces if key[0] == digest]:
            del self._pieces[key]

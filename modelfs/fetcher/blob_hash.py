"""Each blob's sha256 over its pieces, fed in order as they arrive, so a blob is checked against
its digest without being read twice.

Pieces arrive in any order. Those up to ``HASH_AHEAD`` ahead of a blob's hash are held for it;
further ones, and any the hash finds missing, are read back (from the writer's queue or the
cache) when the hash gets to them. A piece that arrives behind the hash (evicted and fetched
again) restarts it. What a finished hash means (verified, or rejected) is the caller's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from modelfs.artifact.tree import BlobRef
from modelfs.cache import piece_checksum
from modelfs.errors import IntegrityError
from modelfs.pieces import piece_count
from modelfs.sources.interface import BlobBytes

# Pieces up to this many ahead of a blob's hash are held for it; further ones are read back
# from the cache when the hash gets to them (a random reader's pieces, mostly).
HASH_AHEAD = 16

# A piece the hash needs and does not hold: from the writer's queue or the cache, None if absent.
ReadBack = Callable[[BlobRef, int], Awaitable[BlobBytes | None]]


@dataclass
class BlobHash:
    """A blob's sha256 over its pieces ``0 .. next_index - 1``, fed in order."""

    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    # Each piece's ``piece_checksum`` as hashed: the cache vouches for exactly those bytes.
    checksums: list[int] = field(default_factory=list)
    next_index: int = 0
    ahead: dict[int, BlobBytes] = field(default_factory=dict)  # arrived, not hashed yet
    lock: trio.Lock = field(default_factory=trio.Lock)


def _hash_piece(state: BlobHash, data: BlobBytes) -> None:
    state.hasher.update(data)
    state.checksums.append(piece_checksum(data))


class BlobHashes:
    """The hashes under way, one per blob."""

    def __init__(self, piece_size: int, read_back: ReadBack) -> None:
        self._piece_size = piece_size
        self._read_back = read_back
        self._states: dict[str, BlobHash] = {}

    def start(self, digest: str, state: BlobHash | None = None) -> BlobHash:
        """The blob's hash under way, or a new one (``state``, if given)."""
        if state is not None:
            self._states[digest] = state
        return self._states.setdefault(digest, BlobHash())

    def feed(self, blob: BlobRef, index: int, data: BlobBytes) -> BlobHash:
        """Give the hash a piece fresh from the source; the hash it went to."""
        state = self._states.get(blob.digest)
        if state is None or index < state.next_index:
            # (Re)start; a piece hashed before, evicted and fetched again is not covered.
            state = self._states[blob.digest] = BlobHash()
        if index - state.next_index < HASH_AHEAD:
            state.ahead[index] = data
        return state

    async def advance(self, blob: BlobRef, state: BlobHash, wait: bool = True) -> str | None:
        """Hash the blob's pieces in order as far as they are at hand; the hex sha256 once it
        is whole, else None (a piece is not here yet, or another task finished the hash).

        Callers that ``wait`` queue on the lock, so they return only once the hash went past
        what was at hand, their own piece included: a read that completes a blob learns its
        digest. The others return at once if the hash is busy; the task hashing gets to their
        pieces.
        """
        if not wait and state.lock.locked():
            # Its piece is in ``ahead`` (or, far ahead, in the cache when the hash gets there),
            # where the task hashing looks before it stops.
            return None
        if not blob.digest.startswith("sha256:"):
            raise IntegrityError(f"blob {blob.digest}: only sha256 digests can be checked")
        count = piece_count(blob.size, self._piece_size)
        async with state.lock:
            while self._states.get(blob.digest) is state and state.next_index < count:
                data = state.ahead.pop(state.next_index, None)
                if data is None:
                    data = await self._read_back(blob, state.next_index)
                if data is None:
                    if state.next_index in state.ahead:
                        continue  # it arrived while it was read back
                    return None  # not here yet (or evicted): hashed when it arrives
                await trio.to_thread.run_sync(_hash_piece, state, data)
                state.next_index += 1
            if self._states.get(blob.digest) is not state:
                return None  # finished, or restarted, by a task that held the lock before
            del self._states[blob.digest]
        return state.hasher.hexdigest()

    def spare_one(self, stored: Callable[[str, int], bool]) -> bool:
        """Let go of the furthest piece held ahead of a hash that is ``stored`` already (the
        hash reads it back when it gets there); False if there is none."""
        for digest, state in self._states.items():
            # Not the next one: the hash may be reading it back right now.
            held = [i for i in state.ahead if i > state.next_index and stored(digest, i)]
            if held:
                del state.ahead[max(held)]
                return True
        return False

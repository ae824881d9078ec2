"""The narrow interface every blob source implements: a registry repository or an OCI layout.

The piece fetcher and the mount only ever talk to a ``BlobSource``; how the bytes travel
(HTTP with auth and retries, or files on disk) stays behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# A range as a source hands it over: a registry's lean path receives the body into a pooled buffer
# (a memoryview), and it travels on as that (to the cache, the hash, the reader), uncopied.
BlobBytes = bytes | bytearray | memoryview

# Told each piece of a run as it lands: its place in the run and its bytes.
Deliver = Callable[[int, BlobBytes], Awaitable[None]]


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest as the source returned it; ``digest`` is the sha256 of ``data``."""

    digest: str
    media_type: str
    data: bytes


class BlobSource(Protocol):
    """Where one model's manifests and blobs come from."""

    @property
    def name(self) -> str:
        """Human-readable location for messages, e.g. ``localhost:5000/models/bert``."""
        ...

    async def get_manifest(self, selector: str) -> FetchedManifest:
        """Fetch a manifest by tag or digest; verify it against the digest when given one."""
        ...

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        """Fetch a small blob (a config) whole and verify its digest."""
        ...

    async def read_range(self, digest: str, start: int, length: int) -> BlobBytes:
        """Exactly ``length`` bytes of the blob from ``start`` (fewer only at the blob's end)."""
        ...

    def stream_blob(self, digest: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """The whole blob as a stream of chunks (no digest check: the caller hashes)."""
        ...


@runtime_checkable
class PieceRuns(Protocol):
    """A source that fetches consecutive pieces in one request (a registry: one range GET for
    several pieces costs it far less CPU than one GET each)."""

    async def read_pieces(
        self, digest: str, start: int, lengths: Sequence[int], deliver: Deliver
    ) -> None:
        """The consecutive pieces of ``lengths`` bytes from ``start``, each awaited into
        ``deliver`` in order as it lands; exactly those lengths (the blob holds them)."""
        ...


async def read_as_run(runs: PieceRuns, digest: str, start: int, length: int) -> BlobBytes:
    """``read_range`` of a source that reads runs of pieces: a run of one."""
    if length <= 0:
        return b""
    received: list[BlobBytes] = []

    async def keep(_place: int, data: BlobBytes) -> None:
        received.append(data)

    await runs.read_pieces(digest, start, [length], keep)
    return received[0]


@runtime_checkable
class UnvouchedPieces(Protocol):
    """A source that may hand out pieces nothing vouches for until their whole blob checks out
    (pieces from peers when the model has no piece index, ``--peers-without-index``)."""

    async def whole_before_serving(self, digest: str) -> bool:
        """Whether no byte of the blob may be served before the whole blob matched its digest."""
        ...

    def blob_checked(self, digest: str, good: bool) -> None:
        """The blob hashed whole to its digest (``good``), or not (its pieces were dropped)."""
        ...

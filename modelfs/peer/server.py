"""The peer server: whole, verified pieces of a node's cache, to cluster members only.

One route, ``GET /pieces/<digest>/<index>``, answered only to requests carrying a valid cluster
token (``AuthenticatedServer``). A piece is served only if this node can vouch for it: its blob
was verified whole, the piece matches the piece index, or (a model without an index) this
process took it from the registry itself. The cache keeps whether a piece was vouched for, so a
piece hashed against the index once is not hashed again for the next peer. There is no listing
and no file path: a stranger learns nothing, a member learns only whether this node holds a
piece it named.
"""

from __future__ import annotations

import math
import re
import ssl
import time
from collections.abc import Callable

import trio

from modelfs.cache.store import PieceCache
from modelfs.transport.server import DEFAULT_MAX_CONNECTIONS, AuthenticatedServer, Request, Response

PIECE_PATH = re.compile(r"^/pieces/(sha256:[0-9a-f]{64})/([0-9]{1,9})$")

# The digest the piece index gives for (blob digest, piece index); None if not indexed.
ExpectedPiece = Callable[[str, int], str | None]


class PeerServer(AuthenticatedServer):
    def __init__(
        self,
        cache: PieceCache,
        secret: bytes,
        expected: ExpectedPiece,
        clock: Callable[[], float] = time.time,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        super().__init__(self.answer, secret, clock, tls=tls, max_connections=max_connections)
        self.cache = cache
        self._expected = expected
        # Pieces of blobs without an index that this process took from the registry.
        self._from_registry: set[tuple[str, int]] = set()
        self.last_asked = -math.inf  # trio time of the latest piece request (a preheat's linger)

    def vouch(self, digest: str, index: int) -> None:
        """This process took the piece from the registry (a model without an index: its peers
        check the whole blob before serving a byte of it)."""
        self._from_registry.add((digest, index))

    def piece(self, digest: str, index: int) -> bytes | bytearray | memoryview | None:
        """The piece, if held and vouched for (blob verified whole, or piece matches the
        index), or taken from the registry by this process."""
        wanted = self._expected(digest, index)
        if wanted is not None:
            return self.cache.get_checked(digest, index, wanted, None)
        from_registry = (digest, index) in self._from_registry
        return self.cache.get(digest, index, unvouched=from_registry)

    async def answer(self, request: Request) -> Response:
        match = PIECE_PATH.match(request.path)
        if request.method != "GET" or match is None:
            return Response(404)
        self.last_asked = trio.current_time()
        # Cache read and hash of 4 MiB: off the event loop.
        data = await trio.to_thread.run_sync(self.piece, match[1], int(match[2]))
        return Response(200, bytes(data)) if data is not None else Response(404)

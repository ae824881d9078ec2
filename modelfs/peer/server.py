"""The peer server: whole, verified pieces of a node's cache, to cluster members only.

One route, ``GET /pieces/<digest>/<index>``, answered only to requests carrying a valid cluster
token. A piece is served only if this node can vouch for it: its blob was verified whole, or
the piece matches the piece index. There is no listing and no file path: a stranger learns
nothing, a member learns only whether this node holds a piece it asked for by digest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable

import h11
import trio

from modelfs.cache.store import PieceCache
from modelfs.peer.auth import SCHEME, Verdict, check

log = logging.getLogger(__name__)

PIECE_PATH = re.compile(r"^/pieces/(sha256:[0-9a-f]{64})/(\d{1,9})$")
IDLE_TIMEOUT = 30.0
_RECEIVE_SIZE = 64 * 1024

# The hex sha256 the piece index gives for (blob digest, piece index); None if not indexed.
ExpectedPiece = Callable[[str, int], str | None]


class PeerServer:
    def __init__(
        self,
        cache: PieceCache,
        secret: bytes,
        expected: ExpectedPiece,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self._secret = secret
        self._expected = expected
        self._clock = clock

    def piece(self, digest: str, index: int) -> bytes | None:
        """The piece, if held and vouched for (blob verified whole, or piece matches the index)."""
        data = self.cache.get(digest, index)
        if data is None:
            return None
        if self.cache.is_verified(digest):
            return data
        wanted = self._expected(digest, index)
        if wanted is not None and hashlib.sha256(data).hexdigest() == wanted:
            return data
        return None

    async def answer(
        self, method: str, target: str, authorization: str | None
    ) -> tuple[int, bytes]:
        """(status, body) for one request; the body is empty unless the status is 200."""
        path = target.split("?", 1)[0]
        verdict = check(self._secret, authorization, method, path, self._clock())
        if verdict is not Verdict.ACCEPTED:
            return verdict.value, b""
        match = PIECE_PATH.match(path)
        if method != "GET" or match is None:
            return 404, b""
        # LMDB read and sha256 of 4 MiB: off the event loop.
        data = await trio.to_thread.run_sync(self.piece, match[1], int(match[2]))
        return (200, data) if data is not None else (404, b"")

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await trio.serve_tcp(self.handle_connection, port, host=host, task_status=task_status)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT):
                    request = await _next_request(connection, stream)
                if request is None:
                    return
                status, body = await self.answer(
                    request.method.decode(),
                    request.target.decode(),
                    _header(request, b"authorization"),
                )
                await _respond(connection, stream, status, body)
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except h11.RemoteProtocolError as error:
            if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _respond(connection, stream, error.error_status_hint, b"")
        except trio.BrokenResourceError:
            log.debug("peer server: a client went away mid-answer")
        finally:
            await stream.aclose()


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _next_event(connection: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await stream.receive_some(_RECEIVE_SIZE))


async def _next_request(
    connection: h11.Connection, stream: trio.SocketStream
) -> h11.Request | None:
    """The next request, its (ignored) body drained; None when the client closed."""
    request = await _next_event(connection, stream)
    if not isinstance(request, h11.Request):
        return None
    while not isinstance(await _next_event(connection, stream), h11.EndOfMessage):
        pass
    return request


async def _respond(
    connection: h11.Connection, stream: trio.SocketStream, status: int, body: bytes
) -> None:
    headers = [("Content-Length", str(len(body)))]
    if status == 200:
        headers.append(("Content-Type", "application/octet-stream"))
    if status == 401:
        headers.append(("WWW-Authenticate", SCHEME))
    for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body)):
        await stream.send_all(connection.send(event) or b"")
    await stream.send_all(connection.send(h11.EndOfMessage()) or b"")

"""A small HTTP/1.1 server on trio and h11 where every request must carry a cluster token.

The peer server and the scheduler both use it. Requests without a token get 401, with a bad
one 403, both with an empty body, before any handler runs (``public`` GET paths excepted:
the scheduler's ``/metrics``, which Prometheus scrapes without a token). Bodies are bounded;
connections are kept alive between requests and closed when idle.

With a TLS context (mutual TLS: the context requires a client certificate), each connection is
wrapped before its first byte is read; a client without a certificate the CA signed fails the
handshake and is never answered. The HMAC token is still required on top.

At most ``max_connections`` connections are served at once. One more gets 503 to its first
request, unauthenticated and at once, and is closed: a peer client then tries another peer or
the registry right away, instead of queueing behind a busy node (a stalled queue would eat its
wait budget), and does not report the peer as failed.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from modelfs.errors import ModelfsError
from modelfs.peer.auth import SCHEME, Verdict, check

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 30.0
BUSY_TIMEOUT = 1.0  # longest a refused connection is kept to tell it 503
DEFAULT_MAX_CONNECTIONS = 256
MAX_BODY = 4 * 1024 * 1024
_RECEIVE_SIZE = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/octet-stream"


Handler = Callable[[Request], Awaitable[Response]]


class _BodyTooLarge(Exception):
    pass


class AuthenticatedServer:
    def __init__(
        self,
        handler: Handler,
        secret: bytes,
        clock: Callable[[], float] = time.time,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        public: dict[str, Handler] | None = None,
    ) -> None:
        self._handler = handler
        self._public = public or {}
        self._secret = secret
        self._clock = clock
        self._tls = tls
        self.connections = trio.CapacityLimiter(max_connections)
        self.refused_connections = 0

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as error:
            raise ModelfsError(
                f"cannot listen on {host}:{port} ({error.strerror}): choose another address"
            ) from None
        await trio.serve_listeners(self.handle_connection, listeners, task_status=task_status)

    async def handle_connection(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self._tls is not None:
            stream = trio.SSLStream(tcp, self._tls, server_side=True, https_compatible=True)
        try:
            self.connections.acquire_nowait()
        except trio.WouldBlock:
            self.refused_connections += 1
            log.info("%d connections already: one more refused", self.connections.total_tokens)
            await _refuse_busy(stream)
            return
        try:
            await self._serve_connection(stream)
        finally:
            self.connections.release()

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                received = None  # stays None if the client idles past the timeout
                with trio.move_on_after(IDLE_TIMEOUT):
                    received = await _next_request(connection, stream)
                if received is None:
                    return
                request, authorization = received
                await _respond(connection, stream, await self._answer(request, authorization))
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except h11.RemoteProtocolError as error:
            await _refuse(connection, stream, error.error_status_hint)
        except _BodyTooLarge:
            await _refuse(connection, stream, 413)
        except trio.BrokenResourceError:
            # Also a TLS handshake that failed (no certificate, or one from another CA).
            log.debug("a client went away mid-answer, or failed the TLS handshake")
        finally:
            await stream.aclose()

    async def _answer(self, request: Request, authorization: str | None) -> Response:
        public = self._public.get(request.path)
        if public is not None and request.method == "GET":
            return await public(request)
        verdict = check(
            self._secret,
            authorization,
            request.method,
            request.path,
            self._clock(),
            request.body,
        )
        if verdict is not Verdict.ACCEPTED:
            return Response(verdict.value)
        return await self._handler(request)


async def _next_event(connection: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))


async def _next_request(
    connection: h11.Connection, stream: trio.abc.Stream
) -> tuple[Request, str | None] | None:
    """The next request and its Authorization header; None when the client closed."""
    head = await _next_event(connection, stream)
    if not isinstance(head, h11.Request):
        return None
    body = bytearray()
    while not isinstance(event := await _next_event(connection, stream), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _BodyTooLarge
    authorization = next(
        (bytes(value).decode("latin-1") for key, value in head.headers if key == b"authorization"),
        None,
    )
    path = head.target.decode("latin-1").split("?", 1)[0]
    return Request(head.method.decode("latin-1"), path, bytes(body)), authorization


async def _respond(connection: h11.Connection, stream: trio.abc.Stream, response: Response) -> None:
    headers = [("Content-Length", str(len(response.body)))]
    if response.body:
        headers.append(("Content-Type", response.content_type))
    if response.status == 401:
        headers.append(("WWW-Authenticate", SCHEME))
    for event in (
        h11.Response(status_code=response.status, headers=headers),
        h11.Data(data=response.body),
        h11.EndOfMessage(),
    ):
        await stream.send_all(connection.send(event) or b"")


async def _refuse_busy(stream: trio.abc.Stream) -> None:
    """503 to the first request, then close. The request is read first: closing a socket with
    unread bytes resets it, and the client could lose the answer."""
    connection = h11.Connection(h11.SERVER)
    with trio.move_on_after(BUSY_TIMEOUT):
        try:
            if await _next_request(connection, stream) is not None:
                await _respond(connection, stream, Response(503))
        except (h11.ProtocolError, _BodyTooLarge, trio.BrokenResourceError):
            log.debug("a refused client went away, or sent no valid request")
    await trio.aclose_forcefully(stream)


async def _refuse(connection: h11.Connection, stream: trio.abc.Stream, status: int) -> None:
    """Answer a request we cannot parse or take, if the connection still allows an answer."""
    if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        try:
            await _respond(connection, stream, Response(status))
        except (h11.LocalProtocolError, trio.BrokenResourceError):
            log.debug("could not send the refusal %d", status)


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) for a listening socket."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 0.0.0.0:7480)")
    return host, int(port)

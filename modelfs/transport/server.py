"""A small HTTP/1.1 server on trio and h11 where every request must carry a cluster token.

The peer server and the scheduler both use it. The token is checked from the request's
headers alone (``transport.tokens``), before a byte of its body is read: requests without a token
get 401, with a bad one 403, both with an empty body, before any handler runs (``public`` GET
paths excepted:
the scheduler's ``/metrics``, which Prometheus scrapes without a token). A declared body larger
than ``MAX_BODY`` gets 413 from the headers too. Only then is the body read, bounded, and a body
whose sha256 is not the signed one gets 400. So a client without the secret makes the server hold
no more than one receive buffer per connection. Connections are kept alive between requests and
closed when idle.

With a TLS context (mutual TLS: the context requires a client certificate), each connection is
wrapped before its first byte is read; a client without a certificate the CA signed fails the
handshake and is never answered. The HMAC token is still required on top.

At most ``max_connections`` connections are served at once. One more gets 503 to its first
request, unauthenticated and at once, and is closed: a peer client then tries another peer or
the registry right away, instead of queueing behind a busy node (a stalled queue would eat its
wait budget), and does not report the peer as failed.

Whatever a client sends, and whenever it goes away, only its connection ends: any error while
serving one is logged in one line and the server serves on.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from modelfs.errors import ModelfsError
from modelfs.transport.tokens import DIGEST_HEADER, EMPTY_BODY, SCHEME, Verdict, check
from modelfs.untrusted import decimal

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 30.0
BUSY_TIMEOUT = 1.0  # longest a refused connection is kept to tell it 503
LINGER = 2.0  # longest the rest of an unread body is drained after the answer
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


@dataclass(frozen=True)
class _Head:
    """A request line and the headers the server looks at, before any of the body."""

    method: str
    path: str
    authorization: str | None
    digest: str  # the body's sha256 the client declares (and signs)
    length: int | None  # the body's declared length, capped at MAX_BODY + 1; None: chunked


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
        try:
            await self._handle_connection(tcp)
        except Exception as error:  # any client, any bytes: it ends this connection only
            log.warning("a connection ended by %s: %.200r", type(error).__name__, str(error))
            await trio.aclose_forcefully(tcp)

    async def _handle_connection(self, tcp: trio.SocketStream) -> None:
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
            while await self._exchange(connection, stream):
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

    async def _exchange(self, connection: h11.Connection, stream: trio.abc.Stream) -> bool:
        """Read one request and answer it; whether the connection may carry another."""
        head = None  # stays None if the client idles past the timeout, or closed
        with trio.move_on_after(IDLE_TIMEOUT):
            head = await _next_head(connection, stream)
        if head is None:
            return False
        response = self._refusal(head)
        if response is None:
            body = None  # stays None if the body does not arrive in time
            with trio.move_on_after(IDLE_TIMEOUT):
                body = await _read_body(connection, stream)
            if body is None:
                return False
            response = await self._answer(head, body)
        elif not isinstance(connection.next_event(), h11.EndOfMessage):
            # Refused with a body unread: the connection cannot carry another request.
            await _respond(connection, stream, response, close=True)
            await _linger(stream)
            return False
        await _respond(connection, stream, response)
        return connection.our_state is h11.DONE and connection.their_state is h11.DONE

    def _refusal(self, head: _Head) -> Response | None:
        """The answer a request gets from its headers alone; None: read its body."""
        if head.length is not None and head.length > MAX_BODY:
            return Response(413)
        if head.path in self._public and head.method == "GET":
            return None if head.length == 0 else Response(400)  # unsigned: no body to read
        verdict = check(
            self._secret, head.authorization, head.method, head.path, self._clock(), head.digest
        )
        return None if verdict is Verdict.ACCEPTED else Response(verdict.value)

    async def _answer(self, head: _Head, body: bytes) -> Response:
        request = Request(head.method, head.path, body)
        public = self._public.get(head.path)
        if public is not None and head.method == "GET":
            return await public(request)
        if hashlib.sha256(body).hexdigest() != head.digest:
            return Response(400)  # not the body the token signed
        return await self._handler(request)


async def _next_event(connection: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))


def _header(request: h11.Request, name: bytes) -> str | None:
    return next(
        (bytes(value).decode("latin-1") for key, value in request.headers if key == name), None
    )


async def _next_head(connection: h11.Connection, stream: trio.abc.Stream) -> _Head | None:
    """The next request's line and headers; None when the client closed."""
    request = await _next_event(connection, stream)
    if not isinstance(request, h11.Request):
        return None
    return _Head(
        request.method.decode("latin-1"),
        request.target.decode("latin-1").split("?", 1)[0],
        _header(request, b"authorization"),
        _header(request, DIGEST_HEADER.lower().encode()) or EMPTY_BODY,
        _declared_length(request),
    )


def _declared_length(request: h11.Request) -> int | None:
    """The body length the headers declare, capped at ``MAX_BODY + 1``; None: chunked."""
    if _header(request, b"transfer-encoding") is not None:
        return None
    text = _header(request, b"content-length")  # h11 checked: digits only
    if text is None:
        return 0
    length = decimal(text)
    return MAX_BODY + 1 if length is None else min(length, MAX_BODY + 1)


async def _read_body(connection: h11.Connection, stream: trio.abc.Stream) -> bytes:
    body = bytearray()
    while not isinstance(event := await _next_event(connection, stream), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:  # a chunked body, which declares no length
                raise _BodyTooLarge
    return bytes(body)


async def _respond(
    connection: h11.Connection, stream: trio.abc.Stream, response: Response, close: bool = False
) -> None:
    headers = [("Content-Length", str(len(response.body)))]
    if close:
        headers.append(("Connection", "close"))
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


async def _linger(stream: trio.abc.Stream) -> None:
    """Drop what the client still sends of a body we did not read, for up to ``LINGER``
    seconds, holding one receive buffer: closing with unread bytes would reset the connection,
    and the client could lose the answer."""
    with trio.move_on_after(LINGER):
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
        while await stream.receive_some(_RECEIVE_SIZE):
            pass


async def _refuse_busy(stream: trio.abc.Stream) -> None:
    """503 to the first request (its body unread), then close."""
    connection = h11.Connection(h11.SERVER)
    with trio.move_on_after(BUSY_TIMEOUT):
        try:
            if await _next_head(connection, stream) is not None:
                await _respond(connection, stream, Response(503), close=True)
                await _linger(stream)
        except (h11.ProtocolError, trio.BrokenResourceError):
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
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]")
    port = decimal(port_text, 5)
    if not host or port is None or port > 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 0.0.0.0:7480)")
    return host, port

"""A lean HTTP/1.1 range GET for piece fetches: the fast path under ``read_range``.

A piece is a few MiB that the registry answers with a plain ``206`` and a Content-Length. Through
httpx every 1 MiB socket read becomes h11 events, chunk objects and a join, all on the one Python
thread that serves the mount. Here the request is written by hand on a kept-alive trio stream and
the body lands by ``recv_into`` in one pooled buffer (``modelfs.fetcher.buffers``).

Only the plain case is handled: anything else (a redirect, a 401, chunked or encoded bodies, a
Content-Range other than the one asked for, a connection error) gives ``None`` and the caller
takes the httpx path, which keeps auth refresh, redirects, retries and their messages.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import trio

from modelfs.fetcher.buffers import PIECE_BUFFERS

# Status line and headers larger than this are not a plain range answer.
_HEAD_LIMIT = 64 * 1024
_RECEIVE_SIZE = 1 << 20


@dataclass(frozen=True)
class Origin:
    """Where the connections go: ``ssl_context`` is None for plain HTTP."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    host_header: str


def parse_content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """``bytes 10-19/100`` -> (10, 19, 100); total None for ``*``; None when malformed."""
    if not header or not header.startswith("bytes "):
        return None
    span, _, total = header[len("bytes ") :].partition("/")
    first, _, last = span.partition("-")
    try:
        start, end = int(first), int(last)
        size = None if total.strip() == "*" else int(total)
    except ValueError:
        return None
    return (start, end, size) if 0 <= start <= end else None


class _Unusual(Exception):
    """The answer is not a plain range answer: the caller takes the general path."""


class _Redirected(_Unusual):
    """The registry sends blobs elsewhere (a CDN): it will for every piece."""


class _Cut(Exception):
    """The body ended short; ``received`` holds what came."""

    def __init__(self, received: bytearray) -> None:
        self.received = received


class RangeGetter:
    """Kept-alive connections to one origin for range GETs; ``aclose`` closes them."""

    def __init__(self, origin: Origin, user_agent: str, timeout: float) -> None:
        self._origin = origin
        self._user_agent = user_agent
        self._timeout = timeout
        self._idle: list[trio.abc.Stream] = []
        self._closed = False
        # Set once the registry redirected a blob GET: asking it here first would only add a
        # round trip to every piece.
        self.redirects = False

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for stream in idle:
            await trio.aclose_forcefully(stream)

    async def get(
        self, target: str, authorization: str | None, start: int, end: int
    ) -> memoryview | bytearray | None:
        """Bytes ``start..end`` of the resource at ``target`` (a path); None: unusual.

        A body cut short gives the bytes that came (fewer than asked) as a ``bytearray``, for the
        caller to resume by appending to it.
        """
        if self._closed or self.redirects:
            return None
        stream: trio.abc.Stream | None = None
        body: memoryview | bytearray | None = None
        reusable = False
        try:
            # A stalled registry is the general path's to report, with its own timeouts.
            with trio.fail_after(self._timeout):
                stream = self._idle.pop() if self._idle else await self._connect()
                body = await self._exchange(stream, target, authorization, start, end)
                reusable = not self._closed
        except _Cut as cut:
            body = cut.received
        except _Redirected:
            self.redirects = True
        except (_Unusual, OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError):
            pass  # the general path asks again, and reports what is wrong
        finally:
            if stream is not None:
                if reusable:
                    self._idle.append(stream)
                else:
                    await trio.aclose_forcefully(stream)
        return body

    async def _connect(self) -> trio.abc.Stream:
        origin = self._origin
        stream: trio.abc.Stream = await trio.open_tcp_stream(origin.host, origin.port)
        if origin.ssl_context is not None:
            tls = trio.SSLStream(stream, origin.ssl_context, server_hostname=origin.host)
            await tls.do_handshake()
            stream = tls
        return stream

    async def _exchange(
        self,
        stream: trio.abc.Stream,
        target: str,
        authorization: str | None,
        start: int,
        end: int,
    ) -> memoryview | bytearray:
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {self._origin.host_header}",
            f"User-Agent: {self._user_agent}",
            "Accept-Encoding: identity",
            f"Range: bytes={start}-{end}",
        ]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head, rest = await _receive_head(stream)
        length = _plain_range_length(head, start, end)
        if len(rest) > length:
            raise _Unusual  # bytes past the body: not a one-request-at-a-time server
        body = PIECE_BUFFERS.take(length)
        body[: len(rest)] = rest
        received = await _receive_into(stream, memoryview(body)[len(rest) :])
        if len(rest) + received < length:
            raise _Cut(bytearray(body[: len(rest) + received]))  # out of the pooled buffer
        return body


async def _receive_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """The status line and headers, and whatever of the body came with them."""
    received = b""
    while True:
        chunk = await stream.receive_some(_HEAD_LIMIT)
        if not chunk:
            raise _Unusual  # closed (an idle connection the server let go)
        received += chunk
        head, found, rest = received.partition(b"\r\n\r\n")
        if found:
            return head, rest
        if len(received) > _HEAD_LIMIT:
            raise _Unusual


def _plain_range_length(head: bytes, start: int, end: int) -> int:
    """The body's length if ``head`` is a plain ``206`` for exactly ``start..end``."""
    status, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status.partition(" ")
    if rest[:1] == "3":
        raise _Redirected
    if version != "HTTP/1.1" or not rest.startswith("206 "):
        raise _Unusual
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise _Unusual
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers or headers.get("content-encoding", "identity") != "identity":
        raise _Unusual
    if headers.get("connection", "").lower() == "close":
        raise _Unusual  # the general path reads such answers; here connections are reused
    span = parse_content_range(headers.get("content-range"))
    length = headers.get("content-length", "")
    if span is None or span[:2] != (start, end) or not length.isdigit():
        raise _Unusual
    if int(length) != end - start + 1:
        raise _Unusual
    return int(length)


async def _receive_into(stream: trio.abc.Stream, view: memoryview) -> int:
    """Fill ``view`` from the stream, straight from the socket when it is plain TCP; the count
    received, short if the stream ended or broke first."""
    received = 0
    try:
        if isinstance(stream, trio.SocketStream):
            sock = stream.socket
            while received < len(view):
                count = await sock.recv_into(view[received:])
                if not count:
                    break
                received += count
            return received
        while received < len(view):
            chunk = await stream.receive_some(min(len(view) - received, _RECEIVE_SIZE))
            if not chunk:
                break
            view[received : received + len(chunk)] = chunk
            received += len(chunk)
    except (OSError, trio.BrokenResourceError, ssl.SSLError):
        pass  # as good as an early end: the caller resumes from what came
    return received

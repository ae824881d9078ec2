"""A lean HTTP/1.1 range GET for piece fetches: the fast path under ``read_pieces``.

A run of pieces (a few MiB each) is one range that the registry answers with a plain ``206`` and
a Content-Length. Through httpx every 1 MiB socket read becomes h11 events, chunk objects and a
join, all on the one Python thread that serves the mount. Here the request is written by hand on
a kept-alive trio stream and each piece of the body lands by ``recv_into`` in its own pooled
buffer (``modelfs.sources.buffers``), handed on as soon as it is whole.

Only the plain case is handled: anything else (a 401, chunked or encoded bodies, a Content-Range
other than the one asked for, a connection error, a body cut short) ends the run where it got to,
and the caller takes the httpx path for the rest, which keeps auth refresh, retries and their
messages. A redirect (``Redirected``) and a refusal (``Refused``) are the caller's to act on: a
registry that keeps its blobs in object storage sends every blob GET elsewhere, and the place it
names serves range GETs on connections of its own (``modelfs.sources.redirects``).
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from modelfs.sources.buffers import PIECE_BUFFERS
from modelfs.sources.interface import Deliver
from modelfs.sources.proxy import ProxyRoute, open_tunnel
from modelfs.untrusted import decimal

# Status line and headers larger than this are not a plain range answer.
_HEAD_LIMIT = 64 * 1024
_RECEIVE_SIZE = 1 << 20


@dataclass(frozen=True)
class Origin:
    """Where the connections go: ``ssl_context`` is None for plain HTTP; ``proxy``: through
    that HTTP proxy (``modelfs.sources.proxy``); ``headers``: sent with every request (a
    hosts.toml ``header``); ``dial_timeout``: the most a connection may take to open."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    host_header: str
    proxy: ProxyRoute | None = None
    headers: tuple[tuple[str, str], ...] = ()
    dial_timeout: float | None = None


def parse_content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """``bytes 10-19/100`` -> (10, 19, 100); total None for ``*``; None when malformed."""
    if not header or not header.startswith("bytes "):
        return None
    span, _, total = header[len("bytes ") :].partition("/")
    first, _, last = span.partition("-")
    start, end = decimal(first), decimal(last)
    size = None if total == "*" else decimal(total)
    if start is None or end is None or (size is None and total != "*") or start > end:
        return None
    return start, end, size


class _Unusual(Exception):
    """The answer is not a plain range answer: the caller takes the general path."""


class _Closed(_Unusual):
    """The connection closed before any answer: an idle one the other end let go."""


class Redirected(Exception):
    """The answer is a redirect to ``location`` (as sent: maybe relative); nothing was delivered."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class Refused(Exception):
    """The answer is a refusal (400, 401, 403, 404 or 410): for a presigned location, that it
    expired or was revoked; nothing was delivered."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class WholeBlob(Exception):
    """The answer is a ``200`` with more than the range asked for (a pull-through cache filling
    the blob answers so): its body is left unread; nothing was delivered."""


_REFUSALS = frozenset({"400", "401", "403", "404", "410"})
_REDIRECTS = frozenset({"301", "302", "303", "307", "308"})


class RangeGetter:
    """Kept-alive connections to one origin for range GETs; ``aclose`` closes them."""

    def __init__(self, origin: Origin, user_agent: str, timeout: float) -> None:
        self._origin = origin
        self._user_agent = user_agent
        self._timeout = timeout
        self._idle: list[trio.abc.Stream] = []
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for stream in idle:
            await trio.aclose_forcefully(stream)

    async def get_run(
        self,
        target: str,
        authorization: str | None,
        start: int,
        lengths: Sequence[int],
        deliver: Deliver,
    ) -> tuple[int, bytearray]:
        """Consecutive pieces of ``lengths`` bytes from ``start`` of the resource at ``target``
        (a path), in one GET; each is awaited into ``deliver`` as it lands.

        Returns how many pieces were delivered, and the bytes of the next one that came (for the
        caller to resume from). Fewer than all: the rest is the general path's, which reports
        what went wrong. An exception from ``deliver`` ends the run and propagates, as do
        ``Redirected`` and ``Refused`` (before anything was delivered).
        """
        if self._closed:
            return 0, bytearray()
        end = start + sum(lengths) - 1
        stream: trio.abc.Stream | None = None
        reusable = False
        delivered = 0
        try:
            try:
                # A stalled registry is the general path's to report, with its own timeouts.
                with trio.fail_after(self._timeout):
                    kept = bool(self._idle)
                    stream = self._idle.pop() if kept else await self._connect()
                    try:
                        body = await self._request(stream, target, authorization, start, end)
                    except _Closed:
                        if not kept:
                            raise
                        # A kept-alive connection the other end had let go (its idle timeout;
                        # a proxy such as tinyproxy closes after each answer): once more, anew.
                        await trio.aclose_forcefully(stream)
                        stream = None
                        stream = await self._connect()
                        body = await self._request(stream, target, authorization, start, end)
            except (_Unusual, OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError):
                return 0, bytearray()  # the general path asks again, and reports what is wrong
            for length in lengths:
                piece = PIECE_BUFFERS.take(length)
                # Each piece has the whole timeout: ``deliver`` may wait (for the cache writer).
                received = await body.receive_into(memoryview(piece), self._timeout)
                if received < length:
                    return delivered, bytearray(piece[:received])  # out of the pooled buffer
                await deliver(delivered, piece)
                delivered += 1
            reusable = not self._closed and body.finished()
            return delivered, bytearray()
        finally:
            if stream is not None:
                if reusable:
                    self._idle.append(stream)
                else:
                    await trio.aclose_forcefully(stream)

    async def _connect(self) -> trio.abc.Stream:
        origin = self._origin
        route = origin.proxy
        with trio.fail_after(origin.dial_timeout or math.inf):
            stream: trio.abc.Stream = await (
                trio.open_tcp_stream(origin.host, origin.port)
                if route is None
                else trio.open_tcp_stream(route.host, route.port)
            )
        if route is not None and origin.ssl_context is not None:
            await open_tunnel(stream, origin.host, origin.port, route)
        if origin.ssl_context is not None:
            tls = trio.SSLStream(stream, origin.ssl_context, server_hostname=origin.host)
            await tls.do_handshake()
            stream = tls
        return stream

    async def _request(
        self,
        stream: trio.abc.Stream,
        target: str,
        authorization: str | None,
        start: int,
        end: int,
    ) -> _Body:
        """Send the GET and read its head; the body that follows, if the answer is plain."""
        origin = self._origin
        forwarded = origin.proxy is not None and origin.ssl_context is None
        if forwarded:
            target = f"http://{origin.host_header}{target}"  # absolute form, for the proxy
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {origin.host_header}",
            f"User-Agent: {self._user_agent}",
            "Accept-Encoding: identity",
            f"Range: bytes={start}-{end}",
            *(f"{name}: {value}" for name, value in origin.headers),
        ]
        if forwarded and origin.proxy is not None and origin.proxy.authorization:
            lines.append(f"Proxy-Authorization: {origin.proxy.authorization}")
        if authorization:
            lines.append(f"Authorization: {authorization}")
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head, rest = await _receive_head(stream)
        length = _plain_range_length(head, start, end)
        if len(rest) > length:
            raise _Unusual  # bytes past the body: not a one-request-at-a-time server
        return _Body(stream, rest)


class _Body:
    """A response body read in order: first what came with the head, then the stream."""

    def __init__(self, stream: trio.abc.Stream, early: bytes) -> None:
        self._stream = stream
        self._early = memoryview(early)
        self._broken = False

    def finished(self) -> bool:
        """Whether the stream is still good for the next request."""
        return not self._broken and not self._early

    async def receive_into(self, view: memoryview, timeout: float) -> int:
        """Fill ``view``, straight from the socket when it is plain TCP; the count received,
        short if the stream ended, broke or stalled for ``timeout`` seconds."""
        received = min(len(self._early), len(view))
        view[:received] = self._early[:received]
        self._early = self._early[received:]
        stream = self._stream
        plain = stream.socket if isinstance(stream, trio.SocketStream) else None
        # A plain socket wakes its reader only once a MiB waits (or the stream ends): a piece
        # comes in a few receives, not one per burst of segments, each a trip through the loop.
        low_water = 1
        try:
            with trio.move_on_after(timeout):
                while received < len(view):
                    if plain is not None:
                        wanted = _RECEIVE_SIZE if len(view) - received > _RECEIVE_SIZE else 1
                        if wanted != low_water:
                            plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
                            low_water = wanted
                        count = await plain.recv_into(view[received:])
                    else:
                        chunk = await stream.receive_some(min(len(view) - received, _RECEIVE_SIZE))
                        count = len(chunk)
                        view[received : received + count] = chunk
                    if not count:
                        break
                    received += count
        except (OSError, trio.BrokenResourceError, ssl.SSLError):
            pass  # as good as an early end: the caller resumes from what came
        finally:
            if plain is not None and low_water != 1:
                with contextlib.suppress(OSError):  # the next answer's head wakes it at once
                    plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        if received < len(view):
            self._broken = True
        return received


async def _receive_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """The status line and headers, and whatever of the body came with them."""
    received = b""
    while True:
        chunk = await stream.receive_some(_HEAD_LIMIT)
        if not chunk:
            raise _Closed if not received else _Unusual
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
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise _Unusual
        headers[name.strip().lower()] = value.strip()
    code = rest[:3]
    if code in _REDIRECTS and headers.get("location"):
        raise Redirected(headers["location"])
    if code in _REFUSALS:
        raise Refused(int(code))
    if code == "200" and (
        start != 0 or (decimal(headers.get("content-length", "")) or 0) > end + 1
    ):
        raise WholeBlob
    if version != "HTTP/1.1" or not rest.startswith("206 "):
        raise _Unusual
    if "transfer-encoding" in headers or headers.get("content-encoding", "identity") != "identity":
        raise _Unusual
    if headers.get("connection", "").lower() == "close":
        raise _Unusual  # the general path reads such answers; here connections are reused
    span = parse_content_range(headers.get("content-range"))
    length = decimal(headers.get("content-length", ""))
    if span is None or span[:2] != (start, end) or length != end - start + 1:
        raise _Unusual
    return length

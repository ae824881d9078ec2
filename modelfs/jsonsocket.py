"""One JSON request line in, one JSON answer line out, per connection, on a unix socket only
its owner may open (mode 0600): the daemon's control socket and each mount's stats socket. A
request the server refuses is answered ``{"error": "<one line>"}``.

Whatever a client sends, and whenever it goes away, only its connection ends: a request must
arrive within ``REQUEST_TIMEOUT``, at most ``MAX_CONNECTIONS`` are open at once (one more is
told so and closed), and any error is logged in one line. The process behind the socket (the
daemon and its mounts, a mount process and its readers) never depends on a client's bytes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from modelfs.errors import ModelfsError
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT = 5.0  # to send the request line (`modelfs status` sends it at once)
SEND_TIMEOUT = 5.0  # to take the answer
USAGE = 'send one JSON object, such as {"command": "status"}'
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


class ControlError(ModelfsError):
    """The socket cannot be reached or answered wrongly."""


async def open_control_socket(path: Path) -> trio.SocketListener:
    """Listen on ``path``; a socket file left by a dead process is replaced, a live one refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            await ask(path, {"command": "ping"})
        except ControlError:
            path.unlink()
        else:
            raise ControlError(f"a modelfs daemon already answers on {path}; stop it first")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)  # created 0600: no moment where others could connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(previous)
    sock.listen(16)
    return trio.SocketListener(sock)


async def serve_control(
    listener: trio.SocketListener, handle: Handler, max_connections: int = MAX_CONNECTIONS
) -> None:
    slots = trio.CapacityLimiter(max_connections)

    async def connected(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await _serve(stream, handle, slots)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # `modelfs status` interrupted, or the daemon's 2 s wait for a mount's counters over
            log.debug("a client went away before its answer")
        except Exception as error:  # any client, any bytes: it ends this connection only
            log.warning("a control request ended by %s: %.200r", type(error).__name__, str(error))

    await trio.serve_listeners(connected, [listener])


async def _serve(stream: trio.SocketStream, handle: Handler, slots: trio.CapacityLimiter) -> None:
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        busy = f"{slots.total_tokens} requests are open on this socket already; try again"
        with trio.move_on_after(SEND_TIMEOUT):  # then closed at once: it holds no slot
            await stream.send_all(json.dumps({"error": busy}).encode() + b"\n")
        return
    try:
        request = None  # stays None if the client sends no line in time (half-open)
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await _receive_request(stream)
        if request is not None:
            await _send(stream, await _reply(request, handle))
    finally:
        slots.release()


async def _receive_request(stream: trio.SocketStream) -> bytes:
    request = bytearray()
    while b"\n" not in request and len(request) < MAX_REQUEST:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        request += chunk
    return bytes(request)


async def _reply(request: bytes, handle: Handler) -> dict[str, Any]:
    try:
        message = loads_json(request)
    except ValueError:  # also nesting and numbers past any bound
        return {"error": USAGE}
    if not isinstance(message, dict):
        return {"error": USAGE}
    try:
        reply = await handle(message)
    except ModelfsError as error:
        return {"error": str(error)}
    except Exception as error:  # a flaw one request meets must not end the process
        log.warning("a control request failed by %s: %.200r", type(error).__name__, str(error))
        return {"error": f"the request failed ({type(error).__name__}: {error}); see the log"}
    return {"error": USAGE} if reply is None else reply


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    """Send the answer, then drop what the client still sends until it closes (a request
    longer than ``MAX_REQUEST``): closing with unread bytes would reset the connection, and
    the client could lose the answer."""
    with trio.move_on_after(SEND_TIMEOUT):
        await stream.send_all(json.dumps(reply).encode() + b"\n")
        await stream.send_eof()
        while await stream.receive_some(MAX_REQUEST):
            pass


async def ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Send ``request`` to the server listening on ``path``; its answer."""
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as error:
        raise ControlError(
            f"cannot reach the modelfs daemon at {path}: {error.strerror} "
            "(is modelfsd.service running? pass --control-socket if it listens elsewhere)"
        ) from None
    async with stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
    if not answer:
        raise ControlError(
            f"the daemon at {path} closed the connection without answering "
            "(was it reloading or stopping?); try again"
        )
    try:
        reply = loads_json(answer)
    except ValueError:
        raise ControlError(f"the daemon at {path} sent no JSON answer") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon at {path} refused the request: {reply}")
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply

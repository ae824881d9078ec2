"""The daemon's control API: one JSON request line in, one JSON answer line out, per connection,
on a unix socket only root may open (mode 0600). A request the daemon refuses is answered
``{"error": "<one line>"}``."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from modelfs.errors import ModelfsError

DEFAULT_CONTROL_SOCKET = Path("/run/modelfs/control.sock")
MAX_REQUEST = 64 << 10
PING_TIMEOUT = 10.0
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


class ControlError(ModelfsError):
    """The daemon's control socket cannot be reached or answered wrongly."""


async def open_control_socket(path: Path) -> trio.SocketListener:
    """Listen on ``path``; a socket file left by a dead daemon is replaced, a live one refused."""
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


async def serve_control(listener: trio.SocketListener, handle: Handler) -> None:
    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\n" not in request and len(request) < MAX_REQUEST:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                request += chunk
            try:
                message = json.loads(request)
            except ValueError:
                message = None
            try:
                reply = await handle(message) if isinstance(message, dict) else None
            except ModelfsError as error:
                reply = {"error": str(error)}
            if reply is None:
                reply = {"error": 'send one JSON object, such as {"command": "status"}'}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    await trio.serve_listeners(answer, [listener])


async def ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Send ``request`` to the daemon listening on ``path``; its answer."""
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
        reply = json.loads(answer)
    except ValueError:
        raise ControlError(f"the daemon at {path} sent no JSON answer") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon at {path} refused the request: {reply}")
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply


async def daemon_answers(path: Path) -> bool:
    """Whether a daemon listens on ``path`` (False when nothing does, or we may not connect)."""
    try:
        with trio.fail_after(PING_TIMEOUT):
            await ask(path, {"command": "ping"})
    except trio.TooSlowError:
        raise ControlError(
            f"the modelfs daemon at {path} does not answer; pass --no-daemon to work without it"
        ) from None
    except ControlError:
        return False
    return True

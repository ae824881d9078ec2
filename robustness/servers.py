"""Real modelfs servers run in a thread of their own for the fuzzer to talk to over a socket,
and what a client reads back: the peer and scheduler HTTP servers, the daemon's control socket.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

# Any of these in the servers' logs means a request met an unforeseen exception: a failure,
# though the server went on serving (its last line of defence caught it).
FLAW_LOGS = ("a connection ended by", "a control request ended by", "a control request failed")


class FlawLog(logging.Handler):
    """Keeps the servers' log lines that name a flaw (``FLAW_LOGS``)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.flaws: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(FLAW_LOGS):
            self.flaws.append(message)

    def take(self) -> list[str]:
        flaws, self.flaws = self.flaws, []
        return flaws


@contextmanager
def flaw_log() -> Iterator[FlawLog]:
    handler = FlawLog()
    root = logging.getLogger("modelfs")
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


Serve = Callable[[trio.TaskStatus[Any]], Awaitable[None]]


@contextmanager
def serving(serve: Serve) -> Iterator[Any]:
    """Run ``serve`` (it calls ``task_status.started(value)`` once it listens) under trio in a
    thread; yields the value it started with; cancelled and joined on exit."""
    started: list[Any] = []
    ready = threading.Event()
    failed: list[BaseException] = []
    token: list[trio.lowlevel.TrioToken] = []
    cancel = trio.CancelScope()

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        with cancel:
            async with trio.open_nursery() as nursery:
                started.append(await nursery.start(serve))
                ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as error:  # reported to the caller below
            failed.append(error)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="fuzzed-server")
    thread.start()
    ready.wait(30)
    try:
        if failed or not started:
            raise RuntimeError(f"the server did not start: {failed!r}")
        yield started[0]
    finally:
        if token:
            trio.from_thread.run_sync(cancel.cancel, trio_token=token[0])
        thread.join(30)


def exchange(address: Any, family: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request``, half-close, and read what comes back until the server closes (or
    ``timeout`` passes: a hang then shows as an empty answer)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before it took everything: read its answer
        answer = bytearray()
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return b""
        return bytes(answer)

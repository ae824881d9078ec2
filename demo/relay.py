"""A TCP relay on loopback that counts the bytes flowing from the registry to its clients.

The demo points ``modelfs mount`` at the relay instead of the registry, so what the mount fetched
is read from outside the mount process: every byte the registry sent (HTTP headers, manifest,
config and blob bytes alike).
"""

from __future__ import annotations

import trio

_CHUNK = 1 << 16


class CountingRelay:
    """Forwards each connection to ``target_port`` on 127.0.0.1; ``received`` counts replies."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.received = 0
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port (``port``) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._relay, listeners)
            task_status.started()

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return  # the client sees the connection close, as with a dead registry
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, upstream, False)
                nursery.start_soon(self._pipe, upstream, client, True)

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, counted: bool
    ) -> None:
        try:
            while chunk := await source.receive_some(_CHUNK):
                if counted:
                    self.received += len(chunk)
                await sink.send_all(chunk)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # One side went away: close both, so the other direction ends too.
            await source.aclose()
            await sink.aclose()

"""``modelfs daemon``: the node service systemd runs (``modelfsd.service``, ``Type=notify``).

It owns the node's cache settings, keeps the config's mounts up (one supervised child process
each), answers the control socket, and serves metrics if asked. READY=1 goes to systemd once the
control socket answers and every configured mount has been tried once, so units ordered after
it find their models mounted. SIGTERM (or SIGINT) sends STOPPING=1 and unmounts everything.
"""

from __future__ import annotations

import logging
import signal
from contextlib import ExitStack
from typing import Any

import trio

from modelfs.cache import PieceCache
from modelfs.metrics import DaemonCollector, DaemonSample, MountSample, serving_metrics
from modelfs.service.config import DaemonConfig
from modelfs.service.control import ask, open_control_socket, serve_control
from modelfs.service.notify import notify, watchdog_interval
from modelfs.service.supervisor import MountState, supervise

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.mounts = [MountState(str(spec.reference), str(spec.path)) for spec in config.mounts]
        self.cache = PieceCache(config.cache_dir, config.cache_size)

    def status(self) -> dict[str, Any]:
        stats = self.cache.stats()
        return {
            "mounts": [mount.as_json() for mount in self.mounts],
            "cache": {
                "dir": str(self.config.cache_dir),
                "size": stats.size,
                "limit": stats.limit,
                "pieces": stats.pieces,
                "blobs": stats.blobs,
                "models": len(self.cache.meta_keys("manifest/")),
            },
        }

    def handle(self, request: dict[str, Any]) -> dict[str, Any] | None:
        command = request.get("command")
        if command == "ping":
            return {"ok": True}
        if command == "status":
            return self.status()
        return None

    def sample(self) -> DaemonSample:
        return DaemonSample(
            self.cache.stats(),
            [
                MountSample(
                    mount.reference, mount.mountpoint, mount.state == "mounted", mount.restarts
                )
                for mount in self.mounts
            ],
        )

    async def run(self) -> None:
        try:
            with ExitStack() as resources:
                if self.config.metrics_addr:
                    resources.enter_context(
                        serving_metrics(self.config.metrics_addr, DaemonCollector(self.sample))
                    )
                await self._serve()
        finally:
            self.config.control_socket.unlink(missing_ok=True)
            self.cache.close()

    async def _serve(self) -> None:
        listener = await open_control_socket(self.config.control_socket)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            nursery.start_soon(serve_control, listener, self.handle)
            tried = []
            for spec, state in zip(self.config.mounts, self.mounts, strict=True):
                tried.append(trio.Event())
                nursery.start_soon(supervise, spec, self.config, state, tried[-1])
            await ask(self.config.control_socket, {"command": "ping"})
            for event in tried:
                await event.wait()
            up = sum(mount.state == "mounted" for mount in self.mounts)
            notify(f"READY=1\nSTATUS={up} of {len(self.mounts)} mounts up")
            log.warning("modelfs daemon ready: %d of %d mounts up", up, len(self.mounts))
            interval = watchdog_interval()
            if interval is not None:
                nursery.start_soon(_keep_alive, interval)


async def _keep_alive(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.warning("received %s: unmounting everything", signal.Signals(signum).name)
            notify("STOPPING=1")
            scope.cancel()
            return

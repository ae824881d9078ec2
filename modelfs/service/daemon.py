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
from pathlib import Path
from typing import Any

import trio

from modelfs.cache import PieceCache
from modelfs.fetcher.stats import MountStats
from modelfs.metrics import (
    DaemonCollector,
    DaemonSample,
    MountSample,
    hit_ratio,
    serving_metrics,
)
from modelfs.service.cache_ops import cached_models
from modelfs.service.config import DaemonConfig
from modelfs.service.control import ControlError, ask, open_control_socket, serve_control
from modelfs.service.notify import notify, watchdog_interval
from modelfs.service.supervisor import MountState, stats_socket, supervise

log = logging.getLogger(__name__)

# How long a scrape or ``modelfs status`` waits on a mount process for its counters.
STATS_TIMEOUT = 2.0


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.mounts = [MountState(str(spec.reference), str(spec.path)) for spec in config.mounts]
        self.cache = PieceCache(config.cache_dir, config.cache_size)

    async def status(self) -> dict[str, Any]:
        sample = await self.sample()
        live = [mount.live for mount in sample.mounts if mount.live is not None]
        return {
            "mounts": [
                {
                    **state.as_json(),
                    "present_bytes": mount.present_bytes,
                    "total_bytes": mount.total_bytes,
                    "live": None if mount.live is None else mount.live.as_json(),
                }
                for state, mount in zip(self.mounts, sample.mounts, strict=True)
            ],
            "cache": {
                "dir": str(self.config.cache_dir),
                "size": sample.cache.size,
                "limit": sample.cache.limit,
                "pieces": sample.cache.pieces,
                "blobs": sample.cache.blobs,
                "models": len(self.cache.meta_keys("manifest/")),
                "hit_ratio": hit_ratio(live),
            },
        }

    async def handle(self, request: dict[str, Any]) -> dict[str, Any] | None:
        command = request.get("command")
        if command == "ping":
            return {"ok": True}
        if command == "status":
            return await self.status()
        return None

    async def sample(self) -> DaemonSample:
        """The cache, and each mount with the counters its process reports (none from a mount
        process that is down or does not answer in time)."""
        live: list[MountStats | None] = [None] * len(self.mounts)

        async def ask_counters(number: int, mount: MountState) -> None:
            with trio.move_on_after(STATS_TIMEOUT):
                try:
                    reply = await ask(
                        stats_socket(self.config, Path(mount.mountpoint)), {"command": "stats"}
                    )
                    live[number] = MountStats.from_json(reply)
                except (ControlError, KeyError, TypeError, ValueError) as error:
                    log.info("no counters from the mount on %s: %s", mount.mountpoint, error)

        async with trio.open_nursery() as nursery:
            for number, mount in enumerate(self.mounts):
                if mount.state == "mounted":
                    nursery.start_soon(ask_counters, number, mount)
        presence = {model.digest: model for model in cached_models(self.cache)}
        mounts = []
        for mount, counters in zip(self.mounts, live, strict=True):
            model = presence.get(mount.digest or "")
            mounts.append(
                MountSample(
                    mount.reference,
                    mount.mountpoint,
                    mount.state == "mounted",
                    mount.restarts,
                    None if model is None else model.present_bytes,
                    None if model is None else model.total_bytes,
                    counters,
                )
            )
        return DaemonSample(self.cache.stats(), mounts)

    async def run(self) -> None:
        token = trio.lowlevel.current_trio_token()

        def sample_from_thread() -> DaemonSample:
            # The metrics server calls from its own thread; the mounts are asked from trio.
            return trio.from_thread.run(self.sample, trio_token=token)

        try:
            with ExitStack() as resources:
                if self.config.metrics_addr:
                    resources.enter_context(
                        serving_metrics(
                            self.config.metrics_addr, DaemonCollector(sample_from_thread)
                        )
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

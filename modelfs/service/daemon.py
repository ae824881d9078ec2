"""``modelfs daemon``: the node service systemd runs (``modelfsd.service``, ``Type=notify``).

It owns the node's cache settings, keeps the config's mounts up (one supervised child process
each), answers the control socket, and serves metrics if asked. READY=1 goes to systemd once the
control socket answers and every configured mount has been tried once, so units ordered after
it find their models mounted. SIGTERM (or SIGINT) sends STOPPING=1 and unmounts everything,
unless systemd is restarting the unit: then the mounts stay up for the next daemon
(modelfs.service.restart). SIGHUP reloads: the daemon re-executes itself and keeps its mounts
(modelfs.service.reload).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import trio

from modelfs.cache import PieceCache
from modelfs.errors import ModelfsError
from modelfs.metrics import (
    DaemonCollector,
    DaemonSample,
    MountSample,
    hit_ratio,
    serving_metrics,
)
from modelfs.service.cache_ops import cached_models
from modelfs.service.cluster_agent import ClusterAgent
from modelfs.service.config import DaemonConfig
from modelfs.service.control import ControlError, ask, serve_control
from modelfs.service.mount_table import MountRequestError, MountTable, parse_mount_request
from modelfs.service.notify import notify, watchdog_interval
from modelfs.service.reload import (
    HandedOver,
    Handover,
    control_listener,
    encode_handover,
    monotonic_usec,
    next_signal,
    reexec,
    resume,
    to_carry,
    to_stop,
)
from modelfs.service.restart import (
    record_file,
    restart_pending,
    save_handover,
    take_saved_handover,
)
from modelfs.service.supervisor import MountState, stats_socket
from modelfs.sources.stats import MountStats

log = logging.getLogger(__name__)

# How long a scrape or ``modelfs status`` waits on a mount process for its counters.
STATS_TIMEOUT = 2.0
RECORD_INTERVAL = 0.2  # how often the list of mounts is written down, when it changed


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        load_config: Callable[[], DaemonConfig],
        handover: Handover | None = None,
    ) -> None:
        self.config = config
        self.load_config = load_config  # the config as it is now, for a reload
        # From the previous image (a reload) or the previous daemon (a restart).
        self.handover = handover or take_saved_handover(config.control_socket)
        self.table: MountTable | None = None
        self.agent: ClusterAgent | None = None  # with [cluster]
        self.cache = PieceCache(config.cache_dir, config.cache_size)

    @property
    def mounts(self) -> list[MountState]:
        return [] if self.table is None else self.table.states()

    async def status(self) -> dict[str, Any]:
        states = self.mounts
        sample = await self.sample(states)
        live = [mount.live for mount in sample.mounts if mount.live is not None]
        return {
            **({} if self.agent is None else {"cluster": self.agent.as_json()}),
            "mounts": [
                {
                    **state.as_json(),
                    "present_bytes": mount.present_bytes,
                    "total_bytes": mount.total_bytes,
                    "live": None if mount.live is None else mount.live.as_json(),
                }
                for state, mount in zip(states, sample.mounts, strict=True)
            ],
            "cache": {
                "dir": str(self.config.cache_dir),
                "size": sample.cache.size,
                "limit": sample.cache.limit,
                "pieces": sample.cache.pieces,
                "blobs": sample.cache.blobs,
                "evicted_pieces": sample.cache.evicted_pieces,
                "models": len(self.cache.meta_keys("manifest/")),
                "hit_ratio": hit_ratio(live),
                "damage": self.cache.damage,  # None, or why it is out of use
            },
        }

    async def handle(self, request: dict[str, Any]) -> dict[str, Any] | None:
        command = request.get("command")
        if command == "ping":
            return {"ok": True}
        if command == "status":
            return await self.status()
        if command == "mount" and self.table is not None:
            spec, settings, credentials = parse_mount_request(request)
            return {"mount": (await self.table.mount(spec, settings, credentials)).as_json()}
        if command == "umount" and self.table is not None:
            path = request.get("path")
            if not isinstance(path, str):
                raise MountRequestError("an umount request needs the mountpoint's path")
            return {"unmounted": await self.table.stop(Path(path))}
        return None

    async def sample(self, states: list[MountState] | None = None) -> DaemonSample:
        """The cache, and each mount (of ``states``, by default all) with the counters its
        process reports (none from a mount process that is down or does not answer in time)."""
        states = self.mounts if states is None else states  # one list: mounts come and go
        live: list[MountStats | None] = [None] * len(states)

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
            for number, mount in enumerate(states):
                if mount.state == "mounted":
                    nursery.start_soon(ask_counters, number, mount)
        presence = {model.digest: model for model in cached_models(self.cache)}
        mounts = []
        for mount, counters in zip(states, live, strict=True):
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
            # Stopped (and its mounts with it): nothing is left for a next daemon to adopt.
            record_file(self.config.control_socket).unlink(missing_ok=True)
            self.config.control_socket.unlink(missing_ok=True)
            self.cache.close()

    async def _serve(self) -> None:
        listener = await control_listener(self.config.control_socket, self.handover)
        async with trio.open_nursery() as nursery:
            self.table = table = MountTable(nursery, self.config)
            nursery.start_soon(self._on_signals, nursery.cancel_scope, listener)
            nursery.start_soon(serve_control, listener, self.handle)
            nursery.start_soon(self.keep_record)
            if self.config.cluster is not None:
                # The cache by the daemon's attribute: a failed reload opens it again.
                self.agent = ClusterAgent(
                    self.config, self.config.cluster, lambda: self.cache, lambda: self.table
                )
                nursery.start_soon(self.agent.run)
            handed = self.handover.mounts if self.handover is not None else []
            # Those up first: their processes hold their peer ports, the others may get new ones.
            handed = sorted(handed, key=lambda mount: mount.state.state != "mounted")
            handed_paths = {mount.spec.path.resolve() for mount in handed}
            starts = [partial(resume, table, mount) for mount in handed] + [
                partial(table.start, spec, MountState(str(spec.reference), str(spec.path)))
                for spec in self.config.mounts
                if spec.path.resolve() not in handed_paths
            ]
            entries = []
            for start in starts:
                try:
                    entries.append(start())
                except MountRequestError as error:  # no peer port left for it
                    log.error("a mount is not started: %s", error)
            await ask(self.config.control_socket, {"command": "ping"})
            for entry in entries:
                await entry.first_attempt.wait()
            up = sum(mount.state == "mounted" for mount in self.mounts)
            notify(f"READY=1\nSTATUS={up} of {len(self.mounts)} mounts up")
            log.warning("modelfs daemon ready: %d of %d mounts up", up, len(self.mounts))
            interval = watchdog_interval()
            if interval is not None:
                nursery.start_soon(_keep_alive, interval)

    async def keep_record(self) -> None:
        """Keep the mounts written down as a restart hands them over, for a next daemon should
        this one be killed (``modelfs.service.restart.record_file``)."""
        written = ""
        while True:
            assert self.table is not None
            carried = to_carry(list(self.table.entries.values()), self.config)
            mounts = [HandedOver(entry.spec, entry.settings, entry.state) for entry in carried]
            record = Handover(self.config.control_socket, None, mounts)
            if (text := encode_handover(record)) != written:
                save_handover(record, record_file(self.config.control_socket))
                written = text
            await trio.sleep(RECORD_INTERVAL)

    async def _on_signals(self, scope: trio.CancelScope, listener: trio.SocketListener) -> None:
        """SIGTERM or SIGINT: unmount everything and stop (or, in a restart, leave the mounts
        to the next daemon). SIGHUP: reload."""
        while True:
            signum = await next_signal()
            if signum != signal.SIGHUP:
                notify("STOPPING=1")
                if signum == signal.SIGTERM and await restart_pending():
                    await self._exit_for_restart()
                log.warning("received %s: unmounting everything", signal.Signals(signum).name)
                scope.cancel()
                return
            handover = await self._prepare_reload(listener)
            if handover is None:
                continue
            self.cache.close()
            try:
                reexec(handover)
            except OSError as error:
                self.cache = PieceCache(self.config.cache_dir, self.config.cache_size)
                log.error("reload failed, running on: cannot re-execute: %s", error)
                notify(f"READY=1\nSTATUS=reload failed: {error}")

    async def _prepare_reload(self, listener: trio.SocketListener) -> Handover | None:
        """Check the config as it is now and stop the mounts that cannot be handed over; what
        to hand the new image. None: the config is wrong and the daemon runs on as it was."""
        notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
        try:
            config = self.load_config()
        except ModelfsError as error:
            log.error("reload refused, the running config stays: %s", error)
            notify(f"READY=1\nSTATUS=reload refused: {error}")
            return None
        mounts = await self._mounts_to_hand_over(config)
        log.warning("reloading: re-executing, %d mounts handed over", len(mounts))
        return Handover(self.config.control_socket, listener.socket.fileno(), mounts)

    async def _exit_for_restart(self) -> None:
        """Hand the mounts over through a file and end the process where it stands: like the
        exec of a reload, nothing unwinds, so no mount process is stopped."""
        mounts = await self._mounts_to_hand_over(self.config)
        save_handover(Handover(self.config.control_socket, None, mounts))
        log.warning(
            "systemd restarts the service: %d mounts left up for the next daemon", len(mounts)
        )
        self.cache.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    async def _mounts_to_hand_over(self, config: DaemonConfig) -> list[HandedOver]:
        """Stop the mounts that ``config`` drops or changes, and those not up; the rest."""
        assert self.table is not None
        table = self.table
        carried = to_carry(list(table.entries.values()), config)
        while stopping := to_stop(list(table.entries.values()), self.config, config):
            for path in stopping:
                await table.stop(path)
        # No checkpoint from here to the hand-over: every mount left is up, its process alive or
        # unreaped (one a control request added meanwhile included); the stopped start again.
        carried += [entry for entry in table.entries.values() if entry not in carried]
        return [HandedOver(entry.spec, entry.settings, entry.state) for entry in carried]


async def _keep_alive(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)

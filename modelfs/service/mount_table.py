"""The daemon's mounts while it runs: each one supervised in its own cancel scope, in a nursery the
daemon owns, so mounts can come and go (the config's at start and on reload, others asked for over
the control socket) without touching the rest."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from modelfs.errors import ModelfsError
from modelfs.mount.session import check_mountpoint
from modelfs.prefetch.prefetcher import PrefetchMode
from modelfs.reference import LayoutReference, parse_any_reference
from modelfs.service.config import DaemonConfig, MountSpec, RegistrySettings
from modelfs.service.peer_ports import choose_port
from modelfs.service.supervisor import Child, MountState, is_mounted, supervise
from modelfs.sources.credentials import Credentials


class MountRequestError(ModelfsError):
    """A mount or umount asked of the daemon cannot be done."""


@dataclass(eq=False)  # each is one mount's supervision: equal only to itself
class Supervised:
    spec: MountSpec
    settings: RegistrySettings | None  # a control request's registry settings; None: the config's
    state: MountState
    credentials: Credentials | None = None  # a control request's, in memory only
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    first_attempt: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)


def config_for(
    config: DaemonConfig, spec: MountSpec, settings: RegistrySettings | None
) -> DaemonConfig:
    """The daemon's config as one mount sees it: a control request's registry settings win."""
    if settings is None or isinstance(spec.reference, LayoutReference):
        return config
    return replace(config, registries={**config.registries, spec.reference.registry: settings})


def parse_mount_request(
    request: dict[str, Any],
) -> tuple[MountSpec, RegistrySettings, Credentials | None]:
    """``{"reference", "path", "prefetch", "plain_http", "insecure", "credentials"}`` into what
    to mount; ``credentials`` (``{"username", "password"}``, optional) are the registry's for
    this mount alone (the CSI plugin's, from a pod's secret), else the node's login applies."""
    reference, path = request.get("reference"), request.get("path")
    if not isinstance(reference, str) or not isinstance(path, str) or not os.path.isabs(path):
        raise MountRequestError("a mount request needs a reference and an absolute path")
    if "\0" in path:  # the OS refuses it, and Python raises ValueError
        raise MountRequestError(f"the mountpoint {path!r} holds a NUL byte: send a real path")
    prefetch = request.get("prefetch", PrefetchMode.HINTS.value)
    if not isinstance(prefetch, str) or prefetch not in {mode.value for mode in PrefetchMode}:
        raise MountRequestError(f"prefetch {prefetch!r} is not one of none, hints, all")
    spec = MountSpec(parse_any_reference(reference), Path(path), PrefetchMode(prefetch))
    settings = RegistrySettings(
        plain_http=bool(request.get("plain_http")), insecure=bool(request.get("insecure"))
    )
    credentials = request.get("credentials")
    if credentials is None:
        return spec, settings, None
    username = credentials.get("username") if isinstance(credentials, dict) else None
    password = credentials.get("password") if isinstance(credentials, dict) else None
    if not isinstance(username, str) or not username or not isinstance(password, str):
        raise MountRequestError('a mount request\'s credentials are {"username", "password"}')
    return spec, settings, Credentials(username, password)


class MountTable:
    def __init__(self, nursery: trio.Nursery, config: DaemonConfig) -> None:
        self.nursery = nursery
        self.config = config
        self.entries: dict[Path, Supervised] = {}  # by resolved mountpoint
        self.reserved: set[int] = set()  # peer ports held by the node's preheats

    def states(self) -> list[MountState]:
        return [entry.state for entry in self.entries.values()]

    def _taken_ports(self) -> set[int]:
        mounts = {e.state.peer_port for e in self.entries.values() if e.state.peer_port}
        return mounts | self.reserved

    def reserve_port(self) -> int | None:
        """A peer port for a preheat: the second lowest free one, the lowest staying free for
        the next mount; None when fewer than two are free. Give it back with ``release_port``."""
        cluster = self.config.cluster
        if cluster is None:
            return None
        taken = self._taken_ports()
        lowest = choose_port(cluster.peer_ports, taken)
        second = None if lowest is None else choose_port(cluster.peer_ports, taken | {lowest})
        if second is not None:
            self.reserved.add(second)
        return second

    def release_port(self, port: int) -> None:
        self.reserved.discard(port)

    def start(
        self,
        spec: MountSpec,
        state: MountState,
        settings: RegistrySettings | None = None,
        adopted: Child | None = None,
        credentials: Credentials | None = None,
    ) -> Supervised:
        """Supervise ``spec``; with ``[cluster]``, on the peer port it had if it may keep it
        (an ``adopted`` process always may: the reload stopped those that may not)."""
        state.peer_port = self._peer_port(spec, state.peer_port)
        entry = Supervised(spec, settings, state, credentials)
        self.entries[spec.path.resolve()] = entry
        self.nursery.start_soon(self._supervise, entry, adopted)
        return entry

    def _peer_port(self, spec: MountSpec, kept: int | None) -> int | None:
        cluster = self.config.cluster
        if cluster is None:
            return None
        port = choose_port(cluster.peer_ports, self._taken_ports(), kept)
        if port is None:
            raise MountRequestError(
                f"no free peer port for {spec.path}: all of [cluster] peer_ports "
                f"{cluster.peer_ports} serve other mounts; widen the range or umount one"
            )
        return port

    async def _supervise(self, entry: Supervised, adopted: Child | None) -> None:
        config = config_for(self.config, entry.spec, entry.settings)
        try:
            with entry.scope:
                await supervise(
                    entry.spec, config, entry.state, entry.first_attempt, adopted, entry.credentials
                )
        finally:
            entry.ended.set()
            path = entry.spec.path.resolve()
            if self.entries.get(path) is entry:
                del self.entries[path]

    async def stop(self, path: Path) -> bool:
        """Unmount the mount on ``path``; False if the daemon has none there."""
        entry = self.entries.get(path)
        if entry is None:
            return False
        entry.scope.cancel()
        await entry.ended.wait()
        return True

    async def mount(
        self, spec: MountSpec, settings: RegistrySettings, credentials: Credentials | None = None
    ) -> MountState:
        """Mount ``spec`` for a control request and keep it up; once its first attempt mounted.
        A first attempt that fails is not retried: the request fails with its error."""
        path = spec.path.resolve()
        if path in self.entries:
            held = self.entries[path].state.reference
            raise MountRequestError(
                f"{path} is already mounted by the daemon ({held}); umount it first"
            )
        if is_mounted(path):
            raise MountRequestError(f"{path} is already a mount point; umount it first")
        check_mountpoint(spec.path)  # as `modelfs mount` does: a raw client gets no more
        state = MountState(str(spec.reference), str(path), origin="control")
        entry = self.start(spec, state, settings, credentials=credentials)
        await entry.first_attempt.wait()
        if entry.state.state != "mounted":
            await self.stop(path)
            raise MountRequestError(entry.state.last_error or f"{spec.reference} did not mount")
        return entry.state

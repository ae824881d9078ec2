"""The snapshotter's gRPC service: containerd's snapshots API over the metadata and directories.

It runs on grpcio's asyncio server in a process of its own. modelfs is trio elsewhere, but
grpcio has no trio server, and its thread-pool server would bring threads to a state machine
that is simplest run from one thread: here every metadata change runs on the event loop, one at
a time, and only the slow file work (walking a layer for its usage, deleting a layer) goes to
worker threads, after the change it belongs to has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from modelfs.reference import Reference
from modelfs.snapshot.api import mount_pb, pb, services
from modelfs.snapshot.cri import PulledCredentials, serving_cri_proxy
from modelfs.snapshot.disk import Layout, disk_usage, marker_in
from modelfs.snapshot.filters import FilterError, matcher
from modelfs.snapshot.lazy import ModelMounts
from modelfs.snapshot.metadata import Code, Metadata, Snapshot, SnapshotError
from modelfs.snapshot.models import model_reference, parse_marker, remote_layer
from modelfs.snapshot.mounts import Kind, Mount, mounts_for
from modelfs.snapshot.stats import COMMIT, UNPACKER, SnapshotterStats

log = logging.getLogger(__name__)

_STATUS = {
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
}
_KINDS = {Kind.VIEW: pb.VIEW, Kind.ACTIVE: pb.ACTIVE, Kind.COMMITTED: pb.COMMITTED}
_LIST_BATCH = 100  # infos per List message, well under gRPC's 4 MiB message limit


class Snapshotter:
    """The operations of containerd's Snapshotter interface on one root."""

    def __init__(
        self,
        root: Path,
        models: ModelMounts,
        stats: SnapshotterStats,
        pulled: PulledCredentials | None = None,
    ) -> None:
        self.layout = Layout(root)
        self.layout.create_root()
        self.metadata = Metadata(self.layout.database)
        self.models = models
        self.stats = stats
        self.pulled = pulled  # the credentials of CRI's pulls, when it proxies CRI's images

    def close(self) -> None:
        self.metadata.close()

    async def create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        """Prepare (active) or View: the record and its directories, both or neither, made
        once its lower dirs are there (a model mount that cannot be made fails it first)."""
        lower = await self.lower_dirs(parent)
        with self.metadata.transaction():
            snapshot = self.metadata.create(kind, key, parent, labels)
            self.layout.make(snapshot.id)
        return mounts_for(kind, self.layout.fs(snapshot.id), self.layout.work(snapshot.id), lower)

    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """An active snapshot, unless the unpacker asks for a model's marker layer: then the
        model is mounted and committed under the layer's chain id, and the answer is
        AlreadyExists, so containerd fetches and applies nothing."""
        remote = remote_layer(labels)
        if remote is None:
            return await self.create(Kind.ACTIVE, key, parent, labels)
        if self.metadata.find(remote.chain_id) is None:
            await self._ensure(remote.model, labels)
            try:
                with self.metadata.transaction():
                    committed = self.metadata.create(
                        Kind.COMMITTED, remote.chain_id, parent, labels, str(remote.model)
                    )
                    self.layout.make(committed.id)
            except BaseException:
                await self._release(str(remote.model))
                raise
            self.stats.model_layer(UNPACKER)
        raise SnapshotError(
            Code.ALREADY_EXISTS, f"{remote.chain_id} is the model {remote.model}, mounted lazily"
        )

    async def layer(self, snapshot: Snapshot) -> Path:
        """What a committed snapshot shows as a lower dir: its files, or its model's mount,
        mounted again if it went (the node rebooted, its mount process was killed)."""
        if snapshot.model:
            return await self._ensure(model_reference(snapshot.model), snapshot.labels)
        return self.layout.fs(snapshot.id)

    async def _ensure(self, model: Reference, labels: Mapping[str, str]) -> Path:
        """The model's mount, with the credentials CRI's pull of the snapshot's image gave
        (``cri.image-ref``), if kept, else the node's."""
        pulled = None if self.pulled is None else self.pulled.for_model(labels, model)
        return await self.models.ensure(model, pulled)

    async def lower_dirs(self, parent: str) -> list[Path]:
        """The lower dirs of a snapshot over ``parent``, nearest first."""
        if not parent:
            return []
        top = self.metadata.get(parent)
        return [await self.layer(snapshot) for snapshot in [top, *self.metadata.parents(top)]]

    async def mounts(self, key: str) -> list[Mount]:
        snapshot = self.metadata.get(key)
        if snapshot.kind is Kind.COMMITTED:
            raise SnapshotError(Code.FAILED_PRECONDITION, f"snapshot {key!r} is committed")
        lower = await self.lower_dirs(snapshot.parent)
        fs, work = self.layout.fs(snapshot.id), self.layout.work(snapshot.id)
        return mounts_for(snapshot.kind, fs, work, lower)

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        """Commit a layer; a layer holding a model's marker alone is committed as the model."""
        active = self.metadata.get(key)
        upper = self.layout.fs(active.id)
        marker = await asyncio.to_thread(marker_in, upper)
        model = "" if marker is None else str(parse_marker(marker))
        if model:
            await self.models.ensure(model_reference(model))
        size, inodes = await asyncio.to_thread(disk_usage, upper)
        try:
            with self.metadata.transaction():
                committed = self.metadata.commit(key, name, labels, size, inodes, model)
        except BaseException:
            await self._release(model)
            raise
        if model:
            self.stats.model_layer(COMMIT)
        return committed

    async def remove(self, key: str) -> None:
        with self.metadata.transaction():
            snapshot = self.metadata.remove(key)
        await asyncio.to_thread(self.layout.delete, snapshot.id)
        await self._release(snapshot.model)

    async def _release(self, model: str) -> None:
        """Unmount a model no snapshot stands for any more."""
        if model:
            reference = model_reference(model)
            assert reference.digest is not None
            if self.metadata.model_users(reference.digest) == 0:
                await self.models.release(self.models.path(reference))

    async def usage(self, key: str) -> tuple[int, int]:
        snapshot = self.metadata.get(key)
        if snapshot.kind is Kind.COMMITTED:
            return snapshot.size, snapshot.inodes
        return await asyncio.to_thread(disk_usage, self.layout.fs(snapshot.id))

    async def cleanup(self) -> None:
        """Remove what no snapshot holds: layer directories, and model mounts (a crash between
        a Remove and its unmount leaves one)."""
        known = {snapshot.id for snapshot in self.metadata.all()}
        for path in self.layout.orphans(known):
            log.info("cleanup: removing %s", path)
            await asyncio.to_thread(self.layout.delete, int(path.name))
        for place in self.models.places():
            if self.metadata.model_users("sha256:" + place.name) == 0:
                log.info("cleanup: unmounting %s", place)
                await self.models.release(place)

    def list(self, filters: list[str]) -> list[Snapshot]:
        matches = matcher(filters)
        return [s for s in self.metadata.all() if matches(partial(_field, s))]


def _field(snapshot: Snapshot, path: tuple[str, ...]) -> str | None:
    """A snapshot's field as containerd's filters name it (its snapshot adaptor): name, parent
    and kind are always present, so ``parent==""`` finds a bottom layer, as the unpacker's
    filter for a remote layer of an image's first layer asks."""
    if path == ("name",):
        return snapshot.name
    if path == ("parent",):
        return snapshot.parent
    if path == ("kind",):
        return snapshot.kind.value
    if len(path) > 1 and path[0] == "labels":
        return snapshot.labels.get(".".join(path[1:]))
    return None


def _info(snapshot: Snapshot) -> Any:
    info = pb.Info(
        name=snapshot.name,
        parent=snapshot.parent,
        kind=_KINDS[snapshot.kind],
        labels=dict(snapshot.labels),
    )
    info.created_at.FromNanoseconds(snapshot.created_ns)
    info.updated_at.FromNanoseconds(snapshot.updated_ns)
    return info


def _mounts(mounts: list[Mount]) -> list[Any]:
    return [mount_pb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


class Service(services.SnapshotsServicer):  # type: ignore[misc]
    """The gRPC methods: requests to the Snapshotter, its refusals to gRPC statuses.

    A refusal ends that call alone; any other error too (logged with its traceback, status
    UNKNOWN), and the server serves on."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    async def _call(self, context: grpc.aio.ServicerContext, what: str, run: Any) -> Any:
        """``run()`` (awaited if a coroutine) for the call ``what`` names (its method first),
        counted in the stats before containerd has the answer (a scrape after it sees it)."""
        method, started = what.split()[0], time.monotonic()
        try:
            result = run()
            result = await result if asyncio.iscoroutine(result) else result
        except SnapshotError as error:
            log.info("%s: %s", what, error)
            self._count(method, _STATUS[error.code], started)
            await context.abort(_STATUS[error.code], str(error))
        except FilterError as error:
            self._count(method, grpc.StatusCode.INVALID_ARGUMENT, started)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except BaseException:
            self._count(method, grpc.StatusCode.UNKNOWN, started)
            raise
        self._count(method, grpc.StatusCode.OK, started)
        return result

    def _count(self, method: str, code: grpc.StatusCode, started: float) -> None:
        stats = self.snapshotter.stats
        stats.answered(method, code.name, time.monotonic() - started)
        stats.holding(*self.snapshotter.metadata.census())

    async def Prepare(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        run = self.snapshotter.prepare
        args = (request.key, request.parent, dict(request.labels))
        mounts = await self._call(context, f"Prepare {request.key}", lambda: run(*args))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    async def View(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        run = self.snapshotter.create
        args = (Kind.VIEW, request.key, request.parent, dict(request.labels))
        mounts = await self._call(context, f"View {request.key}", lambda: run(*args))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    async def Mounts(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        get = self.snapshotter.mounts
        mounts = await self._call(context, f"Mounts {request.key}", lambda: get(request.key))
        return pb.MountsResponse(mounts=_mounts(mounts))

    async def Commit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        labels = dict(request.labels)
        commit = self.snapshotter.commit
        run = lambda: commit(request.name, request.key, labels)  # noqa: E731
        await self._call(context, f"Commit {request.key} as {request.name}", run)
        return Empty()

    async def Remove(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        remove = self.snapshotter.remove
        await self._call(context, f"Remove {request.key}", lambda: remove(request.key))
        return Empty()

    async def Stat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        get = self.snapshotter.metadata.get
        snapshot = await self._call(context, f"Stat {request.key}", lambda: get(request.key))
        return pb.StatSnapshotResponse(info=_info(snapshot))

    async def Update(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = self.snapshotter.metadata
        info = request.info
        paths = list(request.update_mask.paths)

        def update() -> Snapshot:
            with metadata.transaction():
                return metadata.update_labels(info.name, dict(info.labels), paths)

        snapshot = await self._call(context, f"Update {info.name}", update)
        return pb.UpdateSnapshotResponse(info=_info(snapshot))

    async def List(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        filters = list(request.filters)
        found = await self._call(context, "List", lambda: self.snapshotter.list(filters))
        for start in range(0, len(found), _LIST_BATCH):
            batch = found[start : start + _LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[_info(snapshot) for snapshot in batch])

    async def Usage(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        usage = self.snapshotter.usage
        size, inodes = await self._call(context, f"Usage {request.key}", lambda: usage(request.key))
        return pb.UsageResponse(size=size, inodes=inodes)

    async def Cleanup(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._call(context, "Cleanup", self.snapshotter.cleanup)
        return Empty()


@dataclass(frozen=True)
class CriProxy:
    """Where to serve CRI's image service (kubelet's ``--image-service-endpoint``) and where
    containerd's CRI answers it."""

    address: Path
    endpoint: Path
    pulled: PulledCredentials


async def serve(
    root: Path,
    address: Path,
    models: ModelMounts,
    stats: SnapshotterStats,
    cri: CriProxy | None = None,
    ready: Any = None,
) -> None:
    """Serve the snapshots API for ``root`` on the unix socket ``address`` until SIGTERM or
    SIGINT, models mounted by ``models``, counted in ``stats``; with ``cri``, CRI's image
    service too, whose pulls' credentials the model mounts use. ``ready()`` is called once the
    sockets listen."""
    snapshotter = Snapshotter(root, models, stats, None if cri is None else cri.pulled)
    stats.holding(*snapshotter.metadata.census())
    server = grpc.aio.server()
    services.add_SnapshotsServicer_to_server(Service(snapshotter), server)
    address.parent.mkdir(parents=True, exist_ok=True)
    address.unlink(missing_ok=True)  # a socket left by a snapshotter that died
    server.add_insecure_port(f"unix://{address}")
    await server.start()
    address.chmod(0o600)
    log.info("snapshotter serving %s on %s", root, address)
    async with contextlib.AsyncExitStack() as stack:
        if cri is not None:
            proxy = serving_cri_proxy(cri.address, cri.endpoint, cri.pulled, stats)
            await stack.enter_async_context(proxy)
        if ready is not None:
            ready()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    await server.stop(grace=5)
    snapshotter.close()

"""Running one mount: load the model, start the FUSE session, serve until unmounted or signalled.

One process serves one mount. The session ends when the kernel unmounts it (``modelfs umount``,
``fusermount3 -u``) or on SIGTERM/SIGINT, which unmount it; either way the cache is flushed and
the leases on its blobs released.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from modelfs.artifact.inflate import MAX_RATIO, InflateBounds
from modelfs.artifact.tree import MAX_LAYER_SIZE, FileNode
from modelfs.cache import PieceCache
from modelfs.errors import ModelfsError
from modelfs.fetcher.index import IndexLookup
from modelfs.fetcher.manifests import resolve_manifest
from modelfs.fetcher.piece_fetcher import PieceFetcher
from modelfs.fs.fuse import OpenFile, ReadOnlyTreeFS
from modelfs.fs.session import FuseSession, mount, unmount
from modelfs.jsonsocket import Handler, open_control_socket, serve_control
from modelfs.logs import set_log_context
from modelfs.mount.model import Model, load_model
from modelfs.mount.trust import FileScans, check_signature, load_signature_policy, read_file
from modelfs.peer.options import ClusterOptions, ClusterSettings
from modelfs.prefetch.prefetcher import Prefetcher, PrefetchMode, ProfileLookup, WindowPolicy
from modelfs.prefetch.profile import ReadRecorder, recorded_profile
from modelfs.reference import LayoutReference, Reference, parse_any_reference
from modelfs.sources.buffers import PIECE_BUFFERS
from modelfs.sources.credentials import Credentials
from modelfs.sources.hosts import DEFAULT_HOSTS_DIR
from modelfs.sources.interface import BlobSource
from modelfs.sources.layout import LayoutSource
from modelfs.sources.mirrors import find_hosts, open_repository
from modelfs.sources.registry import DEFAULT_READ_TIMEOUT
from modelfs.sources.stats import (
    CORRUPT_CACHE_ENTRY,
    LAYOUT,
    PEER,
    REGISTRY,
    REJECTED_PEER_PIECE,
    MountStats,
)
from modelfs.trust.scan_policy import ScanPolicy
from modelfs.untrusted import loads_json

if TYPE_CHECKING:
    from modelfs.peer.source import PeerStats

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/modelfs")
DEFAULT_CACHE_SIZE = 100 << 30
# The kernel sends reads up to the readahead window, 128 KiB by default: 1 MiB or more gets the
# largest FUSE reads (1 MiB) and several in flight. An mmap page fault reads this much around
# it, so one piece (4 MiB) keeps a loader that reads one tensor from fetching many; the
# prefetcher reads further ahead of sequential readers itself.
DEFAULT_READ_AHEAD_KB = 4 << 10


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _tune_malloc() -> None:
    """Keep freed piece-sized blocks (LMDB's dirty pages of 4 MiB values) in one heap for reuse.

    glibc hands such blocks back to the kernel at once, so every piece would cost fresh page
    faults (a 1 MiB mmap threshold: 20x the faults, cold reads 15-25% slower), and it spreads
    threads over arenas that each keep their own: with two, a 6 GB model's cold read peaked at
    165-175 MB against 149-151 with one, at the same speed. Other libcs keep their defaults.
    """
    # The process's own symbols, libc's among them: find_library("c") runs ldconfig (~3 ms).
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 128 << 20)
        mallopt(_M_ARENA_MAX, 1)


@dataclass
class MountOptions:
    reference: Reference | LayoutReference
    mountpoint: Path
    cache_dir: Path = DEFAULT_CACHE_DIR
    cache_size: int = DEFAULT_CACHE_SIZE
    plain_http: bool = False
    insecure: bool = False
    timeout: float = 30.0
    retries: int = 3
    read_timeout: float = DEFAULT_READ_TIMEOUT
    # Where the registry's mirrors are named: containerd's hosts.toml directory, or a list of
    # modelfs's own ([registries."host"] mirrors), which wins (modelfs.sources.mirrors).
    hosts_dir: Path | None = DEFAULT_HOSTS_DIR
    mirrors: tuple[str, ...] = ()
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB
    # What a compressed layer may inflate to (docs/limits.md): times its size, and bytes.
    max_inflate_ratio: int = MAX_RATIO
    max_inflate_size: int = MAX_LAYER_SIZE
    prefetch: PrefetchMode = PrefetchMode.HINTS
    serve_unverified: bool = False  # serve pieces of blobs without an index before their check
    allow_other: bool = field(default_factory=lambda: os.getuid() == 0)
    cluster: ClusterSettings | None = None  # share pieces with peers (per the scheduler)
    stats_socket: Path | None = None  # where the daemon asks for this mount's counters
    # Trust (docs/trust.md): a containers policy.json (None: the node's, if it has one), and
    # what a file that fails its scan gets.
    signature_policy: Path | None = None
    scan: ScanPolicy = field(default_factory=ScanPolicy)
    # The registry credentials given to this mount (the snapshotter's, from CRI, over a pipe);
    # None: the node's docker config. Held in memory only: never in the settings file.
    credentials: Credentials | None = field(default=None, repr=False, compare=False)

    # The one model of a mount's settings: ``modelfs mount``'s options and the daemon's config
    # both make one, and the daemon hands its mount processes theirs as a file (``--settings``).
    def as_json(self) -> str:
        document = {
            name: _to_json(getattr(self, name))
            for name in self.__dataclass_fields__
            if name != "credentials"
        }
        document["reference"] = str(self.reference)
        return json.dumps(document, indent=1)

    @classmethod
    def from_json(cls, text: str) -> MountOptions:
        """The settings ``as_json`` wrote; a malformed file is one line naming what is wrong."""
        try:
            document = loads_json(text)
            cluster = document.pop("cluster")
            return cls(
                reference=parse_any_reference(document.pop("reference")),
                mountpoint=Path(document.pop("mountpoint")),
                cache_dir=Path(document.pop("cache_dir")),
                prefetch=PrefetchMode(document.pop("prefetch")),
                cluster=None if cluster is None else ClusterSettings.from_json(cluster),
                stats_socket=_optional_path(document.pop("stats_socket")),
                hosts_dir=_optional_path(document.pop("hosts_dir", str(DEFAULT_HOSTS_DIR))),
                mirrors=tuple(str(url) for url in document.pop("mirrors", ())),
                signature_policy=_optional_path(document.pop("signature_policy", None)),
                scan=ScanPolicy.parse(document.pop("scan", "")),
                **document,
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ModelfsError(
                f"the mount settings are malformed ({error}); write them again"
            ) from None


def _to_json(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, PrefetchMode):
        return value.value
    if isinstance(value, ClusterSettings):
        return value.as_json()
    if isinstance(value, ScanPolicy):
        return value.as_text()
    return value


def _optional_path(value: object) -> Path | None:
    return None if value is None else Path(str(value))


@asynccontextmanager
async def open_source(
    options: MountOptions, stats: MountStats | None = None
) -> AsyncIterator[BlobSource]:
    """The blob source a reference names: a registry repository or an OCI layout on disk;
    with ``stats``, a registry's bytes are counted there."""
    ref = options.reference
    if isinstance(ref, LayoutReference):
        yield LayoutSource(Path(ref.path))
        return
    hosts = find_hosts(
        ref.registry,
        ref.api_host,
        plain_http=options.plain_http,
        hosts_dir=options.hosts_dir,
        mirrors=options.mirrors,
    )
    async with open_repository(
        ref.repository,
        hosts,
        insecure=options.insecure,
        timeout=options.timeout,
        retries=options.retries,
        read_timeout=options.read_timeout,
        credentials=options.credentials,
        stats=stats,
    ) as repository:
        yield repository


# The system's own directories: a mount on one hides what the system runs on. The trees are
# refused whole; the others only themselves (/var/lib/models is a fine mountpoint).
_SYSTEM_DIRS = frozenset(
    Path(path)
    for path in (
        "/", "/bin", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt",
        "/root", "/run", "/sbin", "/srv", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local",
        "/usr/sbin", "/usr/share", "/var", "/var/lib", "/var/log", "/var/tmp",
    )
)  # fmt: skip
_SYSTEM_TREES = tuple(Path(path) for path in ("/boot", "/dev", "/etc", "/proc", "/sys"))


def check_mountpoint(mountpoint: Path, allow_non_empty: bool = False) -> None:
    """Refuse a mountpoint that is not a directory, a dead mount (its FUSE process is gone), a
    system directory, one reached through a symlink, one that holds other mounts (the parent of
    the daemon's), or, unless ``allow_non_empty`` (FUSE's ``nonempty``), one with files: a
    mount there would stack on a mount, fail with a traceback, or hide what is there."""
    try:
        is_dir = mountpoint.is_dir()
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            raise ModelfsError(f"mountpoint {mountpoint}: {error.strerror}") from None
        raise ModelfsError(
            f"mountpoint {mountpoint} is a dead mount (its process is gone); "
            f"run `modelfs umount {mountpoint}` first"
        ) from None
    if not is_dir:
        raise ModelfsError(f"mountpoint {mountpoint} is not a directory; create it first")
    resolved = Path(os.path.realpath(mountpoint))
    if resolved != Path(os.path.abspath(mountpoint)):
        raise ModelfsError(
            f"mountpoint {mountpoint} leads to {resolved} through a symlink; "
            f"give {resolved} itself if that is the place"
        )
    if resolved in _SYSTEM_DIRS or any(resolved.is_relative_to(tree) for tree in _SYSTEM_TREES):
        raise ModelfsError(
            f"mountpoint {resolved} is a system directory; mount on a directory of its own, "
            "such as /models"
        )
    points = _mount_points()
    if inner := [point for point in points if point.parent.is_relative_to(resolved)]:
        raise ModelfsError(
            f"mountpoint {resolved} holds other mounts ({inner[0]}); a mount on it would hide "
            "them: choose a directory of its own"
        )
    # A mount point's entries are its mount's (whoever mounts there says what of it).
    if not allow_non_empty and resolved not in points and _has_entries(resolved):
        raise ModelfsError(
            f"mountpoint {resolved} is not empty; a mount would hide its files: choose an "
            "empty directory, or pass --allow-non-empty"
        )


def _mount_points() -> list[Path]:
    """From /proc/self/mountinfo, whose paths escape spaces and the like as octal."""
    with open("/proc/self/mountinfo") as mounts:
        return [
            Path(re.sub(r"\\([0-7]{3})", lambda code: chr(int(code[1], 8)), line.split()[4]))
            for line in mounts
        ]


def _has_entries(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except OSError as error:
        raise ModelfsError(f"mountpoint {directory}: {error.strerror}") from None


def _fsname(options: MountOptions) -> str:
    """What the mount table shows as the mount's source (no commas: fusermount3 splits on them)."""
    return "modelfs:" + str(options.reference).replace(",", "_")


def mountinfo_path(path: Path) -> str:
    """``path`` as /proc/self/mountinfo writes it (octal escapes for blanks and backslashes)."""
    return "".join(f"\\{ord(char):03o}" if char in " \t\n\\" else char for char in str(path))


def is_mount_point(mountpoint: Path) -> bool:
    """Whether anything is mounted on ``mountpoint`` (absolute), dead mounts included; read from
    /proc/self/mountinfo, since stat-ing a dead mount fails."""
    target = mountinfo_path(mountpoint)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


def _fuse_device(mountpoint: Path) -> str | None:
    """The ``major:minor`` of the FUSE mount at ``mountpoint``, from /proc/self/mountinfo.

    Stat-ing the mountpoint (or resolving it) would ask this very process, whose session is not
    serving yet: ``mountpoint`` must already be absolute and resolved.
    """
    target = str(mountpoint)
    device = None
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[4] == target and line.split(" - ")[1].startswith("fuse"):
                device = fields[2]  # the last one listed is the one on top
    return device


def _raise_read_ahead(mountpoint: Path, read_ahead_kb: int) -> None:
    """Raise the mount's bdi readahead: the INIT reply can only lower it."""
    device = _fuse_device(mountpoint)
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(read_ahead_kb))
    except OSError as error:
        log.info(
            "could not raise readahead of %s: %s (reads stay at the default size)",
            mountpoint,
            error,
        )


class RecordingFile:
    """An open file whose reads are noted by a ``ReadRecorder`` (``modelfs profile``)."""

    def __init__(self, inner: OpenFile, recorder: ReadRecorder) -> None:
        self.node = inner.node
        self.keep_cache = inner.keep_cache
        self._inner = inner
        self._recorder = recorder

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        data = await self._inner.read(offset, size)  # locates a deferred file first
        self._recorder.note(self.node, offset, size)
        return data


async def serve(
    options: MountOptions,
    on_ready: Callable[[Model], None],
    recorder: ReadRecorder | None = None,
) -> None:
    """Mount and serve until unmounted; ``on_ready`` runs once listing the mount works.

    With a ``recorder``, every read that reaches the mount is noted in it.
    """
    options.mountpoint = options.mountpoint.resolve()  # before it is a FUSE mount
    _tune_malloc()
    cluster = None if options.cluster is None else options.cluster.load()
    policy = load_signature_policy(options.signature_policy)
    selector = options.reference.selector
    set_log_context(
        reference=str(options.reference),
        digest=selector if selector.startswith("sha256:") else None,
    )
    cache = PieceCache(options.cache_dir, options.cache_size)
    stats = MountStats()
    try:
        rejected_send, rejected_receive = trio.open_memory_channel[str](math.inf)
        async with (
            open_source(options, stats) as origin,
            _with_peers(cluster, origin, selector, cache) as (source, peer_stats),
        ):
            fetcher = PieceFetcher(
                source,
                cache,
                on_rejected=rejected_send.send_nowait,
                stats=stats,
                source_kind=_source_kind(origin, source),
                index=IndexLookup(origin, selector, cache),
                serve_unverified=options.serve_unverified,
            )
            async with fetcher.writing():
                # The signature policy first: a refused model costs its manifest and signatures.
                pinned = (await resolve_manifest(origin, selector, cache)).digest
                verdict = await check_signature(policy, options.reference, origin, pinned)
                stats.signature = verdict.reason
                model = await load_model(
                    source,
                    pinned,
                    cache,
                    fetcher,
                    defer_compressed=True,
                    inflate_bounds=InflateBounds(
                        options.max_inflate_ratio, options.max_inflate_size
                    ),
                )
                scans = FileScans(options.scan, partial(read_file, fetcher))
                await scans.refuse_model(options.reference, model.tree)
                # A few small requests, before ready: no read waits for them.
                await fetcher.look_up_index(model.digest)
                set_log_context(digest=model.digest)
                log.info(
                    "%s pinned to %s: %d files, %d bytes",
                    options.reference,
                    model.digest,
                    len(model.tree.files()),
                    model.tree.total_size,
                )

                leased = [blob.digest for blob in model.blobs] + model.deferred
                cache.lease(leased)
                cache.lease(model.decompressed, whole=True)
                try:
                    snapshot = partial(_snapshot, model, fetcher, peer_stats, scans)
                    await _run_session(
                        options,
                        model,
                        fetcher,
                        scans,
                        rejected_receive,
                        on_ready,
                        snapshot,
                        partial(recorded_profile, origin, model.digest),
                        recorder,
                    )
                finally:
                    cache.release(leased)
                    if options.stats_socket is not None:
                        options.stats_socket.unlink(missing_ok=True)
    finally:
        cache.close()


@asynccontextmanager
async def _with_peers(
    cluster: ClusterOptions | None, origin: BlobSource, selector: str, cache: PieceCache
) -> AsyncIterator[tuple[BlobSource, PeerStats | None]]:
    """The source reads go to, and the peer source's counters when it is one."""
    if cluster is None:
        yield origin, None
        return
    # The peer and scheduler modules only for a mount in a cluster (~20 ms of start-up).
    from modelfs.peer.source import PeerSource, with_peers

    async with with_peers(cluster, origin, selector, cache) as source:
        yield source, source.stats if isinstance(source, PeerSource) else None


def _source_kind(origin: BlobSource, source: BlobSource) -> str:
    if isinstance(origin, LayoutSource):
        return LAYOUT
    return REGISTRY if source is origin else PEER


async def _snapshot(
    model: Model,
    fetcher: PieceFetcher,
    peer_stats: PeerStats | None,
    scans: FileScans,
    request: dict[str, Any],
) -> dict[str, Any]:
    """The mount's counters as the daemon asks for them (whatever the request says)."""
    stats = replace(
        fetcher.stats,
        errors=dict(fetcher.stats.errors),
        findings=[finding.as_json() for finding in scans.findings],
        files=len(model.tree.files()),
        piece_buffers=PIECE_BUFFERS.mapped,
        plain_piece_buffers=PIECE_BUFFERS.plain_buffers,
    )
    if fetcher.cache.corrupt_pieces_found:
        stats.errors[CORRUPT_CACHE_ENTRY] = fetcher.cache.corrupt_pieces_found
    if peer_stats is not None:
        stats.rejected_by_peer = dict(peer_stats.rejected_by_peer)
        if stats.rejected_by_peer:
            stats.errors[REJECTED_PEER_PIECE] = sum(stats.rejected_by_peer.values())
    return {"digest": model.digest, **stats.as_json()}


async def _run_session(
    options: MountOptions,
    model: Model,
    fetcher: PieceFetcher,
    scans: FileScans,
    rejected: trio.MemoryReceiveChannel[str],
    on_ready: Callable[[Model], None],
    snapshot: Handler,
    recorded: ProfileLookup,
    recorder: ReadRecorder | None,
) -> None:
    policy = WindowPolicy(fetcher.cache.piece_size, kernel_readahead=options.read_ahead_kb << 10)
    prefetcher = Prefetcher(fetcher, options.prefetch, policy, recorded=recorded)

    def open_file(node: FileNode) -> OpenFile:
        opened = scans.guard(prefetcher.open(node))
        return opened if recorder is None else RecordingFile(opened, recorder)

    initialized = trio.Event()
    operations = ReadOnlyTreeFS(model.tree, open_file)
    try:
        fd = mount(options.mountpoint, _fsname(options), options.allow_other)
    except OSError as error:
        raise ModelfsError(
            f"cannot mount on {options.mountpoint}: {error.strerror} (is it an existing empty "
            "directory, and is /dev/fuse available?)"
        ) from None
    fuse = FuseSession(operations, fd, initialized.set)
    unmounted_by_kernel = False
    try:
        async with trio.open_nursery() as nursery:

            async def serve_until_unmounted() -> None:
                nonlocal unmounted_by_kernel
                await fuse.run()
                unmounted_by_kernel = True
                nursery.cancel_scope.cancel()

            async def raise_read_ahead_after_init() -> None:
                # The kernel lowers the bdi readahead to what the INIT reply allows (what it
                # offered: 128 KiB), so a value written before the reply does not stick.
                await initialized.wait()
                _raise_read_ahead(options.mountpoint, options.read_ahead_kb)

            await nursery.start(prefetcher.run, model.tree)
            nursery.start_soon(raise_read_ahead_after_init)
            nursery.start_soon(serve_until_unmounted)
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            nursery.start_soon(_purge_rejected, model, fuse, rejected)
            if options.stats_socket is not None:
                listener = await open_control_socket(options.stats_socket)
                nursery.start_soon(serve_control, listener, snapshot)
            on_ready(model)
    finally:
        if not unmounted_by_kernel:
            unmount(options.mountpoint)
        os.close(fd)
        log.info("%s unmounted from %s", options.reference, options.mountpoint)


async def _purge_rejected(
    model: Model, fuse: FuseSession, rejected: trio.MemoryReceiveChannel[str]
) -> None:
    """Drop the kernel's page cache of files whose blob failed its digest check.

    Runs beside the request handlers, never inside one: the kernel waits on pages that an
    unanswered read holds, so invalidating from a handler could deadlock.
    """
    async for digest in rejected:
        for file in model.tree.files():
            if file.located and file.blob.digest == digest:
                await trio.to_thread.run_sync(fuse.invalidate_inode, file.inode)


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            scope.cancel()
            return

"""Running one mount: load the model, start the FUSE session, serve until unmounted or signalled.

One process serves one mount (pyfuse3 runs one FUSE session per process). The session ends when
the kernel unmounts it (``modelfs umount``, ``fusermount3 -u``) or on SIGTERM/SIGINT, which
unmount it; either way the cache is flushed and the leases on its blobs released.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from modelfs.cache import PieceCache
from modelfs.errors import ModelfsError
from modelfs.fetcher.layout import LayoutSource
from modelfs.fetcher.pieces import PieceFetcher
from modelfs.fetcher.registry import RegistryClient
from modelfs.fetcher.source import BlobSource
from modelfs.fs.fuse import ReadOnlyTreeFS
from modelfs.fs.model import Model, load_model
from modelfs.fs.tree import FileNode
from modelfs.peer.source import ClusterOptions, with_peers
from modelfs.reference import LayoutReference, Reference

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/modelfs")
DEFAULT_CACHE_SIZE = 100 << 30
# The kernel sends reads up to the readahead window; 128 KiB by default. Larger windows mean
# fewer, larger FUSE requests and let mmap loaders fault in big runs (lazy-loading.md).
DEFAULT_READ_AHEAD_KB = 16 << 10


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
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB
    allow_other: bool = field(default_factory=lambda: os.getuid() == 0)
    cluster: ClusterOptions | None = None  # share pieces with peers (per the scheduler)


@asynccontextmanager
async def open_source(options: MountOptions) -> AsyncIterator[BlobSource]:
    """The blob source a reference names: a registry repository or an OCI layout on disk."""
    ref = options.reference
    if isinstance(ref, LayoutReference):
        yield LayoutSource(Path(ref.path))
        return
    async with RegistryClient(
        ref.api_host,
        plain_http=options.plain_http,
        insecure=options.insecure,
        timeout=options.timeout,
        retries=options.retries,
    ) as client:
        yield client.repository(ref.repository)


def _fuse_options(options: MountOptions, model: Model) -> set[str]:
    name = str(options.reference).replace(",", "_")
    fuse_options = set(pyfuse3.default_options) | {
        "ro",
        f"fsname=modelfs:{name}",
        "subtype=modelfs",
    }
    if options.allow_other:
        fuse_options.add("allow_other")
    return fuse_options


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
    """Raise the mount's bdi readahead (pyfuse3 cannot set max_read; this is the lever)."""
    device = _fuse_device(mountpoint)
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(read_ahead_kb))
    except OSError as error:
        log.info(
            "could not raise readahead of %s: %s (reads stay at the default size)",
            mountpoint,
            error,
        )


async def serve(options: MountOptions, on_ready: Callable[[Model], None]) -> None:
    """Mount and serve until unmounted; ``on_ready`` runs once listing the mount works."""
    options.mountpoint = options.mountpoint.resolve()  # before it is a FUSE mount
    cache = PieceCache(options.cache_dir, options.cache_size)
    try:
        rejected_send, rejected_receive = trio.open_memory_channel[str](math.inf)
        async with (
            open_source(options) as origin,
            with_peers(options.cluster, origin, options.reference.selector, cache) as source,
        ):
            fetcher = PieceFetcher(source, cache, on_rejected=rejected_send.send_nowait)
            model = await load_model(source, options.reference.selector, cache, fetcher)
            log.info(
                "%s pinned to %s: %d files, %d bytes",
                options.reference,
                model.digest,
                len(model.tree.files()),
                model.tree.total_size,
            )

            async def read_file(node: FileNode, offset: int, size: int) -> bytes | memoryview:
                return await fetcher.read(node.blob, node.offset + offset, size)

            operations = ReadOnlyTreeFS(model.tree, read_file)
            leased = [blob.digest for blob in model.blobs]
            cache.lease(leased)
            try:
                await _run_session(options, model, operations, rejected_receive, on_ready)
            finally:
                cache.release(leased)
    finally:
        cache.close()


async def _run_session(
    options: MountOptions,
    model: Model,
    operations: ReadOnlyTreeFS,
    rejected: trio.MemoryReceiveChannel[str],
    on_ready: Callable[[Model], None],
) -> None:
    try:
        pyfuse3.init(operations, str(options.mountpoint), _fuse_options(options, model))
    except RuntimeError as error:
        raise ModelfsError(
            f"cannot mount on {options.mountpoint}: {error} (is it an existing empty directory, "
            "and is /dev/fuse available?)"
        ) from None
    unmounted_by_kernel = False
    try:
        _raise_read_ahead(options.mountpoint, options.read_ahead_kb)
        async with trio.open_nursery() as nursery:

            async def serve_until_unmounted() -> None:
                nonlocal unmounted_by_kernel
                await pyfuse3.main()
                unmounted_by_kernel = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(serve_until_unmounted)
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            nursery.start_soon(_purge_rejected, model, rejected)
            on_ready(model)
    finally:
        pyfuse3.close(unmount=not unmounted_by_kernel)
        log.info("%s unmounted from %s", options.reference, options.mountpoint)


async def _purge_rejected(model: Model, rejected: trio.MemoryReceiveChannel[str]) -> None:
    """Drop the kernel's page cache of files whose blob failed its digest check.

    Runs beside the request handlers, never inside one: the kernel waits on pages that an
    unanswered read holds, so invalidating from a handler could deadlock.
    """
    async for digest in rejected:
        for file in model.tree.files():
            if file.blob.digest == digest:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, file.inode, False)


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            scope.cancel()
            return

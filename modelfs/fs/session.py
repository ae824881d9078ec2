"""The kernel's side: a FUSE session of modelfs's own on ``/dev/fuse``, served in trio.

Requests are read on the event loop and answered there, but for a READ's data: that reply is
written by a worker thread. ``os.writev`` lets go of the GIL, and the kernel's copy of the reply
into the file's page cache is most of what serving a read costs (69% of the mount's CPU in a cold
read with the registry off the node's disk, docs/benchmarks.md). With libfuse through pyfuse3
that copy ran on the event loop with the GIL held, so the mount used one core; here the copies
run on every core while the loop goes on receiving and checking pieces.

Reads are tasks in the session's nursery; everything else is answered at once, in order. A read
whose caller gets a signal (the kernel sends INTERRUPT) is cancelled and answered EINTR, so a
reader waiting on a stalled registry can be stopped with Ctrl-C. The session ends when the
kernel ends the connection (the mount is gone: ENODEV) or when its scope is cancelled; ``mount``
and ``unmount`` are the calls around it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import trio

from modelfs.fs import protocol
from modelfs.fs.protocol import Attributes, FsStats, FuseError, ProtocolError, Request

log = logging.getLogger(__name__)

# mount(2) flags and umount2(2)'s lazy detach.
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2

# A reply at least this large is written by a worker thread; a smaller one costs less to write
# than to hand over.
_THREADED_REPLY = 64 << 10

_libc = ctypes.CDLL(None, use_errno=True)


class Operations(Protocol):
    """What the session asks of the filesystem (``modelfs.fs.fuse.ReadOnlyTreeFS``)."""

    def lookup(self, parent: int, name: bytes) -> Attributes: ...
    def getattr(self, inode: int) -> Attributes: ...
    def opendir(self, inode: int) -> int: ...
    def entries(self, handle: int, start: int) -> Iterator[tuple[bytes, Attributes, int]]: ...
    def open(self, inode: int, flags: int) -> tuple[int, bool]: ...
    def release(self, handle: int) -> None: ...
    async def read(self, handle: int, offset: int, size: int) -> bytes | memoryview: ...
    def access(self, inode: int, mode: int) -> bool: ...
    def statfs(self) -> FsStats: ...
    def getxattr(self, inode: int, name: bytes) -> bytes: ...
    def listxattr(self, inode: int) -> list[bytes]: ...


def mount(mountpoint: Path, fsname: str, allow_other: bool) -> int:
    """Mount a FUSE filesystem read-only on ``mountpoint``; the ``/dev/fuse`` descriptor that
    serves it. As root by mount(2), as anyone else through ``fusermount3``."""
    options = ["default_permissions", *(["allow_other"] if allow_other else [])]
    if os.geteuid() != 0:
        return _mount_with_fusermount(mountpoint, fsname, options)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
    result = _libc.mount(
        fsname.encode(),
        os.fsencode(mountpoint),
        b"fuse.modelfs",
        ctypes.c_ulong(_MS_RDONLY | _MS_NOSUID | _MS_NODEV),
        ",".join(data + options).encode(),
    )
    if result != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise OSError(code, os.strerror(code))
    return fd


def _mount_with_fusermount(mountpoint: Path, fsname: str, options: list[str]) -> int:
    """fusermount3 mounts for a user and sends the descriptor back over a socket
    (``_FUSE_COMMFD``), as libfuse does."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        all_options = ["ro", "nosuid", "nodev", f"fsname={fsname}", "subtype=modelfs", *options]
        result = subprocess.run(
            ["fusermount3", "-o", ",".join(all_options), "--", str(mountpoint)],
            env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise OSError(errno.EPERM, result.stderr.strip() or "fusermount3 failed")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EIO, "fusermount3 sent no /dev/fuse descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(mountpoint: Path) -> None:
    """Detach the mount (lazily: open files keep it until they close)."""
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code != errno.EINVAL:  # EINVAL: not mounted (any more)
                log.warning("could not unmount %s: %s", mountpoint, os.strerror(code))
        return
    result = subprocess.run(
        ["fusermount3", "-u", "-z", "--", str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode != 0:
        log.warning("could not unmount %s: %s", mountpoint, result.stderr.strip())


class FuseSession:
    """Serves ``operations`` on the ``/dev/fuse`` descriptor ``fd`` (which it does not close).

    ``on_init`` runs once the INIT reply is written (the kernel then sets the mount's
    readahead from it, so what raises it must come after).
    """

    def __init__(
        self,
        operations: Operations,
        fd: int,
        on_init: Callable[[], None],
    ) -> None:
        self._operations = operations
        self._fd = fd
        self._on_init = on_init
        self._buffer = bytearray(16 * protocol.MIN_READ_BUFFER)
        # READ replies waiting for a writer thread, each holding its data until written: as many
        # as the kernel has reads in flight (its max_background, and the readers' own).
        self._replies: queue.SimpleQueue[tuple[int, bytes | memoryview] | None] = (
            queue.SimpleQueue()
        )
        # The reads in flight, by unique, and the highest unique read so far (INTERRUPTs name
        # the request they are for, and may come before it).
        self._reads: dict[int, trio.CancelScope] = {}
        self._last_unique = 0
        self._answers: dict[int, Callable[[Request], bytes | None]] = {
            protocol.INIT: self._init,
            protocol.LOOKUP: self._lookup,
            protocol.GETATTR: lambda request: protocol.attr_reply(
                operations.getattr(request.nodeid)
            ),
            protocol.OPEN: self._open,
            protocol.RELEASE: self._release,
            protocol.OPENDIR: lambda request: protocol.open_reply(
                operations.opendir(request.nodeid), keep_cache=True, directory=True
            ),
            protocol.READDIR: self._readdir,
            protocol.RELEASEDIR: lambda request: b"",
            protocol.FLUSH: lambda request: b"",
            protocol.STATFS: lambda request: protocol.statfs_reply(operations.statfs()),
            protocol.ACCESS: self._access,
            protocol.GETXATTR: self._getxattr,
            protocol.LISTXATTR: self._listxattr,
            protocol.FORGET: lambda request: None,  # inodes live as long as the tree
            protocol.BATCH_FORGET: lambda request: None,
        }

    async def run(self) -> None:
        """Serve until the kernel ends the connection."""
        os.set_blocking(self._fd, False)
        # One writer per core this process may run on: more would only wait for the cores. Threads
        # fed by a queue, not trio.to_thread: a read's task has nothing to wait for once its
        # reply is handed over, and the hand-off was a quarter of the loop's GIL-held time.
        writers = [
            threading.Thread(target=self._write_replies, name="fuse-reply", daemon=True)
            for _ in range(len(os.sched_getaffinity(0)))
        ]
        for writer in writers:
            writer.start()
        try:
            async with trio.open_nursery() as nursery:
                while (request := await self._next_request()) is not None:
                    if request.opcode == protocol.INTERRUPT:
                        self._interrupt(request)
                        continue
                    self._last_unique = request.unique
                    if request.opcode == protocol.READ:
                        # Known before the read's task runs: an INTERRUPT may come next.
                        self._reads[request.unique] = trio.CancelScope()
                        nursery.start_soon(self._read, request)
                    elif request.opcode == protocol.DESTROY:
                        self._reply(request.unique, b"")
                        break
                    else:
                        self._answer(request)
                nursery.cancel_scope.cancel()  # reads still in flight have no one to answer
        finally:
            for _ in writers:
                self._replies.put(None)
            with trio.CancelScope(shield=True):  # the replies handed over are written first
                for writer in writers:
                    await trio.to_thread.run_sync(writer.join)

    def _write_replies(self) -> None:
        while (reply := self._replies.get()) is not None:
            self._reply(*reply)

    def invalidate_inode(self, inode: int) -> None:
        """Drop the kernel's pages of ``inode`` (blocks while the kernel waits on them: call it
        from a thread, never from inside a request's answer)."""
        try:
            os.write(self._fd, protocol.inval_inode_notice(inode))
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.ENODEV):  # not cached; unmounted
                raise

    async def _next_request(self) -> Request | None:
        while True:
            await trio.lowlevel.checkpoint()  # one request at a time: the answers run between
            try:
                size = os.readv(self._fd, [self._buffer])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as error:
                if error.errno in (errno.ENOENT, errno.EINTR):  # a request taken back; retry
                    continue
                if error.errno == errno.ENODEV:  # unmounted
                    return None
                raise
            if size == 0:  # the other end is gone (/dev/fuse says ENODEV; a socket says this)
                return None
            try:
                return protocol.parse_request(memoryview(self._buffer)[:size])
            except ProtocolError as problem:
                log.error("FUSE: %s; answered EIO", problem)
                if size >= protocol.IN_HEADER.size:  # its sender is waiting: never leave it so
                    unique = protocol.IN_HEADER.unpack_from(self._buffer)[2]
                    self._reply(unique, b"", errno.EIO)

    def _answer(self, request: Request) -> None:
        answer = self._answers.get(request.opcode)
        if answer is None:
            self._reply(request.unique, b"", errno.ENOSYS)  # the kernel stops asking
            return
        try:
            payload = answer(request)
        except FuseError as error:
            self._reply(request.unique, b"", error.errno)
        except Exception:
            log.exception("FUSE: request %d failed unexpectedly", request.opcode)
            self._reply(request.unique, b"", errno.EIO)
        else:
            if payload is not None:
                self._reply(request.unique, payload)
            if request.opcode == protocol.INIT:
                self._on_init()

    def _interrupt(self, request: Request) -> None:
        """The caller of the request named got a signal: its read, if in flight, is cancelled
        (and answered EINTR). One not read yet is asked of the kernel again later (EAGAIN);
        one already answered needs nothing. The INTERRUPT itself is otherwise not answered."""
        (unique,) = protocol.INTERRUPT_IN.unpack_from(request.body)
        scope = self._reads.get(unique)
        if scope is not None:
            scope.cancel()
        elif unique > self._last_unique:
            self._reply(request.unique, b"", errno.EAGAIN)

    async def _read(self, request: Request) -> None:
        handle, offset, size, _ = protocol.READ_IN.unpack_from(request.body)
        # A read cancelled by an INTERRUPT leaves the pieces it waited on to be fetched all the
        # same: the fetcher's other waiters take a cancelled fetch over (``PieceFetcher``).
        with self._reads[request.unique] as scope:
            try:
                data = await self._operations.read(handle, offset, size)
            except FuseError as error:  # the filesystem logs why
                self._reply(request.unique, b"", error.errno)
                return
            except Exception:  # a bug: this read fails, the session goes on
                log.exception("FUSE: a read failed unexpectedly")
                self._reply(request.unique, b"", errno.EIO)
                return
            finally:
                del self._reads[request.unique]
        if scope.cancelled_caught:
            self._reply(request.unique, b"", errno.EINTR)
            return
        if len(data) < _THREADED_REPLY:
            self._reply(request.unique, data)
        else:
            self._replies.put((request.unique, data))

    def _reply(self, unique: int, payload: bytes | memoryview, error: int = 0) -> None:
        header = protocol.out_header(unique, len(payload), error)
        try:
            os.writev(self._fd, [header, payload] if payload else [header])
        except OSError as problem:
            # ENOENT: the request was taken back (its reader was killed); ENODEV: unmounted.
            if problem.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("FUSE: a reply could not be written: %s", problem.strerror)

    # -- the answers: each returns the reply's payload, or None for no reply ------------------

    def _init(self, request: Request) -> bytes:
        reply, minor = protocol.init_reply(request.body)
        log.debug("FUSE protocol 7.%d", minor)
        return reply

    def _lookup(self, request: Request) -> bytes:
        name = protocol.name_argument(request.body)
        try:
            attributes = self._operations.lookup(request.nodeid, name)
        except FuseError as error:
            if error.errno != errno.ENOENT:
                raise
            # The tree never changes: the kernel may remember that the name is not there.
            return protocol.negative_entry_reply(self._operations.getattr(request.nodeid).timeout)
        return protocol.entry_reply(attributes)

    def _open(self, request: Request) -> bytes:
        flags, _ = protocol.OPEN_IN.unpack_from(request.body)
        handle, keep_cache = self._operations.open(request.nodeid, flags)
        return protocol.open_reply(handle, keep_cache)

    def _release(self, request: Request) -> bytes:
        (handle,) = protocol.RELEASE_IN.unpack_from(request.body)
        self._operations.release(handle)
        return b""

    def _readdir(self, request: Request) -> bytes:
        handle, offset, size, _ = protocol.READ_IN.unpack_from(request.body)
        return protocol.dirents(self._operations.entries(handle, offset), size)

    def _access(self, request: Request) -> bytes:
        (mask,) = protocol.ACCESS_IN.unpack_from(request.body)
        if not self._operations.access(request.nodeid, mask):
            raise FuseError(errno.EACCES)
        return b""

    def _getxattr(self, request: Request) -> bytes:
        size, _ = protocol.GETXATTR_IN.unpack_from(request.body)
        name = protocol.name_argument(request.body[protocol.GETXATTR_IN.size :])
        return _xattr_reply(self._operations.getxattr(request.nodeid, name), size)

    def _listxattr(self, request: Request) -> bytes:
        size, _ = protocol.GETXATTR_IN.unpack_from(request.body)
        names = self._operations.listxattr(request.nodeid)
        return _xattr_reply(b"".join(name + b"\0" for name in names), size)


def _xattr_reply(value: bytes, size: int) -> bytes:
    """A size of 0 asks how large the value is; a smaller one than the value is ERANGE."""
    if size == 0:
        return protocol.xattr_size_reply(len(value))
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value

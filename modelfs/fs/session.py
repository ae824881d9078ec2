"""The FUSE session: the kernel's protocol on ``/dev/fuse``, spoken directly (no libfuse).

A read-only filesystem needs a dozen requests, each a fixed little-endian struct, so modelfs
speaks them itself (the structs are those of ``linux/fuse.h``). That puts the reply path in our
hands: a read's reply is written with ``os.writev`` from a worker thread, without the GIL, so
the kernel's copy of the bytes into the page cache runs beside the event loop and beside other
replies, where a libfuse binding copies on the event loop holding the GIL.

``FuseSession.mount`` mounts (``mount(2)`` as root, else through ``fusermount3``, which hands the
device back over a socket), ``serve`` answers requests until the kernel unmounts, ``unmount``
detaches. What to answer is the ``Operations`` given to ``serve`` (``modelfs.fs.fuse``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from modelfs.errors import ModelfsError

log = logging.getLogger(__name__)

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
_ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry/attr valid (s, ns); + attr
_ATTR_OUT = struct.Struct("<QII")  # attr valid (s, ns), dummy; + attr
_OPEN_IN = struct.Struct("<II")  # flags, open_flags
_OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
_READ_IN = struct.Struct("<QQI")  # fh, offset, size (then flags we do not need)
_RELEASE_IN = struct.Struct("<Q")  # fh
_ACCESS_IN = struct.Struct("<I")  # mask
_GETXATTR_IN = struct.Struct("<II")  # size, padding; then the name
_GETXATTR_OUT = struct.Struct("<II")  # size, padding
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # the 64 bytes of protocol 7.31
_STATFS_OUT = struct.Struct("<QQQQQIII4x24x")  # blocks, bfree, bavail, files, ffree, bsize, ...
_DIRENT = struct.Struct("<QQII")  # ino, next offset, namelen, type; then the name, 8-aligned
_INVAL_INODE = struct.Struct("<Qqq")  # ino, offset, length

_LOOKUP, _FORGET, _GETATTR, _OPEN, _READ, _STATFS, _RELEASE = 1, 2, 3, 14, 15, 17, 18
_GETXATTR, _LISTXATTR, _FLUSH, _INIT, _OPENDIR, _READDIR = 22, 23, 25, 26, 27, 28
_RELEASEDIR, _ACCESS, _INTERRUPT, _DESTROY, _BATCH_FORGET = 29, 34, 36, 38, 42
_NO_REPLY = {_FORGET, _BATCH_FORGET, _INTERRUPT}

_KERNEL_MAJOR, _OUR_MINOR = 7, 31
_ASYNC_READ, _PARALLEL_DIROPS, _MAX_PAGES = 1 << 0, 1 << 18, 1 << 22
_MAX_PAGES_PER_READ = 256  # 1 MiB reads
_FOPEN_KEEP_CACHE = 1 << 1
_NOTIFY_INVAL_INODE = 2
# Requests are small for a read-only filesystem; the kernel wants room for a write's header and
# max_write bytes all the same.
_MAX_WRITE = 128 << 10
_REQUEST_BUFFER = _MAX_WRITE + 4096
# Replies at least this long are written from a worker thread (the copy is the cost).
_THREADED_REPLY = 64 << 10

_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MNT_DETACH = 2


class FuseError(Exception):
    """A request's answer is this errno."""

    def __init__(self, errno_: int) -> None:
        super().__init__(os.strerror(errno_))
        self.errno = errno_


@dataclass(frozen=True)
class Attributes:
    inode: int
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    mtime_ns: int
    timeout: float  # how long the kernel may keep the entry and these attributes

    def packed(self) -> bytes:
        seconds, nanoseconds = divmod(self.mtime_ns, 1_000_000_000)
        blocks = (self.size + 511) // 512
        return _ATTR.pack(
            self.inode, self.size, blocks, seconds, seconds, seconds,
            nanoseconds, nanoseconds, nanoseconds,
            self.mode, self.nlink, self.uid, self.gid, 0, 1 << 20, 0,
        )  # fmt: skip


@dataclass(frozen=True)
class FsStats:
    blocks: int
    files: int
    block_size: int = 4096
    name_max: int = 255


class Operations(Protocol):
    """What a read-only filesystem answers; raise ``FuseError`` to answer an errno."""

    def init(self) -> None: ...
    def lookup(self, parent: int, name: str) -> Attributes: ...
    def getattr(self, inode: int) -> Attributes: ...
    def open(self, inode: int, flags: int) -> int: ...
    async def read(self, handle: int, offset: int, size: int) -> bytes | memoryview: ...
    def release(self, handle: int) -> None: ...
    def opendir(self, inode: int) -> None: ...
    def readdir(self, inode: int, start: int) -> list[tuple[str, Attributes]]: ...
    def access(self, inode: int, mask: int) -> None: ...
    def statfs(self) -> FsStats: ...


def _timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


class FuseSession:
    """One mounted FUSE filesystem: its ``/dev/fuse`` descriptor and where it is mounted."""

    def __init__(self, device: int, mountpoint: Path) -> None:
        self._device = device
        self.mountpoint = mountpoint
        self._mounted = True

    @classmethod
    def mount(cls, mountpoint: Path, fsname: str, subtype: str, allow_other: bool) -> FuseSession:
        """Mount read-only at ``mountpoint``; a clear error if it cannot be."""
        options = ["default_permissions"] + (["allow_other"] if allow_other else [])
        try:
            if os.geteuid() == 0:
                device = _mount_directly(mountpoint, fsname, subtype, options)
            else:
                device = _mount_with_fusermount(mountpoint, fsname, subtype, options)
        except OSError as error:
            raise ModelfsError(
                f"cannot mount on {mountpoint}: {error.strerror or error} (is it an existing "
                "directory, not mounted on already, and is /dev/fuse available?)"
            ) from None
        os.set_blocking(device, False)
        return cls(device, mountpoint)

    async def serve(self, operations: Operations) -> None:
        """Answer the kernel's requests until it unmounts (or DESTROY); each read in a task."""
        buffer = bytearray(_REQUEST_BUFFER)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    count = os.readv(self._device, [buffer])
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._device)
                    continue
                except OSError as error:
                    if error.errno == errno.ENODEV:  # unmounted
                        break
                    if error.errno in (errno.EINTR, errno.ENOENT):  # a request withdrawn
                        continue
                    raise
                request = bytes(buffer[:count])
                _, opcode, unique, inode, *_ = _IN_HEADER.unpack_from(request)
                body = memoryview(request)[_IN_HEADER.size :]
                if opcode == _READ:
                    nursery.start_soon(self._read, operations, unique, body)
                elif opcode == _DESTROY:
                    self._reply(unique, b"")
                    break
                elif opcode not in _NO_REPLY:
                    self._answer(operations, opcode, unique, inode, body)
            nursery.cancel_scope.cancel()
        self._mounted = False

    def _answer(
        self, operations: Operations, opcode: int, unique: int, inode: int, body: memoryview
    ) -> None:
        try:
            reply = self._dispatch(operations, opcode, inode, body)
        except FuseError as error:
            self._reply(unique, b"", error.errno)
        except Exception:
            log.exception("FUSE request %d on inode %d failed unexpectedly", opcode, inode)
            self._reply(unique, b"", errno.EIO)
        else:
            self._reply(unique, reply)

    def _dispatch(self, operations: Operations, opcode: int, inode: int, body: memoryview) -> bytes:
        if opcode == _LOOKUP:
            name = bytes(body).split(b"\0", 1)[0]
            return _entry(operations.lookup(inode, os.fsdecode(name)))
        if opcode == _GETATTR:
            attributes = operations.getattr(inode)
            return _ATTR_OUT.pack(*_timeout(attributes.timeout), 0) + attributes.packed()
        if opcode == _OPEN:
            flags, _ = _OPEN_IN.unpack_from(body)
            return _OPEN_OUT.pack(operations.open(inode, flags), _FOPEN_KEEP_CACHE, 0)
        if opcode == _RELEASE:
            (handle,) = _RELEASE_IN.unpack_from(body)
            operations.release(handle)
            return b""
        if opcode == _OPENDIR:
            operations.opendir(inode)
            return _OPEN_OUT.pack(inode, 0, 0)
        if opcode == _READDIR:
            _, offset, size = _READ_IN.unpack_from(body)
            return _dirents(operations.readdir(inode, offset), offset, size)
        if opcode in (_RELEASEDIR, _FLUSH):
            return b""
        if opcode == _ACCESS:
            (mask,) = _ACCESS_IN.unpack_from(body)
            operations.access(inode, mask)
            return b""
        if opcode == _STATFS:
            stats = operations.statfs()
            return _STATFS_OUT.pack(
                stats.blocks, 0, 0, stats.files, 0, stats.block_size, stats.name_max,
                stats.block_size,
            )  # fmt: skip
        if opcode in (_GETXATTR, _LISTXATTR):
            operations.getattr(inode)  # ENOENT for an unknown inode
            (size, _) = _GETXATTR_IN.unpack_from(body)
            if opcode == _GETXATTR:
                raise FuseError(errno.ENODATA)  # no extended attributes
            return _GETXATTR_OUT.pack(0, 0) if size == 0 else b""
        if opcode == _INIT:
            return self._init(operations, body)
        raise FuseError(errno.ENOSYS)

    def _init(self, operations: Operations, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = _INIT_IN.unpack_from(body)
        if major != _KERNEL_MAJOR or minor < _OUR_MINOR:
            raise FuseError(errno.EPROTO)
        operations.init()
        wanted = flags & (_ASYNC_READ | _PARALLEL_DIROPS | _MAX_PAGES)
        return _INIT_OUT.pack(
            _KERNEL_MAJOR, _OUR_MINOR, max_readahead, wanted, 0, 0, _MAX_WRITE, 1,
            _MAX_PAGES_PER_READ, 0, 0, 0,
        )  # fmt: skip

    async def _read(self, operations: Operations, unique: int, body: memoryview) -> None:
        handle, offset, size = _READ_IN.unpack_from(body)
        try:
            data = await operations.read(handle, offset, size)
        except FuseError as error:
            self._reply(unique, b"", error.errno)
            return
        if len(data) < _THREADED_REPLY:
            self._reply(unique, data)
        else:
            # The kernel copies the reply into the page cache: off the event loop, no GIL.
            await trio.to_thread.run_sync(self._reply, unique, data)

    def _reply(self, unique: int, data: bytes | memoryview, error: int = 0) -> None:
        header = _OUT_HEADER.pack(_OUT_HEADER.size + len(data), -error, unique)
        try:
            os.writev(self._device, [header, data] if data else [header])
        except FileNotFoundError:
            pass  # the request was interrupted and withdrawn
        except OSError as failure:
            if failure.errno != errno.ENODEV:  # unmounted meanwhile
                raise

    def invalidate(self, inode: int) -> None:
        """Drop the kernel's cached pages of ``inode`` (blocking: call it from a thread)."""
        header = _OUT_HEADER.pack(_OUT_HEADER.size + _INVAL_INODE.size, _NOTIFY_INVAL_INODE, 0)
        with contextlib.suppress(FileNotFoundError):  # not known to the kernel: nothing cached
            os.writev(self._device, [header, _INVAL_INODE.pack(inode, 0, 0)])

    def close(self) -> None:
        """Detach the mount if still mounted, and close the device."""
        if self._mounted:
            _unmount(self.mountpoint)
            self._mounted = False
        os.close(self._device)


def _entry(attributes: Attributes) -> bytes:
    valid = _timeout(attributes.timeout)
    return (
        _ENTRY_OUT.pack(attributes.inode, 0, valid[0], valid[0], valid[1], valid[1])
        + attributes.packed()
    )


def _dirents(entries: list[tuple[str, Attributes]], start: int, size: int) -> bytes:
    """The directory entries from position ``start`` on that fit in ``size`` bytes; each says
    where the next one is, so a listing resumes anywhere."""
    out = bytearray()
    for position, (name, attributes) in enumerate(entries, start + 1):
        raw = os.fsencode(name)
        kind = attributes.mode >> 12  # the DT_* type is the mode's file type bits
        record = _DIRENT.pack(attributes.inode, position, len(raw), kind) + raw
        record += b"\0" * (-len(record) % 8)
        if len(out) + len(record) > size:
            break
        out += record
    return bytes(out)


def _mount_directly(mountpoint: Path, fsname: str, subtype: str, options: list[str]) -> int:
    device = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    identity = [f"fd={device}", "rootmode=40000", f"user_id={os.getuid()}"]
    data = ",".join([*identity, f"group_id={os.getgid()}", *options])
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    if libc.mount(
        fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(), flags, data.encode()
    ):
        failure = ctypes.get_errno()
        os.close(device)
        raise OSError(failure, os.strerror(failure))
    return device


def _mount_with_fusermount(mountpoint: Path, fsname: str, subtype: str, options: list[str]) -> int:
    """fusermount3 opens /dev/fuse, mounts, and sends the descriptor back over a socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        command = [
            "fusermount3",
            "-o",
            ",".join(["ro", "nosuid", "nodev", f"fsname={fsname}", f"subtype={subtype}", *options]),
            "--",
            str(mountpoint),
        ]
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        try:
            result = subprocess.run(
                command, pass_fds=[theirs.fileno()], env=env, capture_output=True, text=True
            )
        except FileNotFoundError:
            raise OSError(errno.ENOENT, "fusermount3 is not installed (package fuse3)") from None
        if result.returncode != 0:
            raise OSError(errno.EPERM, result.stderr.strip() or "fusermount3 failed")
        _, descriptors, _, _ = socket.recv_fds(ours, 1, 1)
    if not descriptors:
        raise OSError(errno.EIO, "fusermount3 sent no descriptor")
    return descriptors[0]


def _unmount(mountpoint: Path) -> None:
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) == 0:
            return
        failure = ctypes.get_errno()
        if failure in (errno.EINVAL, errno.ENOENT):
            return  # not mounted any more
        log.warning("unmounting %s: %s", mountpoint, os.strerror(failure))
        return
    subprocess.run(["fusermount3", "-u", "-q", "-z", "--", str(mountpoint)], check=False)

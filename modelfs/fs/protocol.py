"""The FUSE wire protocol, as far as a read-only filesystem speaks it: no I/O here.

Requests come from ``/dev/fuse`` as a ``fuse_in_header`` and the opcode's arguments; replies go
back as a ``fuse_out_header`` and the reply's struct. Names, numbers and layouts are those of
the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.x); only the messages modelfs answers are
here. Everything is little-endian on the machines FUSE runs on; "=" keeps the structs unpadded.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass

KERNEL_VERSION = 7
# 7.28 brought max_pages (reads up to 1 MiB); nothing modelfs uses came later.
KERNEL_MINOR_VERSION = 31

# Opcodes (enum fuse_opcode).
LOOKUP = 1
FORGET = 2
GETATTR = 3
OPEN = 14
READ = 15
STATFS = 17
RELEASE = 18
GETXATTR = 22
LISTXATTR = 23
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42

# INIT flags.
ASYNC_READ = 1 << 0
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22

# OPEN reply flags.
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

NOTIFY_INVAL_INODE = 2

# The kernel refuses to hand a request to a smaller buffer.
MIN_READ_BUFFER = 8192
# The most the kernel asks of one READ when given MAX_PAGES: 256 pages of 4 KiB.
MAX_READ = 1 << 20

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ...
OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
INIT_IN = struct.Struct("=IIII")  # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")  # ... max_pages, map_alignment, flags2, unused
ATTR = struct.Struct("=QQQqqqIIIIIIIIII")  # times are signed: before 1970 is negative
ENTRY_OUT = struct.Struct("=QQQQII")  # nodeid, generation, entry/attr valid (s, ns); + ATTR
ATTR_OUT = struct.Struct("=QII")  # attr valid (s, ns), dummy; + ATTR
OPEN_IN = struct.Struct("=II")  # flags, open_flags
OPEN_OUT = struct.Struct("=QII")  # fh, open_flags, padding
READ_IN = struct.Struct("=QQII")  # fh, offset, size, read_flags (+ lock owner, flags)
RELEASE_IN = struct.Struct("=Q")  # fh (+ flags...)
ACCESS_IN = struct.Struct("=I")  # mask
INTERRUPT_IN = struct.Struct("=Q")  # the unique of the request whose caller got a signal
GETXATTR_IN = struct.Struct("=II")  # size, padding
GETXATTR_OUT = struct.Struct("=II")  # size, padding
STATFS_OUT = struct.Struct("=QQQQQIII28x")  # blocks, bfree, bavail, files, ffree, bsize, ...
DIRENT = struct.Struct("=QQII")  # ino, off, namelen, type; + the name, padded to 8 bytes
INVAL_INODE_OUT = struct.Struct("=Qqq")  # ino, offset, length


class ProtocolError(Exception):
    """The kernel sent something this side of the protocol cannot read."""


class FuseError(Exception):
    """An operation's failure, answered to the kernel as ``-errno``."""

    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` shows of an inode, and how long the kernel may keep it."""

    ino: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    timeout: float
    blksize: int = 4096

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(frozen=True, slots=True)
class FsStats:
    """What ``statfs`` shows."""

    blocks: int
    files: int
    block_size: int = 4096
    name_max: int = 255


@dataclass(frozen=True, slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    body: bytes


def parse_request(data: bytes | memoryview) -> Request:
    """One request as read from ``/dev/fuse`` (one read returns exactly one)."""
    if len(data) < IN_HEADER.size:
        raise ProtocolError(f"a request of {len(data)} bytes, shorter than its header")
    length, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(data)
    if length != len(data):
        raise ProtocolError(f"a request says {length} bytes and has {len(data)}")
    return Request(opcode, unique, nodeid, bytes(data[IN_HEADER.size :]))


def name_argument(body: bytes) -> bytes:
    """The NUL-terminated name a LOOKUP carries."""
    name, nul, _ = body.partition(b"\0")
    if not nul:
        raise ProtocolError("a name without its terminating NUL")
    return name


def out_header(unique: int, payload_size: int, error: int = 0) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + payload_size, -error, unique)


def init_reply(body: bytes) -> tuple[bytes, int]:
    """The INIT reply for the kernel's INIT, and the minor version both sides speak.

    The readahead is the kernel's own offer: a reply can only lower it, and the mount raises
    it afterwards through the bdi (``mount.session``)."""
    major, minor, kernel_readahead, kernel_flags = INIT_IN.unpack_from(body)
    if major != KERNEL_VERSION:
        raise ProtocolError(f"the kernel speaks FUSE {major}.{minor}, modelfs {KERNEL_VERSION}.x")
    minor = min(minor, KERNEL_MINOR_VERSION)
    flags = kernel_flags & (ASYNC_READ | PARALLEL_DIROPS | MAX_PAGES)
    reply = INIT_OUT.pack(
        KERNEL_VERSION,
        minor,
        kernel_readahead,
        flags,
        64,  # max_background: reads (readahead among them) in flight at once
        48,  # congestion_threshold
        4096,  # max_write: nothing is written; the kernel sizes its buffers by it
        1,  # time_gran: nanoseconds
        MAX_READ // 4096,  # max_pages
        0,
        0,
    )
    return reply, minor


def _valid(timeout: float) -> tuple[int, int]:
    seconds = int(timeout)
    return seconds, int((timeout - seconds) * 1e9)


def _attr(attributes: Attributes) -> bytes:
    seconds, nanoseconds = divmod(attributes.mtime_ns, 1_000_000_000)
    return ATTR.pack(
        attributes.ino,
        attributes.size,
        attributes.blocks,
        seconds,
        seconds,
        seconds,
        nanoseconds,
        nanoseconds,
        nanoseconds,
        attributes.mode,
        attributes.nlink,
        attributes.uid,
        attributes.gid,
        0,  # rdev
        attributes.blksize,
        0,  # flags
    )


def entry_reply(attributes: Attributes) -> bytes:
    seconds, nanoseconds = _valid(attributes.timeout)
    head = ENTRY_OUT.pack(attributes.ino, 0, seconds, seconds, nanoseconds, nanoseconds)
    return head + _attr(attributes)


def negative_entry_reply(timeout: float) -> bytes:
    """That a name is not there, for ``timeout`` seconds (an entry of inode 0)."""
    seconds, nanoseconds = _valid(timeout)
    return ENTRY_OUT.pack(0, 0, seconds, 0, nanoseconds, 0) + bytes(ATTR.size)


def attr_reply(attributes: Attributes) -> bytes:
    seconds, nanoseconds = _valid(attributes.timeout)
    return ATTR_OUT.pack(seconds, nanoseconds, 0) + _attr(attributes)


def open_reply(handle: int, keep_cache: bool, directory: bool = False) -> bytes:
    flags = FOPEN_KEEP_CACHE if keep_cache else 0
    if directory:
        flags |= FOPEN_CACHE_DIR
    return OPEN_OUT.pack(handle, flags, 0)


def statfs_reply(stats: FsStats) -> bytes:
    return STATFS_OUT.pack(
        stats.blocks, 0, 0, stats.files, 0, stats.block_size, stats.name_max, stats.block_size
    )


def xattr_size_reply(size: int) -> bytes:
    return GETXATTR_OUT.pack(size, 0)


def dirents(entries: Iterable[tuple[bytes, Attributes, int]], room: int) -> bytes:
    """As many directory entries as fit in ``room`` bytes; each says where the next one starts,
    so the kernel's next READDIR resumes after the last one it got."""
    reply = bytearray()
    for name, attributes, next_offset in entries:
        size = DIRENT.size + len(name)
        padded = (size + 7) & ~7
        if len(reply) + padded > room:
            break
        kind = stat.S_IFMT(attributes.mode) >> 12  # DT_REG, DT_DIR... are the mode's type bits
        reply += DIRENT.pack(attributes.ino, next_offset, len(name), kind)
        reply += name + bytes(padded - size)
    return bytes(reply)


def inval_inode_notice(inode: int) -> bytes:
    """Asks the kernel to drop its cached pages and attributes of ``inode``."""
    payload = INVAL_INODE_OUT.pack(inode, 0, 0)  # from offset 0, length 0: the whole file
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), NOTIFY_INVAL_INODE, 0) + payload

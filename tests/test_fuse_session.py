"""modelfs's own FUSE session (``modelfs.fs.session``) and its wire format (``fs.protocol``).

The protocol's packing is checked as the kernel reads it, in microseconds. The session is
checked on real mounts of ``/dev/fuse``, serving a few files from memory through an operations
object of its own, so what is tested is the session: concurrent readers answered by worker
threads, a read that fails, a reader killed while its read is answered, an unmount with reads in
flight, and a mount by a user who is not root (through fusermount3).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from modelfs.artifact.tree import ROOT_INODE
from modelfs.fs import protocol
from modelfs.fs.protocol import Attributes, FsStats, FuseError, ProtocolError
from modelfs.fs.session import FuseSession, mount, unmount

ROOT = Path(__file__).resolve().parent.parent


# -- the wire format ---------------------------------------------------------------------------


def request_bytes(opcode: int, unique: int, nodeid: int, body: bytes) -> bytes:
    length = protocol.IN_HEADER.size + len(body)
    return protocol.IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def test_a_request_is_read_whole_or_refused() -> None:
    request = protocol.parse_request(request_bytes(protocol.LOOKUP, 7, 1, b"config.json\0"))
    assert (request.opcode, request.unique, request.nodeid) == (protocol.LOOKUP, 7, 1)
    assert protocol.name_argument(request.body) == b"config.json"
    with pytest.raises(ProtocolError, match="shorter than its header"):
        protocol.parse_request(b"\0" * 12)
    with pytest.raises(ProtocolError, match="says 52 bytes and has 51"):
        protocol.parse_request(request_bytes(protocol.LOOKUP, 7, 1, b"config.json\0")[:-1])
    with pytest.raises(ProtocolError, match="NUL"):
        protocol.name_argument(b"config.json")


def test_init_speaks_the_older_minor_and_asks_only_what_the_kernel_offers() -> None:
    offered = protocol.ASYNC_READ | protocol.MAX_PAGES | (1 << 12)
    body = protocol.INIT_IN.pack(7, 44, 128 << 10, offered) + bytes(48)
    reply, minor = protocol.init_reply(body)
    fields = protocol.INIT_OUT.unpack(reply)
    assert minor == protocol.KERNEL_MINOR_VERSION and fields[:2] == (7, minor)
    assert fields[2] == 128 << 10  # the kernel's own offer; the mount raises it later
    assert fields[3] == protocol.ASYNC_READ | protocol.MAX_PAGES  # nothing not offered
    assert fields[8] * 4096 == protocol.MAX_READ
    assert protocol.init_reply(protocol.INIT_IN.pack(7, 27, 1 << 20, 0))[1] == 27
    with pytest.raises(ProtocolError, match=r"FUSE 8\.0"):
        protocol.init_reply(protocol.INIT_IN.pack(8, 0, 0, 0))


def test_attributes_are_packed_as_the_kernel_reads_them() -> None:
    attributes = Attributes(
        ino=5,
        mode=stat.S_IFREG | 0o444,
        nlink=1,
        size=1000,
        uid=1,
        gid=2,
        mtime_ns=-1_500_000_000,  # before 1970
        timeout=1.5,
        blksize=1 << 20,
    )
    entry = protocol.entry_reply(attributes)
    assert len(entry) == 128  # sizeof(struct fuse_entry_out)
    nodeid, _, entry_valid, attr_valid, entry_nsec, _ = protocol.ENTRY_OUT.unpack_from(entry)
    assert (nodeid, entry_valid, attr_valid, entry_nsec) == (5, 1, 1, 500_000_000)
    attr = protocol.ATTR.unpack_from(entry, protocol.ENTRY_OUT.size)
    assert attr[:3] == (5, 1000, 2)  # ino, size, 512-byte blocks
    assert (attr[4], attr[7]) == (-2, 500_000_000)  # mtime: whole seconds down, then ns
    assert attr[9:14] == (stat.S_IFREG | 0o444, 1, 1, 2, 0)
    assert len(protocol.attr_reply(attributes)) == 104  # sizeof(struct fuse_attr_out)
    negative = protocol.negative_entry_reply(2.0)
    assert protocol.ENTRY_OUT.unpack_from(negative)[:3] == (0, 0, 2) and not any(negative[40:])
    assert len(protocol.statfs_reply(FsStats(blocks=3, files=2))) == 80


def test_directory_entries_are_padded_and_stop_before_the_room_is_exceeded() -> None:
    def attributes(inode: int) -> Attributes:
        return Attributes(inode, stat.S_IFDIR | 0o555, 2, 0, 0, 0, 0, 1.0)

    entries = [(b"a", attributes(2), 1), (b"bcdefghij", attributes(3), 2)]
    reply = protocol.dirents(entries, room=1 << 10)
    assert len(reply) == 32 + 40  # 24 + 1 and 24 + 9, each padded to 8 bytes
    second = protocol.DIRENT.unpack_from(reply, 32)
    assert second == (3, 2, 9, stat.S_IFDIR >> 12) and reply[56:65] == b"bcdefghij"
    assert protocol.dirents(entries, room=71) == reply[:32]
    assert protocol.dirents(entries, room=31) == b""


def test_an_invalidation_notice_names_the_inode_and_the_whole_file() -> None:
    notice = protocol.inval_inode_notice(9)
    length, code, unique = protocol.OUT_HEADER.unpack_from(notice)
    assert (length, code, unique) == (len(notice), protocol.NOTIFY_INVAL_INODE, 0)
    assert protocol.INVAL_INODE_OUT.unpack_from(notice, 16) == (9, 0, 0)


# -- the session on real mounts ------------------------------------------------------------------


class MemoryFiles:
    """A flat directory of files in memory; a read of a name in ``held`` waits for ``go``."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.names = sorted(files)
        self.held: set[str] = set()
        self.go = trio.Event()
        self.failing: set[str] = set()
        self.handles: dict[int, str] = {}
        self._next_handle = itertools.count(1)
        self.reads_started = 0
        self.reads_cancelled = 0

    def _attributes(self, inode: int) -> Attributes:
        if inode == ROOT_INODE:
            return Attributes(inode, stat.S_IFDIR | 0o555, 2, 0, 0, 0, 0, 60.0)
        if not 2 <= inode < 2 + len(self.names):
            raise FuseError(errno.ESTALE)
        size = len(self.files[self.names[inode - 2]])
        return Attributes(inode, stat.S_IFREG | 0o444, 1, size, 0, 0, 0, 60.0)

    def lookup(self, parent: int, name: bytes) -> Attributes:
        if os.fsdecode(name) not in self.files:
            raise FuseError(errno.ENOENT)
        return self._attributes(2 + self.names.index(os.fsdecode(name)))

    def getattr(self, inode: int) -> Attributes:
        return self._attributes(inode)

    def opendir(self, inode: int) -> int:
        return inode

    def entries(self, handle: int, start: int) -> Iterator[tuple[bytes, Attributes, int]]:
        for position in range(start, len(self.names)):
            yield os.fsencode(self.names[position]), self._attributes(2 + position), position + 1

    def open(self, inode: int, flags: int) -> tuple[int, bool]:
        handle = next(self._next_handle)
        self.handles[handle] = self.names[inode - 2]
        return handle, False

    def release(self, handle: int) -> None:
        del self.handles[handle]

    async def read(self, handle: int, offset: int, size: int) -> bytes | memoryview:
        name = self.handles[handle]
        self.reads_started += 1
        if name in self.held:
            try:
                await self.go.wait()
            except trio.Cancelled:
                self.reads_cancelled += 1
                raise
        if name in self.failing:
            raise FuseError(errno.EIO)
        return memoryview(self.files[name])[offset : offset + size]

    def access(self, inode: int, mode: int) -> bool:
        return True

    def statfs(self) -> FsStats:
        return FsStats(blocks=1, files=len(self.files))

    def getxattr(self, inode: int, name: bytes) -> bytes:
        raise FuseError(errno.ENODATA)

    def listxattr(self, inode: int) -> list[bytes]:
        return []


@asynccontextmanager
async def served(files: MemoryFiles, mountpoint: Path) -> AsyncIterator[trio.Nursery]:
    """``files`` mounted on ``mountpoint`` by a session in this process, until the block ends."""
    mountpoint.mkdir(exist_ok=True)
    fd = mount(mountpoint, "modelfs:test", allow_other=False)
    session = FuseSession(files, fd, lambda: None)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                yield nursery
                unmount(mountpoint)  # the session ends when the kernel drops the connection
    finally:
        unmount(mountpoint)
        os.close(fd)


def direct_read(path: Path, offset: int, size: int) -> bytes:
    """A read that reaches the session whatever the page cache holds (O_DIRECT)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def test_concurrent_readers_get_exact_bytes_through_threaded_replies(tmp_path: Path) -> None:
    data = {f"shard-{n}.bin": random.randbytes((3 << 20) + n * 4099) for n in range(3)}
    files = MemoryFiles(data)
    ranges = [
        (name, offset, size)
        for name, content in data.items()
        for offset, size in [(0, 1 << 20), (4095, 700 << 10), (len(content) - 10, 4096)]
        + [(random.randrange(len(content)), random.choice([1 << 16, 1 << 20])) for _ in range(20)]
    ]

    async def main() -> None:
        mnt = tmp_path / "mnt"
        async with served(files, mnt):

            def check(name: str, offset: int, size: int) -> bool:
                return direct_read(mnt / name, offset, size) == data[name][offset : offset + size]

            def read_all() -> list[bool]:
                with ThreadPoolExecutor(8) as pool:
                    return list(pool.map(lambda r: check(*r), ranges))

            # Abandoned if the test fails, so that closing the session's descriptor (which
            # aborts the connection) frees the readers rather than waiting for them.
            assert all(await trio.to_thread.run_sync(read_all, abandon_on_cancel=True))
            listing = await trio.to_thread.run_sync(os.listdir, mnt)
            assert sorted(listing) == sorted(data)
            missing = mnt / "missing.bin"
            assert not await trio.to_thread.run_sync(missing.exists)
            whole = await trio.to_thread.run_sync((mnt / "shard-2.bin").read_bytes)
            assert whole == data["shard-2.bin"]
        assert files.reads_started >= len(ranges)

    trio.run(main)


def test_a_failed_read_fails_alone_and_the_session_goes_on(tmp_path: Path) -> None:
    files = MemoryFiles({"bad.bin": b"x" * 100, "good.bin": b"y" * 100})
    files.failing.add("bad.bin")

    async def main() -> None:
        mnt = tmp_path / "mnt"
        async with served(files, mnt):
            with pytest.raises(OSError) as raised:
                await trio.to_thread.run_sync(direct_read, mnt / "bad.bin", 0, 4096)
            assert raised.value.errno == errno.EIO
            good = await trio.to_thread.run_sync(direct_read, mnt / "good.bin", 0, 4096)
            assert good == b"y" * 100

    trio.run(main)


_READER = (
    "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT); os.pread(fd, 4096, 0)"
)


def test_a_reader_killed_while_its_read_is_answered_leaves_the_session_serving(
    tmp_path: Path,
) -> None:
    files = MemoryFiles({"held.bin": b"h" * (1 << 20), "other.bin": b"o" * 4096})
    files.held.add("held.bin")

    async def main() -> None:
        mnt = tmp_path / "mnt"
        async with served(files, mnt):
            reader = subprocess.Popen([sys.executable, "-c", _READER, str(mnt / "held.bin")])
            while files.reads_started == 0:
                await trio.sleep(0.01)
            reader.send_signal(signal.SIGKILL)  # it dies once its read is answered
            await trio.sleep(0.1)
            files.go.set()
            await trio.to_thread.run_sync(reader.wait)
            other = await trio.to_thread.run_sync(direct_read, mnt / "other.bin", 0, 4096)
            assert other == b"o" * 4096
            held = await trio.to_thread.run_sync(direct_read, mnt / "held.bin", 0, 1 << 20)
            assert held == b"h" * (1 << 20)

    trio.run(main)


_INTERRUPTED_READER = """
import os, signal, sys
def stop(*_): raise SystemExit(3)
signal.signal(signal.SIGUSR1, stop)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
os.pread(fd, 4096, 0)
"""


def test_a_signal_to_a_reader_interrupts_its_read_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    """The kernel sends INTERRUPT for a read whose caller got a signal: the read is cancelled
    and answered EINTR at once, so the caller's handler runs (here: exit 3) while the filesystem
    would still be waiting."""
    files = MemoryFiles({"held.bin": b"h" * 4096})
    files.held.add("held.bin")

    async def main() -> None:
        mnt = tmp_path / "mnt"
        async with served(files, mnt):
            reader = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_READER, mnt / "held.bin"])
            try:
                while files.reads_started == 0:
                    await trio.sleep(0.01)
                reader.send_signal(signal.SIGUSR1)
                assert await trio.to_thread.run_sync(reader.wait, 10) == 3
            finally:
                reader.kill()
                files.go.set()  # if it was not interrupted, its read is answered: it can die
                await trio.to_thread.run_sync(reader.wait)
            assert files.reads_cancelled == 1
            held = await trio.to_thread.run_sync(direct_read, mnt / "held.bin", 0, 4096)
            assert held == b"h" * 4096

    trio.run(main)


def test_a_session_cancelled_with_a_read_in_flight_ends_and_frees_the_reader(
    tmp_path: Path,
) -> None:
    """As on SIGTERM: the session's scope is cancelled, the mount detached and its descriptor
    closed, which ends the connection: the waiting reader gets an error, never a hang."""
    files = MemoryFiles({"held.bin": b"h" * 4096})
    files.held.add("held.bin")
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    async def main() -> subprocess.Popen[bytes]:
        fd = mount(mnt, "modelfs:test", allow_other=False)
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, str(mnt / "held.bin")], stderr=subprocess.PIPE
        )
        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(FuseSession(files, fd, lambda: None).run)
                    while files.reads_started == 0:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
        finally:
            unmount(mnt)
            os.close(fd)
        return reader

    reader = trio.run(main)
    assert reader.wait(timeout=30) != 0
    assert reader.stderr is not None and b"Errno" in reader.stderr.read()
    assert not os.path.ismount(mnt)


_AS_A_USER = """
import errno, os, sys
from pathlib import Path
import trio
sys.path.insert(0, sys.argv[2])
from test_fuse_session import MemoryFiles
from modelfs.fs.session import FuseSession, mount, unmount

async def main(mnt):
    files = MemoryFiles({"weights.bin": b"w" * 5000})
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    fd = mount(mnt, "modelfs:user", allow_other=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(FuseSession(files, fd, lambda: None).run)
        data = await trio.to_thread.run_sync((mnt / "weights.bin").read_bytes)
        mounts = Path("/proc/self/mountinfo").read_text()
        unmount(mnt)
    print(len(data), data == b"w" * 5000, "fuse.modelfs modelfs:user" in mounts)

trio.run(main, Path(sys.argv[1]))
"""


def test_a_user_who_is_not_root_mounts_through_fusermount3(tmp_path: Path) -> None:
    mnt = Path("/tmp") / f"modelfs-user-{os.getpid()}"
    mnt.mkdir(exist_ok=True)
    os.chown(mnt, 65534, 65534)
    # Distributions leave /dev/fuse open to all (0666); a container may not.
    device_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", device_mode | 0o666)
    try:
        script = textwrap.dedent(_AS_A_USER)
        result = subprocess.run(
            [sys.executable, "-c", script, str(mnt), str(ROOT / "tests")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert result.stdout.split() == ["5000", "True", "True"], result.stderr
        assert not os.path.ismount(mnt)
    finally:
        os.chmod("/dev/fuse", device_mode)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def test_an_interrupt_cancels_its_read_waits_for_one_not_read_yet_and_ignores_one_answered() -> (
    None
):
    """Over a SOCK_SEQPACKET pair: an INTERRUPT for a read in flight gets that read answered
    EINTR; one for a request the session has not read yet is answered EAGAIN (the kernel sends it
    again later); one for a request already answered gets no answer."""
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.settimeout(5)
    files = MemoryFiles({"held.bin": b"h" * 10})
    files.held.add("held.bin")

    def exchange(message: bytes) -> tuple[int, int, bytes]:
        kernel.send(message)
        reply = kernel.recv(1 << 16)
        _, error, unique = protocol.OUT_HEADER.unpack_from(reply)
        return unique, -error, reply[protocol.OUT_HEADER.size :]

    def interrupt(unique: int) -> bytes:  # its own unique is the request's with the low bit set
        return request_bytes(protocol.INTERRUPT, unique | 1, 0, protocol.INTERRUPT_IN.pack(unique))

    def as_kernel() -> None:
        with kernel:
            init = protocol.INIT_IN.pack(7, 31, 1 << 20, protocol.ASYNC_READ) + bytes(48)
            assert exchange(request_bytes(protocol.INIT, 2, 0, init))[:2] == (2, 0)
            opened = exchange(
                request_bytes(protocol.OPEN, 4, 2, protocol.OPEN_IN.pack(os.O_RDONLY, 0))
            )
            assert opened[:2] == (4, 0)
            handle = protocol.OPEN_OUT.unpack_from(opened[2])[0]
            kernel.send(request_bytes(protocol.READ, 6, 2, protocol.READ_IN.pack(handle, 0, 10, 0)))
            assert exchange(interrupt(8))[:2] == (9, errno.EAGAIN)  # not read yet
            assert exchange(interrupt(6))[:2] == (6, errno.EINTR)  # the read, answered
            kernel.send(interrupt(4))  # the OPEN, answered long ago: no answer
            statfs = exchange(request_bytes(protocol.STATFS, 8, 1, b""))
            assert statfs[:2] == (8, 0)

    async def main() -> None:
        with ours, trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(FuseSession(files, ours.fileno(), lambda: None).run)
                await trio.to_thread.run_sync(as_kernel)

    trio.run(main)
    assert files.reads_cancelled == 1


def test_the_session_answers_what_it_cannot_read_and_ends_when_its_peer_does() -> None:
    """Driven over a SOCK_SEQPACKET pair, which keeps messages whole as ``/dev/fuse`` does: no
    request is left unanswered, and a closed peer ends ``run``."""
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.settimeout(5)  # a request left unanswered fails the test, not hangs it
    files = MemoryFiles({"a.bin": b"a"})
    initialized = []

    def exchange(message: bytes) -> tuple[int, int, bytes]:
        kernel.send(message)
        reply = kernel.recv(1 << 16)
        length, error, unique = protocol.OUT_HEADER.unpack_from(reply)
        assert length == len(reply)
        return unique, -error, reply[protocol.OUT_HEADER.size :]

    def as_kernel() -> None:
        with kernel:
            init = protocol.INIT_IN.pack(7, 31, 1 << 20, protocol.ASYNC_READ) + bytes(48)
            unique, error, body = exchange(request_bytes(protocol.INIT, 1, 0, init))
            assert (unique, error, protocol.INIT_OUT.unpack(body)[:2]) == (1, 0, (7, 31))
            # Says 4 bytes more than it has: answered EIO, not left waiting.
            short = request_bytes(protocol.GETATTR, 2, 1, bytes(16))
            assert exchange(short[:-4])[:2] == (2, errno.EIO)
            assert exchange(request_bytes(51, 3, 1, b""))[:2] == (3, errno.ENOSYS)  # TMPFILE
            unique, error, body = exchange(request_bytes(protocol.LOOKUP, 4, 1, b"nope\0"))
            assert (unique, error, protocol.ENTRY_OUT.unpack_from(body)[0]) == (4, 0, 0)
            assert exchange(request_bytes(protocol.GETATTR, 5, 99, bytes(16)))[:2] == (
                5,
                errno.ESTALE,
            )

    async def main() -> None:
        with ours, trio.fail_after(10):
            session = FuseSession(files, ours.fileno(), lambda: initialized.append(True))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                await trio.to_thread.run_sync(as_kernel)  # then the peer closes: run ends

    trio.run(main)
    assert initialized == [True]  # once the INIT reply was written

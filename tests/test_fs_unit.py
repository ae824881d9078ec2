"""The filesystem object without FUSE: ``ReadOnlyTreeFS`` driven directly in trio.

The tree comes from the real model loader, file bytes through a real ``PieceFetcher`` and LMDB
``PieceCache`` from an in-memory source (``modelfs.testing``): no registry, no kernel, no root,
milliseconds a test. The kernel's part, answering the requests, is what the real-mount tests
check (``tests/test_mount.py``, ``tests/test_fs_errno_mount.py``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from modelfs.artifact.tree import ROOT_INODE, DataNotLocatedError, FileNode
from modelfs.cache import PieceCache
from modelfs.errors import (
    AuthError,
    CacheError,
    IntegrityError,
    ModelfsError,
    NotFoundError,
    PieceAlteredError,
    RegistryUnavailableError,
    errno_of,
)
from modelfs.fetcher.piece_fetcher import PieceFetcher
from modelfs.fs import protocol
from modelfs.fs.fuse import OpenFile, ReadOnlyTreeFS
from modelfs.fs.protocol import FuseError
from modelfs.mount.model import load_model
from modelfs.prefetch.prefetcher import Prefetcher, PrefetchMode, WindowPolicy
from modelfs.scheduler.service import BadRequest
from modelfs.sources.interface import BlobBytes, PieceRuns
from modelfs.sources.layout import LayoutError
from modelfs.testing import MemoryRunSource, MemorySource, digest_of, model_source

PIECE = 64 << 10
CONFIG = b'{"model_type": "bert"}'
WEIGHTS = os.urandom(5 * PIECE + 123)  # six pieces, the last one short
VOCAB = b"[PAD]\n[UNK]\n"
FILES = {"config.json": CONFIG, "model.safetensors": WEIGHTS, "tokenizer/vocab.txt": VOCAB}


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[PieceCache]:
    cache = PieceCache(tmp_path / "cache", 64 << 20, piece_size=PIECE)
    yield cache
    cache.close()


@pytest.fixture(params=[MemorySource, MemoryRunSource])
def source(request: pytest.FixtureRequest) -> MemorySource:
    return model_source(FILES, source=request.param)


@asynccontextmanager
async def filesystem(source: MemorySource, cache: PieceCache) -> AsyncIterator[ReadOnlyTreeFS]:
    """The filesystem a mount of ``source`` serves, reads going through the piece fetcher."""
    fetcher = PieceFetcher(source, cache)
    model = await load_model(source, "latest", cache, fetcher)
    policy = WindowPolicy(PIECE, kernel_readahead=128 << 10)
    prefetcher = Prefetcher(fetcher, PrefetchMode.NONE, policy)
    with trio.fail_after(5):
        yield ReadOnlyTreeFS(model.tree, prefetcher.open)


def run(
    source: MemorySource, cache: PieceCache, body: Callable[[ReadOnlyTreeFS], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with filesystem(source, cache) as fs:
            await body(fs)

    trio.run(main)


def inode_of(fs: ReadOnlyTreeFS, path: str) -> int:
    inode = ROOT_INODE
    for name in path.split("/"):
        inode = fs.lookup(inode, name.encode()).ino
    return inode


async def read_file(fs: ReadOnlyTreeFS, path: str, chunk: int = 128 << 10) -> bytes:
    """The file's bytes as the kernel asks for them: open, reads of ``chunk`` to EOF, release."""
    handle, _ = fs.open(inode_of(fs, path), os.O_RDONLY)
    data = bytearray()
    try:
        while part := await fs.read(handle, len(data), chunk):
            data += part
    finally:
        fs.release(handle)
    return bytes(data)


async def fuse_errno(request: Awaitable[object]) -> int:
    """The errno the read failed with (it must fail)."""
    with pytest.raises(FuseError) as raised:
        await request
    return raised.value.errno


def failed_with(operation: Callable[..., object], *arguments: object) -> int:
    """The errno the operation failed with (it must fail)."""
    with pytest.raises(FuseError) as raised:
        operation(*arguments)
    return raised.value.errno


# -- names and attributes ----------------------------------------------------------------------


def test_lookup_and_getattr_describe_files_and_directories(
    source: MemorySource, cache: PieceCache
) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        weights = fs.lookup(ROOT_INODE, b"model.safetensors")
        assert stat.S_ISREG(weights.mode) and weights.mode & 0o777 == 0o444
        assert weights.size == len(WEIGHTS) and weights.nlink == 1
        assert weights.blocks == (len(WEIGHTS) + 511) // 512
        assert fs.getattr(weights.ino).size == len(WEIGHTS)
        tokenizer = fs.lookup(ROOT_INODE, b"tokenizer")
        assert stat.S_ISDIR(tokenizer.mode) and tokenizer.mode & 0o777 == 0o555
        root = fs.getattr(ROOT_INODE)
        assert root.nlink == 3  # ".", its entry in its parent, "tokenizer/.."
        assert fs.lookup(ROOT_INODE, b".").ino == ROOT_INODE
        assert fs.lookup(tokenizer.ino, b"vocab.txt").size == len(VOCAB)

    run(source, cache, body)


def test_names_and_inodes_that_are_not_there(source: MemorySource, cache: PieceCache) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        config = inode_of(fs, "config.json")
        unknown = 10_000
        assert failed_with(fs.lookup, ROOT_INODE, b"missing.bin") == errno.ENOENT
        assert failed_with(fs.lookup, config, b"x") == errno.ENOTDIR
        assert failed_with(fs.getattr, unknown) == errno.ESTALE
        assert failed_with(fs.lookup, unknown, b"config.json") == errno.ESTALE
        assert failed_with(fs.open, unknown, os.O_RDONLY) == errno.ESTALE
        assert failed_with(fs.opendir, unknown) == errno.ESTALE

    run(source, cache, body)


# -- directories -------------------------------------------------------------------------------


def test_a_listing_is_sorted_and_resumes_where_the_kernel_asks(
    source: MemorySource, cache: PieceCache
) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        fh = fs.opendir(ROOT_INODE)
        entries = [(name, attr.ino, next_id) for name, attr, next_id in fs.entries(fh, 0)]
        names = [name for name, _, _ in entries]
        assert names == [b"config.json", b"model.safetensors", b"tokenizer"]
        assert [inode_of(fs, name.decode()) for name in names] == [e[1] for e in entries]
        assert [name for name, _, _ in fs.entries(fh, entries[0][2])] == names[1:]
        assert list(fs.entries(fh, len(names))) == []

    run(source, cache, body)


def test_readdir_stops_when_the_reply_is_full_and_goes_on_from_there(
    source: MemorySource, cache: PieceCache
) -> None:
    room = 2 * protocol.DIRENT.size + 2 * 24  # two entries of names up to 24 bytes a reply

    async def body(fs: ReadOnlyTreeFS) -> None:
        handle = fs.opendir(ROOT_INODE)
        listed: list[tuple[bytes, int]] = []
        replies = []
        while True:  # as the kernel asks: from the offset of the last entry it got
            reply = protocol.dirents(fs.entries(handle, listed[-1][1] if listed else 0), room)
            replies.append(reply)
            if not reply:
                break
            listed += parse_dirents(reply)
        assert [name for name, _ in listed] == [b"config.json", b"model.safetensors", b"tokenizer"]
        assert [len(parse_dirents(reply)) for reply in replies] == [2, 1, 0]

    run(source, cache, body)


def parse_dirents(reply: bytes) -> list[tuple[bytes, int]]:
    """(name, offset) of each ``fuse_dirent`` in a READDIR reply, as the kernel reads it."""
    entries = []
    position = 0
    while position < len(reply):
        inode, offset, length, kind = protocol.DIRENT.unpack_from(reply, position)
        start = position + protocol.DIRENT.size
        assert inode and kind in (stat.S_IFREG >> 12, stat.S_IFDIR >> 12)
        entries.append((reply[start : start + length], offset))
        position += (protocol.DIRENT.size + length + 7) & ~7
    return entries


def test_what_is_not_a_directory_or_not_a_file(source: MemorySource, cache: PieceCache) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        config = inode_of(fs, "config.json")
        assert failed_with(fs.opendir, config) == errno.ENOTDIR
        assert failed_with(fs.open, ROOT_INODE, os.O_RDONLY) == errno.EISDIR
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            assert failed_with(fs.open, config, flags) == errno.EROFS
        assert fs.access(config, os.R_OK)
        assert not fs.access(config, os.W_OK)
        assert failed_with(fs.getxattr, config, b"user.x") == errno.ENODATA
        assert fs.listxattr(config) == []
        assert await fuse_errno(fs.read(99, 0, 10)) == errno.EBADF

    run(source, cache, body)


def test_statfs_counts_the_model(source: MemorySource, cache: PieceCache) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        stats = fs.statfs()
        total = sum(map(len, FILES.values()))
        assert stats.blocks == (total + 4095) // 4096 and stats.block_size == 4096
        assert stats.files == len(FILES)

    run(source, cache, body)


# -- reads -------------------------------------------------------------------------------------


def test_files_read_whole_through_the_fetcher(source: MemorySource, cache: PieceCache) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        for path, data in FILES.items():
            assert await read_file(fs, path, chunk=PIECE // 3) == data

    run(source, cache, body)
    assert cache.is_verified(digest_of(WEIGHTS))


def test_reads_across_pieces_at_and_past_the_end(source: MemorySource, cache: PieceCache) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        handle, _ = fs.open(inode_of(fs, "model.safetensors"), os.O_RDONLY)
        span = (PIECE - 10, 2 * PIECE + 20)
        assert await fs.read(handle, span[0], span[1]) == WEIGHTS[span[0] : sum(span)]
        tail = await fs.read(handle, len(WEIGHTS) - 5, 4096)
        assert tail == WEIGHTS[-5:]  # cut at the end of the file, not short before it
        assert await fs.read(handle, len(WEIGHTS), 4096) == b""
        fs.release(handle)
        assert await fuse_errno(fs.read(handle, 0, 10)) == errno.EBADF

    run(source, cache, body)


def test_a_file_is_fetched_once_by_readers_at_once_and_kept(
    source: MemorySource, cache: PieceCache
) -> None:
    weights = digest_of(WEIGHTS)

    async def body(fs: ReadOnlyTreeFS) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(read_file, fs, "model.safetensors")
        assert await read_file(fs, "model.safetensors") == WEIGHTS

    run(source, cache, body)
    # Without a piece index the blob is fetched whole and checked before its first byte is
    # served: one run of reads of it, never repeated, and no other file's blob touched.
    fetched = [read for read in source.reads if read[0] == weights]
    assert sum(length for _, _, length in fetched) == len(WEIGHTS)
    assert not any(read[0] == digest_of(VOCAB) for read in source.reads)


# -- errors and their errnos -------------------------------------------------------------------


def altered(source: MemorySource, digest: str) -> None:
    data = bytearray(source.blobs[digest])
    data[PIECE + 1] ^= 1
    source.blobs[digest] = bytes(data)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (altered, errno.EIO),
        (lambda source, digest: source.blobs.pop(digest), errno.ESTALE),
        (
            lambda source, digest: source.failures.update({digest: AuthError("denied")}),
            errno.EACCES,
        ),
        (
            lambda source, digest: source.failures.update(
                {digest: RegistryUnavailableError("down")}
            ),
            errno.EIO,
        ),
    ],
    ids=["altered", "gone", "refused", "down"],
)
def test_a_failed_read_gives_its_errors_errno_and_the_next_read_recovers(
    source: MemorySource,
    cache: PieceCache,
    fault: Callable[[MemorySource, str], object],
    expected: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    digest = digest_of(WEIGHTS)

    async def body(fs: ReadOnlyTreeFS) -> None:
        assert await read_file(fs, "config.json") == CONFIG  # the filesystem is fine
        good = dict(source.blobs)
        fault(source, digest)
        handle, _ = fs.open(inode_of(fs, "model.safetensors"), os.O_RDONLY)
        assert await fuse_errno(fs.read(handle, 0, 4096)) == expected
        source.blobs, source.failures = good, {}
        assert await fs.read(handle, 0, 4096) == WEIGHTS[:4096]

    run(source, cache, body)
    # Reported in one line, even when pieces fetched at once failed together.
    failed = [r for r in caplog.records if r.getMessage().startswith("read model.safetensors")]
    assert len(failed) == 1 and failed[0].exc_info is None, caplog.text


class BrokenFile:
    """A reader that fails (a bug) or comes back short: the errors the tree cannot name."""

    keep_cache = True

    def __init__(self, node: FileNode, error: Exception | None) -> None:
        self.node = node
        self._error = error

    async def read(self, offset: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._error is not None:
            raise self._error
        return b"x" * (size - 1)


@pytest.mark.parametrize(
    "error",
    [DataNotLocatedError("a bug"), KeyError("another"), None],
    ids=["internal", "unexpected", "short"],
)
def test_a_bug_or_a_short_read_is_eio_and_logged(
    source: MemorySource,
    cache: PieceCache,
    error: Exception | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with filesystem(source, cache) as real:

            def broken(node: FileNode) -> OpenFile:
                return BrokenFile(node, error)

            fs = ReadOnlyTreeFS(real.tree, broken)
            handle, _ = fs.open(inode_of(fs, "config.json"), os.O_RDONLY)
            assert await fuse_errno(fs.read(handle, 0, 10)) == errno.EIO

    trio.run(main)
    assert "config.json" in caplog.text
    assert (error is not None) == ("Traceback" in caplog.text)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ModelfsError("any"), errno.EIO),
        (IntegrityError("digest"), errno.EIO),
        (PieceAlteredError("piece"), errno.EIO),
        (CacheError("disk"), errno.EIO),
        (LayoutError("layout"), errno.EIO),  # a class outside errors.py: its base decides
        (RegistryUnavailableError("down"), errno.EIO),
        (AuthError("denied"), errno.EACCES),
        (NotFoundError("gone"), errno.ESTALE),
        (DataNotLocatedError("bug"), errno.EIO),
        (BadRequest("body"), errno.EIO),
        (ValueError("not ours"), errno.EIO),
    ],
)
def test_errno_of_every_kind_of_error(error: Exception, expected: int) -> None:
    assert errno_of(error) == expected


def test_the_errors_once_outside_the_tree_are_in_it() -> None:
    assert issubclass(DataNotLocatedError, ModelfsError)
    assert issubclass(BadRequest, ModelfsError)


# -- the in-memory source itself ---------------------------------------------------------------


def test_the_memory_source_serves_what_a_registry_would() -> None:
    source = model_source(FILES, source=MemoryRunSource)
    assert isinstance(source, PieceRuns) and not isinstance(model_source(FILES), PieceRuns)
    weights = digest_of(WEIGHTS)

    async def main() -> None:
        tagged = await source.get_manifest("latest")
        assert await source.get_manifest(tagged.digest) == tagged
        assert await source.get_blob(digest_of(CONFIG), 1 << 20) == CONFIG
        with pytest.raises(ModelfsError, match="more than"):
            await source.get_blob(weights, 100)
        assert await source.read_range(weights, len(WEIGHTS) - 3, 10) == WEIGHTS[-3:]
        async with source.stream_blob(weights) as chunks:
            assert b"".join([chunk async for chunk in chunks]) == WEIGHTS
        landed: dict[int, bytes] = {}

        async def deliver(place: int, data: BlobBytes) -> None:
            landed[place] = bytes(data)

        await source.read_pieces(weights, PIECE, [PIECE, 7], deliver)
        assert landed == {0: WEIGHTS[PIECE : 2 * PIECE], 1: WEIGHTS[2 * PIECE : 2 * PIECE + 7]}
        altered(source, weights)
        with pytest.raises(IntegrityError):
            await source.get_blob(weights, 1 << 30)
        for missing in (source.get_manifest("v2"), source.read_range("sha256:" + "0" * 64, 0, 1)):
            with pytest.raises(NotFoundError):
                await missing

    trio.run(main)

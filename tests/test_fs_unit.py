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

import pyfuse3
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
from modelfs.fs.fuse import OpenFile, ReadOnlyTreeFS
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
CTX = pyfuse3.RequestContext()  # the caller of a request: no operation here looks at it


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
        yield ReadOnlyTreeFS(model.tree, prefetcher.open, lambda: None)


def run(
    source: MemorySource, cache: PieceCache, body: Callable[[ReadOnlyTreeFS], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with filesystem(source, cache) as fs:
            await body(fs)

    trio.run(main)


async def inode_of(fs: ReadOnlyTreeFS, path: str) -> int:
    inode = ROOT_INODE
    for name in path.split("/"):
        inode = (await fs.lookup(inode, name.encode(), CTX)).st_ino
    return inode


async def read_file(fs: ReadOnlyTreeFS, path: str, chunk: int = 128 << 10) -> bytes:
    """The file's bytes as the kernel asks for them: open, reads of ``chunk`` to EOF, release."""
    info = await fs.open(await inode_of(fs, path), os.O_RDONLY, CTX)
    data = bytearray()
    try:
        while part := await fs.read(info.fh, len(data), chunk):
            data += part
    finally:
        await fs.release(info.fh)
    return bytes(data)


async def fuse_errno(request: Awaitable[object]) -> int:
    """The errno the request failed with (it must fail)."""
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await request
    return raised.value.errno


# -- names and attributes ----------------------------------------------------------------------


def test_lookup_and_getattr_describe_files_and_directories(
    source: MemorySource, cache: PieceCache
) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        weights = await fs.lookup(ROOT_INODE, b"model.safetensors", CTX)
        assert stat.S_ISREG(weights.st_mode) and weights.st_mode & 0o777 == 0o444
        assert weights.st_size == len(WEIGHTS) and weights.st_nlink == 1
        assert weights.st_blocks == (len(WEIGHTS) + 511) // 512
        assert (await fs.getattr(weights.st_ino, CTX)).st_size == len(WEIGHTS)
        tokenizer = await fs.lookup(ROOT_INODE, b"tokenizer", CTX)
        assert stat.S_ISDIR(tokenizer.st_mode) and tokenizer.st_mode & 0o777 == 0o555
        root = await fs.getattr(ROOT_INODE, CTX)
        assert root.st_nlink == 3  # ".", its entry in its parent, "tokenizer/.."
        assert (await fs.lookup(ROOT_INODE, b".", CTX)).st_ino == ROOT_INODE
        assert (await fs.lookup(tokenizer.st_ino, b"vocab.txt", CTX)).st_size == len(VOCAB)

    run(source, cache, body)


def test_names_and_inodes_that_are_not_there(source: MemorySource, cache: PieceCache) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        config = await inode_of(fs, "config.json")
        unknown = 10_000
        assert await fuse_errno(fs.lookup(ROOT_INODE, b"missing.bin", CTX)) == errno.ENOENT
        assert await fuse_errno(fs.lookup(config, b"x", CTX)) == errno.ENOTDIR
        for request in (
            fs.getattr(unknown, CTX),
            fs.lookup(unknown, b"config.json", CTX),
            fs.open(unknown, os.O_RDONLY, CTX),
            fs.opendir(unknown, CTX),
        ):
            assert await fuse_errno(request) == errno.ESTALE

    run(source, cache, body)


# -- directories -------------------------------------------------------------------------------


def test_a_listing_is_sorted_and_resumes_where_the_kernel_asks(
    source: MemorySource, cache: PieceCache
) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        fh = await fs.opendir(ROOT_INODE, CTX)
        entries = [(name, attr.st_ino, next_id) for name, attr, next_id in fs.entries(fh, 0)]
        names = [name for name, _, _ in entries]
        assert names == [b"config.json", b"model.safetensors", b"tokenizer"]
        assert [await inode_of(fs, name.decode()) for name in names] == [e[1] for e in entries]
        assert [name for name, _, _ in fs.entries(fh, entries[0][2])] == names[1:]
        assert list(fs.entries(fh, len(names))) == []

    run(source, cache, body)


def test_readdir_stops_when_the_reply_is_full_and_goes_on_from_there(
    source: MemorySource, cache: PieceCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed: list[tuple[bytes, int]] = []
    room = 0

    def reply(token: pyfuse3.ReaddirToken, name: bytes, attr: object, next_id: int) -> bool:
        """The kernel's reply buffer in pyfuse3's place: ``room`` entries a request."""
        nonlocal room
        if room == 0:
            return False
        room -= 1
        listed.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def body(fs: ReadOnlyTreeFS) -> None:
        nonlocal room
        fh = await fs.opendir(ROOT_INODE, CTX)
        requests = 0
        while room != 2:  # until a request adds nothing: the end of the listing
            room = 2
            await fs.readdir(fh, listed[-1][1] if listed else 0, pyfuse3.ReaddirToken())
            requests += 1
        assert [name for name, _ in listed] == [b"config.json", b"model.safetensors", b"tokenizer"]
        assert requests == 3  # two entries, one, none

    run(source, cache, body)


def test_what_is_not_a_directory_or_not_a_file(source: MemorySource, cache: PieceCache) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        config = await inode_of(fs, "config.json")
        assert await fuse_errno(fs.opendir(config, CTX)) == errno.ENOTDIR
        assert await fuse_errno(fs.open(ROOT_INODE, os.O_RDONLY, CTX)) == errno.EISDIR
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            assert await fuse_errno(fs.open(config, flags, CTX)) == errno.EROFS
        assert await fs.access(config, os.R_OK, CTX)
        assert not await fs.access(config, os.W_OK, CTX)
        assert await fuse_errno(fs.getxattr(config, b"user.x", CTX)) == errno.ENODATA
        assert await fs.listxattr(config, CTX) == []
        assert await fuse_errno(fs.read(pyfuse3.FileHandleT(99), 0, 10)) == errno.EBADF

    run(source, cache, body)


def test_statfs_counts_the_model(source: MemorySource, cache: PieceCache) -> None:
    async def body(fs: ReadOnlyTreeFS) -> None:
        stats = await fs.statfs(CTX)
        total = sum(map(len, FILES.values()))
        assert stats.f_blocks == (total + 4095) // 4096 and stats.f_bsize == 4096
        assert stats.f_files == len(FILES) and stats.f_bfree == stats.f_ffree == 0

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
        info = await fs.open(await inode_of(fs, "model.safetensors"), os.O_RDONLY, CTX)
        span = (PIECE - 10, 2 * PIECE + 20)
        assert await fs.read(info.fh, span[0], span[1]) == WEIGHTS[span[0] : sum(span)]
        tail = await fs.read(info.fh, len(WEIGHTS) - 5, 4096)
        assert tail == WEIGHTS[-5:]  # cut at the end of the file, not short before it
        assert await fs.read(info.fh, len(WEIGHTS), 4096) == b""
        await fs.release(info.fh)
        assert await fuse_errno(fs.read(info.fh, 0, 10)) == errno.EBADF

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
        info = await fs.open(await inode_of(fs, "model.safetensors"), os.O_RDONLY, CTX)
        assert await fuse_errno(fs.read(info.fh, 0, 4096)) == expected
        source.blobs, source.failures = good, {}
        assert await fs.read(info.fh, 0, 4096) == WEIGHTS[:4096]

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

            fs = ReadOnlyTreeFS(real.tree, broken, lambda: None)
            info = await fs.open(await inode_of(fs, "config.json"), os.O_RDONLY, CTX)
            assert await fuse_errno(fs.read(info.fh, 0, 10)) == errno.EIO

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

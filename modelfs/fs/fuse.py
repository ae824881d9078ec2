"""The FUSE operations: an immutable tree served read-only, file bytes read through a reader.

The tree never changes under a mount (the manifest is pinned by digest), so the kernel may keep
entries, attributes and page cache for as long as it likes: long timeouts and ``keep_cache``.
A failure to get bytes fails that read only, with the errno ``errors.errno_of`` gives (EIO
unless the registry refused or lost the blob), logged with the file it concerns; the filesystem
itself stays up. An inode the tree does not have is ESTALE: the kernel holds it from elsewhere.

Nothing here needs the kernel: the operations can be driven directly (``tests/test_fs_unit.py``);
``modelfs.fs.session`` speaks to the kernel for them.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Protocol

from modelfs.artifact.tree import DirNode, FileNode, Tree
from modelfs.errors import InternalError, ModelfsError, errno_of
from modelfs.fs.protocol import Attributes, FsStats, FuseError

log = logging.getLogger(__name__)

# Nothing in the tree ever changes: let the kernel cache names and attributes for a day.
CACHE_TIMEOUT = 24 * 3600.0


class OpenFile(Protocol):
    """What an open file handle reads through (one per open, so it can follow the reader)."""

    node: FileNode
    # Whether the kernel may keep the file's pages across opens: not while bytes it was given
    # may still fail their check (--serve-unverified), so that opening it again drops them.
    keep_cache: bool

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """``size`` bytes from ``offset``; any contiguous buffer."""
        ...


class ReadOnlyTreeFS:
    """Serves ``tree``; each open gets its reader from ``open_file(file)``.

    The operations are what ``modelfs.fs.session.FuseSession`` asks; all but ``read`` answer at
    once. A failure is a ``FuseError`` carrying the errno the kernel is answered with.
    """

    def __init__(self, tree: Tree, open_file: Callable[[FileNode], OpenFile]) -> None:
        self.tree = tree
        self._open_file = open_file
        self._handles: dict[int, OpenFile] = {}
        self._next_handle = itertools.count(1)
        self._uid = os.getuid()
        self._gid = os.getgid()

    def getattr(self, inode: int) -> Attributes:
        node = self._node(inode)
        if isinstance(node, FileNode):
            mode, nlink, size = stat.S_IFREG | node.mode, 1, node.size
        else:
            mode, size = stat.S_IFDIR | node.mode, 0
            nlink = 2 + sum(
                isinstance(self.tree.node(child), DirNode) for _, child in node.children.items()
            )
        return Attributes(
            ino=inode,
            mode=mode,
            nlink=nlink,
            size=size,
            uid=self._uid,
            gid=self._gid,
            mtime_ns=node.mtime_ns,
            timeout=CACHE_TIMEOUT,
            blksize=1 << 20,
        )

    def lookup(self, parent: int, name: bytes) -> Attributes:
        if not isinstance(self._node(parent), DirNode):
            raise FuseError(errno.ENOTDIR)
        if name == b".":
            return self.getattr(parent)
        inode = self.tree.lookup(parent, os.fsdecode(name))
        if inode is None:
            raise FuseError(errno.ENOENT)
        return self.getattr(inode)

    def opendir(self, inode: int) -> int:
        if not isinstance(self._node(inode), DirNode):
            raise FuseError(errno.ENOTDIR)
        return inode

    def entries(self, handle: int, start: int) -> Iterator[tuple[bytes, Attributes, int]]:
        """(name, attributes, position to resume after it) of a directory's entries from
        ``start``, made as the reply takes them: the position is the one in the sorted child
        list, so a listing can resume anywhere."""
        children = self.tree.children(handle)
        for position in range(start, len(children)):
            name, inode = children[position]
            yield os.fsencode(name), self.getattr(inode), position + 1

    def open(self, inode: int, flags: int) -> tuple[int, bool]:
        """A handle for reading ``inode``, and whether the kernel may keep its pages."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseError(errno.EROFS)
        node = self._node(inode)
        if not isinstance(node, FileNode):
            raise FuseError(errno.EISDIR)
        handle = next(self._next_handle)
        self._handles[handle] = self._open_file(node)
        return handle, self._handles[handle].keep_cache

    def release(self, handle: int) -> None:
        self._handles.pop(handle, None)

    async def read(self, handle: int, offset: int, size: int) -> bytes | memoryview:
        try:
            file = self._handles[handle]
        except KeyError:
            raise FuseError(errno.EBADF) from None
        node = file.node
        if offset >= node.size:
            return b""
        size = min(size, node.size - offset)
        try:
            data = await file.read(offset, size)
        except Exception as error:
            _log_failed_read(node, offset, size, error)
            raise FuseError(errno_of(error)) from None
        if len(data) != size:  # never a short read before EOF
            log.error("read %s [%d, +%d): got %d bytes", node.path, offset, size, len(data))
            raise FuseError(errno.EIO)
        return data

    def access(self, inode: int, mode: int) -> bool:
        self._node(inode)
        return not mode & os.W_OK

    def statfs(self) -> FsStats:
        return FsStats(blocks=(self.tree.total_size + 4095) // 4096, files=len(self.tree.files()))

    def getxattr(self, inode: int, name: bytes) -> bytes:
        self._node(inode)
        raise FuseError(errno.ENODATA)

    def listxattr(self, inode: int) -> list[bytes]:
        self._node(inode)
        return []

    def _node(self, inode: int) -> FileNode | DirNode:
        try:
            return self.tree.node(inode)
        except KeyError:
            # The kernel only names inodes it was given: one from another tree (a stale handle).
            raise FuseError(errno.ESTALE) from None


def _log_failed_read(node: FileNode, offset: int, size: int, error: Exception) -> None:
    """The error modelfs reports, on one line; a bug's traceback."""
    if isinstance(error, ModelfsError) and not isinstance(error, InternalError):
        log.error("read %s [%d, +%d): %s", node.path, offset, size, error)
    else:
        log.error("read %s [%d, +%d) failed unexpectedly", node.path, offset, size, exc_info=error)

"""The FUSE operations: an immutable tree served read-only, file bytes read through a reader.

The tree never changes under a mount (the manifest is pinned by digest), so the kernel may keep
entries, attributes and page cache for as long as it likes: long timeouts and ``keep_cache``.
Any failure to get bytes is EIO for that read only, logged with the file it concerns; the
filesystem itself stays up.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable
from typing import Protocol

from modelfs.errors import ModelfsError
from modelfs.fs.session import Attributes, FsStats, FuseError
from modelfs.fs.tree import DirNode, FileNode, Tree

log = logging.getLogger(__name__)

# Nothing in the tree ever changes: let the kernel cache names and attributes for a day.
CACHE_TIMEOUT = 24 * 3600.0


class OpenFile(Protocol):
    """What an open file handle reads through (one per open, so it can follow the reader)."""

    node: FileNode

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """``size`` bytes from ``offset``; any contiguous buffer."""
        ...


class ReadOnlyTreeFS:
    """Serves ``tree`` (``modelfs.fs.session.Operations``); each open gets its reader from
    ``open_file(file)``.

    ``on_init`` runs when the kernel's INIT arrives; the INIT reply is sent right after it
    returns, so anything that must follow the reply (bdi readahead) waits for it.
    """

    def __init__(
        self,
        tree: Tree,
        open_file: Callable[[FileNode], OpenFile],
        on_init: Callable[[], None],
    ) -> None:
        self.tree = tree
        self._open_file = open_file
        self._on_init = on_init
        self._handles: dict[int, OpenFile] = {}
        self._next_handle = itertools.count(1)
        self._uid = os.getuid()
        self._gid = os.getgid()

    def init(self) -> None:
        self._on_init()

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
            inode, mode, size, nlink, self._uid, self._gid, node.mtime_ns, CACHE_TIMEOUT
        )

    def lookup(self, parent: int, name: str) -> Attributes:
        if name == ".":
            return self.getattr(parent)
        inode = self.tree.lookup(parent, name)
        if inode is None:
            raise FuseError(errno.ENOENT)
        return self.getattr(inode)

    def opendir(self, inode: int) -> None:
        if not isinstance(self._node(inode), DirNode):
            raise FuseError(errno.ENOTDIR)

    def readdir(self, inode: int, start: int) -> list[tuple[str, Attributes]]:
        # ``start`` is the position in the sorted child list, so a listing can resume anywhere.
        return [(name, self.getattr(child)) for name, child in self.tree.children(inode)[start:]]

    def open(self, inode: int, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseError(errno.EROFS)
        node = self._node(inode)
        if not isinstance(node, FileNode):
            raise FuseError(errno.EISDIR)
        handle = next(self._next_handle)
        self._handles[handle] = self._open_file(node)
        return handle

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
        except ModelfsError as error:
            log.error("read %s [%d, +%d): %s", node.path, offset, size, error)
            raise FuseError(errno.EIO) from None
        except Exception:
            log.exception("read %s [%d, +%d) failed unexpectedly", node.path, offset, size)
            raise FuseError(errno.EIO) from None
        if len(data) != size:  # never a short read before EOF
            log.error("read %s [%d, +%d): got %d bytes", node.path, offset, size, len(data))
            raise FuseError(errno.EIO)
        return data

    def access(self, inode: int, mask: int) -> None:
        self._node(inode)
        if mask & os.W_OK:
            raise FuseError(errno.EACCES)

    def statfs(self) -> FsStats:
        return FsStats(blocks=(self.tree.total_size + 4095) // 4096, files=len(self.tree.files()))

    def _node(self, inode: int) -> FileNode | DirNode:
        try:
            return self.tree.node(inode)
        except KeyError:
            raise FuseError(errno.ENOENT) from None

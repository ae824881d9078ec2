"""The FUSE operations: an immutable tree served read-only, file bytes read through a reader.

The tree never changes under a mount (the manifest is pinned by digest), so the kernel may keep
entries, attributes and page cache for as long as it likes: long timeouts and ``keep_cache``.
A failure to get bytes fails that read only, with the errno ``errors.errno_of`` gives (EIO
unless the registry refused or lost the blob), logged with the file it concerns; the filesystem
itself stays up. An inode the tree does not have is ESTALE: the kernel holds it from elsewhere.

Nothing here needs the kernel but ``readdir``'s reply: the operations can be driven directly
(``tests/test_fs_unit.py``), with the listing itself in ``entries``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Protocol

import pyfuse3

from modelfs.artifact.tree import DirNode, FileNode, Tree
from modelfs.errors import InternalError, ModelfsError, errno_of

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


class ReadOnlyTreeFS(pyfuse3.Operations):
    """Serves ``tree``; each open gets its reader from ``open_file(file)``.

    ``on_init`` runs when the kernel's INIT arrives; the INIT reply is sent right after it
    returns, so anything that must follow the reply (bdi readahead) waits for it.
    """

    def __init__(
        self,
        tree: Tree,
        open_file: Callable[[FileNode], OpenFile],
        on_init: Callable[[], None],
    ) -> None:
        super().__init__()
        self.tree = tree
        self._open_file = open_file
        self._on_init = on_init
        self._handles: dict[int, OpenFile] = {}
        self._next_handle = itertools.count(1)
        self._uid = os.getuid()
        self._gid = os.getgid()

    def init(self) -> None:
        self._on_init()

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = CACHE_TIMEOUT
        attr.attr_timeout = CACHE_TIMEOUT
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_blksize = 1 << 20
        if isinstance(node, FileNode):
            attr.st_mode = stat.S_IFREG | node.mode
            attr.st_nlink = 1
            attr.st_size = node.size
        else:
            attr.st_mode = stat.S_IFDIR | node.mode
            attr.st_nlink = 2 + sum(
                isinstance(self.tree.node(child), DirNode) for _, child in node.children.items()
            )
            attr.st_size = 0
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if not isinstance(self._node(parent_inode), DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attributes(parent_inode)
        inode = self.tree.lookup(parent_inode, os.fsdecode(name))
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not isinstance(self._node(inode), DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        for name, attr, next_id in self.entries(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, attr, next_id):
                return  # the kernel's buffer is full: it asks again from ``next_id``

    def entries(
        self, fh: pyfuse3.FileHandleT, start_id: int
    ) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """(name, attributes, id to resume after it) of a directory's entries from ``start_id``,
        made as the reply takes them: the id is the position in the sorted child list, so a
        listing can resume anywhere."""
        children = self.tree.children(fh)
        for position in range(start_id, len(children)):
            name, inode = children[position]
            yield os.fsencode(name), self._attributes(inode), position + 1

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(inode)
        if not isinstance(node, FileNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        handle = next(self._next_handle)
        self._handles[handle] = self._open_file(node)
        keep_cache = self._handles[handle].keep_cache
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(handle), keep_cache=keep_cache)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._handles.pop(fh, None)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        try:
            file = self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        node = file.node
        if off >= node.size:
            return b""
        size = min(size, node.size - off)
        try:
            data = await file.read(off, size)
        except Exception as error:
            _log_failed_read(node, off, size, error)
            raise pyfuse3.FUSEError(errno_of(error)) from None
        if len(data) != size:  # never a short read before EOF
            log.error("read %s [%d, +%d): got %d bytes", node.path, off, size, len(data))
            raise pyfuse3.FUSEError(errno.EIO)
        return data  # type: ignore[return-value]  # any contiguous buffer is accepted

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._node(inode)
        return not mode & os.W_OK

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = (self.tree.total_size + 4095) // 4096
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = len(self.tree.files())
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._node(inode)
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._node(inode)
        return []

    def _node(self, inode: int) -> FileNode | DirNode:
        try:
            return self.tree.node(inode)
        except KeyError:
            # The kernel only names inodes it was given: one from another tree (a stale handle).
            raise pyfuse3.FUSEError(errno.ESTALE) from None


def _log_failed_read(node: FileNode, offset: int, size: int, error: Exception) -> None:
    """The error modelfs reports, on one line; a bug's traceback."""
    if isinstance(error, ModelfsError) and not isinstance(error, InternalError):
        log.error("read %s [%d, +%d): %s", node.path, offset, size, error)
    else:
        log.error("read %s [%d, +%d) failed unexpectedly", node.path, offset, size, exc_info=error)

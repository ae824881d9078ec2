"""The reference filesystems: a trivial pyfuse3 filesystem serving a directory's files.

``python -m bench.memfs [--from-disk] SOURCE_DIR MOUNTPOINT`` mounts the files of SOURCE_DIR
(flat) read-only with ``keep_cache`` like modelfs, prints ``ready`` and serves until unmounted.
By default every file is read into memory first and reads return memoryview slices: no copy on
this side, the ceiling of FUSE itself. With ``--from-disk`` each read is a ``pread`` of the
source file in a worker thread (the kernel's readahead on that file, reads in parallel): FUSE
at its simplest over bytes on this disk, as a warm modelfs cache's are (a reference, not a
ceiling: modelfs's direct reads of 4 MiB slots can beat it). The
benchmark driver sets the same ``read_ahead_kb`` on this mount as modelfs has on its own.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio


class TrivialFS(pyfuse3.Operations):
    """The files of ``source``, read from memory or (``from_disk``) from their files."""

    def __init__(self, source: Path, from_disk: bool) -> None:
        super().__init__()
        paths = sorted(path for path in source.iterdir() if path.is_file())
        self.names = [path.name for path in paths]
        # Inodes 2.. in name order; 1 is the root directory.
        self.sizes = [path.stat().st_size for path in paths]
        self.fds = [os.open(path, os.O_RDONLY) for path in paths] if from_disk else []
        self.data = [] if from_disk else [memoryview(path.read_bytes()) for path in paths]

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 3600.0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o555, 2, 0
        elif 2 <= inode < 2 + len(self.sizes):
            attr.st_mode, attr.st_nlink = stat.S_IFREG | 0o444, 1
            attr.st_size = self.sizes[inode - 2]
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        decoded = os.fsdecode(name)
        if parent_inode != pyfuse3.ROOT_INODE or decoded not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(2 + self.names.index(decoded))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        return pyfuse3.FileHandleT(inode)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        for position in range(start_id, len(self.names)):
            name = os.fsencode(self.names[position])
            if not pyfuse3.readdir_reply(token, name, self._attributes(2 + position), position + 1):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if self.fds:
            return await trio.to_thread.run_sync(os.pread, self.fds[fh - 2], size, off)
        return self.data[fh - 2][off : off + size]  # type: ignore[return-value]  # any buffer


def main() -> None:
    from_disk = sys.argv[1] == "--from-disk"
    source, mountpoint = Path(sys.argv[1 + from_disk]), sys.argv[2 + from_disk]
    filesystem = TrivialFS(source, from_disk)
    pyfuse3.init(filesystem, mountpoint, {"ro", "fsname=bench-memfs", "subtype=memfs"})
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)  # the driver unmounts with fusermount3


if __name__ == "__main__":
    main()

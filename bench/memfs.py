"""The FUSE ceiling: a trivial pyfuse3 filesystem serving a directory's files from memory.

``python -m bench.memfs SOURCE_DIR MOUNTPOINT`` reads every file of SOURCE_DIR (flat) into
memory, mounts them read-only with ``keep_cache`` like modelfs, prints ``ready`` and serves until
unmounted. Reads return memoryview slices: no copy on this side. The benchmark driver sets the
same ``read_ahead_kb`` on this mount as modelfs has on its own.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio


class MemoryFS(pyfuse3.Operations):
    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__()
        self.names = sorted(files)
        # Inodes 2.. in name order; 1 is the root directory.
        self.data = [memoryview(files[name]) for name in self.names]

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 3600.0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o555, 2, 0
        elif 2 <= inode < 2 + len(self.data):
            attr.st_mode, attr.st_nlink = stat.S_IFREG | 0o444, 1
            attr.st_size = len(self.data[inode - 2])
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
        return self.data[fh - 2][off : off + size]  # type: ignore[return-value]  # any buffer


def main() -> None:
    source, mountpoint = Path(sys.argv[1]), sys.argv[2]
    files = {path.name: path.read_bytes() for path in source.iterdir() if path.is_file()}
    pyfuse3.init(MemoryFS(files), mountpoint, {"ro", "fsname=bench-memfs", "subtype=memfs"})
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)  # the driver unmounts with fusermount3


if __name__ == "__main__":
    main()

"""The snapshot directories under the snapshotter's root, and what they hold on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from modelfs.snapshot.models import MARKER, MARKER_MAX

SNAPSHOTS = "snapshots"


class Layout:
    """``ROOT/metadata.db`` and ``ROOT/snapshots/ID/{fs,work}``, as containerd's overlay has it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / SNAPSHOTS

    @property
    def database(self) -> Path:
        return self.root / "metadata.db"

    def fs(self, snapshot_id: int) -> Path:
        return self.snapshots / str(snapshot_id) / "fs"

    def work(self, snapshot_id: int) -> Path:
        return self.snapshots / str(snapshot_id) / "work"

    def create_root(self) -> None:
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # layers hold other images' files: root's alone

    def make(self, snapshot_id: int) -> None:
        """Fresh ``fs`` and ``work`` directories. A directory already there is the leftover of a
        Prepare whose transaction rolled back (SQLite may hand its number out again): garbage."""
        shutil.rmtree(self.snapshots / str(snapshot_id), ignore_errors=True)
        self.fs(snapshot_id).mkdir(parents=True)
        self.work(snapshot_id).mkdir()
        # A layer's top is a container's "/" (or part of it), which every user of the container
        # must traverse, whatever the umask (the unit's is 0077).
        self.fs(snapshot_id).chmod(0o755)
        self.work(snapshot_id).chmod(0o700)

    def delete(self, snapshot_id: int) -> None:
        shutil.rmtree(self.snapshots / str(snapshot_id), ignore_errors=True)

    def orphans(self, known: set[int]) -> list[Path]:
        """Directories of snapshots the metadata no longer has (a crash between a Remove's
        transaction and its deletion, or a failed Prepare)."""
        return [
            path
            for path in self.snapshots.iterdir()
            if not (path.name.isdigit() and int(path.name) in known)
        ]


def marker_in(upper: Path) -> bytes | None:
    """The marker file of a layer that holds it alone (a model image's marker layer), else
    None: a layer with anything more is an ordinary layer."""
    names = os.listdir(upper)
    if names != [MARKER]:
        return None
    path = upper / MARKER
    if not path.is_file() or path.is_symlink() or path.stat().st_size > MARKER_MAX:
        return None
    return path.read_bytes()


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under ``path``, each inode counted once, as containerd's
    ``fs.DiskUsage`` counts them."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for directory, names, files in os.walk(path):
        for name in [".", *names, *files] if directory == str(path) else [*names, *files]:
            stat = os.lstat(os.path.join(directory, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                size += stat.st_blocks * 512
    return size, len(seen)

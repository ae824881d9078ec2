"""The mounts containerd gets for a snapshot, as its overlay snapshotter makes them (pure).

A snapshot's own directory is ``fs`` (its upper dir while active) beside ``work`` (overlayfs's
work dir); committed snapshots are read-only lower dirs, the nearest parent first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Kind(Enum):
    """A snapshot's kind; the values are the names containerd's API and filters use."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def mounts_for(kind: Kind, fs: Path, work: Path, parents: Sequence[Path]) -> list[Mount]:
    """The mounts of a view or active snapshot whose lower dirs are ``parents`` (nearest first).

    No parent: its own directory, bound (read-only for a view). A view of one parent binds that
    parent read-only (a bind is cheaper than an overlay and shows the same tree); of several, an
    overlay with lower dirs only, which the kernel makes read-only. An active snapshot over
    parents is an overlay writing to its own directory.
    """
    if kind is Kind.COMMITTED:
        raise ValueError("a committed snapshot has no mounts")
    if not parents:
        return [Mount("bind", str(fs), ("ro" if kind is Kind.VIEW else "rw", "rbind"))]
    lower = "lowerdir=" + ":".join(str(parent) for parent in parents)
    if kind is Kind.VIEW:
        if len(parents) == 1:
            return [Mount("bind", str(parents[0]), ("ro", "rbind"))]
        return [Mount("overlay", "overlay", (lower,))]
    return [Mount("overlay", "overlay", (f"workdir={work}", f"upperdir={fs}", lower))]

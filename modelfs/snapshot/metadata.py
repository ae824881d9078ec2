"""The snapshots' state machine, kept in SQLite under the snapshotter's root.

Each operation runs in one transaction, so a crash leaves the store as before or after it, never
half-way. A snapshot has a number, fixed at Prepare or View, that names its directory; Commit
renames an active snapshot (key) to a committed one (name) and keeps the number, so the layer
containerd just unpacked stays where it is. The errors carry the gRPC status containerd expects
(``errdefs``: NotFound, AlreadyExists, FailedPrecondition, InvalidArgument).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from modelfs.errors import ModelfsError
from modelfs.snapshot.mounts import Kind

log = logging.getLogger(__name__)


class Code(Enum):
    NOT_FOUND = "not found"
    ALREADY_EXISTS = "already exists"
    FAILED_PRECONDITION = "failed precondition"
    INVALID_ARGUMENT = "invalid argument"


class SnapshotError(ModelfsError):
    """A request the state machine refuses, with the status containerd maps it to."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Snapshot:
    id: int
    name: str
    kind: Kind
    parent: str  # "" for none
    labels: Mapping[str, str]
    created_ns: int
    updated_ns: int
    size: int = 0  # committed snapshots: bytes on disk, counted at Commit
    inodes: int = 0
    model: str = ""  # a model snapshot: the model mounted in its place (host/repo@digest)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    parent TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL DEFAULT ''
)
"""
_COLUMNS = "id, name, kind, parent, labels, created_ns, updated_ns, size, inodes, model"


def _row(row: tuple[int, str, str, str, str, int, int, int, int, str]) -> Snapshot:
    id_, name, kind, parent, labels, created, updated, size, inodes, model = row
    labels_ = json.loads(labels)
    return Snapshot(id_, name, Kind(kind), parent, labels_, created, updated, size, inodes, model)


class Metadata:
    """The snapshots of one root; not thread-safe (the server calls it from its event loop)."""

    def __init__(self, path: Path) -> None:
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE of transaction().
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic change: rolled back if the block raises (its file work included, by the
        caller: see the server's Prepare)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def find(self, name: str) -> Snapshot | None:
        query = f"SELECT {_COLUMNS} FROM snapshots WHERE name = ?"
        row = self._db.execute(query, (name,)).fetchone()
        return None if row is None else _row(row)

    def get(self, name: str) -> Snapshot:
        snapshot = self.find(name)
        if snapshot is None:
            raise SnapshotError(Code.NOT_FOUND, f"snapshot {name!r} does not exist")
        return snapshot

    def all(self) -> list[Snapshot]:
        return [_row(row) for row in self._db.execute(f"SELECT {_COLUMNS} FROM snapshots")]

    def parents(self, snapshot: Snapshot) -> list[Snapshot]:
        """The committed snapshots under this one, nearest first."""
        chain = []
        while snapshot.parent:
            snapshot = self.get(snapshot.parent)
            chain.append(snapshot)
        return chain

    def create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str], model: str = ""
    ) -> Snapshot:
        """A new snapshot named ``key`` over the committed ``parent``: active, a view, or
        committed at once for a model (the snapshotter's answer to a remote layer)."""
        if not key:
            raise SnapshotError(Code.INVALID_ARGUMENT, "a snapshot needs a key")
        if self.find(key) is not None:
            raise SnapshotError(Code.ALREADY_EXISTS, f"snapshot {key!r} already exists")
        if parent and self.get(parent).kind is not Kind.COMMITTED:
            raise SnapshotError(
                Code.FAILED_PRECONDITION, f"parent {parent!r} is not a committed snapshot"
            )
        now = time.time_ns()
        self._db.execute(
            "INSERT INTO snapshots (name, kind, parent, labels, created_ns, updated_ns, model)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, kind.value, parent, json.dumps(dict(labels)), now, now, model),
        )
        return self.get(key)

    def commit(
        self,
        key: str,
        name: str,
        labels: Mapping[str, str],
        size: int,
        inodes: int,
        model: str = "",
    ) -> Snapshot:
        """The active snapshot ``key`` becomes the committed ``name``, with its usage (and the
        model that stands in for it, if its layer was a model's marker)."""
        active = self.get(key)
        if active.kind is not Kind.ACTIVE:
            raise SnapshotError(Code.FAILED_PRECONDITION, f"snapshot {key!r} is not active")
        if not name:
            raise SnapshotError(Code.INVALID_ARGUMENT, "a committed snapshot needs a name")
        if self.find(name) is not None:
            raise SnapshotError(Code.ALREADY_EXISTS, f"snapshot {name!r} already exists")
        self._db.execute(
            "UPDATE snapshots SET name = ?, kind = ?, labels = ?, updated_ns = ?, size = ?,"
            " inodes = ?, model = ? WHERE id = ?",
            (name, Kind.COMMITTED.value, json.dumps(dict(labels)), time.time_ns(), size, inodes,
             model, active.id),
        )  # fmt: skip
        return self.get(name)

    def remove(self, key: str) -> Snapshot:
        """Forget ``key``, which no snapshot may have as its parent."""
        snapshot = self.get(key)
        child = self._db.execute("SELECT name FROM snapshots WHERE parent = ?", (key,)).fetchone()
        if child is not None:
            raise SnapshotError(
                Code.FAILED_PRECONDITION, f"snapshot {key!r} has a child {child[0]!r}"
            )
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot.id,))
        return snapshot

    def model_users(self, digest: str) -> int:
        """How many snapshots stand for the model of this manifest digest (under any name)."""
        query = "SELECT COUNT(*) FROM snapshots WHERE model LIKE ?"  # a digest has no % or _
        count: int = self._db.execute(query, ("%@" + digest,)).fetchone()[0]
        return count

    def census(self) -> tuple[dict[str, int], int]:
        """Snapshots by kind, and how many models stand for some."""
        query = "SELECT kind, COUNT(*) FROM snapshots GROUP BY kind"
        kinds = {kind: count for kind, count in self._db.execute(query)}
        query = "SELECT COUNT(DISTINCT substr(model, -71)) FROM snapshots WHERE model != ''"
        models: int = self._db.execute(query).fetchone()[0]  # by digest: "sha256:" + 64 hex
        return kinds, models

    def update_labels(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Snapshot:
        """Set labels as an Update with field-mask ``paths`` asks; only labels are mutable."""
        snapshot = self.get(name)
        merged = update_labels(snapshot.labels, labels, paths)
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(merged), time.time_ns(), snapshot.id),
        )
        return self.get(name)


@dataclass(frozen=True)
class Census:
    """What a snapshotter holds, as ``modelfs status`` shows it."""

    kinds: dict[str, int]  # snapshots by kind
    models: dict[str, int]  # model (host/repo@digest) -> snapshots standing for it


def read_census(database: Path) -> Census | None:
    """The census of a snapshotter's store, read without writing (None if there is none)."""
    if not database.exists():
        return None
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            kinds = dict(db.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind"))
            query = "SELECT model, COUNT(*) FROM snapshots WHERE model != '' GROUP BY model"
            models = dict(db.execute(query))
    except sqlite3.Error as error:  # the daemon's status still shows; say why this does not
        log.warning("cannot read the snapshotter's store %s: %s", database, error)
        return None
    return Census(kinds, models)


def update_labels(
    current: Mapping[str, str], given: Mapping[str, str], paths: Sequence[str]
) -> dict[str, str]:
    """The labels after an Update: no paths or ``labels`` replace them all; ``labels.KEY`` sets
    (or, absent from ``given``, deletes) one; any other path is immutable or unknown."""
    if not paths or "labels" in paths:
        return dict(given)
    merged = dict(current)
    for path in paths:
        key = path.removeprefix("labels.")
        if key == path or not key:
            raise SnapshotError(Code.INVALID_ARGUMENT, f"cannot update field {path!r}")
        if key in given:
            merged[key] = given[key]
        else:
            merged.pop(key, None)
    return merged

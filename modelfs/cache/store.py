"""The node's piece cache: an LMDB index and a file of piece bytes, shared by every modelfs
process on the node.

The bytes are in ``pieces.data`` (``modelfs.cache.piece_file``: fixed slots, direct I/O); LMDB
holds what says which bytes are which, in named sub-databases:
- ``pieces``: ``<digest>/<index>`` -> the piece's slot, length, xxh3-64 and whether something
  vouched for its bytes (see below).
- ``free``:   slot (8 bytes, big endian) -> empty: slots to reuse, lowest first.
- ``stamps``: ``<digest>/<index>`` -> the piece's last-use stamp (8 bytes, big endian).
- ``lru``:    stamp + ``<digest>/<index>`` -> empty; iterated in order, oldest first, to evict.
- ``blobs``:  ``<digest>`` -> size, pieces present, verified flag.
- ``leases``: ``<digest>/<pid>`` -> the holder's start time, and whether the lease is whole: blobs
  a live process is reading are evicted last.
- ``reserved``: slot -> the process writing a piece into it (pid, start time) and the bytes it
  counts (see below).
- ``meta``:   small records (the stamp clock, total bytes, slots made, manifests, configs, tar
  indexes), each stored with its xxh3-64, so a flipped bit is a cache miss, never a wrong record.

A piece is *vouched* once something other than its own checksum proved its bytes: the piece index
(a digest per piece, from the registry side) or its whole blob hashing to the blob's digest. The
checksum only proves the bytes are the ones stored. ``get`` serves vouched pieces only, so a piece
stored before its blob was checked (a write-behind, a crash, another process with other flags)
is invisible to every reader on the node until it is vouched for.

The checksum is checked on every read, on the copy that is served: a write lost in a power cut, a
slot another process reused meanwhile, or disk rot all read as a miss, and the piece is fetched
again. A damaged index found while the cache is in use (LMDB reports a page of the wrong type, say)
puts the cache out of use for the process: logged once, every answer from then on is "not cached",
and a mount goes on from its sources. LMDB serialises writers across processes, so the size
accounting in ``meta`` is exact and the limit holds for the whole node. The new stamps of pieces
read are written with the next write transaction rather than making every read a write.

LMDB's write transaction is one lock for the whole node, so a piece's bytes are not written inside
one: a short transaction reserves its slot (counted against the limit, in ``reserved``), the bytes
go to the slot with no lock held, and a second one commits the record. Other processes' writers,
and the small writes of readers, wait for the index only, never for the disk. A process that
dies in between leaves a reserved slot no record points to: the next process to open the cache
frees it.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast, overload

import lmdb
import xxhash

from modelfs.cache.piece_file import PieceFile
from modelfs.errors import CacheError
from modelfs.pieces import DEFAULT_PIECE_SIZE, piece_count, piece_matches

log = logging.getLogger(__name__)

PIECES_FILE = "pieces.data"
_BLOB = struct.Struct(">QIB")  # size, pieces present, verified
_U64 = struct.Struct(">Q")
# The writer's pid and its start time (so a new process given a dead writer's pid is not taken
# for it), the bytes the slot counts.
_RESERVATION = struct.Struct("<IQQ")
_CHECKSUM_SIZE = 8  # what a piece's checksum adds to its cost against the limit
_RECORD_CHECKSUM = struct.Struct("<Q")  # a meta record's xxh3-64, before its value
_FORMAT = b"modelfs-cache-3"
# Formats before 3 kept pieces inside LMDB: such a cache is made again, empty.
_OLDER_FORMATS = (b"modelfs-cache-1", b"modelfs-cache-2")
_TOUCH_FLUSH = 256  # pending stamp updates that force a write
_LARGEST_OFFSET = 1 << 62  # a slot's offset must fit in a file offset (63 bits)
# What reading a damaged index raises: LMDB's own errors, and keys or values of the wrong size or
# bytes (struct's and decoding's errors).
_DAMAGE = (lmdb.Error, struct.error, ValueError)


@dataclass(frozen=True)
class _Piece:
    """Where a stored piece is and how to know it: its ``pieces`` record."""

    slot: int
    length: int
    checksum: int  # xxh3-64 of its bytes
    vouched: bool

    _FORMAT = struct.Struct("<QIQB")

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.slot, self.length, self.checksum, self.vouched)

    @classmethod
    def unpack(cls, record: bytes | memoryview | None) -> _Piece | None:
        """The record's piece; None for none or a damaged record (read as a miss)."""
        if record is None or len(record) != cls._FORMAT.size:
            return None
        slot, length, checksum, vouched = cls._FORMAT.unpack(record)
        return cls(slot, length, checksum, vouched == 1)


@dataclass(frozen=True)
class PutResult:
    """What storing a piece did: whether it was kept, and whether it completed its blob."""

    stored: bool
    blob_complete: bool


_NOT_STORED = PutResult(stored=False, blob_complete=False)
# A lease's value: its holder's start time (so a new process given a dead holder's pid is not
# taken for it), then ``_WHOLE`` for a blob none of whose pieces may be evicted. Versions before
# the start time wrote ``b""`` or ``_WHOLE`` alone: those holders are known by pid only.
_LEASE_STARTED = struct.Struct("<Q")
_WHOLE = b"whole"


@dataclass(frozen=True)
class PieceWrite:
    """A piece to store: ``data`` is piece ``index`` of blob ``digest`` of ``blob_size`` bytes."""

    digest: str
    index: int
    data: bytes | bytearray | memoryview
    blob_size: int
    vouched: bool = False  # the piece index checked it


W = TypeVar("W", bound=PieceWrite)


@dataclass(frozen=True)
class BlobState:
    """What the cache holds of one blob."""

    digest: str
    size: int
    present: int  # pieces
    verified: bool


@dataclass(frozen=True)
class CacheStats:
    size: int
    limit: int
    pieces: int
    blobs: int
    evicted_pieces: int  # by every process on the node since the cache was made


def _piece_key(digest: str, index: int) -> bytes:
    return f"{digest}/{index:010d}".encode()


def _split_piece_key(key: bytes) -> tuple[str, int]:
    digest, _, index = key.decode().rpartition("/")
    return digest, int(index)


def piece_checksum(data: bytes | bytearray | memoryview) -> int:
    """The checksum the cache keeps of a piece's bytes (xxh3-64)."""
    return xxhash.xxh3_64_intdigest(data)


def _stored_size(length: int) -> int:
    """What a piece of ``length`` bytes counts against the limit: its bytes and its checksum."""
    return length + _CHECKSUM_SIZE


def _start_time(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot); 0 when it is not there to ask."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def _unpack_reservation(value: bytes | memoryview) -> tuple[int, int, int]:
    """A ``reserved`` value's pid, start time and bytes; a damaged one reads as a dead writer's
    that counted nothing."""
    if len(value) != _RESERVATION.size:
        return 0, 0, 0
    pid, started, cost = _RESERVATION.unpack(value)
    return int(pid), int(started), int(cost)


def _process_alive(pid: int, started: int | None) -> bool:
    """Whether the process that reserved a slot or holds a lease is still there: its pid,
    started then (``None``: not known, the pid alone)."""
    if pid <= 0 or not _pid_alive(pid):
        return False
    return started is None or _start_time(pid) == started


def _lease_value(started: int, whole: bool) -> bytes:
    return _LEASE_STARTED.pack(started) + (_WHOLE if whole else b"")


def _unpack_lease(value: bytes | memoryview) -> tuple[int | None, bool] | None:
    """A lease value's holder start time (None if written before it was kept) and whether the
    lease is whole; None for a damaged value (read as a dead holder's)."""
    value = bytes(value)
    if value in (b"", _WHOLE):
        return None, value == _WHOLE
    started, rest = value[: _LEASE_STARTED.size], value[_LEASE_STARTED.size :]
    if len(started) != _LEASE_STARTED.size or rest not in (b"", _WHOLE):
        return None
    return int(_LEASE_STARTED.unpack(started)[0]), rest == _WHOLE


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _unless_damaged(otherwise: Callable[..., object]) -> Callable[[_Method], _Method]:
    """The method, until the index is found damaged; from then on (and for the call that found
    it) ``otherwise``'s answer, given the same arguments: what a cache holding nothing says."""

    def wrap(method: _Method) -> _Method:
        @functools.wraps(method)
        def guarded(cache: PieceCache, /, *args: Any, **kwargs: Any) -> Any:
            if cache.damage is None:
                try:
                    return method(cache, *args, **kwargs)
                except _DAMAGE as error:
                    cache.put_out_of_use(error)
            return otherwise(cache, *args, **kwargs)

        return cast(_Method, guarded)

    return wrap


def _nothing(*_: Any, **__: Any) -> None:
    return None


def _no(*_: Any, **__: Any) -> bool:
    return False


def _none_listed(*_: Any, **__: Any) -> list[Any]:
    return []


def _zero(*_: Any, **__: Any) -> int:
    return 0


def _nothing_stored(_: PieceCache, writes: Sequence[PieceWrite], *__: Any) -> list[PutResult]:
    return [_NOT_STORED] * len(writes)


def _every_piece(cache: PieceCache, digest: str, blob_size: int) -> list[int]:
    return list(range(piece_count(blob_size, cache.piece_size)))


def _empty_stats(cache: PieceCache) -> CacheStats:
    return CacheStats(size=0, limit=cache.max_size, pieces=0, blobs=0, evicted_pieces=0)


def _make_private(*paths: Path) -> None:
    """Models are often private: the cache is its owner's alone (0700, files 0600), also when
    an older modelfs made it world-readable. Another user's cache is left as it is."""
    for path in paths:
        if path.exists() and path.stat().st_uid == os.geteuid():
            path.chmod(0o700 if path.is_dir() else 0o600)


def _open_index(path: Path, max_size: int) -> lmdb.Environment:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_private(path)
        environment = lmdb.open(
            str(path),
            # A sparse file: room for the records of a full cache (a few hundred bytes a piece,
            # manifests, piece indexes, tar member lists) with LMDB's free-page slack.
            map_size=max(max_size // 64, 1 << 30),
            max_dbs=8,
            metasync=False,
            mode=0o600,
        )
        _make_private(path / "data.mdb", path / "lock.mdb", path / PIECES_FILE)
    except (OSError, lmdb.Error) as error:
        raise CacheError(
            f"cannot open the cache at {path}: {error} (check --cache-dir and its permissions)"
        ) from error
    # A data file cut short (a full disk, a bad copy) is mapped all the same, and the first
    # page read past its end kills the process with SIGBUS: refuse it while only the meta
    # pages were read.
    needed = (environment.info()["last_pgno"] + 1) * environment.stat()["psize"]
    if (path / "data.mdb").stat().st_size < needed:
        environment.close()
        raise CacheError(
            f"the cache at {path} is truncated (data.mdb is shorter than its {needed} bytes); "
            "remove it or use another --cache-dir"
        )
    # A damaged page can also name bytes past the file's end (a value whose size runs beyond
    # it), and reading them there is SIGBUS. So the map's whole length is file, sparse (no
    # disk): such a read finds zeros, which LMDB reports as damage and the cache goes out of
    # use. Only extended, never cut: LMDB writes its pages at their offsets.
    data, map_size = path / "data.mdb", environment.info()["map_size"]
    try:
        if data.stat().st_size < map_size:
            os.truncate(data, map_size)
    except OSError as error:  # another user's cache, say: usable, without this guard
        log.warning("cache: could not extend %s to its map's length: %s", data, error)
    return environment


class PieceCache:
    """Pieces of blobs, checksummed, bounded in size, least recently used evicted first."""

    def __init__(self, path: Path, max_size: int, piece_size: int = DEFAULT_PIECE_SIZE) -> None:
        self.path = path
        self.max_size = max_size
        self.piece_size = piece_size
        self._env = _open_index(path, max_size)
        # Why the cache is out of use for this process (its index found damaged), else None.
        self.damage: str | None = None
        self._touched: dict[bytes, None] = {}
        self._started = _start_time(os.getpid())  # marks this process's reservations
        # Counted for this process's metrics (evictions are counted node-wide, in ``meta``).
        self.corrupt_pieces_found = 0
        try:
            self._open_databases()
        except _DAMAGE as error:
            self._env.close()
            raise self._damaged(error) from error
        try:
            self._file = PieceFile(path / PIECES_FILE, piece_size)
        except OSError as error:
            self._env.close()
            raise CacheError(
                f"cannot open the cache at {path}: {error} (check --cache-dir and its permissions)"
            ) from error
        try:
            self._free_dead_reservations()
        except _DAMAGE as error:
            self.close()
            raise self._damaged(error) from error

    def _open_databases(self) -> None:
        if self._older_format():
            self._env.close()
            self._remake()
            self._env = _open_index(self.path, self.max_size)
        self._pieces = self._env.open_db(b"pieces")
        self._free = self._env.open_db(b"free")
        self._stamps = self._env.open_db(b"stamps")
        self._lru = self._env.open_db(b"lru")
        self._blobs = self._env.open_db(b"blobs")
        self._leases = self._env.open_db(b"leases")
        self._meta = self._env.open_db(b"meta")
        self._reserved = self._env.open_db(b"reserved")
        self._check_format()

    def _damaged(self, error: Exception) -> CacheError:
        return CacheError(
            f"the cache's index at {self.path} is damaged ({error}); remove the cache or use "
            "another --cache-dir"
        )

    def put_out_of_use(self, error: Exception) -> None:
        """Stop using the cache: its index was found damaged while in use. Logged once; from
        then on it answers as a cache that holds nothing, and a mount goes on from its sources."""
        if self.damage is None:
            self.damage = str(self._damaged(error))
            log.error("%s; this process goes on without the cache", self.damage)

    def raise_if_out_of_use(self) -> None:
        """For commands whose answer would be wrong from a cache out of use (``cache ls``)."""
        if self.damage is not None:
            raise CacheError(self.damage)

    def _older_format(self) -> bool:
        """Whether the cache was made by a modelfs that kept pieces in LMDB."""
        meta = self._env.open_db(b"meta")
        with self._env.begin(db=meta) as txn:
            stored = txn.get(b"format")
        return stored is not None and bytes(stored).split(b"/")[0] in _OLDER_FORMATS

    def _remake(self) -> None:
        """Start the cache afresh: its pieces are fetched again. A process of the older modelfs
        that still has it open goes on with the files it opened, apart from the new ones."""
        log.warning("cache: %s was made by an older modelfs; made afresh, empty", self.path)
        for name in ("data.mdb", "lock.mdb", PIECES_FILE):
            (self.path / name).unlink(missing_ok=True)

    def _check_format(self) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            stored = txn.get(b"format")
            expected = _FORMAT + b"/" + str(self.piece_size).encode()
            if stored is None:
                txn.put(b"format", expected)
            elif stored != expected:
                raise CacheError(
                    f"the cache at {self.path} was made with another format ({stored.decode()}); "
                    "use another --cache-dir or remove this one"
                )

    def close(self) -> None:
        self.flush()
        self._env.close()
        self._file.close()

    # -- pieces ---------------------------------------------------------------------------

    @overload
    def get(
        self, digest: str, index: int, into: None = None, *, unvouched: bool = False
    ) -> bytes | None: ...

    @overload
    def get(
        self,
        digest: str,
        index: int,
        into: memoryview | bytearray | None,
        *,
        unvouched: bool = False,
    ) -> bytes | memoryview | bytearray | None: ...

    @_unless_damaged(_nothing)
    def get(
        self,
        digest: str,
        index: int,
        into: memoryview | bytearray | None = None,
        *,
        unvouched: bool = False,
    ) -> bytes | memoryview | bytearray | None:
        """The piece's bytes if vouched for (with ``unvouched``, also if not: to hash them), or
        None when absent, not vouched for, or when its checksum fails (it is dropped).

        They are read into ``into`` when it is the piece's length, else into new bytes; the
        checksum is checked on what was read, the bytes that are served.
        """
        key = _piece_key(digest, index)
        with self._env.begin(db=self._pieces) as txn:
            piece = _Piece.unpack(txn.get(key))
        if piece is None or not (piece.vouched or unvouched):
            return None
        data = self._read(piece, into)
        if data is None:
            self._drop_damaged(key, piece)
            return None
        self._touched[key] = None
        if len(self._touched) >= _TOUCH_FLUSH:
            self.flush()
        return data

    def _read(
        self, piece: _Piece, into: memoryview | bytearray | None
    ) -> bytes | memoryview | bytearray | None:
        """The piece's bytes, into ``into`` when it is the piece's length, else new bytes; None
        when the file does not hold them all or they fail the checksum."""
        if not self._plausible(piece):
            return None
        data: bytes | memoryview | bytearray
        if into is not None and len(into) == piece.length:
            complete = self._file.read_into(piece.slot, into) == piece.length
            data = into
        else:
            data = self._file.read(piece.slot, piece.length)
            complete = len(data) == piece.length
        return data if complete and piece_checksum(data) == piece.checksum else None

    def _plausible(self, piece: _Piece) -> bool:
        """Whether the record could be one this cache wrote: a damaged record can name any slot
        and length (a 4 GiB read, an offset past what a file can have), and reads as a miss."""
        return piece.length <= self.piece_size and piece.slot < _LARGEST_OFFSET // self.piece_size

    def _drop_damaged(self, key: bytes, piece: _Piece | None) -> bool:
        """Drop a piece whose bytes failed its checksum (or whose record is damaged: ``None``),
        unless it was dropped or stored anew since it was looked up: then another process
        reused its slot meanwhile (a miss). Whether it was dropped."""
        with self._env.begin(write=True) as txn:
            if _Piece.unpack(txn.get(key, db=self._pieces)) != piece:
                return False
            self._delete_piece(txn, key)
        digest, index = _split_piece_key(key)
        log.error(
            "cache: piece %d of %s failed its checksum; dropped, fetching it again", index, digest
        )
        self.corrupt_pieces_found += 1
        return True

    @_unless_damaged(_nothing)
    def get_checked(
        self, digest: str, index: int, expected: str, into: memoryview | bytearray | None
    ) -> bytes | memoryview | bytearray | None:
        """The piece if vouched for, or if it has the piece digest ``expected`` (the index's):
        then it is marked vouched, so the next reader does not hash it again."""
        data = self.get(digest, index, into)
        if data is not None or not self.has(digest, index):
            return data
        data = self.get(digest, index, into, unvouched=True)
        if data is None or not piece_matches(data, expected):
            return None
        self.vouch(digest, index)
        return data

    @_unless_damaged(_nothing)
    def vouch(self, digest: str, index: int) -> None:
        """Mark a stored piece vouched for (the piece index checked its bytes)."""
        with self._env.begin(write=True, db=self._pieces) as txn:
            self._set_vouched(txn, _piece_key(digest, index))

    @_unless_damaged(_no)
    def has(self, digest: str, index: int) -> bool:
        with self._env.begin(db=self._stamps) as txn:
            return txn.get(_piece_key(digest, index)) is not None

    def put(
        self,
        digest: str,
        index: int,
        data: bytes | bytearray | memoryview,
        blob_size: int,
        *,
        vouched: bool = False,
    ) -> PutResult:
        """Store a piece, evicting others to stay under the limit. Thread-safe (one writer).
        ``vouched``: the piece index checked it."""
        return self.put_many([PieceWrite(digest, index, data, blob_size, vouched)])[0]

    @_unless_damaged(_nothing_stored)
    def put_many(
        self, writes: Sequence[W], keep: Callable[[W], bool] = lambda write: True
    ) -> list[PutResult]:
        """Store pieces, as ``put`` does each: their slots reserved in one transaction, their
        bytes written outside it, their records committed in another (one commit for all).

        ``keep`` is asked in that second transaction, holding the node's write lock: a write it
        refuses is not stored (a piece of a blob dropped since it was fetched).
        """
        try:
            with self._env.begin(write=True) as txn:
                self._write_touches(txn)
                slots = [self._reserve(txn, write) for write in writes]
            checksums: dict[int, int] = {}
            try:
                for write, slot in zip(writes, slots, strict=True):
                    if not isinstance(slot, PutResult):
                        self._file.write(slot, write.data)
                        checksums[slot] = piece_checksum(write.data)
            finally:
                # Also when a write failed: the slots it did not fill are freed.
                with self._env.begin(write=True) as txn:
                    results = [
                        slot
                        if isinstance(slot, PutResult)
                        else self._record(txn, write, slot, checksums.get(slot), keep)
                        for write, slot in zip(writes, slots, strict=True)
                    ]
            return results
        except OSError as error:
            raise CacheError(f"cannot write to the cache at {self.path}: {error}") from error

    @_unless_damaged(_nothing)
    def drop_piece(self, digest: str, index: int) -> None:
        with self._env.begin(write=True) as txn:
            self._delete_piece(txn, _piece_key(digest, index))

    @_unless_damaged(_nothing)
    def drop_blob(self, digest: str) -> None:
        """Remove every piece of a blob (after it failed its digest check)."""
        prefix = f"{digest}/".encode()
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor(db=self._pieces)
            keys: list[bytes] = []
            if cursor.set_range(prefix):
                for found in cursor.iternext(values=False):
                    if not bytes(found).startswith(prefix):
                        break
                    keys.append(bytes(found))
            for key in keys:
                self._delete_piece(txn, key)
            txn.delete(digest.encode(), db=self._blobs)

    @_unless_damaged(_every_piece)
    def missing(self, digest: str, blob_size: int) -> list[int]:
        with self._env.begin(db=self._stamps) as txn:
            return [
                index
                for index in range(piece_count(blob_size, self.piece_size))
                if txn.get(_piece_key(digest, index)) is None
            ]

    # -- blob state -----------------------------------------------------------------------

    @_unless_damaged(_no)
    def is_verified(self, digest: str) -> bool:
        with self._env.begin() as txn:
            return self._blob_verified(txn, digest)

    @_unless_damaged(_no)
    def is_complete(self, digest: str, blob_size: int) -> bool:
        with self._env.begin(db=self._blobs) as txn:
            value = txn.get(digest.encode())
        return value is not None and _BLOB.unpack(value)[1] == piece_count(
            blob_size, self.piece_size
        )

    @_unless_damaged(_no)
    def mark_verified(self, digest: str, blob_size: int, checksums: Sequence[int]) -> bool:
        """The blob hashed whole to its digest, over pieces of these ``piece_checksum``s: it,
        and every piece of it, is vouched for, if the cache holds those very pieces. False when
        a piece is missing or other bytes (another process evicted and stored it again since it
        was hashed): nothing is vouched for, the blob is checked again when next read."""
        count = piece_count(blob_size, self.piece_size)
        keys = [_piece_key(digest, index) for index in range(count)]
        with self._env.begin(write=True) as txn:
            stored = [_Piece.unpack(txn.get(key, db=self._pieces)) for key in keys]
            if len(checksums) != count or any(
                piece is None or piece.checksum != checksum
                for piece, checksum in zip(stored, checksums, strict=True)
            ):
                return False
            size, present, _ = self._blob_state(txn, digest, blob_size)
            txn.put(digest.encode(), _BLOB.pack(size, present, 1), db=self._blobs)
            for key in keys:
                self._set_vouched(txn, key)
        return True

    # -- leases: blobs in use by a live process are evicted last ---------------------------

    @_unless_damaged(_nothing)
    def lease(self, digests: list[str], *, whole: bool = False) -> None:
        """This process reads these blobs: they are evicted last. ``whole``: blobs that cannot
        be fetched again a piece at a time (a compressed layer's decompressed stream): none of
        their pieces is evicted while the lease lasts."""
        pid = os.getpid()
        with self._env.begin(write=True, db=self._leases) as txn:
            for digest in digests:
                key = f"{digest}/{pid}".encode()
                held = txn.get(key)
                # A plain lease does not undo this process's whole one (a dead holder's with the
                # same pid is written over).
                if not whole and held is not None and _unpack_lease(held) == (self._started, True):
                    continue
                txn.put(key, _lease_value(self._started, whole))

    @_unless_damaged(_zero)
    def room(self) -> int:
        """Bytes a new blob can have: the limit less what the blobs live processes lease hold
        (the rest can be evicted for it)."""
        with self._env.begin(write=True) as txn:
            held = 0
            for digest in self._leased_blobs(txn)[0]:
                value = txn.get(digest.encode(), db=self._blobs)
                if value is not None:
                    size, present, _ = _BLOB.unpack(value)
                    held += min(present * self.piece_size, size)
        return max(self.max_size - held, 0)

    @_unless_damaged(_nothing)
    def release(self, digests: list[str]) -> None:
        pid = os.getpid()
        with self._env.begin(write=True, db=self._leases) as txn:
            for digest in digests:
                txn.delete(f"{digest}/{pid}".encode())

    # -- small records ---------------------------------------------------------------------

    @_unless_damaged(_nothing)
    def get_meta(self, key: str) -> bytes | None:
        """The record, or None when absent or when it fails its checksum (then it is dropped:
        every record can be fetched or derived again)."""
        with self._env.begin(db=self._meta) as txn:
            stored = txn.get(f"record/{key}".encode())
        if stored is None:
            return None
        record = bytes(stored)
        value = record[_RECORD_CHECKSUM.size :]
        if len(record) < _RECORD_CHECKSUM.size or (
            _RECORD_CHECKSUM.unpack_from(record)[0] != xxhash.xxh3_64_intdigest(value)
        ):
            log.error("cache: the record %s failed its checksum; dropped, made again", key)
            self.delete_meta(key)
            return None
        return value

    @_unless_damaged(_nothing)
    def put_meta(self, key: str, value: bytes) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            checksum = _RECORD_CHECKSUM.pack(xxhash.xxh3_64_intdigest(value))
            txn.put(f"record/{key}".encode(), checksum + value)

    @_unless_damaged(_empty_stats)
    def stats(self) -> CacheStats:
        with self._env.begin() as txn:
            return CacheStats(
                size=self._total(txn),
                limit=self.max_size,
                pieces=txn.stat(self._pieces)["entries"],
                blobs=txn.stat(self._blobs)["entries"],
                evicted_pieces=self._counter(txn, b"evicted"),
            )

    # -- operations over the whole cache (modelfs cache ls|gc|verify|rm) ----------------------

    @_unless_damaged(_none_listed)
    def blob_states(self) -> list[BlobState]:
        """Every blob with at least one piece present."""
        with self._env.begin(db=self._blobs) as txn:
            states = [
                BlobState(bytes(key).decode(), size, present, verified == 1)
                for key, value in txn.cursor()
                for size, present, verified in [_BLOB.unpack(value)]
            ]
        return [state for state in states if state.present > 0]

    @_unless_damaged(_none_listed)
    def meta_keys(self, prefix: str) -> list[str]:
        """Keys of the small records starting with ``prefix`` (as given to ``put_meta``)."""
        start = f"record/{prefix}".encode()
        with self._env.begin(db=self._meta) as txn:
            cursor = txn.cursor()
            keys: list[str] = []
            if cursor.set_range(start):
                for key in cursor.iternext(values=False):
                    if not bytes(key).startswith(start):
                        break
                    keys.append(bytes(key).decode()[len("record/") :])
        return keys

    @_unless_damaged(_nothing)
    def delete_meta(self, key: str) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.delete(f"record/{key}".encode())

    @_unless_damaged(_zero)
    def evict_to(self, size: int) -> int:
        """Evict least recently used pieces (blobs in use last) until at most ``size`` bytes
        are held; the bytes freed."""
        with self._env.begin(write=True) as txn:
            self._write_touches(txn)
            total = self._total(txn)
            if total <= size:
                return 0
            return self._evict(txn, total - size, protect="")

    def accounting(self) -> tuple[int, int]:
        """The bytes counted against the limit, and what the pieces held and the slots live
        writers reserved add up to: equal unless the count went wrong."""
        try:
            with self._env.begin() as txn:
                held = sum(
                    _stored_size(piece.length)
                    for _, record in txn.cursor(db=self._pieces)
                    for piece in [_Piece.unpack(record)]
                    if piece is not None
                )
                reserved = sum(
                    _unpack_reservation(value)[2] for _, value in txn.cursor(db=self._reserved)
                )
                return self._total(txn), held + reserved
        except _DAMAGE as error:
            raise self._damaged(error) from error

    @_unless_damaged(_none_listed)
    def drop_corrupt_pieces(self) -> list[tuple[str, int]]:
        """Check every piece against its checksum; drop and return the ones that fail."""
        with self._env.begin(db=self._pieces) as txn:
            stored = [(bytes(key), _Piece.unpack(value)) for key, value in txn.cursor()]
        return [
            _split_piece_key(key)
            for key, piece in stored
            if (piece is None or self._read(piece, None) is None) and self._drop_damaged(key, piece)
        ]

    def stored_pieces(self, digest: str, blob_size: int) -> Iterator[bytes | None]:
        """The blob's pieces in order as stored, unchecked and without counting as a use."""
        for index in range(piece_count(blob_size, self.piece_size)):
            piece = self._record_of(digest, index)
            if piece is None or not self._plausible(piece):
                yield None
            else:
                yield self._file.read(piece.slot, piece.length)

    @_unless_damaged(_nothing)
    def _record_of(self, digest: str, index: int) -> _Piece | None:
        with self._env.begin(db=self._pieces) as txn:
            return _Piece.unpack(txn.get(_piece_key(digest, index)))

    @_unless_damaged(_nothing)
    def flush(self) -> None:
        """Write the stamps of pieces read since the last write."""
        if self._touched:
            with self._env.begin(write=True) as txn:
                self._write_touches(txn)

    # -- inside a write transaction ------------------------------------------------------

    def _stored_already(
        self, txn: lmdb.Transaction, write: PieceWrite, checksum: int | None = None
    ) -> PutResult | None:
        """The result for a piece the cache holds already, or None to store ``write``. A
        ``write`` the piece index vouched for vouches for the stored piece only if it has the
        same bytes (``checksum``: the write's, when known); other bytes, stored unvouched (a
        process without the index, say), are dropped for it."""
        key = _piece_key(write.digest, write.index)
        record = txn.get(key, db=self._pieces)
        if record is None:
            return None
        stored = _Piece.unpack(record)
        if stored is None:  # a damaged record: dropped, the piece stored anew
            self._delete_piece(txn, key)
            return None
        if write.vouched and not stored.vouched:
            if checksum is None:
                checksum = piece_checksum(write.data)
            if stored.checksum != checksum:
                self._delete_piece(txn, key)
                return None
            self._set_vouched(txn, key)
        return PutResult(stored=True, blob_complete=False)

    def _reserve(self, txn: lmdb.Transaction, write: PieceWrite) -> int | PutResult:
        """A slot for the piece, counted against the limit (evicting others for it) and marked
        this process's, or the result when it needs none: stored already, or no room."""
        cost = _stored_size(len(write.data))
        if cost > self.max_size:
            return _NOT_STORED
        stored = self._stored_already(txn, write)
        if stored is not None:
            return stored
        total = self._total(txn)
        if total + cost > self.max_size:
            total -= self._evict(txn, total + cost - self.max_size, protect=write.digest)
            if total + cost > self.max_size:
                return _NOT_STORED
        slot = self._take_slot(txn)
        writer = _RESERVATION.pack(os.getpid(), self._started, cost)
        txn.put(_U64.pack(slot), writer, db=self._reserved)
        txn.put(b"total", _U64.pack(total + cost), db=self._meta)
        return slot

    def _record(
        self,
        txn: lmdb.Transaction,
        write: W,
        slot: int,
        checksum: int | None,
        keep: Callable[[W], bool],
    ) -> PutResult:
        """Commit the piece written to its reserved ``slot`` (``checksum``: None if it was not
        written), or free the slot: not written, refused by ``keep``, or stored by another
        process meanwhile. The record comes after the bytes, so no reader finds one for bytes
        not yet written."""
        txn.delete(_U64.pack(slot), db=self._reserved)
        stored = None if checksum is None else self._stored_already(txn, write, checksum)
        if checksum is None or stored is not None or not keep(write):
            self._free_slot(txn, slot, _stored_size(len(write.data)))
            return stored or _NOT_STORED
        key = _piece_key(write.digest, write.index)
        txn.put(key, _Piece(slot, len(write.data), checksum, write.vouched).pack(), db=self._pieces)
        self._stamp(txn, key)
        size, present, verified = self._blob_state(txn, write.digest, write.blob_size)
        present += 1
        txn.put(write.digest.encode(), _BLOB.pack(size, present, verified), db=self._blobs)
        complete = present == piece_count(write.blob_size, self.piece_size)
        return PutResult(stored=True, blob_complete=complete and not verified)

    def _free_slot(self, txn: lmdb.Transaction, slot: int, cost: int) -> None:
        """Give a slot back (to reuse, its blocks to the disk) and the bytes it counted."""
        txn.put(_U64.pack(slot), b"", db=self._free)
        self._file.free(slot)
        txn.put(b"total", _U64.pack(max(self._total(txn) - cost, 0)), db=self._meta)

    def _free_dead_reservations(self) -> None:
        """Free the slots of writers that died between reserving and recording them."""
        with self._env.begin(write=True) as txn:
            dead = [
                (int(_U64.unpack(key)[0]), cost)
                for key, value in txn.cursor(db=self._reserved)
                for pid, started, cost in [_unpack_reservation(value)]
                if not _process_alive(pid, started)
            ]
            for slot, cost in dead:
                txn.delete(_U64.pack(slot), db=self._reserved)
                self._free_slot(txn, slot, cost)
        if dead:
            log.warning("cache: freed %d slots that writers which died had reserved", len(dead))

    def _take_slot(self, txn: lmdb.Transaction) -> int:
        """A free slot, the lowest first, else a new one at the end of the file."""
        cursor = txn.cursor(db=self._free)
        if cursor.first():
            slot = int(_U64.unpack(cursor.key())[0])
            cursor.delete()
            return slot
        slot = self._counter(txn, b"slots")
        txn.put(b"slots", _U64.pack(slot + 1), db=self._meta)
        return slot

    def _blob_verified(self, txn: lmdb.Transaction, digest: str) -> bool:
        value = txn.get(digest.encode(), db=self._blobs)
        return value is not None and _BLOB.unpack(value)[2] == 1

    def _set_vouched(self, txn: lmdb.Transaction, key: bytes) -> None:
        piece = _Piece.unpack(txn.get(key, db=self._pieces))
        if piece is not None and not piece.vouched:
            vouched = _Piece(piece.slot, piece.length, piece.checksum, vouched=True)
            txn.put(key, vouched.pack(), db=self._pieces)

    def _total(self, txn: lmdb.Transaction) -> int:
        return self._counter(txn, b"total")

    def _counter(self, txn: lmdb.Transaction, key: bytes) -> int:
        value = txn.get(key, db=self._meta)
        return 0 if value is None else int(_U64.unpack(value)[0])

    def _blob_state(self, txn: lmdb.Transaction, digest: str, size: int) -> tuple[int, int, int]:
        value = txn.get(digest.encode(), db=self._blobs)
        return (size, 0, 0) if value is None else _BLOB.unpack(value)

    def _next_stamp(self, txn: lmdb.Transaction) -> bytes:
        value = txn.get(b"clock", db=self._meta)
        stamp = _U64.pack(0 if value is None else _U64.unpack(value)[0] + 1)
        txn.put(b"clock", stamp, db=self._meta)
        return stamp

    def _stamp(self, txn: lmdb.Transaction, key: bytes) -> None:
        old = txn.get(key, db=self._stamps)
        if old is not None:
            txn.delete(bytes(old) + key, db=self._lru)
        stamp = self._next_stamp(txn)
        txn.put(key, stamp, db=self._stamps)
        txn.put(stamp + key, b"", db=self._lru)

    def _write_touches(self, txn: lmdb.Transaction) -> None:
        touched, self._touched = self._touched, {}
        for key in touched:
            if txn.get(key, db=self._stamps) is not None:
                self._stamp(txn, key)

    def _delete_piece(self, txn: lmdb.Transaction, key: bytes) -> int:
        record = txn.get(key, db=self._pieces)
        if record is None:
            return 0
        txn.delete(key, db=self._pieces)
        piece = _Piece.unpack(record)
        freed = 0
        # A damaged record's slot is lost, not reused for other bytes.
        if piece is not None and self._plausible(piece):
            freed = _stored_size(piece.length)
            self._free_slot(txn, piece.slot, freed)
        stamp = txn.get(key, db=self._stamps)
        if stamp is not None:
            txn.delete(bytes(stamp) + key, db=self._lru)
            txn.delete(key, db=self._stamps)
        digest, _ = _split_piece_key(key)
        blob = txn.get(digest.encode(), db=self._blobs)
        if blob is not None:
            size, present, _ = _BLOB.unpack(blob)
            txn.put(digest.encode(), _BLOB.pack(size, max(present - 1, 0), 0), db=self._blobs)
        return freed

    def _leased_blobs(self, txn: lmdb.Transaction) -> tuple[set[str], set[str]]:
        """The blobs live processes lease, and those of them leased whole."""
        leased, whole, stale = set(), set(), []
        for key, value in txn.cursor(db=self._leases):
            digest, _, pid = bytes(key).decode().rpartition("/")
            lease = _unpack_lease(value)
            if lease is not None and _process_alive(int(pid), lease[0]):
                leased.add(digest)
                if lease[1]:
                    whole.add(digest)
            else:
                stale.append(bytes(key))
        for key in stale:
            txn.delete(key, db=self._leases)
        return leased, whole

    def _evict(self, txn: lmdb.Transaction, need: int, protect: str) -> int:
        """Free at least ``need`` bytes, oldest first: other blobs no process is reading, then
        other blobs but those leased whole, then older pieces of the blob being written."""
        leased, whole = self._leased_blobs(txn)
        spared_by_pass: tuple[set[str], ...] = (
            leased | {protect},
            whole | {protect},
            whole - {protect},
        )
        freed = 0
        for spared in spared_by_pass:
            victims = []
            for stamp_key in txn.cursor(db=self._lru).iternext(values=False):
                key = bytes(stamp_key[_U64.size :])
                if _split_piece_key(key)[0] in spared:
                    continue
                victims.append(key)
                piece = _Piece.unpack(txn.get(key, db=self._pieces))
                freed += 0 if piece is None else _stored_size(piece.length)
                if freed >= need:
                    break
            for key in victims:
                self._delete_piece(txn, key)
            if victims:
                evicted = self._counter(txn, b"evicted") + len(victims)
                txn.put(b"evicted", _U64.pack(evicted), db=self._meta)
                log.info(
                    "cache: evicted %d pieces to stay under %d bytes", len(victims), self.max_size
                )
            if freed >= need:
                break
        return freed

"""The node's piece cache: one LMDB environment shared by every modelfs process on the node.

Layout (named sub-databases):
- ``pieces``: ``<digest>/<index>`` -> the piece's bytes.
- ``checksums``: ``<digest>/<index>`` -> the piece's xxh3-64 (8 bytes, little endian) and whether
  something vouched for its bytes (1 byte; see below); apart from the bytes, so that storing a
  piece hands LMDB the fetched buffer as it is, with no copy.
- ``stamps``: ``<digest>/<index>`` -> the piece's last-use stamp (8 bytes, big endian).
- ``lru``:    stamp + ``<digest>/<index>`` -> empty; iterated in order, oldest first, to evict.
- ``blobs``:  ``<digest>`` -> size, pieces present, verified flag.
- ``leases``: ``<digest>/<pid>`` -> empty: blobs a live process is reading are evicted last.
- ``meta``:   small records (the stamp clock, total bytes, manifests, configs, tar indexes), each
  stored with its xxh3-64, so a flipped bit is a cache miss, never a wrong record.

A piece is *vouched* once something other than its own checksum proved its bytes: the piece index
(a sha256 per piece, from the registry side) or its whole blob hashing to the blob's digest. The
checksum only proves the bytes are the ones stored. ``get`` serves vouched pieces only, so a piece
stored before its blob was checked (a write-behind, a crash, another process with other flags)
is invisible to every reader on the node until it is vouched for.

LMDB serialises writers across processes, so the size accounting in ``meta`` is exact and the
limit holds for the whole node. Reads touch pieces in memory; the new stamps are written with the
next write transaction rather than making every read a write.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, overload

import lmdb
import xxhash

from modelfs.errors import CacheError
from modelfs.pieces import DEFAULT_PIECE_SIZE, piece_count

log = logging.getLogger(__name__)


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable ABI): where an object's bytes are."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBUF_WRITABLE = 0x1


@functools.cache
def _libc() -> ctypes.CDLL:
    # Looked up once: the mapped pages are let go every few MiB read or stored.
    return ctypes.CDLL(None, use_errno=True)


def copy_releasing_gil(into: memoryview | bytearray, source: memoryview | bytes) -> None:
    """``into[:] = source`` without holding the GIL while the bytes move.

    Copying a piece out of LMDB's map faults its pages in from disk once the page cache let them
    go; under the GIL (as a slice assignment copies) the event loop, and every FUSE reply, would
    wait on that disk read. ``ctypes.memmove`` lets the GIL go for the call. Both buffers are held
    (exported) for the copy, so neither can be resized or released under it.
    """
    target, origin = _PyBuffer(), _PyBuffer()
    _get_buffer(into, ctypes.byref(target), _PyBUF_WRITABLE)
    try:
        _get_buffer(source, ctypes.byref(origin), 0)
        try:
            if origin.len != target.len:
                raise ValueError(f"copy of {origin.len} bytes into {target.len}")
            ctypes.memmove(target.buf, origin.buf, origin.len)
        finally:
            _release_buffer(ctypes.byref(origin))
    finally:
        _release_buffer(ctypes.byref(target))


_BLOB = struct.Struct(">QIB")  # size, pieces present, verified
_U64 = struct.Struct(">Q")
_CHECKSUM = struct.Struct("<Q")
# Checksum records: the xxh3-64, then the vouched flag (records of 8 bytes predate the flag).
_CHECKSUM_RECORD = struct.Struct("<QB")
_VOUCHED = 1
_FORMAT = b"modelfs-cache-2"
_TOUCH_FLUSH = 256  # pending stamp updates that force a write
# Reading pieces maps the map's pages into this process, and so does storing them (LMDB reads its
# B-tree through the map, and each fault maps the neighbouring pages just written); every page
# touched stays mapped. They are let go after this many bytes passed through, so the RSS stays
# flat instead of growing with what was read and stored.
RELEASE_MAPPED_EVERY = 8 << 20


@dataclass(frozen=True)
class PutResult:
    """What storing a piece did: whether it was kept, and whether it completed its blob."""

    stored: bool
    blob_complete: bool


_NOT_STORED = PutResult(stored=False, blob_complete=False)
_WHOLE = b"whole"  # the value of a lease on a blob none of whose pieces may be evicted


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


def _stored_size(data: bytes | bytearray | memoryview) -> int:
    """What a piece counts against the limit: its bytes and its checksum."""
    return len(data) + _CHECKSUM.size


def _checksum_record(checksum: int, vouched: bool) -> bytes:
    return _CHECKSUM_RECORD.pack(checksum, _VOUCHED if vouched else 0)


def _read_checksum_record(record: bytes | memoryview | None) -> tuple[int | None, bool]:
    """(checksum, vouched) of a stored record; (None, False) for none or a damaged one."""
    if record is None:
        return None, False
    if len(record) == _CHECKSUM.size:
        return _CHECKSUM.unpack(record)[0], False
    if len(record) == _CHECKSUM_RECORD.size:
        checksum, flag = _CHECKSUM_RECORD.unpack(record)
        return checksum, flag == _VOUCHED
    return None, False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_private(*paths: Path) -> None:
    """Models are often private: the cache is its owner's alone (0700, files 0600), also when
    an older modelfs made it world-readable. Another user's cache is left as it is."""
    for path in paths:
        if path.exists() and path.stat().st_uid == os.geteuid():
            path.chmod(0o700 if path.is_dir() else 0o600)


class PieceCache:
    """Pieces of blobs, checksummed, bounded in size, least recently used evicted first."""

    def __init__(
        self,
        path: Path,
        max_size: int,
        piece_size: int = DEFAULT_PIECE_SIZE,
        release_mapped_every: int = RELEASE_MAPPED_EVERY,
    ) -> None:
        self.path = path
        self.max_size = max_size
        self.piece_size = piece_size
        self._release_mapped_every = release_mapped_every
        self._through_map = 0  # bytes read or stored since the mapped pages were released
        self._map_spans: list[tuple[int, int]] | None = None  # found on the first release
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            _make_private(path)
            # The map is a sparse file: room for the limit plus LMDB's free-page slack.
            self._env = lmdb.open(
                str(path),
                map_size=max(2 * max_size, 1 << 30),
                max_dbs=8,
                metasync=False,
                # Pieces are 4 MiB values read whole: let the kernel read ahead in the map.
                # Without it every 4 KiB page faults alone (warm reads after the page cache
                # was dropped: 47 MB/s instead of 320 here).
                readahead=True,
                mode=0o600,
            )
            _make_private(path / "data.mdb", path / "lock.mdb")
        except (OSError, lmdb.Error) as error:
            raise CacheError(
                f"cannot open the cache at {path}: {error} (check --cache-dir and its permissions)"
            ) from error
        # A data file cut short (a full disk, a bad copy) is mapped all the same, and the first
        # page read past its end kills the process with SIGBUS: refuse it while only the meta
        # pages were read.
        needed = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
        if (path / "data.mdb").stat().st_size < needed:
            self._env.close()
            raise CacheError(
                f"the cache at {path} is truncated (data.mdb is shorter than its {needed} bytes); "
                "remove it or use another --cache-dir"
            )
        self._pieces = self._env.open_db(b"pieces")
        self._checksums = self._env.open_db(b"checksums")
        self._stamps = self._env.open_db(b"stamps")
        self._lru = self._env.open_db(b"lru")
        self._blobs = self._env.open_db(b"blobs")
        self._leases = self._env.open_db(b"leases")
        self._meta = self._env.open_db(b"meta")
        self._touched: dict[bytes, None] = {}
        # Counted for this process's metrics (evictions are counted node-wide, in ``meta``).
        self.corrupt_pieces_found = 0
        self._check_format()

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

        They are copied out of the map into ``into`` when it is the piece's length, else into new
        bytes; the checksum is checked on the copy, the bytes that are served.
        """
        key = _piece_key(digest, index)
        with self._env.begin(db=self._pieces, buffers=True) as txn:
            value = txn.get(key)
            record = txn.get(key, db=self._checksums)
            expected, vouched = _read_checksum_record(record)
            if record is not None and len(record) == _CHECKSUM.size:
                # Stored before pieces kept a flag: vouched for if its blob was verified whole.
                vouched = self._blob_verified(txn, digest)
            if value is None or not (vouched or unvouched):
                return None
            data: bytes | memoryview | bytearray
            if into is not None and len(into) == len(value):
                copy_releasing_gil(into, value)
                data = into
            else:
                data = bytes(value)
        self._passed_through_map(len(data))
        if xxhash.xxh3_64_intdigest(data) != expected:
            log.error(
                "cache: piece %d of %s failed its checksum; dropped, fetching it again",
                index,
                digest,
            )
            self.drop_piece(digest, index)
            self.corrupt_pieces_found += 1
            return None
        self._touched[key] = None
        if len(self._touched) >= _TOUCH_FLUSH:
            self.flush()
        return data

    def get_checked(
        self, digest: str, index: int, expected_sha256: str, into: memoryview | bytearray | None
    ) -> bytes | memoryview | bytearray | None:
        """The piece if vouched for, or if its sha256 is ``expected_sha256`` (the piece index's):
        then it is marked vouched, so the next reader does not hash it again."""
        data = self.get(digest, index, into)
        if data is not None or not self.has(digest, index):
            return data
        data = self.get(digest, index, into, unvouched=True)
        if data is None or hashlib.sha256(data).hexdigest() != expected_sha256:
            return None
        self.vouch(digest, index)
        return data

    def vouch(self, digest: str, index: int) -> None:
        """Mark a stored piece vouched for (the piece index checked its bytes)."""
        key = _piece_key(digest, index)
        with self._env.begin(write=True, db=self._checksums) as txn:
            self._set_vouched(txn, key)

    def has(self, digest: str, index: int) -> bool:
        # Asks the stamps (every piece has one) so the piece's own pages are not touched: the
        # first page of a 4 MiB value is a disk read once the page cache let it go, and this is
        # called on the event loop.
        with self._env.begin(db=self._stamps, buffers=True) as txn:
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

    def put_many(
        self, writes: Sequence[W], keep: Callable[[W], bool] = lambda write: True
    ) -> list[PutResult]:
        """Store pieces in one write transaction (one commit for all), as ``put`` does each.

        ``keep`` is asked inside the transaction, holding the node's write lock: a write it
        refuses is not stored (a piece of a blob dropped since it was fetched).
        """
        try:
            with self._env.begin(write=True, buffers=True) as txn:
                self._write_touches(txn)
                results = [self._put(txn, w) if keep(w) else _NOT_STORED for w in writes]
        except lmdb.Error as error:
            raise CacheError(f"cannot write to the cache at {self.path}: {error}") from error
        self._passed_through_map(sum(len(write.data) for write in writes))
        return results

    def drop_piece(self, digest: str, index: int) -> None:
        with self._env.begin(write=True, buffers=True) as txn:
            self._delete_piece(txn, _piece_key(digest, index))

    def drop_blob(self, digest: str) -> None:
        """Remove every piece of a blob (after it failed its digest check)."""
        prefix = f"{digest}/".encode()
        with self._env.begin(write=True, buffers=True) as txn:
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

    def missing(self, digest: str, blob_size: int) -> list[int]:
        with self._env.begin(db=self._stamps, buffers=True) as txn:  # as in ``has``
            return [
                index
                for index in range(piece_count(blob_size, self.piece_size))
                if txn.get(_piece_key(digest, index)) is None
            ]

    # -- blob state -----------------------------------------------------------------------

    def is_verified(self, digest: str) -> bool:
        with self._env.begin() as txn:
            return self._blob_verified(txn, digest)

    def is_complete(self, digest: str, blob_size: int) -> bool:
        with self._env.begin(db=self._blobs) as txn:
            value = txn.get(digest.encode())
        return value is not None and _BLOB.unpack(value)[1] == piece_count(
            blob_size, self.piece_size
        )

    def mark_verified(self, digest: str, blob_size: int) -> None:
        """The blob hashed whole to its digest: it, and every piece of it, is vouched for."""
        with self._env.begin(write=True, buffers=True) as txn:
            size, present, _ = self._blob_state(txn, digest, blob_size)
            if present == piece_count(blob_size, self.piece_size):
                txn.put(digest.encode(), _BLOB.pack(size, present, 1), db=self._blobs)
                for index in range(present):
                    self._set_vouched(txn, _piece_key(digest, index))

    # -- leases: blobs in use by a live process are evicted last ---------------------------

    def lease(self, digests: list[str], *, whole: bool = False) -> None:
        """This process reads these blobs: they are evicted last. ``whole``: blobs that cannot
        be fetched again a piece at a time (a compressed layer's decompressed stream): none of
        their pieces is evicted while the lease lasts."""
        pid = os.getpid()
        with self._env.begin(write=True, db=self._leases) as txn:
            for digest in digests:
                # A plain lease does not undo a whole one.
                txn.put(f"{digest}/{pid}".encode(), _WHOLE if whole else b"", overwrite=whole)

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

    def release(self, digests: list[str]) -> None:
        pid = os.getpid()
        with self._env.begin(write=True, db=self._leases) as txn:
            for digest in digests:
                txn.delete(f"{digest}/{pid}".encode())

    # -- small records ---------------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        """The record, or None when absent or when it fails its checksum (then it is dropped:
        every record can be fetched or derived again)."""
        with self._env.begin(db=self._meta) as txn:
            stored = txn.get(f"record/{key}".encode())
        if stored is None:
            return None
        record = bytes(stored)
        value = record[_CHECKSUM.size :]
        if len(record) < _CHECKSUM.size or (
            _CHECKSUM.unpack_from(record)[0] != xxhash.xxh3_64_intdigest(value)
        ):
            log.error("cache: the record %s failed its checksum; dropped, made again", key)
            self.delete_meta(key)
            return None
        return value

    def put_meta(self, key: str, value: bytes) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            checksum = _CHECKSUM.pack(xxhash.xxh3_64_intdigest(value))
            txn.put(f"record/{key}".encode(), checksum + value)

    def release_mapped_pages(self) -> None:
        """Unmap the pages of the cache this process touched; they stay in the page cache.

        Done by the cache itself every ``release_mapped_every`` bytes read or stored.
        """
        if self._map_spans is None:
            # The map is made once, when the environment opens: find it once.
            data_file = os.fsencode(self.path.resolve() / "data.mdb")
            with open("/proc/self/maps", "rb") as maps:
                self._map_spans = [
                    (int(start, 16), int(end, 16))
                    for line in maps
                    if line.rstrip().endswith(data_file)
                    for start, end in [line.split(maxsplit=1)[0].split(b"-")]
                ]
        madvise = _libc().madvise
        for start, end in self._map_spans:
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)

    def _passed_through_map(self, size: int) -> None:
        # Called from the threads reading and writing; a count lost to a race only delays it.
        self._through_map += size
        if self._through_map >= self._release_mapped_every:
            self._through_map = 0
            self.release_mapped_pages()

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

    def blob_states(self) -> list[BlobState]:
        """Every blob with at least one piece present."""
        with self._env.begin(db=self._blobs) as txn:
            states = [
                BlobState(bytes(key).decode(), size, present, verified == 1)
                for key, value in txn.cursor()
                for size, present, verified in [_BLOB.unpack(value)]
            ]
        return [state for state in states if state.present > 0]

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

    def delete_meta(self, key: str) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.delete(f"record/{key}".encode())

    def evict_to(self, size: int) -> int:
        """Evict least recently used pieces (blobs in use last) until at most ``size`` bytes
        are held; the bytes freed."""
        with self._env.begin(write=True, buffers=True) as txn:
            self._write_touches(txn)
            total = self._total(txn)
            if total <= size:
                return 0
            return self._evict(txn, total - size, protect="")

    def drop_corrupt_pieces(self) -> list[tuple[str, int]]:
        """Check every piece against its checksum; drop and return the ones that fail."""
        bad: list[bytes] = []
        with self._env.begin(db=self._pieces, buffers=True) as txn:
            for key, value in txn.cursor():
                checksum, _ = _read_checksum_record(txn.get(key, db=self._checksums))
                if checksum is None or xxhash.xxh3_64_intdigest(value) != checksum:
                    bad.append(bytes(key))
        if bad:
            with self._env.begin(write=True, buffers=True) as txn:
                for bad_key in bad:
                    self._delete_piece(txn, bad_key)
        return [_split_piece_key(bad_key) for bad_key in bad]

    def stored_pieces(self, digest: str, blob_size: int) -> Iterator[bytes | None]:
        """The blob's pieces in order as stored, unchecked and without counting as a use."""
        for index in range(piece_count(blob_size, self.piece_size)):
            with self._env.begin(db=self._pieces, buffers=True) as txn:
                value = txn.get(_piece_key(digest, index))
                yield None if value is None else bytes(value)

    def flush(self) -> None:
        """Write the stamps of pieces read since the last write."""
        if self._touched:
            with self._env.begin(write=True, buffers=True) as txn:
                self._write_touches(txn)

    # -- inside a write transaction ------------------------------------------------------

    def _put(self, txn: lmdb.Transaction, write: PieceWrite) -> PutResult:
        key = _piece_key(write.digest, write.index)
        cost = _stored_size(write.data)
        if cost > self.max_size:
            return _NOT_STORED
        if txn.get(key, db=self._pieces) is not None:
            if write.vouched:
                self._set_vouched(txn, key)
            return PutResult(stored=True, blob_complete=False)
        total = self._total(txn)
        if total + cost > self.max_size:
            total -= self._evict(txn, total + cost - self.max_size, protect=write.digest)
            if total + cost > self.max_size:
                return _NOT_STORED
        txn.put(key, write.data, db=self._pieces)
        checksum = xxhash.xxh3_64_intdigest(write.data)
        txn.put(key, _checksum_record(checksum, write.vouched), db=self._checksums)
        self._stamp(txn, key)
        txn.put(b"total", _U64.pack(total + cost), db=self._meta)
        size, present, verified = self._blob_state(txn, write.digest, write.blob_size)
        present += 1
        txn.put(write.digest.encode(), _BLOB.pack(size, present, verified), db=self._blobs)
        complete = present == piece_count(write.blob_size, self.piece_size)
        return PutResult(stored=True, blob_complete=complete and not verified)

    def _blob_verified(self, txn: lmdb.Transaction, digest: str) -> bool:
        value = txn.get(digest.encode(), db=self._blobs)
        return value is not None and _BLOB.unpack(value)[2] == 1

    def _set_vouched(self, txn: lmdb.Transaction, key: bytes) -> None:
        checksum, vouched = _read_checksum_record(txn.get(key, db=self._checksums))
        if checksum is not None and not vouched:
            txn.put(key, _checksum_record(checksum, True), db=self._checksums)

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
        value = txn.get(key, db=self._pieces)
        if value is None:
            return 0
        freed = _stored_size(value)
        txn.delete(key, db=self._pieces)
        txn.delete(key, db=self._checksums)
        stamp = txn.get(key, db=self._stamps)
        if stamp is not None:
            txn.delete(bytes(stamp) + key, db=self._lru)
            txn.delete(key, db=self._stamps)
        txn.put(b"total", _U64.pack(self._total(txn) - freed), db=self._meta)
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
            if _pid_alive(int(pid)):
                leased.add(digest)
                if value == _WHOLE:
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
                value = txn.get(key, db=self._pieces)
                freed += 0 if value is None else _stored_size(value)
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

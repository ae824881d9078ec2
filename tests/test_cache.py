"""The LMDB piece cache on real LMDB files: checksums, limits, LRU order, leases, sharing."""

import hashlib
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import blake3
import lmdb
import pytest
from cache_damage import damage_piece, piece_location
from mounting import modelfs

from modelfs.cache import PieceCache, PieceWrite, PutResult, piece_checksum
from modelfs.cache.store import PIECES_FILE
from modelfs.cli.mount import _died
from modelfs.errors import CacheError

PIECE = 1024
A, B, C = ("sha256:" + c * 64 for c in "abc")


def make(path: Path, limit: int = 100 * PIECE) -> PieceCache:
    return PieceCache(path, limit, piece_size=PIECE)


def test_put_get_and_blob_completion(tmp_path: Path) -> None:
    cache = make(tmp_path)
    size = 2 * PIECE + 10
    assert cache.get(A, 0, unvouched=True) is None
    assert cache.put(A, 0, b"x" * PIECE, size).blob_complete is False
    assert cache.put(A, 2, b"z" * 10, size).blob_complete is False
    assert cache.missing(A, size) == [1]
    assert cache.put(A, 1, b"y" * PIECE, size).blob_complete is True
    assert cache.get(A, 1, unvouched=True) == b"y" * PIECE
    assert cache.stats().pieces == 3
    checksums = [piece_checksum(piece) for piece in (b"x" * PIECE, b"y" * PIECE, b"z" * 10)]
    assert cache.mark_verified(A, size, checksums)
    assert cache.is_verified(A)
    cache.close()


def test_persists_across_reopen_and_is_shared_between_processes(tmp_path: Path) -> None:
    cache = make(tmp_path)
    cache.put(A, 0, b"persist", 7)
    cache.close()
    script = (
        "import sys; from pathlib import Path; from modelfs.cache import PieceCache; "
        f"c = PieceCache(Path(sys.argv[1]), {100 * PIECE}, piece_size={PIECE}); "
        f"assert c.get('{A}', 0, unvouched=True) == b'persist'; "
        f"c.put('{B}', 0, b'other', 5); c.close()"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    cache = make(tmp_path)
    assert cache.get(B, 0, unvouched=True) == b"other"
    cache.close()


def test_corrupted_value_is_dropped_not_served(tmp_path: Path) -> None:
    cache = make(tmp_path)
    cache.put(A, 0, b"good bytes" * 10, 100)
    cache.close()
    damage_piece(tmp_path, A, 0, at=20)  # behind the cache's back, as disk rot would
    cache = make(tmp_path)
    assert cache.get(A, 0, unvouched=True) is None
    assert not cache.has(A, 0)
    assert cache.stats().size == 0
    assert cache.corrupt_pieces_found == 1
    cache.close()


def test_a_lost_or_torn_write_is_a_miss_never_served(tmp_path: Path) -> None:
    """Piece bytes are not synced before the record that points at them (a short last piece is
    written through the page cache): after a power cut the slot may hold what it held before,
    or end early. Either is detected, dropped and fetched again."""
    cache = make(tmp_path)
    cache.put(A, 0, b"old" * 300, 900)
    cache.drop_blob(A)
    cache.put(B, 0, b"new" * 300, 900)  # reuses the slot A's piece left
    cache.put(C, 0, b"tail" * 200, 800)
    cache.close()
    assert piece_location(tmp_path, B, 0)[0] == 0
    with (tmp_path / PIECES_FILE).open("r+b") as file:
        file.write(b"old" * 300)  # B's write lost: the slot still holds A's bytes
        file.truncate(piece_location(tmp_path, C, 0)[0] + 500)  # C's write torn
    cache = make(tmp_path)
    assert cache.get(B, 0, unvouched=True) is None
    assert cache.get(C, 0, unvouched=True) is None
    assert not cache.has(B, 0) and not cache.has(C, 0)  # dropped: the next read fetches them
    assert cache.stats().size == 0
    cache.put(B, 0, b"new" * 300, 900)
    assert cache.get(B, 0, unvouched=True) == b"new" * 300
    cache.close()


def test_a_slot_reused_while_being_read_is_a_miss_and_the_new_piece_stays(
    tmp_path: Path,
) -> None:
    """Another process may evict a piece and reuse its slot between a reader's look-up and its
    read: the reader gets a miss (its bytes fail the checksum), and the piece now in the slot
    is not dropped for it."""
    reader = make(tmp_path)
    reader.put(A, 0, b"a" * PIECE, PIECE)
    read_into = reader._file.read_into
    other = (
        "import sys; from pathlib import Path; from modelfs.cache import PieceCache; "
        f"c = PieceCache(Path(sys.argv[1]), {100 * PIECE}, piece_size={PIECE}); "
        f"c.drop_blob('{A}'); c.put('{B}', 0, b'b' * {PIECE}, {PIECE}); c.close()"
    )

    def evicted_meanwhile(slot: int, into: bytearray | memoryview) -> int:
        subprocess.run([sys.executable, "-c", other, str(tmp_path)], check=True)
        return read_into(slot, into)

    reader._file.read_into = evicted_meanwhile  # type: ignore[method-assign]
    assert reader.get(A, 0, bytearray(PIECE), unvouched=True) is None
    assert reader.corrupt_pieces_found == 0
    assert reader.get(B, 0, unvouched=True) == b"b" * PIECE
    reader.close()


def test_slots_are_reused_and_their_blocks_given_back(tmp_path: Path) -> None:
    """The pieces file stays within the limit: an evicted piece's slot is reused, and its disk
    blocks are freed meanwhile."""
    piece = 64 << 10
    cache = PieceCache(tmp_path, 4 * (piece + 8), piece_size=piece)
    for index in range(12):
        cache.put(A, index, os.urandom(piece), 12 * piece)
    data = tmp_path / PIECES_FILE
    assert data.stat().st_size <= 5 * piece
    cache.drop_blob(A)
    assert data.stat().st_blocks * 512 < piece
    cache.close()


def test_limit_is_never_exceeded_and_oldest_goes_first(tmp_path: Path) -> None:
    limit = 10 * (PIECE + 8)  # room for exactly ten pieces with their checksums
    cache = make(tmp_path, limit)
    for index in range(10):
        cache.put(A, index, bytes(PIECE), 100 * PIECE)
    cache.get(A, 0, unvouched=True)  # piece 0 is now the most recently used
    for index in range(5):
        cache.put(B, index, bytes(PIECE), 100 * PIECE)
        assert cache.stats().size <= limit
    assert cache.has(A, 0)
    assert [i for i in range(1, 10) if cache.has(A, i)] == [6, 7, 8, 9]
    cache.close()


def test_leased_blobs_are_evicted_last(tmp_path: Path) -> None:
    limit = 4 * (PIECE + 8)
    cache = make(tmp_path, limit)
    cache.put(A, 0, bytes(PIECE), 10 * PIECE)
    cache.put(A, 1, bytes(PIECE), 10 * PIECE)
    cache.put(B, 0, bytes(PIECE), 10 * PIECE)
    cache.put(B, 1, bytes(PIECE), 10 * PIECE)
    cache.lease([A])
    cache.put(C, 0, bytes(PIECE), 10 * PIECE)
    cache.put(C, 1, bytes(PIECE), 10 * PIECE)
    assert cache.has(A, 0) and cache.has(A, 1)
    assert not cache.has(B, 0) and not cache.has(B, 1)
    cache.release([A])
    cache.close()


def test_blobs_leased_whole_keep_every_piece_under_pressure(tmp_path: Path) -> None:
    """Issue 22 (found by scripts/chaos): a decompressed stream cannot be fetched again a piece
    at a time, so no piece of it goes while it is leased whole; other leased blobs do."""
    cache = make(tmp_path, 4 * (PIECE + 8))
    cache.put(A, 0, bytes(PIECE), 2 * PIECE)
    cache.put(A, 1, bytes(PIECE), 2 * PIECE)
    cache.lease([A], whole=True)
    cache.lease([A])  # a plain lease of the same blob does not undo it
    cache.put(B, 0, bytes(PIECE), 10 * PIECE)
    cache.lease([B])
    for index in range(1, 6):
        cache.put(B, index, bytes(PIECE), 10 * PIECE)
    assert cache.has(A, 0) and cache.has(A, 1)
    assert [index for index in range(6) if cache.has(B, index)] == [4, 5]
    assert cache.room() < PIECE  # all held by leased blobs
    cache.release([A, B])
    cache.put(C, 0, bytes(PIECE), PIECE)
    assert not cache.has(A, 0)
    cache.close()


def test_lease_of_a_dead_process_is_ignored(tmp_path: Path) -> None:
    cache = make(tmp_path, 2 * (PIECE + 8))
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from modelfs.cache import PieceCache; "
            f"c = PieceCache(Path(sys.argv[1]), {2 * (PIECE + 8)}, piece_size={PIECE}); "
            f"c.put('{A}', 0, bytes({PIECE}), {4 * PIECE}); c.lease(['{A}'])",
            str(tmp_path),
        ],
        check=True,
    )
    assert child.returncode == 0
    cache.put(B, 0, bytes(PIECE), 4 * PIECE)
    cache.put(B, 1, bytes(PIECE), 4 * PIECE)
    assert not cache.has(A, 0)
    cache.close()


def _lease_values(tmp_path: Path, values: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True) as txn:
        leases = env.open_db(b"leases", txn=txn)
        for key, value in values.items():
            txn.put(key, value, db=leases)
    env.close()


def test_a_lease_of_a_dead_process_whose_pid_was_given_again_is_ignored(tmp_path: Path) -> None:
    """In a container a new process often gets a dead one's pid: a lease is its holder's by pid
    and start time. Here this very pid, started at another time, leased A whole."""
    make(tmp_path).close()
    pid = os.getpid()
    _lease_values(tmp_path, {f"{A}/{pid}".encode(): struct.pack("<Q", 1) + b"whole"})
    cache = make(tmp_path, 2 * (PIECE + 8))
    cache.put(A, 0, bytes(PIECE), 4 * PIECE)
    assert cache.room() == 2 * (PIECE + 8)  # A is held by no one
    cache.put(B, 0, bytes(PIECE), 4 * PIECE)
    cache.put(B, 1, bytes(PIECE), 4 * PIECE)
    assert not cache.has(A, 0)  # evicted, though "leased whole" by a pid that is alive
    cache.close()


def test_a_lease_written_before_start_times_were_kept_still_holds(tmp_path: Path) -> None:
    make(tmp_path).close()
    pid = os.getpid()
    _lease_values(tmp_path, {f"{A}/{pid}".encode(): b"whole", f"{B}/{pid}".encode(): b"\x01"})
    cache = make(tmp_path, 2 * (PIECE + 8))
    cache.put(A, 0, bytes(PIECE), 4 * PIECE)
    cache.put(B, 0, bytes(PIECE), 4 * PIECE)  # B's lease value is damaged: no lease
    cache.put(C, 0, bytes(PIECE), 4 * PIECE)
    assert cache.has(A, 0) and not cache.has(B, 0)
    cache.close()


def test_a_plain_lease_writes_over_a_dead_holders_whole_one(tmp_path: Path) -> None:
    make(tmp_path).close()
    pid = os.getpid()
    _lease_values(tmp_path, {f"{A}/{pid}".encode(): struct.pack("<Q", 1) + b"whole"})
    cache = make(tmp_path, 3 * (PIECE + 8))
    cache.put(A, 0, bytes(PIECE), 4 * PIECE)
    cache.lease([A])  # this process's now: held, though not whole
    assert cache.room() == 3 * (PIECE + 8) - PIECE
    cache.lease([B], whole=True)
    cache.lease([B])  # does not undo this process's own whole lease
    cache.put(B, 0, bytes(PIECE), 4 * PIECE)
    cache.put(C, 0, bytes(PIECE), 4 * PIECE)
    cache.put(C, 1, bytes(PIECE), 4 * PIECE)
    assert cache.has(B, 0) and not cache.has(A, 0)
    cache.close()


def test_piece_larger_than_the_cache_is_not_stored(tmp_path: Path) -> None:
    cache = make(tmp_path, PIECE // 2)
    assert cache.put(A, 0, bytes(PIECE), PIECE).stored is False
    assert cache.stats().size == 0
    cache.close()


def test_drop_blob_removes_every_piece(tmp_path: Path) -> None:
    cache = make(tmp_path)
    for index in range(3):
        cache.put(A, index, bytes(PIECE), 3 * PIECE)
    cache.put(B, 0, b"keep", 4)
    cache.drop_blob(A)
    assert cache.missing(A, 3 * PIECE) == [0, 1, 2]
    assert cache.get(B, 0, unvouched=True) == b"keep"
    assert cache.stats().size == 4 + 8
    cache.close()


def test_unusable_cache_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="cannot open the cache"):
        make(blocker / "cache")


def test_meta_records(tmp_path: Path) -> None:
    cache = make(tmp_path)
    cache.put_meta("manifest/x", b"{}")
    assert cache.get_meta("manifest/x") == b"{}"
    assert cache.get_meta("missing") is None
    assert os.path.exists(tmp_path / "data.mdb")
    cache.close()


def test_a_piece_nothing_vouched_for_is_served_to_no_reader(tmp_path: Path) -> None:
    cache = make(tmp_path)
    size = PIECE + 5
    cache.put(A, 0, b"a" * PIECE, size)
    cache.put(A, 1, b"b" * 5, size)
    assert cache.has(A, 0)
    assert cache.get(A, 0) is None  # stored before its blob was checked: readers do not see it
    assert cache.get(A, 0, unvouched=True) == b"a" * PIECE  # the hash reads it back
    assert cache.mark_verified(A, size, [piece_checksum(b"a" * PIECE), piece_checksum(b"b" * 5)])
    assert cache.get(A, 0) == b"a" * PIECE
    assert cache.get(A, 1) == b"b" * 5
    # An eviction of one piece un-verifies the blob but leaves its other pieces vouched for.
    cache.drop_piece(A, 1)
    assert not cache.is_verified(A)
    assert cache.get(A, 0) == b"a" * PIECE
    cache.close()


def test_a_piece_is_vouched_for_by_the_piece_index_once(tmp_path: Path) -> None:
    cache = make(tmp_path)
    cache.put(A, 0, b"good", 4)
    cache.put(B, 0, b"evil", 4)
    good = f"blake3:{blake3.blake3(b'good').hexdigest()}"
    assert cache.get_checked(B, 0, good, None) is None  # bytes that do not match stay unserved
    assert cache.get(B, 0) is None
    assert cache.get_checked(A, 0, good, None) == b"good"
    assert cache.get(A, 0) == b"good"  # marked: the next reader does not hash it again
    cache.put(A, 1, b"old", 3)  # a piece of a model indexed before v2: sha256
    assert cache.get_checked(A, 1, "sha256:" + hashlib.sha256(b"evil").hexdigest(), None) is None
    assert cache.get_checked(A, 1, "sha256:" + hashlib.sha256(b"old").hexdigest(), None) == b"old"
    assert cache.put(B, 1, b"x", 2, vouched=True).stored
    assert cache.get(B, 1) == b"x"
    cache.close()


def test_a_damaged_record_is_a_miss_never_a_wrong_record(tmp_path: Path) -> None:
    cache = make(tmp_path)
    cache.put_meta("tar-index/x", b'[{"data_offset": 512}]')
    cache.close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        damaged = bytearray(txn.get(b"record/tar-index/x"))
        damaged[-3] ^= 0x01  # 512 -> 502: one bit
        txn.put(b"record/tar-index/x", bytes(damaged))
    env.close()
    cache = make(tmp_path)
    assert cache.get_meta("tar-index/x") is None
    assert cache.meta_keys("tar-index/") == []  # dropped, made again by its next user
    cache.close()


def test_a_cache_of_an_older_format_is_made_afresh(tmp_path: Path) -> None:
    # Formats 1 and 2 kept the pieces inside LMDB: such a cache starts again, empty and usable.
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"format", f"modelfs-cache-2/{PIECE}".encode(), db=env.open_db(b"meta", txn=txn))
        txn.put(f"{A}/{0:010d}".encode(), b"x" * PIECE, db=env.open_db(b"pieces", txn=txn))
    env.close()
    cache = make(tmp_path)
    assert cache.stats().pieces == 0 and not cache.has(A, 0)
    cache.put(A, 0, b"y" * PIECE, PIECE, vouched=True)
    assert cache.get(A, 0) == b"y" * PIECE
    cache.close()


def test_a_cache_of_another_piece_size_is_refused_with_what_to_do(tmp_path: Path) -> None:
    make(tmp_path).close()
    with pytest.raises(CacheError, match=r"another format.*another --cache-dir or remove"):
        PieceCache(tmp_path, 100 * PIECE, piece_size=2 * PIECE)


def test_a_piece_read_lands_in_the_buffer_given(tmp_path: Path) -> None:
    cache = make(tmp_path)
    data = os.urandom(PIECE)
    cache.put("sha256:a", 0, data, PIECE)
    into = memoryview(bytearray(PIECE + 10))[:PIECE]
    got = cache.get("sha256:a", 0, into, unvouched=True)
    assert got is into and bytes(into) == data
    cache.close()


def test_a_blob_is_vouched_for_only_over_the_very_pieces_that_were_hashed(tmp_path: Path) -> None:
    """A process hashed a blob whole; meanwhile another evicted a piece and stored other bytes
    for it. Marking the blob checked must not vouch for bytes nobody checked."""
    cache = make(tmp_path)
    size = 2 * PIECE
    hashed = [b"a" * PIECE, b"b" * PIECE]
    for index, piece in enumerate(hashed):
        cache.put(A, index, piece, size)
    cache.drop_piece(A, 1)
    cache.put(A, 1, b"X" * PIECE, size)  # stored since, unchecked
    assert not cache.mark_verified(A, size, [piece_checksum(piece) for piece in hashed])
    assert not cache.is_verified(A)
    assert cache.get(A, 0) is None and cache.get(A, 1) is None  # neither is served
    assert not cache.mark_verified(A, size, [piece_checksum(hashed[0])])  # not every piece
    cache.drop_piece(A, 1)
    cache.put(A, 1, hashed[1], size)  # the hashed bytes again: now it may be vouched for
    assert cache.mark_verified(A, size, [piece_checksum(piece) for piece in hashed])
    assert cache.get(A, 1) == hashed[1]
    cache.close()


def _slots_made(cache: PieceCache) -> int:
    with cache._env.begin(db=cache._meta) as txn:
        return cache._counter(txn, b"slots")


def test_no_lock_is_held_while_a_piece_is_written(tmp_path: Path) -> None:
    """LMDB's write lock is the whole node's: while one process writes a piece's bytes, another
    stores, leases and records (it would wait for the lock forever, and time out, if the bytes
    were written inside the transaction)."""
    cache = make(tmp_path)
    write = cache._file.write
    other = (
        "import sys; from pathlib import Path; from modelfs.cache import PieceCache; "
        f"c = PieceCache(Path(sys.argv[1]), {100 * PIECE}, piece_size={PIECE}); "
        f"c.put('{B}', 0, b'b' * {PIECE}, {PIECE}); c.lease(['{B}']); "
        "c.put_meta('note', b'written'); c.close()"
    )

    def others_meanwhile(slot: int, data: bytes | bytearray | memoryview) -> None:
        subprocess.run([sys.executable, "-c", other, str(tmp_path)], check=True, timeout=30)
        write(slot, data)

    cache._file.write = others_meanwhile  # type: ignore[method-assign]
    assert cache.put(A, 0, b"a" * PIECE, PIECE).stored
    assert cache.get(A, 0, unvouched=True) == b"a" * PIECE
    assert cache.get(B, 0, unvouched=True) == b"b" * PIECE
    assert cache.get_meta("note") == b"written"
    assert cache.accounting() == (2 * (PIECE + 8), 2 * (PIECE + 8))  # both counted, once each
    cache.close()


def test_the_slot_of_a_writer_that_died_mid_write_is_freed_by_the_next_opener(
    tmp_path: Path,
) -> None:
    """A process killed between reserving a slot and recording its piece leaves a slot no record
    points to, counted against the limit: the next process to open the cache frees it."""
    limit = PIECE + 8  # room for one piece: a reservation never freed would block every put
    dies = (
        "import os, sys; from pathlib import Path; from modelfs.cache import PieceCache; "
        f"c = PieceCache(Path(sys.argv[1]), {limit}, piece_size={PIECE}); "
        "c._file.write = lambda slot, data: os.kill(os.getpid(), 9); "
        f"c.put('{A}', 0, b'a' * {PIECE}, {PIECE})"
    )
    child = subprocess.run([sys.executable, "-c", dies, str(tmp_path)])
    assert child.returncode == -9
    cache = make(tmp_path, limit)
    assert cache.accounting() == (0, 0)
    assert cache.put(B, 0, b"b" * PIECE, PIECE).stored
    assert cache.accounting() == (limit, limit)
    assert cache.get(B, 0, unvouched=True) == b"b" * PIECE
    assert not cache.has(A, 0)
    assert _slots_made(cache) == 1  # the freed slot was reused
    cache.close()


def test_a_failed_or_refused_write_gives_its_slot_and_bytes_back(tmp_path: Path) -> None:
    cache = make(tmp_path)
    write = cache._file.write

    def disk_full(slot: int, data: bytes | bytearray | memoryview) -> None:
        raise OSError(28, "No space left on device")

    cache._file.write = disk_full  # type: ignore[method-assign]
    with pytest.raises(CacheError, match="No space left on device"):
        cache.put(A, 0, b"a" * PIECE, PIECE)
    cache._file.write = write  # type: ignore[method-assign]
    assert (cache.stats().size, cache.has(A, 0)) == (0, False)
    refused = cache.put_many([PieceWrite(A, 0, b"a" * PIECE, PIECE)], keep=lambda w: False)
    assert refused == [PutResult(stored=False, blob_complete=False)]
    assert (cache.stats().size, cache.has(A, 0)) == (0, False)
    assert cache.put(B, 0, b"b" * PIECE, PIECE).stored
    assert _slots_made(cache) == 1  # one slot served all three
    cache.close()


def test_a_damaged_index_is_refused_in_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    cache = make(tmp_path)
    for index in range(4):
        cache.put(A, index, bytes([index]) * PIECE, 4 * PIECE)
    cache.close()
    _damage_every_index_page(tmp_path)
    with pytest.raises(CacheError) as raised:
        make(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"the cache's index at {tmp_path} is damaged (")
    assert message.endswith("remove the cache or use another --cache-dir")
    assert "\n" not in message
    verify = modelfs("cache", "verify", "--cache-dir", str(tmp_path))
    assert verify.returncode == 1
    assert verify.stderr == f"modelfs: error: {message}\n"


def _damage_every_index_page(cache_dir: Path) -> None:
    with (cache_dir / "data.mdb").open("r+b") as file:  # every page but LMDB's two meta pages
        used = os.lseek(file.fileno(), 0, os.SEEK_HOLE)  # then the map's sparse rest
        file.seek(2 * 4096)
        file.write(b"\xff" * (used - 2 * 4096))


def test_an_index_damaged_while_in_use_puts_the_cache_out_of_use_not_the_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by damaging the index under live mounts: LMDB's errors came out of reads (EIO) and
    out of the mount (it died). Now the cache answers as one that holds nothing, said once."""
    cache = make(tmp_path)
    for index in range(4):
        cache.put(A, index, bytes([index]) * PIECE, 4 * PIECE, vouched=True)
    assert cache.get(A, 0) == bytes(PIECE)
    _damage_every_index_page(tmp_path)  # under the open cache, as disk rot would
    assert cache.get(A, 1) is None
    assert cache.damage is not None
    assert cache.damage.startswith(f"the cache's index at {tmp_path} is damaged (")
    assert not cache.has(A, 2)
    assert cache.missing(A, 4 * PIECE) == [0, 1, 2, 3]
    assert cache.put(B, 0, b"b" * PIECE, PIECE, vouched=True).stored is False
    assert cache.put_many([PieceWrite(B, 1, b"b", 2 * PIECE)]) == [PutResult(False, False)]
    cache.lease([A], whole=True)
    cache.release([A])
    assert cache.get_meta("manifest/x") is None
    assert cache.stats().size == 0 and cache.room() == 0
    assert [record.message for record in caplog.records if record.levelname == "ERROR"] == [
        f"{cache.damage}; this process goes on without the cache"
    ]
    with pytest.raises(CacheError) as raised:
        cache.raise_if_out_of_use()
    assert str(raised.value) == cache.damage
    cache.close()


def test_records_of_the_wrong_size_are_damage_too(tmp_path: Path) -> None:
    """Found by scripts/chaos --only damage_cache: a key or value of the wrong size made
    struct.error come out of opening the cache (the mount "failed unexpectedly", every time)
    or out of a lookup."""
    cache = make(tmp_path)
    cache.put(A, 0, b"a" * PIECE, 2 * PIECE, vouched=True)
    with cache._env.begin(write=True, db=cache._blobs) as txn:
        txn.put(A.encode(), b"\x01\x02")  # a blob's state, cut short
    assert cache.is_complete(A, 2 * PIECE) is False
    assert cache.damage is not None and "unpack requires a buffer" in cache.damage
    cache.close()
    with lmdb.open(str(tmp_path), max_dbs=8) as env, env.begin(write=True) as txn:
        txn.put(b"\x07", b"", db=env.open_db(b"reserved", txn=txn))  # a slot key, cut short
    with pytest.raises(CacheError) as raised:
        make(tmp_path)
    assert str(raised.value).startswith(f"the cache's index at {tmp_path} is damaged (")


def test_a_mount_killed_by_lmdb_is_told_as_a_damaged_index(tmp_path: Path) -> None:
    """LMDB ends a process on some damage (an assertion: SIGABRT, found by scripts/chaos; a page
    read past the file: SIGBUS), which no Python code can catch. The mount command says what
    to do instead of "status -6"."""
    for killed in (signal.SIGABRT, signal.SIGBUS):  # the wait status of a process it killed
        message = _died(killed, tmp_path / "mount.log", tmp_path)
        assert message == (
            f"the mount process was killed by {killed.name}, as a damaged cache index does "
            f"(see {tmp_path / 'mount.log'}); remove the cache at {tmp_path} or use another "
            "--cache-dir"
        )
    assert _died(1 << 8, tmp_path / "mount.log", tmp_path).startswith(
        "the mount process exited with status 1;"
    )


def test_a_damaged_record_naming_any_slot_and_length_is_a_miss(tmp_path: Path) -> None:
    """A record that parses but holds garbage (a 4 GiB length, a slot past any file) made a
    read of 4 GiB, or an offset the kernel cannot take (the mount died of OverflowError)."""
    cache = make(tmp_path)
    cache.put(A, 0, b"a" * PIECE, 2 * PIECE, vouched=True)
    cache.put(A, 1, b"b" * PIECE, 2 * PIECE, vouched=True)
    with cache._env.begin(write=True, db=cache._pieces) as txn:
        for index, (slot, length) in enumerate([(0, (1 << 32) - 1), (1 << 63, PIECE)]):
            key = f"{A}/{index:010d}".encode()
            checksum = struct.unpack("<QIQB", txn.get(key))[2]
            txn.put(key, struct.pack("<QIQB", slot, length, checksum, 1))
    assert cache.get(A, 0) is None and cache.get(A, 1) is None
    assert list(cache.stored_pieces(A, 2 * PIECE)) == [None, None]
    assert cache.put(A, 0, b"a" * PIECE, 2 * PIECE, vouched=True).stored  # fetched again
    assert cache.get(A, 0) == b"a" * PIECE
    cache.close()


def test_a_vouched_write_vouches_only_for_the_same_bytes_stored_before(tmp_path: Path) -> None:
    """A piece stored unvouched (by a process without the piece index: from a peer, say, before
    its blob was checked) is not vouched for by a later write the index checked unless it holds
    the same bytes; other bytes are replaced, and no reader is served them."""
    cache = make(tmp_path)
    cache.put(A, 0, b"L" * PIECE, 2 * PIECE)  # a lying peer's bytes, unvouched
    cache.put(B, 0, b"b" * PIECE, PIECE)
    assert cache.put(A, 0, b"a" * PIECE, 2 * PIECE, vouched=True).stored
    assert cache.get(A, 0) == b"a" * PIECE
    assert cache.put(B, 0, b"b" * PIECE, PIECE, vouched=True).stored  # the same bytes
    assert cache.get(B, 0) == b"b" * PIECE
    assert cache.stats().pieces == 2
    assert cache.accounting() == (2 * (PIECE + 8), 2 * (PIECE + 8))
    cache.close()


def test_a_reservation_of_a_dead_writer_whose_pid_is_reused_is_freed(tmp_path: Path) -> None:
    """In a container, a new process is often given the pid of one that died: a reservation is
    the writer's by pid and start time, so the pid alone does not keep it."""
    limit = PIECE + 8
    make(tmp_path, limit).close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True) as txn:
        reserved, meta = (env.open_db(name, txn=txn) for name in (b"reserved", b"meta"))
        # Slot 0, reserved by a process with this pid that started at another time.
        txn.put((0).to_bytes(8, "big"), struct.pack("<IQQ", os.getpid(), 1, limit), db=reserved)
        txn.put(b"total", limit.to_bytes(8, "big"), db=meta)
        txn.put(b"slots", (1).to_bytes(8, "big"), db=meta)
    env.close()
    cache = make(tmp_path, limit)
    assert cache.accounting() == (0, 0)
    assert cache.put(A, 0, b"a" * PIECE, PIECE).stored
    assert _slots_made(cache) == 1
    cache.close()


def test_a_damaged_reservation_is_freed_not_fatal(tmp_path: Path) -> None:
    make(tmp_path).close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True) as txn:
        reserved, meta = (env.open_db(name, txn=txn) for name in (b"reserved", b"meta"))
        txn.put((0).to_bytes(8, "big"), b"\x01" * 5, db=reserved)  # slot 0's, cut short
        txn.put(b"slots", (1).to_bytes(8, "big"), db=meta)
    env.close()
    cache = make(tmp_path)
    assert cache.accounting() == (0, 0)
    assert cache.put(A, 0, b"a" * PIECE, PIECE).stored
    assert _slots_made(cache) == 1  # slot 0 again
    cache.close()

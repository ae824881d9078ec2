"""The LMDB piece cache on real LMDB files: checksums, limits, LRU order, leases, sharing."""

import hashlib
import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest

from modelfs.cache import PieceCache
from modelfs.cache.store import copy_releasing_gil
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
    cache.mark_verified(A, size)
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
    # Flip a byte of the stored value behind the cache's back, as disk rot would.
    env = lmdb.open(str(tmp_path), max_dbs=8)
    db = env.open_db(b"pieces")
    with env.begin(write=True, db=db) as txn:
        key, value = next(iter(txn.cursor()))
        damaged = bytearray(value)
        damaged[20] ^= 0xFF
        txn.put(key, bytes(damaged))
    env.close()
    cache = make(tmp_path)
    assert cache.get(A, 0, unvouched=True) is None
    assert not cache.has(A, 0)
    assert cache.stats().size == 0
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
    cache.mark_verified(A, size)
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
    good = hashlib.sha256(b"good").hexdigest()
    assert cache.get_checked(B, 0, good, None) is None  # bytes that do not match stay unserved
    assert cache.get(B, 0) is None
    assert cache.get_checked(A, 0, good, None) == b"good"
    assert cache.get(A, 0) == b"good"  # marked: the next reader does not hash it again
    assert cache.put(B, 1, b"x", 2, vouched=True).stored
    assert cache.get(B, 1) == b"x"
    cache.close()


def test_pieces_stored_before_the_vouched_flag_count_as_vouched_if_their_blob_was_verified(
    tmp_path: Path,
) -> None:
    cache = make(tmp_path)
    for digest, verified in ((A, True), (B, False)):
        cache.put(digest, 0, b"old", 3)
        if verified:
            cache.mark_verified(digest, 3)
    cache.close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    checksums = env.open_db(b"checksums")
    with env.begin(write=True, db=checksums) as txn:
        for digest in (A, B):  # as an older modelfs stored them: the checksum alone
            key = f"{digest}/{0:010d}".encode()
            txn.put(key, bytes(txn.get(key))[:8])
    env.close()
    cache = make(tmp_path)
    assert cache.get(A, 0) == b"old"
    assert cache.get(B, 0) is None
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


def test_a_cache_of_an_older_format_is_refused_with_what_to_do(tmp_path: Path) -> None:
    # Format 1 kept the checksum inside each piece's value: read as format 2, every piece would
    # fail its checksum, so the cache is refused whole, with the way out.
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format", f"modelfs-cache-1/{PIECE}".encode())
    env.close()
    with pytest.raises(CacheError, match=r"another format.*another --cache-dir or remove"):
        make(tmp_path)


def test_a_piece_copied_out_of_the_map_lands_in_the_buffer_given(tmp_path: Path) -> None:
    cache = make(tmp_path)
    data = os.urandom(PIECE)
    cache.put("sha256:a", 0, data, PIECE)
    into = memoryview(bytearray(PIECE + 10))[:PIECE]
    got = cache.get("sha256:a", 0, into, unvouched=True)
    assert got is into and bytes(into) == data
    cache.close()


def test_the_copy_out_of_the_map_lets_the_event_loop_thread_run() -> None:
    """A cache read copies in a worker thread; meanwhile the thread that started it keeps running.
    Under the GIL (as a slice assignment copies) it would stop for the whole copy."""
    size = 512 << 20
    source = memoryview(bytes(size))
    into = memoryview(bytearray(size))
    into[:] = source  # touched: what is timed below is only the copy
    copied: list[tuple[float, float]] = []

    def copy() -> None:
        started = time.perf_counter()
        copy_releasing_gil(into, source)
        copied.append((started, time.perf_counter()))

    worker = threading.Thread(target=copy)
    turns: list[float] = []
    worker.start()
    while worker.is_alive():
        turns.append(time.perf_counter())
    worker.join()
    started, ended = copied[0]
    inside = [started] + [turn for turn in turns if started < turn < ended] + [ended]
    longest_wait = max(later - earlier for earlier, later in itertools.pairwise(inside))
    assert longest_wait < (ended - started) / 2


def test_a_copy_between_buffers_of_different_sizes_is_refused() -> None:
    with pytest.raises(ValueError, match="copy of 10 bytes into 9"):
        copy_releasing_gil(bytearray(9), b"0123456789")

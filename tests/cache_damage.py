"""Damage a stored piece behind the cache's back, as disk rot, a lost write or a bug would."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import lmdb
import xxhash

from modelfs.cache.store import PIECES_FILE

# The cache's ``pieces`` record (modelfs/cache/store.py): slot, length, xxh3-64, vouched.
RECORD = struct.Struct("<QIQB")


def piece_location(cache_dir: Path, digest: str, index: int) -> tuple[int, int]:
    """(offset in the pieces file, length) of a stored piece, waiting a while for a mount that
    is still storing what it fetched (the record is committed after the bytes are written)."""
    env = lmdb.open(str(cache_dir), max_dbs=8)
    deadline = time.monotonic() + 10
    try:
        while True:
            with env.begin() as txn:
                pieces, meta = (env.open_db(name, txn=txn) for name in (b"pieces", b"meta"))
                record = txn.get(f"{digest}/{index:010d}".encode(), db=pieces)
                piece_size = int(bytes(txn.get(b"format", db=meta)).rpartition(b"/")[2])
            if record is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        env.close()
    assert record is not None, f"piece {index} of {digest} is not in {cache_dir}"
    slot, length, _, _ = RECORD.unpack(record)
    return slot * piece_size, length


def damage_piece(
    cache_dir: Path, digest: str, index: int, *, at: int = 1000, reseal: bool = False
) -> None:
    """Flip the byte ``at`` of a stored piece. ``reseal``: also give the piece the damaged
    bytes' own checksum, marked vouched, so that only a digest check can tell."""
    offset, length = piece_location(cache_dir, digest, index)
    with (cache_dir / PIECES_FILE).open("r+b") as file:
        file.seek(offset)
        data = bytearray(file.read(length))
        data[at] ^= 0xFF
        file.seek(offset)
        file.write(data)
    if not reseal:
        return
    env = lmdb.open(str(cache_dir), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            pieces = env.open_db(b"pieces", txn=txn, create=False)
            key = f"{digest}/{index:010d}".encode()
            slot, _, _, _ = RECORD.unpack(txn.get(key, db=pieces))
            txn.put(
                key, RECORD.pack(slot, length, xxhash.xxh3_64_intdigest(bytes(data)), 1), db=pieces
            )
    finally:
        env.close()

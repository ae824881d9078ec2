"""The pieces file on a real filesystem: direct I/O where the buffer allows, buffered otherwise,
the same bytes either way."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from modelfs.cache.piece_file import PieceFile

SLOT = 64 << 10


def aligned(data: bytes) -> memoryview:
    """``data`` in a page-aligned buffer, as the mount's piece buffers are."""
    buffer = mmap.mmap(-1, SLOT)
    view = memoryview(buffer)[: len(data)]
    view[:] = data
    return view


def test_whole_and_short_pieces_round_trip_direct_or_not(tmp_path: Path) -> None:
    pieces = PieceFile(tmp_path / "pieces.data", SLOT)
    whole, short, unaligned = os.urandom(SLOT), os.urandom(5000), os.urandom(SLOT)
    pieces.write(3, aligned(whole))  # direct
    pieces.write(1, aligned(short))  # 5000 bytes cannot go direct: through the page cache
    pieces.write(0, memoryview(bytes(1) + unaligned)[1:])  # not aligned: EINVAL, then buffered
    into = aligned(bytes(SLOT))
    assert pieces.read_into(3, into) == SLOT and bytes(into) == whole
    assert pieces.read(1, 5000) == short
    assert pieces.read_into(0, bytearray(SLOT)) == SLOT
    assert pieces.read(0, SLOT) == unaligned
    assert (tmp_path / "pieces.data").stat().st_size == 4 * SLOT
    pieces.close()


def test_a_read_past_the_end_of_the_file_comes_back_short(tmp_path: Path) -> None:
    pieces = PieceFile(tmp_path / "pieces.data", SLOT)
    pieces.write(0, aligned(os.urandom(SLOT)))
    assert pieces.read_into(1, aligned(bytes(SLOT))) == 0
    os.truncate(tmp_path / "pieces.data", SLOT // 2)
    assert pieces.read_into(0, aligned(bytes(SLOT))) == SLOT // 2
    assert len(pieces.read(0, SLOT)) == SLOT // 2
    pieces.close()


def test_a_freed_slot_holds_no_blocks_and_reads_as_zeros(tmp_path: Path) -> None:
    pieces = PieceFile(tmp_path / "pieces.data", SLOT)
    for slot in range(4):
        pieces.write(slot, aligned(os.urandom(SLOT)))
    os.sync()
    before = (tmp_path / "pieces.data").stat().st_blocks
    pieces.free(1)
    pieces.free(2)
    assert (tmp_path / "pieces.data").stat().st_blocks <= before - 2 * SLOT // 512
    assert pieces.read(1, SLOT) == bytes(SLOT)
    pieces.close()

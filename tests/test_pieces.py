import hashlib

import blake3
import pytest

from modelfs.pieces import piece_count, piece_matches, piece_runs, piece_span, pieces_covering


def test_piece_count() -> None:
    assert piece_count(0, 4) == 0
    assert piece_count(1, 4) == 1
    assert piece_count(4, 4) == 1
    assert piece_count(9, 4) == 3


def test_piece_span_last_is_short() -> None:
    assert piece_span(0, 9, 4) == (0, 4)
    assert piece_span(2, 9, 4) == (8, 1)
    with pytest.raises(ValueError):
        piece_span(3, 9, 4)


@pytest.mark.parametrize(
    ("offset", "size", "expected"),
    [
        (0, 1, range(0, 1)),
        (3, 2, range(0, 2)),
        (4, 4, range(1, 2)),
        (0, 100, range(0, 3)),
        (9, 5, range(0)),
        (8, 0, range(0)),
    ],
)
def test_pieces_covering(offset: int, size: int, expected: range) -> None:
    assert pieces_covering(offset, size, 9, 4) == expected


def test_consecutive_pieces_of_one_blob_are_grouped_into_runs() -> None:
    pieces = [("a", 0), ("a", 1), ("a", 2), ("b", 3), ("a", 3), ("a", 5), ("a", 6)]
    assert piece_runs(pieces, 2) == [
        ("a", [0, 1]),
        ("a", [2]),
        ("b", [3]),
        ("a", [3]),
        ("a", [5, 6]),
    ]


def test_a_piece_matches_the_digest_of_the_hash_it_names() -> None:
    data = b"piece"
    assert piece_matches(data, "blake3:" + blake3.blake3(data).hexdigest())
    assert piece_matches(data, "sha256:" + hashlib.sha256(data).hexdigest())  # a v1 index
    assert not piece_matches(b"other", "blake3:" + blake3.blake3(data).hexdigest())
    assert not piece_matches(data, "blake3:" + hashlib.sha256(data).hexdigest())
    assert not piece_matches(data, "md5:" + hashlib.md5(data).hexdigest())

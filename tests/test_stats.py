"""The pure parts of the mount counters: histogram buckets, the snapshot's JSON, error kinds,
the status columns, JSON log lines."""

from __future__ import annotations

import json
import logging

import pytest

from modelfs.cli.status import describe_fetched, describe_sources, describe_waits, table
from modelfs.errors import (
    AuthError,
    IntegrityError,
    ModelfsError,
    RegistryError,
    RegistryUnavailableError,
)
from modelfs.logs import ContextFilter, JsonFormatter, set_log_context
from modelfs.metrics import hit_ratio
from modelfs.sources.stats import (
    DIGEST_MISMATCH,
    SOURCE_UNREACHABLE,
    Histogram,
    MountStats,
    attributing,
    error_kind,
    mark_served_by,
)


def test_histogram_buckets_include_their_upper_bound() -> None:
    histogram = Histogram(bounds=(0.01, 0.1, 1.0))
    for seconds in (0.005, 0.01, 0.05, 0.1, 2.0, 2.0):
        histogram.observe(seconds)
    assert histogram.counts == [2, 2, 0, 2]
    assert histogram.cumulative() == [(0.01, 2), (0.1, 4), (1.0, 4), (float("inf"), 6)]
    assert histogram.count == 6
    assert histogram.total == pytest.approx(4.165)


def test_snapshot_survives_json() -> None:
    stats = MountStats(read_bytes=10, files=3, piece_buffers=17, plain_piece_buffers=2)
    stats.fetched("registry", 7)
    stats.fetched("registry", 5)
    stats.timed("registry", 0.02)
    stats.fetch_started("on_demand")
    stats.failed(DIGEST_MISMATCH, "blob x does not match its digest")
    stats.rejected_by_peer["10.0.0.2:7000"] = 1
    stats.read_seconds.observe(0.03)
    copy = MountStats.from_json(json.loads(json.dumps(stats.as_json())))
    assert copy == stats
    assert copy.fetched_bytes == {"registry": 12}
    assert copy.read_seconds.count == 1
    with pytest.raises(KeyError):
        MountStats.from_json({"read_bytes": 1})
    # A mount process of an older modelfs reports no read times: none, not a failure.
    older = stats.as_json()
    del older["read_seconds"]
    assert MountStats.from_json(older).read_seconds.count == 0
    del older["piece_buffers"], older["plain_piece_buffers"]
    assert MountStats.from_json(older).piece_buffers == 0
    broken = stats.as_json()
    broken["read_seconds"]["counts"] = [1]
    with pytest.raises(ValueError, match="11 bounds with 1 counts"):
        MountStats.from_json(broken)


def test_slow_reads_are_those_over_ten_milliseconds() -> None:
    stats = MountStats()
    for seconds in (0.00004, 0.0004, 0.004, 0.01, 0.02, 0.4, 40.0):
        stats.read_seconds.observe(seconds)
    assert stats.slow_reads() == 3
    assert describe_waits(stats.as_json()) == "3 of 7"
    assert describe_waits({}) == "-"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RegistryUnavailableError("down"), SOURCE_UNREACHABLE),
        (IntegrityError("wrong bytes"), DIGEST_MISMATCH),
        (AuthError("denied"), "auth_denied"),  # before its base class, RegistryError
        (RegistryError("500"), "registry_error"),
        (ModelfsError("?"), "other"),
    ],
)
def test_error_kind(error: ModelfsError, kind: str) -> None:
    assert error_kind(error) == kind


def test_served_by_marks_only_inside_its_block() -> None:
    mark_served_by("registry")  # outside any fetch: nothing to mark
    with attributing("peer") as served_by:
        assert served_by == ["peer"]
        mark_served_by("registry")
    assert served_by == ["registry"]


@pytest.mark.parametrize(
    ("fetched", "column"),
    [
        ({}, "-"),
        ({"registry": 0}, "-"),
        ({"registry": 80, "peer": 20}, "registry 80% peer 20%"),
        ({"peer": 1, "registry": 3}, "registry 75% peer 25%"),
        ({"cache": 999, "registry": 1, "peer": 0}, "cache 100% registry <1%"),
    ],
)
def test_sources_column(fetched: dict[str, int], column: str) -> None:
    assert describe_sources(fetched) == column


def test_fetched_column() -> None:
    assert describe_fetched(3 << 20, 4 << 20) == "3.0 of 4.0 MiB (75%)"
    assert describe_fetched(None, 4 << 20) == "-"
    assert describe_fetched(0, 0) == "-"


def test_table_pads_columns() -> None:
    assert table([["A", "BB"], ["ccc", "d"]]) == ["A    BB", "ccc  d"]


def test_hit_ratio() -> None:
    assert hit_ratio([]) is None
    first = MountStats(fetched_bytes={"cache": 30, "registry": 10})
    second = MountStats(fetched_bytes={"peer": 60})
    assert hit_ratio([first, second]) == 0.3


def test_json_log_line_carries_the_mount_context() -> None:
    set_log_context(reference="r.example/m:v1", digest="sha256:" + "a" * 64)
    try:
        record = logging.LogRecord("modelfs.x", logging.ERROR, __file__, 1, "read %s", ("f",), None)
        ContextFilter().filter(record)
        line = json.loads(JsonFormatter().format(record))
    finally:
        set_log_context(reference=None, digest=None)
    assert line["message"] == "read f" and line["level"] == "error"
    assert line["reference"] == "r.example/m:v1" and line["digest"] == "sha256:" + "a" * 64

"""A mount's live counters: bytes read and fetched by source, fetch latencies, errors by kind.

One ``MountStats`` per mount process, fed by the piece fetcher, the metered registry repository
and the reader path; the mount hands a JSON snapshot to the daemon, which exports it to
Prometheus and ``modelfs status``. Pure: no I/O here.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from modelfs.errors import (
    AuthError,
    CacheError,
    IntegrityError,
    ModelfsError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from modelfs.sources.interface import BlobBytes, Deliver

# Seconds: a cached piece takes ~1 ms, a 4 MiB piece from a near registry a few ms to 100 ms,
# one behind retries up to the request timeout (30 s by default).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# Seconds a reader's read took: one served from memory takes tens of microseconds, one that
# waited on a fetch milliseconds or more.
READ_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
# A read slower than this waited on the network (or a disk), not on the mount's own work.
SLOW_READ = 0.01

# Where bytes come from (label values of ``modelfs_fetched_bytes_total``): a mirror is one of
# the registry's hosts.toml mirrors (``modelfs.sources.mirrors``).
REGISTRY, MIRROR, PEER, LAYOUT, CACHE = "registry", "mirror", "peer", "layout", "cache"
SOURCES = (REGISTRY, MIRROR, PEER, LAYOUT, CACHE)
# Sources that count what they send themselves (``MeteredRepository``), whole blobs included.
SELF_COUNTED = frozenset({REGISTRY, MIRROR})

# What a fetch was for (``modelfs_fetches_total``).
ON_DEMAND, PREFETCH = "on_demand", "prefetch"

# Errors by kind (``modelfs_errors_total``).
SOURCE_UNREACHABLE = "source_unreachable"
DIGEST_MISMATCH = "digest_mismatch"
CORRUPT_CACHE_ENTRY = "corrupt_cache_entry"
REJECTED_PEER_PIECE = "rejected_peer_piece"


def error_kind(error: ModelfsError) -> str:
    """The ``kind`` label of an error that failed a fetch."""
    kinds: tuple[tuple[type[ModelfsError], str], ...] = (
        (RegistryUnavailableError, SOURCE_UNREACHABLE),
        (AuthError, "auth_denied"),
        (NotFoundError, "not_found"),
        (RegistryError, "registry_error"),
        (IntegrityError, DIGEST_MISMATCH),
        (CacheError, "cache_error"),
    )
    return next((kind for cls, kind in kinds if isinstance(error, cls)), "other")


@dataclass
class Histogram:
    """Observations counted per bucket (``counts[i]``: at most ``bounds[i]``, above the
    previous bound; the last count is above every bound)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that) per bucket, ending with +Inf: Prometheus'
        ``le`` buckets."""
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


@dataclass
class MountStats:
    """Everything one mount process counts since it started."""

    read_bytes: int = 0  # served to readers through FUSE
    read_seconds: Histogram = field(default_factory=lambda: Histogram(READ_BUCKETS))
    fetched_bytes: dict[str, int] = field(default_factory=dict)  # by source
    mirror_bytes: dict[str, int] = field(default_factory=dict)  # by mirror (its host)
    fetch_seconds: dict[str, Histogram] = field(default_factory=dict)  # by source
    fetches: dict[str, int] = field(default_factory=dict)  # pieces from a source, by purpose
    errors: dict[str, int] = field(default_factory=dict)  # by kind
    last_error: str | None = None
    # Filled in when a snapshot is taken (the cache and the peer source keep their own).
    files: int = 0
    rejected_by_peer: dict[str, int] = field(default_factory=dict)
    # The process's piece buffer pool (``modelfs.sources.buffers``): buffers mapped, and plain
    # buffers handed out past its capacity.
    piece_buffers: int = 0
    plain_piece_buffers: int = 0
    # Trust (modelfs.trust): what the signature policy said of the model (which key verified
    # it), and what the file scans found.
    signature: str | None = None
    findings: list[dict[str, str]] = field(default_factory=list)

    def fetched(self, source: str, size: int) -> None:
        self.fetched_bytes[source] = self.fetched_bytes.get(source, 0) + size

    def fetched_from_mirror(self, host: str, size: int) -> None:
        self.mirror_bytes[host] = self.mirror_bytes.get(host, 0) + size

    def timed(self, source: str, seconds: float) -> None:
        self.fetch_seconds.setdefault(source, Histogram()).observe(seconds)

    def counting(self, source: Callable[[], str | None], deliver: Deliver) -> Deliver:
        """``deliver``, counting each piece's bytes and the time it took to come (since the
        request, or the piece before) for ``source()``; None: someone else counts it."""
        started = time.monotonic()

        async def counted(place: int, data: BlobBytes) -> None:
            nonlocal started
            kind = source()
            if kind is not None:
                self.timed(kind, time.monotonic() - started)
                self.fetched(kind, len(data))
            await deliver(place, data)
            started = time.monotonic()

        return counted

    def slow_reads(self) -> int:
        """Reads that took longer than ``SLOW_READ`` (a bound of theirs): they waited on a fetch."""
        return sum(self.read_seconds.counts[bisect_right(self.read_seconds.bounds, SLOW_READ) :])

    def fetch_started(self, purpose: str) -> None:
        self.fetches[purpose] = self.fetches.get(purpose, 0) + 1

    def failed(self, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = message

    def as_json(self) -> dict[str, Any]:
        return {
            "read_bytes": self.read_bytes,
            "read_seconds": _histogram_json(self.read_seconds),
            "fetched_bytes": self.fetched_bytes,
            "mirror_bytes": self.mirror_bytes,
            "fetch_seconds": {
                source: _histogram_json(h) for source, h in self.fetch_seconds.items()
            },
            "fetches": self.fetches,
            "errors": self.errors,
            "last_error": self.last_error,
            "files": self.files,
            "rejected_by_peer": self.rejected_by_peer,
            "piece_buffers": self.piece_buffers,
            "plain_piece_buffers": self.plain_piece_buffers,
            "signature": self.signature,
            "findings": self.findings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountStats:
        """Raises KeyError, TypeError or ValueError on a snapshot of another shape."""
        return cls(
            read_bytes=int(data["read_bytes"]),
            # A mount process started by an older modelfs (kept across a reload) has none.
            read_seconds=(
                _histogram_from_json(data["read_seconds"])
                if "read_seconds" in data
                else Histogram(READ_BUCKETS)
            ),
            fetched_bytes={str(k): int(v) for k, v in data["fetched_bytes"].items()},
            # Older mount processes read no mirrors.
            mirror_bytes={str(k): int(v) for k, v in data.get("mirror_bytes", {}).items()},
            fetch_seconds={
                str(source): _histogram_from_json(h) for source, h in data["fetch_seconds"].items()
            },
            fetches={str(k): int(v) for k, v in data["fetches"].items()},
            errors={str(k): int(v) for k, v in data["errors"].items()},
            last_error=None if data["last_error"] is None else str(data["last_error"]),
            files=int(data["files"]),
            rejected_by_peer={str(k): int(v) for k, v in data["rejected_by_peer"].items()},
            # Older mount processes do not report their buffer pool.
            piece_buffers=int(data.get("piece_buffers", 0)),
            plain_piece_buffers=int(data.get("plain_piece_buffers", 0)),
            # Older mount processes do not report trust.
            signature=None if data.get("signature") is None else str(data["signature"]),
            findings=[
                {str(k): str(v) for k, v in finding.items()} for finding in data.get("findings", [])
            ],
        )


def _histogram_json(histogram: Histogram) -> dict[str, Any]:
    return {"bounds": list(histogram.bounds), "counts": histogram.counts, "sum": histogram.total}


def _histogram_from_json(data: dict[str, Any]) -> Histogram:
    bounds = tuple(float(bound) for bound in data["bounds"])
    counts = [int(count) for count in data["counts"]]
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"a histogram of {len(bounds)} bounds with {len(counts)} counts")
    return Histogram(bounds, counts, float(data["sum"]))


# Which source served the fetch running in this task. A fetch through peers may fall back to
# the registry inside the peer source; the metered registry marks it, so the fetcher files the
# bytes and latency under the source that really served them.
_served_by: ContextVar[list[str] | None] = ContextVar("modelfs_served_by", default=None)


@contextmanager
def attributing(default: str) -> Iterator[list[str]]:
    """Within the block, ``mark_served_by`` overrides ``default``; read the box afterwards."""
    box = [default]
    token = _served_by.set(box)
    try:
        yield box
    finally:
        _served_by.reset(token)


def mark_served_by(source: str) -> None:
    box = _served_by.get()
    if box is not None:
        box[0] = source

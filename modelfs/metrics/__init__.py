"""Prometheus metrics of the node service, computed when scraped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from modelfs.cache import CacheStats
from modelfs.errors import ModelfsError
from modelfs.sources.stats import CACHE, MountStats
from modelfs.untrusted import decimal


@dataclass(frozen=True)
class MountSample:
    reference: str
    mountpoint: str
    up: bool
    restarts: int
    present_bytes: int | None  # of the pinned model, in the node's cache
    total_bytes: int | None
    live: MountStats | None  # what the mount process counted; None if it did not answer


@dataclass(frozen=True)
class DaemonSample:
    cache: CacheStats
    mounts: Sequence[MountSample]


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes ``le``."""
    return "+Inf" if bound == float("inf") else repr(bound)


def hit_ratio(mounts: Sequence[MountStats]) -> float | None:
    """Of the bytes the mounts loaded, the share the cache had; None before any load."""
    cache = sum(stats.fetched_bytes.get(CACHE, 0) for stats in mounts)
    loaded = sum(sum(stats.fetched_bytes.values()) for stats in mounts)
    return cache / loaded if loaded else None


def _mount_families(
    mounts: Sequence[MountSample],
) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
    """The counters each mount process reports, labelled by reference and mountpoint."""
    labels = ["reference", "mountpoint"]
    read = CounterMetricFamily(
        "modelfs_read_bytes", "Bytes served to readers of the mount.", labels=labels
    )
    fetched = CounterMetricFamily(
        "modelfs_fetched_bytes",
        "Bytes the mount loaded, by source (registry, mirror, peer, layout, cache).",
        labels=[*labels, "source"],
    )
    from_mirrors = CounterMetricFamily(
        "modelfs_mirror_fetched_bytes",
        'Bytes the mount loaded from each registry mirror (its host), of source="mirror".',
        labels=[*labels, "mirror"],
    )
    duration = HistogramMetricFamily(
        "modelfs_fetch_duration_seconds",
        "Time to load one piece (a range, for the registry), by source.",
        labels=[*labels, "source"],
    )
    read_duration = HistogramMetricFamily(
        "modelfs_read_duration_seconds",
        "Time a reader's read of the mount took; one slower than a few milliseconds waited on "
        "a fetch.",
        labels=labels,
    )
    fetches = CounterMetricFamily(
        "modelfs_fetches",
        "Pieces fetched from a source, on demand (a read waited) or prefetched.",
        labels=[*labels, "kind"],
    )
    errors = CounterMetricFamily(
        "modelfs_errors", "Failed fetches and rejected bytes, by kind.", labels=[*labels, "kind"]
    )
    rejected = CounterMetricFamily(
        "modelfs_peer_rejected_pieces",
        "Pieces from a peer that failed their check.",
        labels=[*labels, "peer"],
    )
    buffers = GaugeMetricFamily(
        "modelfs_piece_buffers",
        "Pooled piece buffers the mount process has mapped, at most the pool's capacity: how "
        "much of its memory bound its busiest moment used.",
        labels=labels,
    )
    plain_buffers = CounterMetricFamily(
        "modelfs_plain_piece_buffers",
        "Piece buffers handed out past the pool's capacity, every pooled one being in flight.",
        labels=labels,
    )
    findings = GaugeMetricFamily(
        "modelfs_scan_findings",
        "Findings of the mount's file scans (docs/trust.md), by format and the policy's action.",
        labels=[*labels, "format", "action"],
    )
    ratio = GaugeMetricFamily(
        "modelfs_mount_fetched_ratio",
        "Share of the mounted model's bytes present in the cache.",
        labels=labels,
    )
    for mount in mounts:
        names = [mount.reference, mount.mountpoint]
        if mount.total_bytes:
            ratio.add_metric(names, (mount.present_bytes or 0) / mount.total_bytes)
        stats = mount.live
        if stats is None:
            continue
        read.add_metric(names, stats.read_bytes)
        read_duration.add_metric(
            names,
            [(_le(bound), count) for bound, count in stats.read_seconds.cumulative()],
            stats.read_seconds.total,
        )
        for source in sorted(stats.fetched_bytes):
            fetched.add_metric([*names, source], stats.fetched_bytes[source])
        for mirror, count in sorted(stats.mirror_bytes.items()):
            from_mirrors.add_metric([*names, mirror], count)
        for source, histogram in sorted(stats.fetch_seconds.items()):
            duration.add_metric(
                [*names, source],
                [(_le(bound), count) for bound, count in histogram.cumulative()],
                histogram.total,
            )
        for kind, count in sorted(stats.fetches.items()):
            fetches.add_metric([*names, kind], count)
        for kind, count in sorted(stats.errors.items()):
            errors.add_metric([*names, kind], count)
        for peer, count in sorted(stats.rejected_by_peer.items()):
            rejected.add_metric([*names, peer], count)
        buffers.add_metric(names, stats.piece_buffers)
        counted = Counter((found["format"], found["action"]) for found in stats.findings)
        for (kind, action), count in sorted(counted.items()):
            findings.add_metric([*names, kind, action], count)
        plain_buffers.add_metric(names, stats.plain_piece_buffers)
    yield from (
        read,
        read_duration,
        fetched,
        from_mirrors,
        duration,
        fetches,
        errors,
        rejected,
        buffers,
        plain_buffers,
        findings,
        ratio,
    )


class DaemonCollector(Collector):
    """Reads the daemon's state, and asks the mounts for their counters, at scrape time:
    nothing to keep in step."""

    def __init__(self, sample: Callable[[], DaemonSample]) -> None:
        self._sample = sample

    def collect(
        self,
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        sample = self._sample()
        yield GaugeMetricFamily(
            "modelfs_cache_size_bytes", "Bytes held by the node's piece cache.", sample.cache.size
        )
        yield GaugeMetricFamily(
            "modelfs_cache_limit_bytes", "Most bytes the piece cache may hold.", sample.cache.limit
        )
        yield GaugeMetricFamily(
            "modelfs_cache_pieces", "Pieces held by the cache.", sample.cache.pieces
        )
        yield GaugeMetricFamily(
            "modelfs_cache_blobs", "Blobs with pieces in the cache.", sample.cache.blobs
        )
        yield CounterMetricFamily(
            "modelfs_cache_evicted_pieces",
            "Pieces evicted from the node's cache by any process (mounts, preheat, cache gc).",
            sample.cache.evicted_pieces,
        )
        labels = ["reference", "mountpoint"]
        up = GaugeMetricFamily("modelfs_mount_up", "1 while the mount is serving.", labels=labels)
        restarts = CounterMetricFamily(
            "modelfs_mount_restarts", "Times the mount process was restarted.", labels=labels
        )
        for mount in sample.mounts:
            up.add_metric([mount.reference, mount.mountpoint], 1 if mount.up else 0)
            restarts.add_metric([mount.reference, mount.mountpoint], mount.restarts)
        yield up
        yield restarts
        yield from _mount_families(sample.mounts)


def parse_address(text: str) -> tuple[str, int]:
    host, _, port_text = text.rpartition(":")
    port = decimal(port_text, 5)
    if port is None or port > 65535:
        raise ModelfsError(f"--metrics-addr {text!r} is not HOST:PORT (example: 127.0.0.1:9464)")
    return host.strip("[]") or "0.0.0.0", port


@contextmanager
def serving_metrics(address: str, collector: Collector) -> Iterator[int]:
    """Serve ``/metrics`` on ``address`` (HOST:PORT) until the block ends; yields the port."""
    host, port = parse_address(address)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as error:
        raise ModelfsError(f"cannot serve metrics on {address}: {error.strerror}") from None
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

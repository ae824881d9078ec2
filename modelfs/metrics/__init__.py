"""Prometheus metrics of the node service, computed when scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from modelfs.cache import CacheStats
from modelfs.errors import ModelfsError


@dataclass(frozen=True)
class MountSample:
    reference: str
    mountpoint: str
    up: bool
    restarts: int


@dataclass(frozen=True)
class DaemonSample:
    cache: CacheStats
    mounts: Sequence[MountSample]


class DaemonCollector(Collector):
    """Reads the daemon's state at scrape time: nothing to keep in step."""

    def __init__(self, sample: Callable[[], DaemonSample]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
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


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise ModelfsError(f"--metrics-addr {text!r} is not HOST:PORT (example: 127.0.0.1:9464)")
    return host.strip("[]") or "0.0.0.0", int(port)


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

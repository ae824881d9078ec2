"""The snapshotter's Prometheus metrics: what it was asked, what it holds, the models it mounted.

The gRPC calls run on the event loop and the scrapes in prometheus_client's HTTP thread: the
counters live here behind a lock, and a scrape reads a copy.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

UNPACKER = "unpacker"  # a model layer answered at Prepare (containerd skipped its download)
COMMIT = "commit"  # a model layer found at Commit (ctr pull applied the marker)


@dataclass
class SnapshotterStats:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, code)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    snapshots: dict[str, int] = field(default_factory=dict)  # kind -> how many
    models: int = 0  # models mounted for snapshots
    model_layers: Counter[str] = field(default_factory=Counter)  # UNPACKER / COMMIT
    cri_requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, code)
    cri_credentials_kept: int = 0  # PullImage calls whose credentials the proxy kept
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def answered(self, method: str, code: str, seconds: float) -> None:
        with self._lock:
            self.requests[method, code] += 1
            self.seconds[method] += seconds

    def holding(self, snapshots: Mapping[str, int], models: int) -> None:
        with self._lock:
            self.snapshots = dict(snapshots)
            self.models = models

    def model_layer(self, path: str) -> None:
        with self._lock:
            self.model_layers[path] += 1

    def cri_answered(self, method: str, code: str, kept: bool) -> None:
        with self._lock:
            self.cri_requests[method, code] += 1
            self.cri_credentials_kept += kept

    def copy(self) -> SnapshotterStats:
        with self._lock:
            return SnapshotterStats(
                Counter(self.requests),
                defaultdict(float, self.seconds),
                dict(self.snapshots),
                self.models,
                Counter(self.model_layers),
                Counter(self.cri_requests),
                self.cri_credentials_kept,
            )


class SnapshotterCollector(Collector):
    def __init__(self, stats: SnapshotterStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats.copy()
        requests = CounterMetricFamily(
            "modelfs_snapshotter_requests",
            "containerd's calls to the snapshotter, by method and gRPC status.",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(stats.requests.items()):
            requests.add_metric([method, code], count)
        yield requests
        seconds = CounterMetricFamily(
            "modelfs_snapshotter_request_seconds",
            "Seconds spent answering containerd's calls, by method.",
            labels=["method"],
        )
        for method, total in sorted(stats.seconds.items()):
            seconds.add_metric([method], total)
        yield seconds
        snapshots = GaugeMetricFamily(
            "modelfs_snapshotter_snapshots", "Snapshots held, by kind.", labels=["kind"]
        )
        for kind in ("active", "view", "committed"):
            snapshots.add_metric([kind], stats.snapshots.get(kind, 0))
        yield snapshots
        yield GaugeMetricFamily(
            "modelfs_snapshotter_models", "Models mounted for snapshots.", stats.models
        )
        layers = CounterMetricFamily(
            "modelfs_snapshotter_model_layers",
            "Model layers put in place of their marker: at Prepare (the unpacker skipped the "
            "download) or at Commit (ctr pull applied the marker).",
            labels=["path"],
        )
        for path in (UNPACKER, COMMIT):
            layers.add_metric([path], stats.model_layers[path])
        yield layers
        cri = CounterMetricFamily(
            "modelfs_snapshotter_cri_requests",
            "kubelet's image service calls through the CRI image proxy, by method and the gRPC "
            "status containerd answered.",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(stats.cri_requests.items()):
            cri.add_metric([method, code], count)
        yield cri
        yield CounterMetricFamily(
            "modelfs_snapshotter_cri_credentials_kept",
            "PullImage calls whose credentials the CRI image proxy kept for the model mounts.",
            stats.cri_credentials_kept,
        )

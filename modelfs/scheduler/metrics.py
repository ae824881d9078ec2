"""The scheduler's decisions as Prometheus metrics (``GET /metrics``, no token needed).

Counted by this replica: with several replicas, Prometheus sums them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from modelfs.scheduler.ranking import Action, Decision, FailureKind
from modelfs.scheduler.state import NODE_TTL
from modelfs.transport.server import Request, Response


class SchedulerMetrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._last_seen: dict[str, float] = {}
        self.answers = Counter(
            "modelfs_scheduler_answers",
            "Answers to nodes asking for a piece, by action: peers (candidates named), source "
            "(registry trip granted) or wait (registry trip deferred: others are fetching it)",
            ["action"],
            registry=self.registry,
        )
        self.candidates = Counter(
            "modelfs_scheduler_candidates",
            "Peers named as candidates in answers",
            registry=self.registry,
        )
        self.avoided = Counter(
            "modelfs_scheduler_avoided_peers",
            "Holders of a piece left out of an answer because they were reported",
            registry=self.registry,
        )
        self.reports = Counter(
            "modelfs_scheduler_reports",
            "Peers reported by nodes, by kind (corrupt, missing, failed)",
            ["kind"],
            registry=self.registry,
        )
        self.registrations = Counter(
            "modelfs_scheduler_registrations",
            "Node registrations and heartbeats received",
            registry=self.registry,
        )
        self.announced = Counter(
            "modelfs_scheduler_announced_pieces",
            "Pieces nodes announced they hold",
            registry=self.registry,
        )
        self.preheats = Counter(
            "modelfs_scheduler_preheats",
            "Preheats asked of node services, one per node named or selected",
            registry=self.registry,
        )
        self.preheat_ends = Counter(
            "modelfs_scheduler_preheat_ends",
            "Preheats node services reported finished, by state (done, failed)",
            ["state"],
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "modelfs_scheduler_backend_errors",
            "Requests answered 503 because the state backend (Redis) failed",
            registry=self.registry,
        )
        Gauge(
            "modelfs_scheduler_nodes",
            "Nodes that registered with this replica within the node time to live",
            registry=self.registry,
        ).set_function(self._live_nodes)
        # Every label shows, at zero until counted.
        for action in Action:
            self.answers.labels(action.value)
        for kind in FailureKind:
            self.reports.labels(kind.value)
        for state in ("done", "failed"):
            self.preheat_ends.labels(state)

    def _live_nodes(self) -> float:
        horizon = self._clock() - NODE_TTL
        for address in [a for a, seen in self._last_seen.items() if seen < horizon]:
            del self._last_seen[address]
        return float(len(self._last_seen))

    def registered(self, address: str) -> None:
        self.registrations.inc()
        self._last_seen[address] = self._clock()

    def answered(self, decision: Decision) -> None:
        self.answers.labels(decision.action.value).inc()
        self.candidates.inc(len(decision.peers))
        self.avoided.inc(decision.avoided)

    async def scrape(self, request: Request) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

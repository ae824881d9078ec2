"""The node services (``modelfs daemon``) the scheduler knows, what each holds, and the preheats
asked of them, over the same ``KeyValue`` as the piece state (memory, or Redis for replicas).

A node service reports itself by name (its labels, the models it holds) every few seconds and
is forgotten ``SERVICE_TTL`` after its last report, or at once when it says it leaves. A preheat
names a reference and the nodes that should hold it; each live node gets it in its queue, which
it drains (long-polling ``jobs_for``) and reports progress on. A job stays queued until the node
reports it done or failed, so a node service that restarts takes its unfinished preheats up
again, and continues from what its cache holds. A node that is not live is reported down, both
when the preheat is asked for (it is not queued) and while it runs (its report lapsed).
"""

from __future__ import annotations

import enum
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from modelfs.scheduler.placement import Holding, Selector
from modelfs.scheduler.state import KeyValue

SERVICE_TTL = 15.0  # a node service reports every few seconds; silent this long, it is down
JOB_TTL = 24 * 3600.0  # a preheat and its progress are kept this long
MAX_QUEUED = 16  # preheats waiting on one node
JOBS_HOLD = 5.0  # a node service's ask for preheats is held this long when there are none
_PREFIX = "modelfs:"
_SERVICES = f"{_PREFIX}services"


class JobState(enum.Enum):
    QUEUED = "queued"  # asked for; the node has not started it
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DOWN = "down"  # the node service is not live (never reported by a node)

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.DOWN)


@dataclass(frozen=True)
class Progress:
    """One node's part of one preheat."""

    state: JobState
    digest: str = ""
    held_bytes: int = 0  # of the model, in its cache (what it held before counts)
    total_bytes: int = 0
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Progress:
        return cls(**{**document, "state": JobState(document["state"])})


@dataclass(frozen=True)
class NodeReport:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    holdings: tuple[Holding, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": self.labels,
            "models": [{**asdict(h), "references": list(h.references)} for h in self.holdings],
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> NodeReport:
        holdings = tuple(
            Holding(
                m["digest"], m["present_bytes"], m["total_bytes"], tuple(m.get("references", ()))
            )
            for m in document["models"]
        )
        return cls(document["name"], dict(document["labels"]), holdings)


@dataclass(frozen=True)
class Preheat:
    id: str
    reference: str
    nodes: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "reference": self.reference, "nodes": list(self.nodes)}


def node_progress(stored: Progress | None, live: bool) -> Progress:
    """What to say about one node of a preheat: what it reported, unless it stopped reporting
    before it finished (down)."""
    if stored is not None and stored.state.final:
        return stored
    if not live:
        return replace(
            stored or Progress(JobState.DOWN),
            state=JobState.DOWN,
            error=f"its node service has not reported to the scheduler in {SERVICE_TTL:.0f} s",
        )
    return stored or Progress(JobState.QUEUED)


def _service_key(name: str) -> str:
    return f"{_PREFIX}service:{name}"


def _queue_key(name: str) -> str:
    return f"{_PREFIX}queue:{name}"


def _job_key(job: str) -> str:
    return f"{_PREFIX}preheat:{job}"


def _progress_key(job: str, name: str) -> str:
    return f"{_PREFIX}progress:{job}:{name}"


class Fleet:
    def __init__(self, store: KeyValue, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def report(self, node: NodeReport) -> None:
        await self._store.put(_service_key(node.name), json.dumps(node.as_json()), SERVICE_TTL)
        await self._store.add_member(_SERVICES, node.name, JOB_TTL)

    async def leave(self, name: str) -> None:
        await self._store.delete(_service_key(name))

    async def live(self) -> dict[str, NodeReport]:
        """The node services that reported within ``SERVICE_TTL``, by name."""
        names = sorted(await self._store.members(_SERVICES))
        records = await self._store.get_many([_service_key(name) for name in names])
        live = {}
        for name, record in zip(names, records, strict=True):
            if record is None:
                await self._store.remove_member(_SERVICES, name)
            else:
                live[name] = NodeReport.from_json(json.loads(record))
        return live

    async def select(self, selector: Selector) -> list[str]:
        return [name for name, node in (await self.live()).items() if selector.matches(node.labels)]

    async def create(self, reference: str, nodes: list[str]) -> Preheat:
        """A preheat of ``reference`` on ``nodes``: queued on each live one; one whose queue is
        full fails at once; the others are down."""
        # The second it was asked in, then random: a node takes its queue in the order asked.
        job_id = f"{int(self._clock()) & 0xFFFFFFFF:08x}{secrets.token_hex(4)}"
        job = Preheat(job_id, reference, tuple(dict.fromkeys(nodes)))
        await self._store.put(_job_key(job.id), json.dumps(job.as_json()), JOB_TTL)
        live = await self.live()
        for name in job.nodes:
            if name not in live:
                continue
            if len(await self._store.members(_queue_key(name))) >= MAX_QUEUED:
                error = f"{MAX_QUEUED} preheats are queued on this node already: try later"
                await self._put_progress(job.id, name, Progress(JobState.FAILED, error=error))
            else:
                await self._store.add_member(_queue_key(name), job.id, JOB_TTL)
        return job

    async def job(self, job_id: str) -> Preheat | None:
        (record,) = await self._store.get_many([_job_key(job_id)])
        if record is None:
            return None
        document = json.loads(record)
        return Preheat(document["id"], document["reference"], tuple(document["nodes"]))

    async def jobs_for(self, name: str, known: set[str]) -> list[Preheat]:
        """The preheats queued on node ``name`` but those it has ``known`` already."""
        jobs = []
        for job_id in sorted(await self._store.members(_queue_key(name)) - known):
            job = await self.job(job_id)
            if job is None:
                await self._store.remove_member(_queue_key(name), job_id)
            else:
                jobs.append(job)
        return jobs

    async def progress(self, name: str, job_id: str, progress: Progress) -> bool:
        """Node ``name``'s progress on a preheat; False (ignored) when the preheat does not ask
        it of that node, or the state is not one a node reports."""
        job = await self.job(job_id)
        if job is None or name not in job.nodes or progress.state not in _REPORTED:
            return False
        await self._put_progress(job_id, name, progress)
        if progress.state.final:
            await self._store.remove_member(_queue_key(name), job_id)
        return True

    async def _put_progress(self, job_id: str, name: str, progress: Progress) -> None:
        await self._store.put(_progress_key(job_id, name), json.dumps(progress.as_json()), JOB_TTL)

    async def status(self, job_id: str) -> tuple[Preheat, dict[str, Progress]] | None:
        job = await self.job(job_id)
        if job is None:
            return None
        records = await self._store.get_many([_progress_key(job_id, n) for n in job.nodes])
        live = await self.live()
        progress = {
            name: node_progress(
                None if record is None else Progress.from_json(json.loads(record)), name in live
            )
            for name, record in zip(job.nodes, records, strict=True)
        }
        return job, progress


_REPORTED = {JobState.RUNNING, JobState.DONE, JobState.FAILED}


def where_models_are(nodes: dict[str, NodeReport]) -> list[dict[str, Any]]:
    """Each model some node holds any of, with the nodes that hold it, most held first; the
    scheduler's answer to ``modelfs cluster models``."""
    models: dict[str, dict[str, Any]] = {}
    for name, node in sorted(nodes.items()):
        for holding in node.holdings:
            if holding.present_bytes == 0:
                continue
            model = models.setdefault(
                holding.digest,
                {"digest": holding.digest, "references": [], "total_bytes": 0, "nodes": []},
            )
            model["references"] = sorted({*model["references"], *holding.references})
            model["total_bytes"] = max(model["total_bytes"], holding.total_bytes)
            model["nodes"].append(
                {"name": name, "present_bytes": holding.present_bytes, "percent": holding.percent}
            )
    for model in models.values():
        model["nodes"].sort(key=lambda entry: (-entry["present_bytes"], entry["name"]))
    return [models[digest] for digest in sorted(models)]

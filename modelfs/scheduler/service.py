"""The scheduler's HTTP API (JSON, cluster-token authenticated), over ``SchedulerState``.

- ``POST /v1/register`` ``{"address", "zone", "rack", "capacity"}``: a node is alive (repeat
  within ``NODE_TTL``).
- ``POST /v1/announce`` ``{"address", "pieces": [[digest, index], ...]}``: pieces it holds.
- ``POST /v1/ask`` ``{"address", "digest", "index", "wait"}`` -> ``{"action":
  "peers"|"source"|"wait", "peers": [...], "retry_after": seconds}``. A node told to wait is
  held (long poll, up to ``LONG_POLL``) until the piece is announced, so waiting costs no stream
  of requests; an announcement made through another replica is seen within ``RECHECK``. With
  ``"wait": false`` (a node asking whether it may add the piece to a registry request it is
  about to make) the answer comes at once.
- ``POST /v1/report`` ``{"address", "peer", "digest", "index", "kind":
  "corrupt"|"missing"|"failed"}``: ``address`` is the reporter (a registered node).
- ``GET /metrics``: decisions for Prometheus (``SchedulerMetrics``), without a token.

The node services (``modelfs daemon``) and preheats (``modelfs.scheduler.fleet``):

- ``POST /v1/node/report`` ``{"name", "labels", "models": [{"digest", "present_bytes",
  "total_bytes", "references"}, ...]}``: a node service is alive and holds these (repeat within
  ``SERVICE_TTL``); ``POST /v1/node/leave`` ``{"name"}``: it stops.
- ``POST /v1/node/jobs`` ``{"name", "known": [id, ...]}`` -> ``{"jobs": [{"id", "reference",
  "nodes"}, ...]}``: the preheats queued on it but the ``known`` ones, held (long poll, up to
  ``JOBS_HOLD``) until there is one.
- ``POST /v1/node/progress`` ``{"name", "job", "state": "running"|"done"|"failed", "digest",
  "held_bytes", "total_bytes", "error"}``.
- ``POST /v1/preheat`` ``{"reference", "nodes": [name, ...]}`` or ``{"reference", "selector"}``
  -> the preheat ``{"id", "reference", "nodes"}``; ``POST /v1/preheat/status`` ``{"id"}`` -> it
  with ``"progress": {name: {"state", "digest", "held_bytes", "total_bytes", "error"}}``.
- ``POST /v1/models`` ``{}`` -> ``{"models": [{"digest", "references", "total_bytes", "nodes":
  [{"name", "present_bytes", "percent"}, ...]}, ...]}``: which live nodes hold how much of what;
  ``POST /v1/nodes`` ``{}`` -> ``{"nodes": [{"name", "labels"}, ...]}``: the live ones.

A state backend that fails (Redis down) gives 503, and nodes then go to the registry.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import AsyncExitStack
from typing import Any

import trio

from modelfs.errors import ModelfsError
from modelfs.reference import parse_reference
from modelfs.scheduler.fleet import (
    JOBS_HOLD,
    Fleet,
    JobState,
    NodeReport,
    Progress,
    where_models_are,
)
from modelfs.scheduler.metrics import SchedulerMetrics
from modelfs.scheduler.placement import (
    Holding,
    labels_problem,
    node_name_problem,
    parse_selector,
)
from modelfs.scheduler.ranking import Action, FailureKind, NodeInfo
from modelfs.scheduler.redis import RedisError, RedisKeyValue
from modelfs.scheduler.state import KeyValue, MemoryKeyValue, SchedulerState
from modelfs.transport.server import AuthenticatedServer, Request, Response
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_ANNOUNCED = 10_000
LONG_POLL = 0.5
RECHECK = 0.05
JOBS_RECHECK = 0.25  # ... and looks at the state this often (a preheat made by a replica)
MAX_MODELS = 1000  # models one node service reports
MAX_REFERENCES = 16  # names one model goes by, in a report
MAX_TEXT = 512  # a reference, an error message
MAX_JOB_NODES = 1000
_JOB_ID = re.compile(r"^[0-9a-f]{16}$")


class BadRequest(ModelfsError):
    """A request body the scheduler refuses: answered 400 with the message."""


def _field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    if kind is bool:
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false")
    elif not isinstance(value, kind) or isinstance(value, bool):  # JSON true is no number
        raise BadRequest(f"{name} must be a {kind.__name__}")
    return value


def _piece(digest: Any, index: Any) -> tuple[str, int]:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise BadRequest("digest must be sha256:<64 hex>")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 10**9:
        raise BadRequest("index must be a piece number")
    return digest, index


def _count(body: dict[str, Any], name: str) -> int:
    value = _field(body, name, int, 0)
    if not 0 <= value < 2**63:
        raise BadRequest(f"{name} must be a byte count")
    return int(value)


def _text(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = _field(body, name, str, default)
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{name} is longer than {MAX_TEXT} characters")
    return str(value)


def _name(body: dict[str, Any]) -> str:
    name = _field(body, "name", str)
    if (problem := node_name_problem(name)) is not None:
        raise BadRequest(problem)
    return str(name)


def _holding(entry: Any) -> Holding:
    if not isinstance(entry, dict):
        raise BadRequest("models must be objects")
    digest = entry.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise BadRequest("a model's digest must be sha256:<64 hex>")
    present, total = _count(entry, "present_bytes"), _count(entry, "total_bytes")
    references = _field(entry, "references", list, [])
    if present > total or len(references) > MAX_REFERENCES:
        raise BadRequest(f"model {digest}: present_bytes above total_bytes, or too many names")
    if not all(isinstance(r, str) and len(r) <= MAX_TEXT for r in references):
        raise BadRequest(f"model {digest}: references must be strings")
    return Holding(digest, present, total, tuple(references))


def _node_report(body: dict[str, Any]) -> NodeReport:
    labels = _field(body, "labels", dict, {})
    if not all(isinstance(value, str) for value in labels.values()):
        raise BadRequest("label values must be strings")
    if (problem := labels_problem(labels)) is not None:
        raise BadRequest(problem)
    models = _field(body, "models", list, [])
    if len(models) > MAX_MODELS:
        raise BadRequest(f"report at most {MAX_MODELS} models")
    return NodeReport(_name(body), labels, tuple(_holding(entry) for entry in models))


def _job_id(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not _JOB_ID.match(value):
        raise BadRequest(f"{name} must be a preheat id (16 hex digits)")
    return value


def _preheat_reference(body: dict[str, Any]) -> str:
    text = _text(body, "reference")
    if text.startswith("oci:"):
        raise BadRequest(
            f"{text!r} is a local OCI layout: other nodes preheat from a registry reference"
        )
    try:
        return str(parse_reference(text))
    except ModelfsError as error:
        raise BadRequest(str(error)) from None


class SchedulerService:
    def __init__(self, state: SchedulerState, fleet: Fleet) -> None:
        self.state = state
        self.fleet = fleet
        self.metrics = SchedulerMetrics()
        # Asks held until a piece is announced here (a replica's announcement: by RECHECK).
        self._announced: dict[tuple[str, int], trio.Event] = {}
        # Node services' asks for preheats, held until one is queued here.
        self._queued: dict[str, trio.Event] = {}

    async def handle(self, request: Request) -> Response:
        route = {
            "/v1/register": self._register,
            "/v1/announce": self._announce,
            "/v1/ask": self._ask,
            "/v1/report": self._report,
            "/v1/node/report": self._node_report,
            "/v1/node/leave": self._node_leave,
            "/v1/node/jobs": self._node_jobs,
            "/v1/node/progress": self._node_progress,
            "/v1/preheat": self._preheat,
            "/v1/preheat/status": self._preheat_status,
            "/v1/models": self._models,
            "/v1/nodes": self._nodes,
        }.get(request.path)
        if request.method != "POST" or route is None:
            return Response(404)
        try:
            body = loads_json(request.body)
        except ValueError as error:  # also nesting and numbers past any bound
            return _json(400, {"error": f"the body is not JSON we take: {error}"})
        try:
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            answer = await route(body)
        except BadRequest as error:
            return _json(400, {"error": str(error)})
        except RedisError as error:
            log.error("scheduler: %s", error)
            self.metrics.backend_errors.inc()
            return _json(503, {"error": str(error)})
        return _json(200, answer)

    async def _register(self, body: dict[str, Any]) -> dict[str, Any]:
        node = NodeInfo(
            _field(body, "address", str),
            _field(body, "zone", str, ""),
            _field(body, "rack", str, ""),
            _field(body, "capacity", int, 4),
        )
        if problem := node.problem():
            raise BadRequest(problem)
        await self.state.register(node)
        self.metrics.registered(node.address)
        return {}

    async def _announce(self, body: dict[str, Any]) -> dict[str, Any]:
        pieces = _field(body, "pieces", list)
        if len(pieces) > MAX_ANNOUNCED:
            raise BadRequest(f"announce at most {MAX_ANNOUNCED} pieces at once")
        parsed = []
        for entry in pieces:
            if not isinstance(entry, list) or len(entry) != 2:
                raise BadRequest("pieces must be [digest, index] pairs")
            parsed.append(_piece(entry[0], entry[1]))
        taken = await self.state.announce(_field(body, "address", str), parsed)
        self.metrics.announced.inc(taken)
        for piece in parsed:
            if (event := self._announced.pop(piece, None)) is not None:
                event.set()
        return {}

    async def _ask(self, body: dict[str, Any]) -> dict[str, Any]:
        digest, index = _piece(body.get("digest"), body.get("index"))
        address = _field(body, "address", str)
        wait = _field(body, "wait", bool, True)
        deadline = trio.current_time() + (LONG_POLL if wait else 0.0)
        while True:
            decision = await self.state.ask(address, digest, index)
            left = deadline - trio.current_time()
            if decision.action is not Action.WAIT or left <= 0:
                break
            with trio.move_on_after(min(left, RECHECK)):
                await self._announced.setdefault((digest, index), trio.Event()).wait()
        self.metrics.answered(decision)
        return {
            "action": decision.action.value,
            "peers": list(decision.peers),
            "retry_after": decision.retry_after,
        }

    async def _report(self, body: dict[str, Any]) -> dict[str, Any]:
        digest, index = _piece(body.get("digest"), body.get("index"))
        try:
            kind = FailureKind(body.get("kind"))
        except ValueError:
            raise BadRequest("kind must be corrupt, missing or failed") from None
        reporter = _field(body, "address", str, "")
        await self.state.report(reporter, _field(body, "peer", str), digest, index, kind)
        self.metrics.reports.labels(kind.value).inc()
        return {}

    async def _node_report(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.fleet.report(_node_report(body))
        return {}

    async def _node_leave(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.fleet.leave(_name(body))
        return {}

    async def _node_jobs(self, body: dict[str, Any]) -> dict[str, Any]:
        name = _name(body)
        known = _field(body, "known", list, [])
        if len(known) > 10 * MAX_JOB_NODES or not all(isinstance(k, str) for k in known):
            raise BadRequest("known must be a list of preheat ids")
        deadline = trio.current_time() + JOBS_HOLD
        while not (jobs := await self.fleet.jobs_for(name, set(known))):
            left = deadline - trio.current_time()
            if left <= 0:
                break
            with trio.move_on_after(min(left, JOBS_RECHECK)):
                await self._queued.setdefault(name, trio.Event()).wait()
        return {"jobs": [job.as_json() for job in jobs]}

    async def _node_progress(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            state = JobState(body.get("state"))
        except ValueError:
            raise BadRequest("state must be running, done or failed") from None
        digest = _text(body, "digest", "")
        if digest and not _DIGEST.match(digest):
            raise BadRequest("digest must be sha256:<64 hex>")
        error = _field(body, "error", str, "")[:MAX_TEXT]
        progress = Progress(
            state, digest, _count(body, "held_bytes"), _count(body, "total_bytes"), error
        )
        taken = await self.fleet.progress(_name(body), _job_id(body, "job"), progress)
        if not taken:
            raise BadRequest("no such preheat of this node, or not a state a node reports")
        if state.final:
            self.metrics.preheat_ends.labels(state.value).inc()
        return {}

    async def _preheat(self, body: dict[str, Any]) -> dict[str, Any]:
        reference = _preheat_reference(body)
        if ("nodes" in body) == ("selector" in body):
            raise BadRequest("a preheat names its nodes, or gives a label selector: one of them")
        if "selector" in body:
            try:
                selector = parse_selector(_text(body, "selector"))
            except ValueError as error:
                raise BadRequest(str(error)) from None
            nodes = await self.fleet.select(selector)
            if not nodes:
                raise BadRequest(f"no live node service has labels that match {body['selector']!r}")
        else:
            nodes = _field(body, "nodes", list)
            if not 0 < len(nodes) <= MAX_JOB_NODES:
                raise BadRequest(f"name 1 to {MAX_JOB_NODES} nodes")
            nodes = [_name({"name": node}) for node in nodes]
        job = await self.fleet.create(reference, nodes)
        self.metrics.preheats.inc(len(job.nodes))
        for name in job.nodes:
            if (event := self._queued.pop(name, None)) is not None:
                event.set()
        return job.as_json()

    async def _preheat_status(self, body: dict[str, Any]) -> dict[str, Any]:
        job_id = _job_id(body, "id")
        found = await self.fleet.status(job_id)
        if found is None:
            raise BadRequest(f"no preheat {job_id} (preheats are kept for a day)")
        job, progress = found
        return {**job.as_json(), "progress": {n: p.as_json() for n, p in progress.items()}}

    async def _models(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"models": where_models_are(await self.fleet.live())}

    async def _nodes(self, body: dict[str, Any]) -> dict[str, Any]:
        live = await self.fleet.live()
        return {"nodes": [{"name": n, "labels": node.labels} for n, node in live.items()]}


def _json(status: int, document: dict[str, Any]) -> Response:
    return Response(status, json.dumps(document).encode(), "application/json")


async def run_scheduler(
    host: str,
    port: int,
    secret: bytes,
    redis_url: str | None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the scheduler until cancelled; state in Redis when ``redis_url`` is given."""
    async with AsyncExitStack() as stack:
        store: KeyValue
        if redis_url is None:
            store = MemoryKeyValue()
        else:
            redis = await stack.enter_async_context(RedisKeyValue(redis_url))
            await redis.command("PING")  # fail at start, not at the first request
            store = redis
        service = SchedulerService(SchedulerState(store), Fleet(store))
        server = AuthenticatedServer(
            service.handle, secret, public={"/metrics": service.metrics.scrape}
        )
        await server.serve(host, port, task_status=task_status)

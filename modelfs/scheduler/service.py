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
from modelfs.scheduler.metrics import SchedulerMetrics
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


class SchedulerService:
    def __init__(self, state: SchedulerState) -> None:
        self.state = state
        self.metrics = SchedulerMetrics()
        # Asks held until a piece is announced here (a replica's announcement: by RECHECK).
        self._announced: dict[tuple[str, int], trio.Event] = {}

    async def handle(self, request: Request) -> Response:
        route = {
            "/v1/register": self._register,
            "/v1/announce": self._announce,
            "/v1/ask": self._ask,
            "/v1/report": self._report,
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
        service = SchedulerService(SchedulerState(store))
        server = AuthenticatedServer(
            service.handle, secret, public={"/metrics": service.metrics.scrape}
        )
        await server.serve(host, port, task_status=task_status)

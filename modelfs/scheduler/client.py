"""A node's side of the scheduler: every call is bounded and none ever raises on failure.

No scheduler, a slow one or one that errs simply means "go to the registry": ``ask`` returns
None, and registrations, announcements and reports are best-effort. A scheduler that did not
answer (or answered 503: its Redis is down) is skipped for a while, ``BACKOFF_FIRST`` doubling
up to ``BACKOFF_MAX``, so a hung one costs a few timeouts, not one per piece.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import trio

from modelfs.scheduler.ranking import Action, Decision, FailureKind, NodeInfo
from modelfs.transport.client import PooledClient, signed_json
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 1.0  # the scheduler asks for 0.02 s; more is never needed

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


class SchedulerClient(PooledClient):
    def __init__(
        self,
        url: str,
        secret: bytes,
        node: NodeInfo,
        *,
        timeout: float = 2.0,  # above the scheduler's long poll
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self.node = node
        self.timeout = timeout
        self._secret = secret
        self._clock = clock
        self._backoff = 0.0
        self._skip_until = float("-inf")  # trio time before which the scheduler is not asked

    def open_pool(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout))

    async def _call(self, path: str, document: dict[str, Any]) -> dict[str, Any] | None:
        http = self.http
        if trio.current_time() < self._skip_until:
            return None
        body, headers = signed_json(self._secret, path, document, self._clock())
        problem = f"no answer within {self.timeout:.1f} s"
        unavailable = True
        with trio.move_on_after(self.timeout):
            try:
                response = await http.post(self.url + path, content=body, headers=headers)
                unavailable = response.status_code == 503
                if response.status_code == 200:
                    answer = loads_json(response.content)  # bounded: nesting, numbers
                    if isinstance(answer, dict):
                        self._backoff = 0.0
                        return answer
                problem = f"HTTP {response.status_code} {response.text[:200]}"
            except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError) as error:
                problem = f"{type(error).__name__}: {error}"
        if unavailable:
            problem += self._back_off()
        log.info("scheduler %s, %s: %s", self.url, path, problem)
        return None

    def _back_off(self) -> str:
        """Skip the scheduler for the next interval; calls that failed together count once."""
        now = trio.current_time()
        if now >= self._skip_until:
            self._backoff = min(max(2 * self._backoff, BACKOFF_FIRST), BACKOFF_MAX)
            self._skip_until = now + self._backoff
        return f"; not asked again for {self._skip_until - now:.1f} s"

    async def register(self) -> bool:
        node = self.node
        document = {
            "address": node.address,
            "zone": node.zone,
            "rack": node.rack,
            "capacity": node.capacity,
        }
        return await self._call("/v1/register", document) is not None

    async def keep_registered(self, interval: float = 10.0) -> None:
        """Register now and every ``interval`` seconds (the scheduler forgets silent nodes)."""
        while True:
            await self.register()
            await trio.sleep(interval)

    async def announce(self, pieces: list[tuple[str, int]]) -> bool:
        document = {"address": self.node.address, "pieces": [list(piece) for piece in pieces]}
        return await self._call("/v1/announce", document) is not None

    async def ask(self, digest: str, index: int, wait: bool = True) -> Decision | None:
        """Where to get the piece; ``wait``: while others fetch it from the registry, the
        scheduler holds the answer (a moment) until one of them has it."""
        document = {"address": self.node.address, "digest": digest, "index": index, "wait": wait}
        answer = await self._call("/v1/ask", document)
        if answer is None:
            return None
        try:
            return Decision(
                Action(answer["action"]),
                tuple(str(peer) for peer in answer.get("peers", [])),
                bounded_wait(float(answer.get("retry_after", 0.0))),
            )
        except (KeyError, ValueError, TypeError):
            log.info("scheduler %s sent an unreadable decision %r", self.url, answer)
            return None

    async def report(self, peer: str, digest: str, index: int, kind: FailureKind) -> bool:
        document = {
            "address": self.node.address,
            "peer": peer,
            "digest": digest,
            "index": index,
            "kind": kind.value,
        }
        return await self._call("/v1/report", document) is not None


def bounded_wait(seconds: float) -> float:
    """A scheduler's ``retry_after``, within what a node will wait between two asks: a scheduler
    (or anyone answering in its place) cannot park a reader with 1e300 or NaN."""
    if not 0.0 <= seconds <= MAX_RETRY_AFTER:  # NaN compares false too
        return MAX_RETRY_AFTER if seconds > MAX_RETRY_AFTER else 0.0
    return seconds

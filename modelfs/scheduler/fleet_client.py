"""The fleet API's client (``modelfs.scheduler.service``): for a node service reporting and taking
its preheats, and for ``modelfs preheat --nodes`` and ``modelfs cluster models``.

Unlike a mount's ``SchedulerClient``, which must never stand in a reader's way and so swallows
every failure, each call here either answers or raises ``SchedulerError`` with one line that
says what went wrong; the node service logs it and tries again later, a command prints it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from modelfs.errors import ModelfsError
from modelfs.transport.client import PooledClient, signed_json
from modelfs.untrusted import loads_json


class SchedulerError(ModelfsError):
    """The scheduler did not answer (``status`` None), or refused the request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FleetClient(PooledClient):
    """``async with FleetClient(url, secret) as client: await client.call(path, document)``."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._secret = secret
        self._clock = clock

    def open_pool(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout))

    async def call(
        self, path: str, document: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """POST ``document`` to ``path``, signed; the JSON object answered."""
        body, headers = signed_json(self._secret, path, document, self._clock())
        try:
            response = await self.http.post(
                self.url + path,
                content=body,
                headers=headers,
                timeout=httpx.Timeout(timeout or self.timeout),
            )
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as error:
            raise SchedulerError(
                f"the scheduler at {self.url} did not answer ({type(error).__name__}: {error}): "
                "check the URL and that it runs"
            ) from None
        if response.status_code in (401, 403):
            raise SchedulerError(
                f"the scheduler at {self.url} refused the request ({response.status_code}): "
                "use the cluster secret its nodes share (and check this machine's clock)",
                response.status_code,
            )
        try:
            answer = loads_json(response.content)
        except ValueError:
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict):
            said = answer.get("error") if isinstance(answer, dict) else response.text[:200]
            raise SchedulerError(
                f"the scheduler at {self.url} answered {response.status_code}: {said}",
                response.status_code,
            )
        return answer

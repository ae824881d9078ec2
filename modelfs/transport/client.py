"""The clients' side: an HTTP connection pool owned by ``async with``, and the signed JSON POST
that nodes, mounts and commands send the scheduler."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any, Self

import httpx

from modelfs.transport.tokens import sign


class PooledClient(ABC):
    """``async with`` opens the pool (``open_pool``, which subclasses shape) and closes it."""

    _http: httpx.AsyncClient | None = None

    @abstractmethod
    def open_pool(self) -> httpx.AsyncClient:
        """A new connection pool, with this client's timeouts and TLS."""

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError(f"{type(self).__name__} used outside `async with`")
        return self._http

    async def __aenter__(self) -> Self:
        self._http = self.open_pool()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def signed_json(
    secret: bytes, path: str, document: dict[str, Any], now: float
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a POST of ``document`` to ``path``, signed with the secret."""
    body = json.dumps(document).encode()
    headers = {**sign(secret, "POST", path, now, body), "Content-Type": "application/json"}
    return body, headers

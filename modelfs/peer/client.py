"""Fetching one piece from a peer, trusting nothing it says.

The bytes are checked against the piece index's digests (which came from the registry), so a
lying peer costs one wasted transfer and a report, never a corrupt byte. Without an index (no
expected digest) the caller checks the whole blob instead. Every failure (bad bytes, refusal,
timeout, dead peer, an address httpx refuses) gives None and a report; the caller falls back.
A busy peer (503: at its connection limit) gives None, and a report only once it has answered
503 ``BUSY_REPORT`` times in a row: a peer that is always busy is as useless as a dead one.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio

from modelfs.fetcher.index import matches_index
from modelfs.pieces import DEFAULT_PIECE_SIZE
from modelfs.scheduler.ranking import FailureKind
from modelfs.transport.client import PooledClient
from modelfs.transport.tokens import sign

log = logging.getLogger(__name__)

BUSY_REPORT = 3  # 503s in a row from one peer that make it a failed peer
CONNECT_TIMEOUT = 1.0  # a peer on the same network connects in milliseconds


@dataclass(frozen=True)
class PeerFailure:
    peer: str
    digest: str
    index: int
    reason: str
    kind: FailureKind


class PeerClient(PooledClient):
    """``async with PeerClient(secret, report=...) as client:``; one connection pool for all."""

    def __init__(
        self,
        secret: bytes,
        *,
        report: Callable[[PeerFailure], None],
        timeout: float = 2.0,  # one attempt, whole piece included: well below the wait budget
        max_piece_size: int = DEFAULT_PIECE_SIZE,
        clock: Callable[[], float] = time.time,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._secret = secret
        self._tls = tls
        self._scheme = "http" if tls is None else "https"
        self._report = report
        self.timeout = timeout
        self._max_piece_size = max_piece_size
        self._clock = clock
        self._busy: dict[str, int] = {}  # peer -> 503s in a row

    def open_pool(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout)),
            verify=self._tls if self._tls else True,
        )

    async def fetch_piece(
        self, peer: str, digest: str, index: int, expected: str | None
    ) -> bytes | None:
        """Piece ``index`` of blob ``digest`` from ``peer`` (host:port), or None.

        None is reported, unless the peer was only busy. ``expected`` is the piece index's digest
        of the piece; None: no piece index, the bytes are unchecked here."""
        http = self.http
        path = f"/pieces/{digest}/{index}"
        headers = sign(self._secret, "GET", path, self._clock())
        reason = f"no answer within {self.timeout:.1f} s"
        kind = FailureKind.FAILED
        data: bytes | None = None
        with trio.move_on_after(self.timeout):
            try:
                async with http.stream(
                    "GET", f"{self._scheme}://{peer}{path}", headers=headers
                ) as response:
                    status = response.status_code
                    if status != 503:
                        self._busy.pop(peer, None)
                    elif not self._busy_too_often(peer):
                        log.info("peer %s is busy; piece %d of %s elsewhere", peer, index, digest)
                        return None
                    if status == 200:
                        data = await self._read(response)
                    else:
                        reason = f"answered HTTP {status}"
                        if status == 503:
                            reason += f" (busy) {BUSY_REPORT} times in a row"
                        elif status == 404:
                            kind = FailureKind.MISSING
            # InvalidURL and StreamError are no HTTPError; OSError: a socket error httpx let by.
            except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError) as error:
                reason = f"{type(error).__name__}: {error}".rstrip(": ")
        if data is not None and (expected is None or await matches_index(data, expected)):
            return data
        if data is not None:
            reason, kind = "sent bytes that do not match the piece index", FailureKind.CORRUPT
        self.fail(PeerFailure(peer, digest, index, reason, kind))
        return None

    def _busy_too_often(self, peer: str) -> bool:
        """Count a 503; True (and the count starts again) at the ``BUSY_REPORT``th in a row."""
        count = self._busy.get(peer, 0) + 1
        self._busy[peer] = count % BUSY_REPORT
        return count >= BUSY_REPORT

    def fail(self, failure: PeerFailure) -> None:
        """Log and report a peer that failed (here, or in a check the caller made)."""
        log.warning(
            "peer %s, piece %d of %s: %s",
            failure.peer,
            failure.index,
            failure.digest,
            failure.reason,
        )
        self._report(failure)

    async def _read(self, response: httpx.Response) -> bytes:
        """The body, cut short once longer than a piece (it then cannot match the index)."""
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self._max_piece_size:
                break
        return bytes(body)

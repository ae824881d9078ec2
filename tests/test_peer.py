"""The peer server and client over real sockets, with a real LMDB cache."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from modelfs.cache.store import PieceCache
from modelfs.errors import AuthError
from modelfs.peer import http as peer_http
from modelfs.peer.auth import MAX_SKEW, Verdict, check, load_secret, sign
from modelfs.peer.client import PeerClient, PeerFailure
from modelfs.peer.server import PeerServer
from modelfs.scheduler.ranking import FailureKind

PIECE = 64 * 1024
SECRET = b"cluster-secret-0123456789abcdef"
BLOB = os.urandom(3 * PIECE - 100)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
PIECES = [BLOB[i : i + PIECE] for i in range(0, len(BLOB), PIECE)]
HASHES = [hashlib.sha256(piece).hexdigest() for piece in PIECES]
NOW = 1_800_000_000.0


def index_lookup(digest: str, index: int) -> str | None:
    return HASHES[index] if digest == DIGEST and index < len(HASHES) else None


class LyingPeer(PeerServer):
    """A compromised node: serves its pieces with one bit flipped."""

    def piece(self, digest: str, index: int) -> bytes | None:
        data = super().piece(digest, index)
        return None if data is None else bytes([data[0] ^ 1]) + data[1:]


def test_tokens() -> None:
    token = sign(SECRET, "GET", "/pieces/x/0", NOW)
    assert check(SECRET, token, "GET", "/pieces/x/0", NOW + 5) is Verdict.ACCEPTED
    assert check(SECRET, None, "GET", "/pieces/x/0", NOW) is Verdict.MISSING
    refused = [
        check(b"another-secret-0123456789", token, "GET", "/pieces/x/0", NOW),
        check(SECRET, token, "GET", "/pieces/x/1", NOW),
        check(SECRET, token, "HEAD", "/pieces/x/0", NOW),
        check(SECRET, token, "GET", "/pieces/x/0", NOW + MAX_SKEW + 1),
        check(SECRET, token, "GET", "/pieces/x/0", NOW - MAX_SKEW - 1),
        check(SECRET, token.replace("Modelfs-HMAC", "Bearer"), "GET", "/pieces/x/0", NOW),
        check(SECRET, "Modelfs-HMAC garbage", "GET", "/pieces/x/0", NOW),
        check(SECRET, sign(SECRET, "POST", "/v1/ask", NOW, b"{}"), "POST", "/v1/ask", NOW, b"[]"),
    ]
    assert refused == [Verdict.REFUSED] * len(refused)


def test_secret_file(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    good.write_bytes(SECRET + b"\n")
    assert load_secret(good) == SECRET
    with pytest.raises(AuthError, match=r"cannot read the cluster secret file .*absent"):
        load_secret(tmp_path / "absent")
    short = tmp_path / "short"
    short.write_bytes(b"abc\n")
    with pytest.raises(AuthError, match=r"shorter than 16 bytes.*openssl rand"):
        load_secret(short)


@pytest.fixture
def cache(tmp_path: Path) -> PieceCache:
    store = PieceCache(tmp_path / "cache", 64 * 1024 * 1024, piece_size=PIECE)
    for index, piece in enumerate(PIECES[:2]):
        store.put(DIGEST, index, piece, len(BLOB))
    return store


@asynccontextmanager
async def peer(server: PeerServer) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, "127.0.0.1", 0)
        yield f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def raw_get(address: str, path: str, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization else {}
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://{address}{path}", headers=headers)


def test_server_serves_only_members_and_only_vouched_pieces(cache: PieceCache) -> None:
    async def main() -> None:
        async with peer(PeerServer(cache, SECRET, index_lookup)) as address:
            path = f"/pieces/{DIGEST}/0"
            stranger = await raw_get(address, path, None)
            assert (stranger.status_code, stranger.content) == (401, b"")
            forged = await raw_get(
                address, path, sign(b"wrong-secret-0123456789", "GET", path, NOW)
            )
            assert (forged.status_code, forged.content) == (403, b"")
            good = await raw_get(address, path, sign(SECRET, "GET", path, time.time()))
            assert (good.status_code, good.content) == (200, PIECES[0])
            for other in (
                f"/pieces/{DIGEST}/2",
                "/pieces/%2e%2e/%2e%2e/etc/passwd",
                "/",
                "/pieces",
            ):
                answer = await raw_get(address, other, sign(SECRET, "GET", other, time.time()))
                assert (answer.status_code, answer.content) == (404, b""), other

    trio.run(main)


def test_server_never_vouches_for_unverified_bytes(cache: PieceCache) -> None:
    unknown = "sha256:" + "0" * 64
    cache.put(unknown, 0, b"not indexed, not verified", 100)
    cache.put(DIGEST, 2, b"x" * len(PIECES[2]), len(BLOB))  # corrupted on this node's disk
    server = PeerServer(cache, SECRET, index_lookup)
    assert server.piece(unknown, 0) is None
    assert server.piece(DIGEST, 2) is None
    assert server.piece(DIGEST, 1) == PIECES[1]
    # A blob verified whole needs no index.
    cache.drop_piece(DIGEST, 2)
    cache.put(DIGEST, 2, PIECES[2], len(BLOB))
    cache.mark_verified(DIGEST, len(BLOB))
    assert PeerServer(cache, SECRET, lambda digest, index: None).piece(DIGEST, 2) == PIECES[2]


def fetch_all(
    server: PeerServer, requests: list[tuple[int, str]], secret: bytes = SECRET
) -> tuple[list[bytes | None], list[PeerFailure]]:
    failures: list[PeerFailure] = []

    async def main() -> list[bytes | None]:
        async with (
            peer(server) as address,
            PeerClient(secret, report=failures.append, max_piece_size=PIECE, timeout=2.0) as client,
        ):
            return [
                await client.fetch_piece(address, DIGEST, index, expected)
                for index, expected in requests
            ]

    return trio.run(main), failures


def test_client_fetches_and_verifies(cache: PieceCache) -> None:
    got, failures = fetch_all(
        PeerServer(cache, SECRET, index_lookup), [(0, HASHES[0]), (1, HASHES[1]), (0, HASHES[0])]
    )
    assert got == [PIECES[0], PIECES[1], PIECES[0]] and failures == []


def test_lying_peer_is_rejected_and_reported(cache: PieceCache) -> None:
    got, failures = fetch_all(LyingPeer(cache, SECRET, index_lookup), [(0, HASHES[0])])
    assert got == [None]
    assert [(f.index, f.kind, f.reason) for f in failures] == [
        (0, FailureKind.CORRUPT, "sent bytes that do not match the piece index")
    ]


def test_oversized_answer_is_corrupt(cache: PieceCache) -> None:
    class Flooding(PeerServer):
        def piece(self, digest: str, index: int) -> bytes | None:
            return b"\0" * (3 * PIECE)

    got, failures = fetch_all(Flooding(cache, SECRET, index_lookup), [(0, HASHES[0])])
    assert got == [None] and failures[0].kind is FailureKind.CORRUPT


def test_refusals_and_absent_pieces_are_reported_not_corrupt(cache: PieceCache) -> None:
    got, failures = fetch_all(
        PeerServer(cache, SECRET, index_lookup), [(2, HASHES[2])], secret=b"x" * 32
    )
    assert got == [None] and [(f.reason, f.kind) for f in failures] == [
        ("answered HTTP 403", FailureKind.FAILED)
    ]
    got, failures = fetch_all(PeerServer(cache, SECRET, index_lookup), [(2, HASHES[2])])
    assert got == [None] and failures[0].kind is FailureKind.MISSING


def test_dead_and_silent_peers_give_none_quickly() -> None:
    failures: list[PeerFailure] = []

    async def main() -> None:
        async with PeerClient(SECRET, report=failures.append, timeout=0.5) as client:
            dead = trio.socket.socket()
            await dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
            dead.close()
            assert await client.fetch_piece(f"127.0.0.1:{dead_port}", DIGEST, 0, HASHES[0]) is None

            async def never_answer(stream: trio.SocketStream) -> None:
                await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1")
                )
                port = listeners[0].socket.getsockname()[1]
                started = trio.current_time()
                assert await client.fetch_piece(f"127.0.0.1:{port}", DIGEST, 0, HASHES[0]) is None
                assert trio.current_time() - started < 2
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert [f.kind for f in failures] == [FailureKind.FAILED, FailureKind.FAILED]
    assert failures[0].reason.startswith("ConnectError")
    assert failures[1].reason == "no answer within 0.5 s"


def test_malformed_request_gets_400(cache: PieceCache) -> None:
    async def main() -> bytes:
        async with peer(PeerServer(cache, SECRET, index_lookup)) as address:
            host, port = address.split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some(4096):
                answer += chunk
            await stream.aclose()
            return answer

    assert trio.run(main).startswith(b"HTTP/1.1 400 ")


def test_idle_and_oversized_requests_are_cut_off(
    cache: PieceCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_http, "IDLE_TIMEOUT", 0.2)

    async def main() -> tuple[bytes, int]:
        async with peer(PeerServer(cache, SECRET, index_lookup)) as address:
            host, port = address.split(":")
            idle = await trio.open_tcp_stream(host, int(port))
            with trio.fail_after(5):
                closed = await idle.receive_some(10)
            await idle.aclose()
            async with httpx.AsyncClient() as client:
                flood = await client.post(f"http://{address}/pieces", content=b"x" * (5 << 20))
            return closed, flood.status_code

    assert trio.run(main) == (b"", 413)

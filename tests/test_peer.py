"""The peer server and client over real sockets, with a real LMDB cache."""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import blake3
import httpx
import pytest
import trio

from modelfs.cache.store import PieceCache, piece_checksum
from modelfs.errors import AuthError, ModelfsError
from modelfs.peer.client import PeerClient, PeerFailure
from modelfs.peer.options import ClusterSettings
from modelfs.peer.server import PeerServer
from modelfs.peer.tls import PeerTLS, TLSConfigError
from modelfs.scheduler.ranking import FailureKind
from modelfs.transport import server as peer_http
from modelfs.transport.tokens import MAX_SKEW, Verdict, check, load_secret, sign

PIECE = 64 * 1024
SECRET = b"cluster-secret-0123456789abcdef"
BLOB = os.urandom(3 * PIECE - 100)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
PIECES = [BLOB[i : i + PIECE] for i in range(0, len(BLOB), PIECE)]
HASHES = [f"blake3:{blake3.blake3(piece).hexdigest()}" for piece in PIECES]  # the piece index
NOW = 1_800_000_000.0


def index_lookup(digest: str, index: int) -> str | None:
    return HASHES[index] if digest == DIGEST and index < len(HASHES) else None


class LyingPeer(PeerServer):
    """A compromised node: serves its pieces with one bit flipped."""

    def piece(self, digest: str, index: int) -> bytes | None:
        data = super().piece(digest, index)
        return None if data is None else bytes([data[0] ^ 1]) + data[1:]


def test_tokens() -> None:
    token = sign(SECRET, "GET", "/pieces/x/0", NOW)["Authorization"]
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
        check(
            SECRET,
            sign(SECRET, "POST", "/v1/ask", NOW, b"{}")["Authorization"],
            "POST",
            "/v1/ask",
            NOW,
            hashlib.sha256(b"[]").hexdigest(),
        ),
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


async def raw_get(address: str, path: str, signed: dict[str, str] | None) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://{address}{path}", headers=signed or {})


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
    cache.mark_verified(DIGEST, len(BLOB), [piece_checksum(piece) for piece in PIECES])
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


# --- mutual TLS -----------------------------------------------------------------------------


def openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}-ca.crt", directory / f"{name}-ca.key"
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name} cluster CA", "-keyout", key, "-out", cert,
    )  # fmt: skip
    return cert, key


def make_node_cert(directory: Path, name: str, ca: tuple[Path, Path]) -> PeerTLS:
    """A node certificate for 127.0.0.1 signed by ``ca``; with that CA as the trusted one."""
    cert, key, request = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", key, "-out", request,
    )  # fmt: skip
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "2", "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    return PeerTLS(cert, key, ca[0])


def test_mutual_tls_serves_only_clients_the_cluster_ca_signed(
    cache: PieceCache, tmp_path: Path
) -> None:
    cluster_ca = make_ca(tmp_path, "cluster")
    server_tls = make_node_cert(tmp_path, "server", cluster_ca)
    member = make_node_cert(tmp_path, "member", cluster_ca)
    outsider = make_node_cert(tmp_path, "outsider", make_ca(tmp_path, "other"))
    path = f"/pieces/{DIGEST}/0"

    async def get(address: str, client_cert: PeerTLS | None) -> httpx.Response | str:
        # Trusts the cluster CA; presents ``client_cert`` (or nothing).
        context = ssl.create_default_context(cafile=cluster_ca[0])
        if client_cert is not None:
            context.load_cert_chain(client_cert.cert, client_cert.key)
        headers = sign(SECRET, "GET", path, time.time())
        async with httpx.AsyncClient(verify=context, timeout=5) as client:
            try:
                return await client.get(f"https://{address}{path}", headers=headers)
            except httpx.HTTPError as error:
                return type(error).__name__

    async def main() -> None:
        server = PeerServer(cache, SECRET, index_lookup, tls=server_tls.server_context())
        async with peer(server) as address:
            served = await get(address, member)
            assert isinstance(served, httpx.Response)
            assert (served.status_code, served.content) == (200, PIECES[0])
            for client_cert in (None, outsider):
                refused = await get(address, client_cert)
                assert isinstance(refused, str), refused  # no answer at all, not even a status
            async with httpx.AsyncClient() as plain:
                with pytest.raises(httpx.HTTPError):
                    await plain.get(f"http://{address}{path}")
            failures: list[PeerFailure] = []
            async with PeerClient(
                SECRET, report=failures.append, tls=member.client_context()
            ) as client:
                assert await client.fetch_piece(address, DIGEST, 1, HASHES[1]) == PIECES[1]
            async with PeerClient(
                SECRET, report=failures.append, tls=outsider.client_context()
            ) as client:
                assert await client.fetch_piece(address, DIGEST, 1, HASHES[1]) is None
            assert [f.kind for f in failures] == [FailureKind.FAILED]

    trio.run(main)


def test_tls_files_that_cannot_be_used_are_named(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "cluster")
    node = make_node_cert(tmp_path, "node", ca)
    with pytest.raises(TLSConfigError, match=r"peer CA certificate .*absent.*--peer-tls-ca"):
        PeerTLS(node.cert, node.key, tmp_path / "absent").server_context()
    with pytest.raises(TLSConfigError, match=r"--peer-tls-cert and --peer-tls-key"):
        PeerTLS(node.cert, ca[1], node.ca).client_context()  # a key of another certificate


# --- the connection limit -------------------------------------------------------------------


def test_connections_beyond_the_limit_are_refused_at_once(cache: PieceCache) -> None:
    limit = 3
    failures: list[PeerFailure] = []

    async def main() -> None:
        server = PeerServer(cache, SECRET, index_lookup, max_connections=limit)
        async with peer(server) as address:
            host, port = address.split(":")
            held = [await trio.open_tcp_stream(host, int(port)) for _ in range(limit)]
            # Let the server take them before the next one knocks.
            while server.connections.borrowed_tokens < limit:
                await trio.sleep(0.01)
            path = f"/pieces/{DIGEST}/0"
            with trio.fail_after(2):  # answered at once, not queued
                busy = await raw_get(address, path, None)
                assert (busy.status_code, busy.content) == (503, b"")
                async with PeerClient(SECRET, report=failures.append) as client:
                    assert await client.fetch_piece(address, DIGEST, 0, HASHES[0]) is None
            assert server.refused_connections == 2
            await held.pop().aclose()
            while server.connections.borrowed_tokens >= limit:
                await trio.sleep(0.01)
            served = await raw_get(address, path, sign(SECRET, "GET", path, time.time()))
            assert (served.status_code, served.content) == (200, PIECES[0])
            for stream in held:
                await stream.aclose()

    trio.run(main)
    assert failures == []  # busy is not at fault: not reported


def test_cluster_settings_take_all_three_tls_files_or_none(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    node = make_node_cert(tmp_path, "node", make_ca(tmp_path, "cluster"))
    common = ("http://scheduler:7480", secret, ("127.0.0.1", 7481), "", "")
    with pytest.raises(ModelfsError, match=r"needs all three"):
        ClusterSettings(*common, tls_cert=node.cert, tls_key=node.key)
    options = ClusterSettings(
        *common,
        peers_without_index=True,
        max_connections=8,
        tls_cert=node.cert,
        tls_key=node.key,
        tls_ca=node.ca,
    ).load()
    assert options.tls == node and options.secret == SECRET
    assert options.without_index and options.max_connections == 8
    plain = ClusterSettings(*common).load()
    assert plain.tls is None and not plain.without_index

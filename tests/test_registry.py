"""RegistryClient against a real distribution registry (and a proxy in front for faults)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from registry_tools import Layer, Proxy, Registry, TokenRequest, push_artifact

from modelfs.errors import (
    AuthError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from modelfs.modelpack import OCI_INDEX, OCI_MANIFEST, layer_media_type
from modelfs.sources.credentials import Credentials
from modelfs.sources.registry import (
    RegistryClient,
    RegistryRepository,
    SystemTrust,
    manifest_media_type,
    parse_content_range,
    registry_message,
)

T = TypeVar("T")
RAW = layer_media_type("weight", "raw")
BLOB = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes, every offset distinguishable
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def run_on(
    host: str,
    repository: str,
    action: Callable[[RegistryRepository], Awaitable[T]],
    **options: object,
) -> T:
    """Open a plain-HTTP client for ``host`` and run ``action`` on one repository."""

    async def main() -> T:
        async with RegistryClient(host, plain_http=True, **options) as client:  # type: ignore[arg-type]
            return await action(client.repository(repository))

    return trio.run(main)


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> str:
    """``tests/blob:v1`` with one raw layer ``BLOB``; returns the manifest digest."""
    return push_artifact(registry.host, "tests/blob", "v1", [Layer(RAW, BLOB, {})])


# --- pure helpers ---------------------------------------------------------------------------


def test_parse_content_range() -> None:
    assert parse_content_range("bytes 10-19/100") == (10, 19, 100)
    assert parse_content_range("bytes 0-0/*") == (0, 0, None)
    assert parse_content_range("bytes 9-3/100") is None
    assert parse_content_range("items 0-1/2") is None
    assert parse_content_range(None) is None


def test_registry_message_and_media_type() -> None:
    body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})
    assert registry_message(body.encode()) == "MANIFEST_UNKNOWN: manifest unknown"
    assert registry_message(b"<html>") == ""
    assert manifest_media_type(f"{OCI_INDEX}; charset=utf-8", b"{}") == OCI_INDEX
    declared = json.dumps({"mediaType": OCI_MANIFEST}).encode()
    assert manifest_media_type("application/json", declared) == OCI_MANIFEST


# --- manifests ----------------------------------------------------------------------------


def test_manifest_by_tag_and_by_digest(registry: Registry, pushed: str) -> None:
    by_tag = run_on(registry.host, "tests/blob", lambda repo: repo.get_manifest("v1"))
    assert by_tag.digest == pushed
    assert by_tag.digest == "sha256:" + hashlib.sha256(by_tag.data).hexdigest()
    assert by_tag.media_type == OCI_MANIFEST
    assert json.loads(by_tag.data)["layers"][0]["digest"] == BLOB_DIGEST
    by_digest = run_on(registry.host, "tests/blob", lambda repo: repo.get_manifest(pushed))
    assert by_digest == by_tag


def test_unknown_tag_and_repository(registry: Registry, pushed: str) -> None:
    with pytest.raises(NotFoundError, match=r"tests/blob:nope not found"):
        run_on(registry.host, "tests/blob", lambda repo: repo.get_manifest("nope"))
    with pytest.raises(NotFoundError, match=r"tests/absent:v1 not found"):
        run_on(registry.host, "tests/absent", lambda repo: repo.get_manifest("v1"))
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFoundError, match=missing):
        run_on(registry.host, "tests/blob", lambda repo: repo.get_blob(missing, 1024))


def test_altered_manifest_is_refused(proxy: Proxy, pushed: str) -> None:
    proxy.tamper_manifests = True
    with pytest.raises(IntegrityError, match=r"tests/blob@sha256:.*the registry or a proxy"):
        run_on(proxy.host, "tests/blob", lambda repo: repo.get_manifest(pushed))
    with pytest.raises(IntegrityError, match=r"tests/blob:v1 has digest"):
        run_on(proxy.host, "tests/blob", lambda repo: repo.get_manifest("v1"))


# --- blobs ----------------------------------------------------------------------------------


def test_range_reads(registry: Registry, pushed: str) -> None:
    async def reads(repo: RegistryRepository) -> list[bytes]:
        return [
            await repo.read_range(BLOB_DIGEST, 0, 100),
            await repo.read_range(BLOB_DIGEST, 500_000, 70_000),
            await repo.read_range(BLOB_DIGEST, len(BLOB) - 10, 10),
            await repo.read_range(BLOB_DIGEST, len(BLOB) - 10, 1000),  # runs past the end
            await repo.read_range(BLOB_DIGEST, len(BLOB), 10),  # starts at the end
            await repo.read_range(BLOB_DIGEST, 0, 0),
            await repo.read_range(BLOB_DIGEST, 0, len(BLOB) + 5),  # the whole blob and more
        ]

    start, middle, end, past_end, at_end, empty, whole = run_on(registry.host, "tests/blob", reads)
    assert start == BLOB[:100]
    assert middle == BLOB[500_000:570_000]
    assert end == past_end == BLOB[-10:]
    assert at_end == empty == b""
    assert whole == BLOB


def test_stream_and_small_blob(registry: Registry, pushed: str) -> None:
    async def stream(repo: RegistryRepository) -> bytes:
        async with repo.stream_blob(BLOB_DIGEST) as chunks:
            return b"".join([chunk async for chunk in chunks])

    assert run_on(registry.host, "tests/blob", stream) == BLOB
    got = run_on(registry.host, "tests/blob", lambda repo: repo.get_blob(BLOB_DIGEST, len(BLOB)))
    assert got == BLOB
    assert run_on(registry.host, "tests/blob", lambda repo: repo.has_blob(BLOB_DIGEST))


def test_blob_over_max_size_is_refused(registry: Registry, pushed: str) -> None:
    from modelfs.errors import ManifestError

    with pytest.raises(ManifestError, match="larger than 1000 bytes"):
        run_on(registry.host, "tests/blob", lambda repo: repo.get_blob(BLOB_DIGEST, 1000))


def test_tampered_blob_fails_integrity(proxy: Proxy, pushed: str) -> None:
    proxy.tamper = True
    with pytest.raises(IntegrityError, match=BLOB_DIGEST):
        run_on(proxy.host, "tests/blob", lambda repo: repo.get_blob(BLOB_DIGEST, len(BLOB)))


def test_range_read_counts_only_asked_bytes(proxy: Proxy, pushed: str) -> None:
    data = run_on(proxy.host, "tests/blob", lambda repo: repo.read_range(BLOB_DIGEST, 1000, 4096))
    assert data == BLOB[1000:5096]
    assert proxy.blob_bytes == 4096
    assert [r.range for r in proxy.blob_requests] == ["bytes=1000-5095"]


def test_push_pull_large_blob_streams(registry: Registry, tmp_path: Path) -> None:
    """A 96 MiB blob goes up and comes down without ever being whole in memory."""
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for index in range(96):
            chunk = hashlib.sha256(str(index).encode()).digest() * (1024 * 1024 // 32)
            digest.update(chunk)
            file.write(chunk)
    expected = "sha256:" + digest.hexdigest()

    tracemalloc.start()
    try:
        push_artifact(registry.host, "tests/big", "v1", [Layer(RAW, path, {})])

        async def pull(repo: RegistryRepository) -> tuple[str, int]:
            hasher = hashlib.sha256()
            size = 0
            async with repo.stream_blob(expected) as chunks:
                async for chunk in chunks:
                    hasher.update(chunk)
                    size += len(chunk)
            return "sha256:" + hasher.hexdigest(), size

        pulled, size = run_on(registry.host, "tests/big", pull)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (pulled, size) == (expected, 96 * 1024 * 1024)
    assert peak < 32 * 1024 * 1024, f"peak Python memory {peak} bytes"
    # Pushing again skips the upload: the blob is already there.
    assert run_on(registry.host, "tests/big", lambda repo: repo.has_blob(expected))


# --- auth -----------------------------------------------------------------------------------


def test_basic_auth(auth_registry: Registry) -> None:
    creds = auth_registry.credentials
    digest = push_artifact(
        auth_registry.host, "tests/private", "v1", [Layer(RAW, BLOB, {})], credentials=creds
    )
    manifest = run_on(
        auth_registry.host, "tests/private", lambda repo: repo.get_manifest("v1"), credentials=creds
    )
    assert manifest.digest == digest
    wrong = Credentials(auth_registry.username or "", "wrong password")
    with pytest.raises(AuthError, match=rf"modelfs login {auth_registry.host}"):
        run_on(
            auth_registry.host,
            "tests/private",
            lambda repo: repo.get_manifest("v1"),
            credentials=wrong,
        )


def test_anonymous_on_auth_registry_says_login(auth_registry: Registry) -> None:
    with pytest.raises(AuthError, match=r"requires authentication.*modelfs login"):
        run_on(auth_registry.host, "tests/private", lambda repo: repo.get_manifest("v1"))


def test_redirect_never_sends_authorization_elsewhere(
    auth_registry: Registry, auth_proxy: Proxy
) -> None:
    creds = auth_registry.credentials
    push_artifact(
        auth_registry.host, "tests/redirected", "v1", [Layer(RAW, BLOB, {})], credentials=creds
    )
    auth_proxy.redirect = True

    async def reads(repo: RegistryRepository) -> tuple[bytes, bytes, bytes]:
        part = await repo.read_range(BLOB_DIGEST, 4096, 8192)
        whole = await repo.get_blob(BLOB_DIGEST, len(BLOB))
        async with repo.stream_blob(BLOB_DIGEST) as chunks:
            streamed = b"".join([chunk async for chunk in chunks])
        return part, whole, streamed

    part, whole, streamed = run_on(auth_proxy.host, "tests/redirected", reads, credentials=creds)
    assert part == BLOB[4096 : 4096 + 8192]
    assert whole == streamed == BLOB
    assert len(auth_proxy.redirect_requests) == 3
    assert not any(r.had_authorization for r in auth_proxy.redirect_requests)
    assert auth_proxy.redirect_requests[0].range == "bytes=4096-12287"
    assert auth_proxy.blob_requests[-1].had_authorization  # the registry itself got it


# --- failures -------------------------------------------------------------------------------


def test_broken_range_read_resumes(proxy: Proxy, pushed: str) -> None:
    proxy.cut_blobs(after=1000)
    data = run_on(proxy.host, "tests/blob", lambda repo: repo.read_range(BLOB_DIGEST, 10, 200_000))
    assert data == BLOB[10:200_010]
    assert [r.range for r in proxy.blob_requests] == ["bytes=10-200009", "bytes=1010-200009"]


def test_broken_stream_resumes(proxy: Proxy, pushed: str) -> None:
    proxy.cut_blobs(after=300_000, times=2)

    async def stream(repo: RegistryRepository) -> bytes:
        async with repo.stream_blob(BLOB_DIGEST) as chunks:
            return b"".join([chunk async for chunk in chunks])

    assert run_on(proxy.host, "tests/blob", stream) == BLOB
    assert [r.range for r in proxy.blob_requests] == [None, "bytes=300000-", "bytes=600000-"]


def test_server_errors_are_retried(proxy: Proxy, pushed: str) -> None:
    proxy.fail_next(2, status=503)
    manifest = run_on(proxy.host, "tests/blob", lambda repo: repo.get_manifest("v1"))
    assert manifest.digest == pushed
    proxy.fail_next(3, status=429)
    with pytest.raises(RegistryUnavailableError, match=r"after 2 attempts \(HTTP 429"):
        run_on(proxy.host, "tests/blob", lambda repo: repo.get_manifest("v1"), retries=1)


def test_other_client_errors_name_status_and_message(proxy: Proxy, pushed: str) -> None:
    # Twice: the lean range GET gives an error answer back and the general path asks again.
    proxy.fail_next(2, status=403)
    with pytest.raises(RegistryError, match=r"HTTP 403 \(INJECTED: proxy answered 403\)"):
        run_on(proxy.host, "tests/blob", lambda repo: repo.read_range(BLOB_DIGEST, 0, 10))


def test_stopped_registry_is_unavailable_then_recovers(fresh_registry: Registry) -> None:
    push_artifact(fresh_registry.host, "tests/flaky", "v1", [Layer(RAW, BLOB, {})])
    fresh_registry.stop()
    began = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match=fresh_registry.host):
        run_on(
            fresh_registry.host,
            "tests/flaky",
            lambda repo: repo.read_range(BLOB_DIGEST, 0, 10),
            timeout=1.0,
            retries=2,
        )
    assert time.monotonic() - began < 5
    fresh_registry.start()
    data = run_on(
        fresh_registry.host,
        "tests/flaky",
        lambda repo: repo.read_range(BLOB_DIGEST, 0, 10),
        timeout=1.0,
        retries=2,
    )
    assert data == BLOB[:10]


def test_paused_registry_is_unavailable_within_bound(fresh_registry: Registry) -> None:
    push_artifact(fresh_registry.host, "tests/paused", "v1", [Layer(RAW, BLOB, {})])
    fresh_registry.pause()
    try:
        began = time.monotonic()
        with pytest.raises(RegistryUnavailableError, match="check that it is running"):
            run_on(
                fresh_registry.host,
                "tests/paused",
                lambda repo: repo.get_manifest("v1"),
                timeout=0.5,
                retries=1,
            )
        elapsed = time.monotonic() - began
    finally:
        fresh_registry.resume()
    assert elapsed < 0.5 * 2 + 1.0


def test_unreachable_stream_is_bounded(fresh_registry: Registry) -> None:
    fresh_registry.stop()

    async def stream(repo: RegistryRepository) -> None:
        async with repo.stream_blob(BLOB_DIGEST) as chunks:
            async for _ in chunks:
                pass

    with pytest.raises(RegistryUnavailableError):
        run_on(fresh_registry.host, "tests/x", stream, timeout=0.5, retries=1)


def test_tls_to_plain_http_registry_names_the_flag(registry: Registry) -> None:
    async def main() -> None:
        async with RegistryClient(registry.host, timeout=2, retries=0) as client:
            await client.ping()

    with pytest.raises(RegistryError, match="--plain-http"):
        trio.run(main)


def test_tls_trust_comes_from_the_system_store(
    tls_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ping(insecure: bool) -> None:
        async with RegistryClient(tls_registry.host, insecure=insecure, retries=0) as client:
            await client.ping()

    with pytest.raises(RegistryError, match="self-signed pass --insecure"):
        trio.run(ping, False)
    trio.run(ping, True)
    # OpenSSL's default verify paths honour SSL_CERT_FILE: the same place a system CA goes.
    assert tls_registry.tls_cert is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.tls_cert))
    trio.run(ping, False)


def test_system_trust_is_loaded_when_the_first_tls_connection_is_made(
    tls_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not before: loading it takes ~45 ms on the way to a mount's listing.
    assert tls_registry.tls_cert is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.tls_cert))
    context = SystemTrust(ssl.PROTOCOL_TLS_CLIENT)
    assert context.cert_store_stats()["x509_ca"] == 0
    host, port = tls_registry.host.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() is not None  # the handshake verified the registry's certificate
    assert context.cert_store_stats()["x509_ca"] == 1


def test_ping(registry: Registry, auth_registry: Registry) -> None:
    async def ping(host: str, creds: Credentials | None) -> None:
        async with RegistryClient(host, plain_http=True, credentials=creds) as client:
            await client.ping()

    trio.run(ping, registry.host, None)
    trio.run(ping, auth_registry.host, auth_registry.credentials)
    with pytest.raises(AuthError, match="rejected the credentials"):
        trio.run(ping, auth_registry.host, Credentials("modelfs", "nope"))


def test_environment_is_isolated() -> None:
    assert "docker-config" in os.environ["DOCKER_CONFIG"]


# --- docker token (Bearer) auth -------------------------------------------------------------


@pytest.fixture
def token_registry_pushed(token_registry: Registry) -> Registry:
    assert token_registry.token_server is not None
    push_artifact(
        token_registry.host,
        "tests/bearer",
        "v1",
        [Layer(RAW, BLOB, {})],
        credentials=token_registry.credentials,
    )
    token_registry.token_server.reset()
    return token_registry


def test_bearer_tokens_are_fetched_once_per_scope(token_registry_pushed: Registry) -> None:
    server = token_registry_pushed
    assert server.token_server is not None

    async def reads(repo: RegistryRepository) -> list[bytes]:
        await repo.get_manifest("v1")
        async with trio.open_nursery() as nursery:
            for index in range(8):
                nursery.start_soon(repo.read_range, BLOB_DIGEST, index * 1000, 1000)
        return [await repo.read_range(BLOB_DIGEST, 0, 10), await repo.get_blob(BLOB_DIGEST, 2**21)]

    first, whole = run_on(server.host, "tests/bearer", reads, credentials=server.credentials)
    assert (first, whole) == (BLOB[:10], BLOB)
    assert server.token_server.requests == [
        TokenRequest(("repository:tests/bearer:pull",), server.username, "basic")
    ]


def test_bearer_expired_token_is_refreshed_once(token_registry_pushed: Registry) -> None:
    server = token_registry_pushed
    assert server.token_server is not None
    server.token_server.expire_next(1)
    data = run_on(
        server.host,
        "tests/bearer",
        lambda repo: repo.read_range(BLOB_DIGEST, 5, 5),
        credentials=server.credentials,
    )
    assert data == BLOB[5:10]
    assert len(server.token_server.requests) == 2
    server.token_server.expire_next(2)  # the refreshed token is refused too: give up
    with pytest.raises(AuthError, match="rejected the credentials"):
        run_on(
            server.host,
            "tests/bearer",
            lambda repo: repo.read_range(BLOB_DIGEST, 5, 5),
            credentials=server.credentials,
        )


def test_bearer_wrong_and_missing_credentials(token_registry_pushed: Registry) -> None:
    server = token_registry_pushed
    with pytest.raises(AuthError, match=rf"rejected the credentials.*modelfs login {server.host}"):
        run_on(
            server.host,
            "tests/bearer",
            lambda repo: repo.get_manifest("v1"),
            credentials=Credentials("modelfs", "wrong"),
        )
    with pytest.raises(AuthError, match=rf"requires authentication.*modelfs login {server.host}"):
        run_on(server.host, "tests/bearer", lambda repo: repo.get_manifest("v1"))


def test_bearer_identity_token_and_ping(token_registry_pushed: Registry) -> None:
    server = token_registry_pushed
    assert server.token_server is not None
    identity = Credentials("<token>", server.token_server.identity_token)
    manifest = run_on(
        server.host, "tests/bearer", lambda repo: repo.get_manifest("v1"), credentials=identity
    )
    assert json.loads(manifest.data)["layers"][0]["digest"] == BLOB_DIGEST
    assert server.token_server.requests[-1].grant == "refresh_token"

    async def ping(creds: Credentials) -> None:
        async with RegistryClient(server.host, plain_http=True, credentials=creds) as client:
            await client.ping()

    trio.run(ping, identity)
    with pytest.raises(AuthError, match="rejected the credentials"):
        trio.run(ping, Credentials("<token>", "not-the-token"))

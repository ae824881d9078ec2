"""Blobs a registry redirects to storage, read by the lean range GET: distribution's ``redirect``
storage middleware in front of nginx-light serving the registry's storage directory, as a registry
on S3 or GCS sends blob GETs to presigned URLs; a counting proxy between them where a test
inspects or refuses what reaches the storage."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cluster_tools import nodes, publish, read_all, scheduler_process
from conftest import AUTH_PASSWORD, AUTH_USERNAME
from mounting import mounted
from registry_tools import Layer, Nginx, Proxy, Registry, push_artifact, self_signed_certificate

from modelfs.modelpack import ANNOTATION_FILEPATH, layer_media_type
from modelfs.sources.credentials import Credentials
from modelfs.sources.hosts import parse_hosts_toml
from modelfs.sources.interface import BlobBytes
from modelfs.sources.redirects import EXPIRY_MARGIN, BlobLocations, stated_expiry
from modelfs.sources.registry import RegistryClient, RegistryRepository

MIB = 1 << 20
BLOB = os.urandom(3 * MIB + 5)
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
REPOSITORY = "tests/redirected-blobs"
CREDENTIALS = Credentials(AUTH_USERNAME, AUTH_PASSWORD)
RUNS = [(0, [MIB, MIB]), (2 * MIB, [MIB, 5]), (100, [4096])]


@dataclass
class Storage:
    """A registry whose blob GETs redirect through ``origin`` (a counting proxy) to ``nginx``;
    clients talk to ``registry`` through ``front`` (which counts what the registry is asked)."""

    registry: Registry
    nginx: Nginx
    origin: Proxy
    front: Proxy

    def reset(self) -> None:
        self.origin.reset()
        self.front.reset()
        self.front.location_query = ""

    def registry_gets(self) -> int:
        return len(self.front.blob_requests)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    root = tmp_path_factory.mktemp("redirecting")
    nginx = Nginx(root / "nginx", root / "registry" / "storage")
    nginx.start()
    origin = Proxy(nginx)
    registry = Registry(
        root / "registry", username=AUTH_USERNAME, password=AUTH_PASSWORD, redirect_to=origin.url
    )
    registry.start()
    front = Proxy(registry)
    try:
        push_artifact(
            registry.host,
            REPOSITORY,
            "v1",
            [Layer(layer_media_type("weight", "raw"), BLOB)],
            credentials=CREDENTIALS,
        )
        yield Storage(registry, nginx, origin, front)
    finally:
        front.close()
        registry.stop()
        origin.close()
        nginx.stop()


def on_repository(host: str, action: Callable[[RegistryRepository], Awaitable[None]]) -> None:
    async def main() -> None:
        async with RegistryClient(host, plain_http=True, credentials=CREDENTIALS) as client:
            await client.ping()  # the login answered first: blob GETs carry it from the start
            await action(client.repository(REPOSITORY))

    trio.run(main)


async def read_run(repo: RegistryRepository, start: int, lengths: Sequence[int]) -> None:
    """Read a run of pieces and check each against the blob's bytes."""
    got: dict[int, bytes] = {}

    async def deliver(place: int, data: BlobBytes) -> None:
        got[place] = bytes(data)

    await repo.read_pieces(BLOB_DIGEST, start, lengths, deliver)
    offsets = [start + sum(lengths[:place]) for place in range(len(lengths))]
    assert got == {
        p: BLOB[o : o + n] for p, (o, n) in enumerate(zip(offsets, lengths, strict=True))
    }


def test_runs_go_straight_to_storage_on_kept_connections_without_the_login(
    storage: Storage,
) -> None:
    storage.reset()
    served_before = len(storage.nginx.served())

    async def reads(repo: RegistryRepository) -> None:
        for start, lengths in RUNS * 2:
            await read_run(repo, start, lengths)

    on_repository(storage.front.host, reads)
    assert storage.registry_gets() == 1  # asked where the blob is once
    assert storage.front.blob_requests[0].had_authorization  # the registry got the login
    assert len(storage.origin.requests) == len(RUNS) * 2
    assert storage.origin.connections == 1  # one kept-alive connection for every run
    assert not any(r.had_authorization for r in storage.origin.requests)
    served = storage.nginx.served()[served_before:]
    assert [entry.status for entry in served] == [206] * len(RUNS) * 2
    assert all(entry.authorization is None for entry in served)
    assert [entry.range for entry in served] == [
        f"bytes={start}-{start + sum(lengths) - 1}" for start, lengths in RUNS * 2
    ]


def test_an_expired_location_is_asked_for_again(storage: Storage) -> None:
    storage.reset()
    signed = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # Presigned for EXPIRY_MARGIN + 2 s from the current second: good for 1 to 2 s.
    storage.front.location_query = (
        f"X-Amz-Date={signed}&X-Amz-Expires={int(EXPIRY_MARGIN) + 2}&X-Amz-Signature=0"
    )

    async def reads(repo: RegistryRepository) -> None:
        await read_run(repo, 0, [MIB])
        await read_run(repo, MIB, [MIB])
        assert storage.registry_gets() == 1
        await trio.sleep(2.1)
        await read_run(repo, 2 * MIB, [MIB])
        assert storage.registry_gets() == 2

    on_repository(storage.front.host, reads)
    assert len(storage.origin.requests) == 3


def test_a_location_past_its_expiry_is_never_used_again(storage: Storage) -> None:
    storage.reset()
    storage.front.location_query = f"Expires={int(time.time()) - 1}"

    async def reads(repo: RegistryRepository) -> None:
        for start, lengths in RUNS:
            await read_run(repo, start, lengths)

    on_repository(storage.front.host, reads)
    assert storage.registry_gets() == len(RUNS)


@pytest.mark.parametrize("status", [403, 400, 410])
def test_a_refusal_from_storage_asks_the_registry_again(storage: Storage, status: int) -> None:
    storage.reset()

    async def reads(repo: RegistryRepository) -> None:
        await read_run(repo, 0, [MIB])
        storage.origin.fail_next(1, status=status)
        await read_run(repo, MIB, [MIB])  # refused, asked again, read from the fresh location
        assert storage.registry_gets() == 2
        storage.origin.fail_next(2, status=status)
        # The kept location and the fresh one refused: the general path follows the redirect.
        await read_run(repo, 2 * MIB, [MIB, 5])
        await read_run(repo, 0, [10])

    on_repository(storage.front.host, reads)
    assert not any(r.had_authorization for r in storage.origin.requests)


def test_hosts_toml_headers_go_to_their_registry_never_to_the_storage(
    storage: Storage, tmp_path: Path
) -> None:
    """A hosts.toml ``header`` (a token, say) is for its host: the lean path's range GETs and
    the general path (which follows the redirect itself) both leave it out at the storage."""
    storage.reset()
    host = storage.front.host
    text = f'server = "http://{host}"\n[header]\n  x-registry-token = "secret"\n'
    endpoint = parse_hosts_toml(text, tmp_path / "hosts.toml", host, host, plain_http=True)[-1]

    async def main() -> None:
        async with RegistryClient(host, credentials=CREDENTIALS, endpoint=endpoint) as client:
            await client.ping()
            repo = client.repository(REPOSITORY)
            await read_run(repo, 0, [MIB, MIB])  # the lean path
            assert await repo.get_blob(BLOB_DIGEST, len(BLOB)) == BLOB  # the general path

    trio.run(main)
    assert storage.registry_gets() == 2  # one redirect per path
    assert storage.front.requests
    assert all(r.headers.get("x-registry-token") == "secret" for r in storage.front.requests)
    assert len(storage.origin.requests) == 2
    assert not any("x-registry-token" in r.headers for r in storage.origin.requests)


@contextmanager
def anonymous_redirecting(root: Path, *, tls: bool = False) -> Iterator[tuple[Registry, Nginx]]:
    """An anonymous registry redirecting blob GETs to nginx, with the test blob pushed."""
    nginx = Nginx(root / "nginx", root / "registry" / "storage", tls=tls)
    registry = Registry(root / "registry", redirect_to=nginx.url)
    with nginx:
        registry.start()
        try:
            push_artifact(
                registry.host,
                REPOSITORY,
                "v1",
                [Layer(layer_media_type("weight", "raw"), BLOB, {ANNOTATION_FILEPATH: "w.bin"})],
            )
            yield registry, nginx
        finally:
            registry.stop()


def test_a_redirect_to_https_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The storage's certificate, made by openssl for the test, is trusted the way a system CA
    # is; set first, as a push's blob HEADs are redirected there too.
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nginx" / "tls-cert.pem"))
    with anonymous_redirecting(tmp_path, tls=True) as (registry, nginx):

        async def main() -> None:
            async with RegistryClient(registry.host, plain_http=True) as client:
                repo = client.repository(REPOSITORY)
                for start, lengths in RUNS:
                    await read_run(repo, start, lengths)

        trio.run(main)
        served = [entry for entry in nginx.served() if entry.method == "GET"]  # not the push's
    assert [entry.status for entry in served] == [206] * len(RUNS)
    assert len({entry.connection for entry in served}) == 1


def test_the_client_certificate_goes_to_its_registry_never_to_the_storage(
    tmp_path: Path,
) -> None:
    """A hosts.toml ``client`` certificate is presented to its registry (which requires it)
    and never to the storage blobs are redirected to (nginx asks any client for one); the
    storage is trusted by the hosts.toml's ``ca``, as containerd trusts redirect targets."""
    (tmp_path / "client").mkdir()
    certificate = self_signed_certificate(tmp_path / "client")
    with anonymous_redirecting(tmp_path / "pushed") as (_, _):
        pass  # the test blob is in its storage: the mutual-TLS registry serves a copy
    nginx = Nginx(
        tmp_path / "nginx", tmp_path / "registry" / "storage", tls=True, client_certs=True
    )
    registry = Registry(
        tmp_path / "registry", tls=True, redirect_to=nginx.url, client_certificate=certificate
    )
    shutil.copytree(
        tmp_path / "pushed" / "registry" / "storage", registry.storage, dirs_exist_ok=True
    )
    hosts = tmp_path / "certs.d" / registry.host / "hosts.toml"
    text = (
        f'server = "https://{registry.host}"\n'
        f'ca = ["{registry.tls_cert}", "{nginx.tls_cert}"]\n'
        f'client = [["{certificate[0]}", "{certificate[1]}"]]\n'
    )
    endpoint = parse_hosts_toml(text, hosts, registry.host, registry.host, plain_http=False)[-1]
    with nginx:
        registry.start()
        try:

            async def main() -> None:
                async with RegistryClient(registry.host, endpoint=endpoint) as client:
                    repo = client.repository(REPOSITORY)
                    await read_run(repo, 0, [MIB, MIB])  # the lean path
                    assert await repo.get_blob(BLOB_DIGEST, len(BLOB)) == BLOB  # the general

            trio.run(main)
        finally:
            registry.stop()
        served = nginx.served()
    assert [entry.status for entry in served] == [206, 200]
    assert [entry.client_certificate for entry in served] == [None, None]


def test_a_mount_reads_redirected_blobs_from_storage(tmp_path: Path) -> None:
    with anonymous_redirecting(tmp_path) as (registry, nginx):
        with mounted(
            f"{registry.host}/{REPOSITORY}:v1", tmp_path / "mnt", tmp_path / "cache"
        ) as mnt:
            assert (mnt / "w.bin").read_bytes() == BLOB
        weights = BLOB_DIGEST.removeprefix("sha256:")
        served = [entry for entry in nginx.served() if weights in entry.path]  # not the config
    assert served and all(entry.status == 206 for entry in served)
    # Every byte of the blob came from the storage, in range GETs (prefetch runs included).
    assert sum(_span(entry.range) for entry in served) >= len(BLOB)


def _span(ranges: str | None) -> int:
    assert ranges is not None and ranges.startswith("bytes=")
    first, _, last = ranges[len("bytes=") :].partition("-")
    return int(last) - int(first) + 1


def test_stated_expiry_of_presigned_urls() -> None:
    base = "https://bucket.example/blob?"
    assert stated_expiry(base + "X-Amz-Date=20261204T093000Z&X-Amz-Expires=900") == 1796377500.0
    assert stated_expiry(base + "x-goog-date=20261204T093000Z&x-goog-expires=60") == 1796376660.0
    assert stated_expiry(base + "Expires=1796376600&Signature=x") == 1796376600.0
    assert stated_expiry(base + "se=2026-12-04T09:30:00Z&sig=x") == 1796376600.0
    assert stated_expiry(base + "se=2026-12-04T09:30Z") == 1796376600.0
    # The earliest of several; none or nonsense states nothing.
    assert stated_expiry(base + "Expires=1796376000&se=2026-12-04T09:30:00Z") == 1796376000.0
    assert stated_expiry(base + "X-Amz-Date=yesterday&X-Amz-Expires=900") is None
    assert stated_expiry(base + "X-Amz-Expires=900") is None
    assert stated_expiry(base + "Expires=-5") is None
    assert stated_expiry("http://127.0.0.1:1/docker/registry/v2/blobs/sha256/ab/ab/data") is None


def test_locations_are_kept_per_blob_until_they_expire_or_are_forgotten() -> None:
    locations = BlobLocations(capacity=2)
    soon = locations.keep("a", "http://s/a?Expires=1030", now=5.0, wall_now=1000.0)
    assert soon.until == 5.0 + 30 - EXPIRY_MARGIN
    assert locations.get("a", 24.9) == soon
    assert locations.get("a", 25.0) is None  # expired: gone
    plain = locations.keep("a", "http://s/a", now=0.0, wall_now=1000.0)
    newer = locations.keep("a", "http://s/a2", now=1.0, wall_now=1001.0)
    locations.forget("a", plain)  # an older location refused: the newer one stays
    assert locations.get("a", 2.0) == newer
    locations.forget("a", newer)
    assert locations.get("a", 2.0) is None
    for blob in ("a", "b", "c"):
        locations.keep(blob, f"http://s/{blob}", now=0.0, wall_now=0.0)
    assert locations.get("a", 1.0) is None  # beyond capacity, the oldest goes
    assert locations.get("c", 1.0) is not None


def test_peers_share_what_one_node_read_from_redirected_storage(tmp_path: Path) -> None:
    size = 32 * MIB
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(os.urandom(size))
    expected = hashlib.sha256(data_path.read_bytes()).hexdigest()
    secret = tmp_path / "cluster-secret"
    secret.write_bytes(os.urandom(32))
    nginx = Nginx(tmp_path / "nginx", tmp_path / "registry" / "storage")
    registry = Registry(tmp_path / "registry", redirect_to=nginx.url)
    with nginx:
        registry.start()
        try:
            reference = publish(registry.host, "tests/redirected-peers", data_path)
            with scheduler_process(secret) as scheduler:
                options = ("--scheduler", scheduler, "--cluster-secret-file", str(secret))
                with nodes(reference, registry.host, tmp_path / "peers", 2, *options) as mounts:
                    hashes, _ = read_all([mnt / "model.bin" for mnt in mounts])
        finally:
            registry.stop()
        blob = [entry for entry in nginx.served() if entry.path.endswith("/data")]
    assert hashes == [expected] * 2
    # Both nodes read it whole; storage sent it about once: the rest came from the peer.
    assert sum(entry.sent for entry in blob) <= 1.25 * size

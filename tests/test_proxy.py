"""HTTP proxies on the lean range-GET path (issue 23): HTTPS through a CONNECT tunnel, plain
HTTP in absolute form, ``Proxy-Authorization`` from the proxy URL only, ``NO_PROXY`` respected;
against a real registry and a real forward proxy (``HttpProxy``)."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import AUTH_PASSWORD, AUTH_USERNAME
from mounting import unmount
from registry_tools import HttpProxy, Layer, Registry, free_port, push_artifact
from test_metrics import running_daemon

from modelfs.errors import RegistryError
from modelfs.modelpack import layer_media_type
from modelfs.sources.hosts import RegistryHost
from modelfs.sources.interface import BlobBytes
from modelfs.sources.proxy import environment_proxy, exempt, parse_proxy_url
from modelfs.sources.registry import RegistryClient

PIECE = 1 << 20
BLOB = bytes(range(256)) * (3 * PIECE // 256) + b"tail"
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
PROXY_USER = ("proxy-user", "proxy-secret")


@pytest.fixture
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.fixture
def http_proxy() -> Iterator[HttpProxy]:
    with HttpProxy(credentials=PROXY_USER) as server:
        yield server


@pytest.fixture(scope="module")
def tls_auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    server = Registry(
        tmp_path_factory.mktemp("tls-auth"),
        tls=True,
        username=AUTH_USERNAME,
        password=AUTH_PASSWORD,
    )
    server.start()
    yield server
    server.stop()


def _proxy_url(proxy: HttpProxy) -> str:
    return f"http://{PROXY_USER[0]}:{PROXY_USER[1]}@127.0.0.1:{proxy.port}"


def _read_plainly(client: RegistryClient, repository: str) -> tuple[int, bytes]:
    """The whole blob by the lean path alone: how many pieces it delivered, and their bytes."""
    pieces: list[bytes] = []

    async def deliver(place: int, data: BlobBytes) -> None:
        pieces.append(bytes(data))

    async def main() -> int:
        async with client:
            await client.ping()  # the auth flow first: the lean path only sends what it knows
            repo = client.repository(repository)
            lengths = [PIECE, PIECE, PIECE, len(BLOB) - 3 * PIECE]
            done, _ = await client.read_run_plainly(
                repo._url(f"blobs/{DIGEST}"), repo._pull, 0, lengths, deliver
            )
            # And the whole path, as a mount reads: exact bytes.
            assert (
                bytes(await repo.read_range(DIGEST, PIECE - 7, 20)) == BLOB[PIECE - 7 : PIECE + 13]
            )
            return done

    return trio.run(main), b"".join(pieces)


def test_plain_http_goes_in_absolute_form(
    registry: Registry, http_proxy: HttpProxy, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    push_artifact(
        registry.host, "proxy/plain", "v1", [Layer(layer_media_type("weight", "raw"), BLOB)]
    )
    no_proxy_environment.setenv("HTTP_PROXY", _proxy_url(http_proxy))
    done, data = _read_plainly(RegistryClient(registry.host, plain_http=True), "proxy/plain")
    assert done == 4 and data == BLOB
    ranged = [r for r in http_proxy.requests if r.target.endswith(DIGEST) and "Range" in r.headers]
    assert ranged, "no range GET reached the proxy"
    assert all(r.target.startswith(f"http://{registry.host}/v2/") for r in ranged)
    lean = [r for r in ranged if r.headers["Range"] == f"bytes=0-{len(BLOB) - 1}"]
    assert (
        lean
        and lean[0].headers["Proxy-Authorization"]
        == parse_proxy_url(_proxy_url(http_proxy)).authorization
    )


def test_https_goes_through_a_tunnel_and_credentials_never_reach_the_proxy(
    tls_auth_registry: Registry, http_proxy: HttpProxy, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    credentials = tls_auth_registry.credentials
    assert credentials is not None and tls_auth_registry.tls_cert is not None
    push_tls(tls_auth_registry)
    no_proxy_environment.setenv("HTTPS_PROXY", _proxy_url(http_proxy))
    # The registry's CA from a hosts.toml-style host: ``ca`` is what trusts it.
    endpoint = RegistryHost(
        "https", tls_auth_registry.host, "/v2", ca=(tls_auth_registry.tls_cert,)
    )
    client = RegistryClient(tls_auth_registry.host, credentials=credentials, endpoint=endpoint)
    done, data = _read_plainly(client, "proxy/tls")
    assert done == 4 and data == BLOB
    assert http_proxy.requests, "nothing went through the proxy"
    assert {r.method for r in http_proxy.requests} == {"CONNECT"}
    assert all(r.target == tls_auth_registry.host for r in http_proxy.requests)
    for request in http_proxy.requests:
        assert "Authorization" not in request.headers
        assert request.headers["Proxy-Authorization"] != credentials.basic_header()


def push_tls(registry: Registry) -> None:
    """Push BLOB to the TLS registry (push_artifact speaks plain HTTP)."""
    assert registry.credentials is not None and registry.tls_cert is not None
    endpoint = RegistryHost("https", registry.host, "/v2", ca=(registry.tls_cert,))

    async def main() -> None:
        async with RegistryClient(
            registry.host, credentials=registry.credentials, endpoint=endpoint
        ) as client:
            repo = client.repository("proxy/tls")

            async def chunks() -> object:
                yield BLOB

            await repo.push_blob(DIGEST, len(BLOB), chunks())  # type: ignore[arg-type]

    trio.run(main)


def test_no_proxy_is_respected(
    registry: Registry, http_proxy: HttpProxy, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    push_artifact(
        registry.host, "proxy/bypass", "v1", [Layer(layer_media_type("weight", "raw"), BLOB)]
    )
    no_proxy_environment.setenv("HTTP_PROXY", _proxy_url(http_proxy))
    no_proxy_environment.setenv("NO_PROXY", "localhost,127.0.0.1")
    done, data = _read_plainly(RegistryClient(registry.host, plain_http=True), "proxy/bypass")
    assert done == 4 and data == BLOB
    assert http_proxy.requests == []


def test_a_refusing_proxy_leaves_the_general_path_to_report(
    registry: Registry, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    push_artifact(
        registry.host, "proxy/refused", "v1", [Layer(layer_media_type("weight", "raw"), BLOB)]
    )
    with HttpProxy(credentials=PROXY_USER) as strict:
        no_proxy_environment.setenv("HTTP_PROXY", strict.url)  # no credentials: 407

        async def main() -> None:
            async with RegistryClient(registry.host, plain_http=True, retries=0) as client:
                await client.repository("proxy/refused").read_range(DIGEST, 0, 10)

        with pytest.raises(RegistryError, match="HTTP 407"):
            trio.run(main)


def test_proxy_variables() -> None:
    environ = {"https_proxy": "http://p:3128", "HTTP_PROXY": "http://q:8080", "NO_PROXY": ".corp"}
    assert environment_proxy("https", "registry.io", environ) == "http://p:3128"
    assert environment_proxy("http", "registry.io:5000", environ) == "http://q:8080"
    assert environment_proxy("https", "r.corp", environ) is None
    assert exempt("corp", ".corp") and exempt("a.b.corp:443", "corp")
    assert not exempt("notcorp", "corp")
    assert exempt("10.1.2.3:5000", "10.0.0.0/8") and not exempt("11.1.2.3", "10.0.0.0/8")
    assert exempt("r.io:5000", "r.io:5000") and not exempt("r.io:443", "r.io:5000")
    assert exempt("anything", "*")
    route = parse_proxy_url("http://u%40x:p%3Aw@proxy:3128")
    assert (route.host, route.port) == ("proxy", 3128)
    assert route.authorization == "Basic dUB4OnA6dw=="
    with pytest.raises(RegistryError, match="not an http:// URL"):
        parse_proxy_url("socks5://proxy:1080")


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[str]:
    """Debian's tinyproxy on a free loopback port: its URL. It closes each client connection
    after one answer, as some proxies do."""
    port = free_port()
    config = tmp_path / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nLogLevel Critical\n"
    )
    process = subprocess.Popen(
        ["tinyproxy", "-d", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "tinyproxy did not listen within 10 s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_fast_path_goes_through_tinyproxy_run_after_run(
    registry: Registry, tinyproxy: str, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    push_artifact(
        registry.host, "proxy/tiny", "v1", [Layer(layer_media_type("weight", "raw"), BLOB)]
    )
    no_proxy_environment.setenv("HTTP_PROXY", tinyproxy)
    client = RegistryClient(registry.host, plain_http=True)
    pieces: list[bytes] = []

    async def deliver(place: int, data: BlobBytes) -> None:
        pieces.append(bytes(data))

    async def main() -> list[int]:
        async with client:
            repo = client.repository("proxy/tiny")
            url, lengths = repo._url(f"blobs/{DIGEST}"), [PIECE, len(BLOB) - PIECE]
            # Runs on one kept-alive connection, which tinyproxy closes after each answer:
            # each later run asks again on a new one, still on the lean path.
            return [
                (await client.read_run_plainly(url, repo._pull, 0, lengths, deliver))[0]
                for _ in range(3)
            ]

    assert trio.run(main) == [2, 2, 2]
    assert b"".join(pieces) == BLOB * 3


def test_the_node_services_proxy_setting_reaches_its_mounts(
    registry: Registry, http_proxy: HttpProxy, tmp_path: Path
) -> None:
    """[proxy] in the node service's config: its mount processes read through the proxy, the
    lean path's range GETs included, with the proxy URL's credentials."""
    push_artifact(
        registry.host,
        "proxy/node",
        "v1",
        [Layer(layer_media_type("weight", "raw"), BLOB, {"org.cncf.model.filepath": "w.bin"})],
    )
    mnt = tmp_path / "models" / "m"
    mnt.mkdir(parents=True)
    config = tmp_path / "config.toml"
    config.write_text(
        f'control_socket = "{tmp_path / "run" / "control.sock"}"\n'
        f'hosts_dir = "{tmp_path / "no-hosts"}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\nsize = "1G"\n'
        f'[registries."{registry.host}"]\nplain_http = true\n'
        f'[proxy]\nhttp = "{_proxy_url(http_proxy)}"\n'
        f'[[mounts]]\nref = "{registry.host}/proxy/node:v1"\npath = "{mnt}"\nprefetch = "none"\n'
    )
    try:
        with running_daemon(config, tmp_path):
            assert (mnt / "w.bin").read_bytes() == BLOB
    finally:
        unmount(mnt)
    ranged = [r for r in http_proxy.requests if r.target.endswith(DIGEST) and "Range" in r.headers]
    assert ranged and all(r.target.startswith(f"http://{registry.host}/v2/") for r in ranged)
    assert any("Accept" not in r.headers for r in ranged)  # the lean path's (httpx sends one)
    authorization = parse_proxy_url(_proxy_url(http_proxy)).authorization
    assert all(r.headers.get("Proxy-Authorization") == authorization for r in http_proxy.requests)

"""Registry mirrors (issue 23): a model read through the mirrors a hosts.toml names, the
registry's server last. The mirror is real: a second ``docker-registry`` in distribution's proxy
mode (a pull-through cache, as Harbor's proxy projects are), in front of the origin through a
counting ``Proxy``; reads go through the real piece fetcher and LMDB cache."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import trio
from cluster_tools import publish, read_all, scheduler_process
from mounting import modelfs, mounted, unmount
from registry_tools import HttpProxy, Layer, Proxy, Registry, push_artifact
from test_metrics import running_daemon, scrape, value
from test_node_peers import SECRET, node_config, started
from test_service import status

from modelfs.artifact.tree import BlobRef
from modelfs.cache import PieceCache
from modelfs.fetcher.index import IndexLookup, PieceHasher, PieceIndex, publish_index
from modelfs.fetcher.piece_fetcher import PieceFetcher
from modelfs.modelpack import layer_media_type
from modelfs.mount.session import MountOptions, open_source
from modelfs.pieces import DEFAULT_PIECE_SIZE
from modelfs.reference import parse_reference
from modelfs.snapshot.mirror import ModelImages, serving_mirror
from modelfs.sources.mirrors import MirroredRepository
from modelfs.sources.registry import RegistryClient
from modelfs.sources.stats import MIRROR, REGISTRY, MountStats

MIB = 1 << 20
DATA = os.urandom(24 * MIB)  # six pieces
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def origin(registry: Registry) -> Iterator[Proxy]:
    """The origin registry as modelfs and the mirror both reach it: counting its blob bytes."""
    with Proxy(registry) as counted:
        yield counted


def pull_through_cache(root: Path, upstream: str) -> Registry:
    """A docker-registry in proxy mode: a pull-through cache of ``upstream``."""
    mirror = Registry(root)
    config = json.loads(mirror.config_path.read_text())
    config["proxy"] = {"remoteurl": upstream}
    mirror.config_path.write_text(json.dumps(config))
    return mirror


@pytest.fixture
def mirror(tmp_path: Path, origin: Proxy) -> Iterator[Registry]:
    cache = pull_through_cache(tmp_path / "mirror", origin.url)
    cache.start()
    yield cache
    cache.stop()


def push_model(registry: Registry, data: bytes = DATA, piece_index: bool = True) -> str:
    repository = f"test/mirrors-{uuid.uuid4().hex[:8]}"
    layer = Layer(layer_media_type("weight", "raw"), data, {"org.cncf.model.filepath": "w.bin"})
    push_artifact(registry.host, repository, "v1", [layer], piece_index=piece_index)
    return f"{repository}:v1"


def hosts_toml(directory: Path, registry: str, text: str) -> Path:
    """A hosts dir holding ``registry``'s hosts.toml."""
    (directory / registry).mkdir(parents=True)
    (directory / registry / "hosts.toml").write_text(text)
    return directory


def read_model(
    reference: str,
    hosts_dir: Path,
    cache_dir: Path,
    between: Callable[[], None] = lambda: None,
    data: bytes = DATA,
    read_timeout: float = 20.0,
    took: list[float] | None = None,
) -> tuple[bytes, MountStats]:
    """The model's weights read as a mount reads them (pieces, in runs, checked), on a node of
    its own (its own cache), 8 MiB at a time, ``between`` run after the first (how long each
    read took into ``took``); and what the node counted."""
    options = MountOptions(
        reference=parse_reference(reference),
        mountpoint=Path(),
        plain_http=True,
        hosts_dir=hosts_dir,
        read_timeout=read_timeout,
    )
    stats = MountStats()
    cache = PieceCache(cache_dir, 1 << 30)

    async def main() -> bytes:
        async with open_source(options, stats) as source:
            assert isinstance(source, MirroredRepository)
            selector = options.reference.selector
            fetcher = PieceFetcher(
                source, cache, stats=stats, index=IndexLookup(source, selector, cache)
            )
            async with fetcher.writing():
                blob = BlobRef("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
                parts = []
                for offset in range(0, len(data), 8 * MIB):
                    started = trio.current_time()
                    parts.append(bytes(await fetcher.read(blob, offset, 8 * MIB)))
                    if took is not None:
                        took.append(trio.current_time() - started)
                    if offset == 0:
                        between()
                return b"".join(parts)

    try:
        return trio.run(main), stats
    finally:
        cache.close()


def from_mirror(stats: MountStats, mirror: Registry) -> bool:
    """Whether the node counted the weights (and a config's few bytes) from ``mirror``."""
    mirrored = stats.fetched_bytes.get(MIRROR, 0)
    return stats.mirror_bytes == {mirror.host: mirrored} and 0 <= mirrored - len(DATA) < 4096


def test_a_cold_read_goes_through_the_mirror_and_the_origin_sends_each_byte_once(
    registry: Registry, origin: Proxy, mirror: Registry, tmp_path: Path
) -> None:
    name = push_model(registry)
    hosts = hosts_toml(
        tmp_path / "certs.d",
        origin.host,
        f'server = "http://{origin.host}"\n\n'
        f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n',
    )
    origin.reset()
    first, stats = read_model(f"{origin.host}/{name}", hosts, tmp_path / "node-1")
    assert first == DATA
    assert from_mirror(stats, mirror) and REGISTRY not in stats.fetched_bytes
    after_first = origin.bytes_by_blob.get(DIGEST, 0)
    second, stats = read_model(f"{origin.host}/{name}", hosts, tmp_path / "node-2")
    assert second == DATA
    assert from_mirror(stats, mirror) and REGISTRY not in stats.fetched_bytes
    # The second node cost the origin nothing; the first about the blob once.
    assert origin.bytes_by_blob.get(DIGEST, 0) == after_first
    print(f"origin sent {after_first / len(DATA):.2f} x the blob for two nodes")
    assert after_first < 1.5 * len(DATA)


def mirror_first(directory: Path, origin: Proxy, mirror: str) -> Path:
    return hosts_toml(
        directory,
        origin.host,
        f'server = "http://{origin.host}"\n\n[host."http://{mirror}"]\n  capabilities = ["pull"]\n',
    )


def test_a_mirror_stopped_mid_read_leaves_the_rest_to_the_origin(
    registry: Registry, origin: Proxy, mirror: Registry, tmp_path: Path
) -> None:
    name = push_model(registry)
    hosts = mirror_first(tmp_path / "certs.d", origin, mirror.host)
    data, stats = read_model(f"{origin.host}/{name}", hosts, tmp_path / "node", mirror.stop)
    assert data == DATA
    assert 8 * MIB <= stats.fetched_bytes[MIRROR] < len(DATA)
    assert stats.fetched_bytes[REGISTRY] >= len(DATA) - stats.fetched_bytes[MIRROR]
    assert stats.errors == {}  # no read failed


@pytest.mark.parametrize("piece_index", [True, False], ids=["piece-index", "no-index"])
def test_a_mirror_that_alters_bytes_is_passed_over_and_no_wrong_byte_is_read(
    registry: Registry, origin: Proxy, mirror: Registry, tmp_path: Path, piece_index: bool
) -> None:
    data = os.urandom(12 * MIB)
    name = push_model(registry, data, piece_index)
    with Proxy(mirror) as tampering:
        tampering.tamper = True  # every blob answer of the mirror: its first byte flipped
        hosts = mirror_first(tmp_path / "certs.d", origin, tampering.host)
        read, stats = read_model(f"{origin.host}/{name}", hosts, tmp_path / "node", data=data)
        assert tampering.blob_bytes > 0  # the mirror was asked, and answered altered bytes
    assert read == data
    assert stats.fetched_bytes[REGISTRY] >= len(data)  # all of it from the origin in the end


def read_file(path: Path) -> bytes:
    with path.open("rb", buffering=0) as file:
        return b"".join(iter(lambda: file.read(MIB), b""))


def test_modelfs_mount_reads_through_the_hosts_dir_it_is_given(
    registry: Registry, origin: Proxy, mirror: Registry, tmp_path: Path
) -> None:
    name = push_model(registry)
    hosts = mirror_first(tmp_path / "certs.d", origin, mirror.host)
    origin.reset()
    mnt = tmp_path / "mnt"
    reference = f"{origin.host}/{name}"
    with mounted(
        reference, mnt, tmp_path / "cache", "--prefetch", "none", "--hosts-dir", str(hosts)
    ):
        assert read_file(mnt / "w.bin") == DATA
    assert origin.bytes_by_blob.get(DIGEST, 0) < 1.5 * len(DATA)  # the mirror's fill, not ours


def test_the_node_service_reads_through_its_configured_mirrors_and_counts_them(
    registry: Registry, origin: Proxy, mirror: Registry, tmp_path: Path
) -> None:
    name = push_model(registry)
    mnt = tmp_path / "models" / "m"
    mnt.mkdir(parents=True)
    control = tmp_path / "run" / "control.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f'control_socket = "{control}"\n'
        f'hosts_dir = "{tmp_path / "no-hosts-dir"}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\nsize = "1G"\n'
        f'[registries."{origin.host}"]\nplain_http = true\nmirrors = ["http://{mirror.host}"]\n'
        f'[[mounts]]\nref = "{origin.host}/{name}"\npath = "{mnt}"\nprefetch = "none"\n'
    )
    try:
        with running_daemon(config, tmp_path) as (port, _):
            assert read_file(mnt / "w.bin") == DATA
            live: dict[str, Any] = status(control)["mounts"][0]["live"]  # type: ignore[index]
            assert live["mirror_bytes"] == {mirror.host: live["fetched_bytes"]["mirror"]}
            assert live["fetched_bytes"]["mirror"] >= len(DATA)
            samples = scrape(port)
            assert value(samples, "modelfs_fetched_bytes_total", mnt, source="mirror") >= len(DATA)
            assert (
                value(samples, "modelfs_mirror_fetched_bytes_total", mnt, mirror=mirror.host)
                == live["mirror_bytes"][mirror.host]
            )
            text = modelfs("status", "--control-socket", str(control)).stdout
            assert f"{mnt}: from mirror {mirror.host}: " in text
            assert "mirror 100%" in text
    finally:
        unmount(mnt)


def test_peers_first_then_the_mirror_chain_for_what_no_peer_holds(
    registry: Registry, origin: Proxy, mirror: Registry, tmp_path: Path
) -> None:
    """Two nodes with [cluster] and a mirror: node A reads through the mirror (no peer holds
    the model yet), node B from node A; the origin sends the model once, to the mirror."""
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(DATA)
    reference = publish(registry.host, "mirrors/cluster", data_path)
    secret = tmp_path / "cluster-secret"
    secret.write_bytes(SECRET)
    with scheduler_process(secret) as scheduler, ExitStack() as stack:
        configs = []
        for name in ("a", "b"):
            config = node_config(tmp_path / name, origin, reference, scheduler, secret)
            text = config.read_text().replace(
                "plain_http = true\n", f'plain_http = true\nmirrors = ["http://{mirror.host}"]\n'
            )
            config.write_text(text)
            configs.append(config)
        origin.reset()
        for config in configs:
            started(stack, config)
        expected = hashlib.sha256(DATA).hexdigest()
        assert read_all([tmp_path / "a" / "model" / "model.bin"])[0] == [expected]
        assert read_all([tmp_path / "b" / "model" / "model.bin"])[0] == [expected]
        live = {
            name: status(tmp_path / name / "run" / "control.sock")["mounts"][0]["live"]  # type: ignore[index]
            for name in ("a", "b")
        }
        assert live["a"]["fetched_bytes"].get("mirror", 0) >= len(DATA), live["a"]
        assert live["b"]["fetched_bytes"].get("peer", 0) >= 0.9 * len(DATA), live["b"]
        assert "registry" not in live["a"]["fetched_bytes"]
        print(f"origin sent {origin.blob_bytes / len(DATA):.2f} x the model for two nodes")
        assert origin.blob_bytes < 1.5 * len(DATA)


def test_the_snapshotters_own_mirror_named_in_hosts_toml_gives_modelfs_the_model(
    registry: Registry, tmp_path: Path
) -> None:
    """containerd's hosts.toml names the modelfs snapshotter's mirror, which answers a model's
    tag with its model image (docs/containerd.md): modelfs reading the same registry through
    that file gets the model itself."""
    repository = f"test/mirrors-{uuid.uuid4().hex[:8]}"
    layer = Layer(layer_media_type("weight", "raw"), b"weights", {"org.cncf.model.filepath": "w"})
    pushed = push_artifact(registry.host, repository, "v1", [layer])
    images = ModelImages(frozenset({registry.host}))
    with serving_mirror("127.0.0.1:0", images) as port:
        hosts = hosts_toml(
            tmp_path / "certs.d",
            registry.host,
            f'server = "http://{registry.host}"\n'
            f'[host."http://127.0.0.1:{port}"]\n  capabilities = ["pull", "resolve"]\n',
        )
        options = MountOptions(
            reference=parse_reference(f"{registry.host}/{repository}:v1"),
            mountpoint=Path(),
            hosts_dir=hosts,
        )

        async def main() -> str:
            async with open_source(options) as source:
                return (await source.get_manifest("v1")).digest

        assert trio.run(main) == pushed
        # containerd (any other client) still gets the model image from it.
        assert images.for_tag(registry.host, repository, "v1") is not None


def test_a_mirror_gets_its_path_headers_ns_and_proxy_from_hosts_toml(
    registry: Registry, origin: Proxy, mirror: Registry, tmp_path: Path
) -> None:
    """override_path, header and proxy of a [host] as a mirror sees them: its requests go
    through the proxy named for it (a real forward proxy, which records them), under the path
    given, with the headers and ``ns``; the lean path's range GETs too."""
    name = push_model(registry)
    with HttpProxy() as forward:
        url = f"http://{mirror.host}/v2"
        hosts = hosts_toml(
            tmp_path / "certs.d",
            origin.host,
            f'server = "http://{origin.host}"\n\n'
            f'[host."{url}"]\n  capabilities = ["pull", "resolve"]\n  override_path = true\n'
            f'  proxy = "{forward.url}"\n'
            f'  [host."{url}".header]\n    x-mirror-test = "from-hosts-toml"\n',
        )
        data, stats = read_model(f"{origin.host}/{name}", hosts, tmp_path / "node")
        requests = list(forward.requests)
    assert data == DATA and from_mirror(stats, mirror)
    assert requests and all(r.target.startswith(f"{url}/test/mirrors-") for r in requests)
    assert all(f"ns={origin.host}" in unquote(r.target) for r in requests)
    assert all(r.headers.get("x-mirror-test") == "from-hosts-toml" for r in requests)
    assert any(r.headers.get("Range", "").startswith("bytes=0-") for r in requests)


def test_a_mirror_that_resolves_tags_is_not_asked_for_what_vouches_for_bytes(
    registry: Registry, fresh_registry: Registry, tmp_path: Path
) -> None:
    """A mirror trusted to resolve tags still never supplies a piece index (nor a signature):
    they come by the referrers tag of a manifest, from the server. Here the mirror holds the
    same model with a forged index whose piece hashes match nothing: asked for it, every read
    would fail."""
    name = push_model(registry)
    repository, tag = name.split(":")
    layer = Layer(layer_media_type("weight", "raw"), DATA, {"org.cncf.model.filepath": "w.bin"})
    push_artifact(fresh_registry.host, repository, tag, [layer], piece_index=False)

    async def forge() -> None:
        async with RegistryClient(fresh_registry.host, plain_http=True) as client:
            mirrored = client.repository(repository)
            manifest = await mirrored.get_manifest(tag)
            hasher = PieceHasher(DEFAULT_PIECE_SIZE)
            hasher.update(bytes(len(DATA)))  # the hashes of zeros: matching no piece
            forged = PieceIndex(manifest.digest, DEFAULT_PIECE_SIZE, {DIGEST: hasher.finish()})
            await publish_index(mirrored, manifest, forged)

    trio.run(forge)
    hosts = hosts_toml(
        tmp_path / "certs.d",
        registry.host,
        f'server = "http://{registry.host}"\n'
        f'[host."http://{fresh_registry.host}"]\n  capabilities = ["pull", "resolve"]\n',
    )
    data, stats = read_model(f"{registry.host}/{name}", hosts, tmp_path / "node")
    assert data == DATA
    assert stats.mirror_bytes == {fresh_registry.host: stats.fetched_bytes[MIRROR]}
    assert stats.errors == {}


def test_a_mirror_that_stops_answering_costs_a_read_its_share_of_the_deadline(
    registry: Registry, origin: Proxy, mirror: Registry, tmp_path: Path
) -> None:
    """The mirror hangs (SIGSTOP) after the first read: the next read waits for it only its
    share of --read-timeout (half, with one mirror), then takes the rest from the origin,
    within the one deadline; the reads after it do not wait for it at all."""
    name = push_model(registry)
    hosts = mirror_first(tmp_path / "certs.d", origin, mirror.host)
    took: list[float] = []
    try:
        data, stats = read_model(
            f"{origin.host}/{name}", hosts, tmp_path / "node", mirror.pause, read_timeout=6.0,
            took=took,
        )  # fmt: skip
    finally:
        mirror.resume()
    assert data == DATA and stats.errors == {}
    assert REGISTRY in stats.fetched_bytes
    _, hung, *rest = took
    print(f"reads took {took}")
    assert 3.0 <= hung < 6.0, took  # the mirror's share, then the origin, within the deadline
    assert all(seconds < 2.0 for seconds in rest), took  # passed over: no wait

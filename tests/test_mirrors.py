"""Registry mirrors (issue 23): a model read through the mirrors a hosts.toml names, the
registry's server last. The mirror is real: a second ``docker-registry`` in distribution's proxy
mode (a pull-through cache, as Harbor's proxy projects are), in front of the origin through a
counting ``Proxy``; reads go through the real piece fetcher and LMDB cache."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.artifact.tree import BlobRef
from modelfs.cache import PieceCache
from modelfs.fetcher.index import IndexLookup
from modelfs.fetcher.piece_fetcher import PieceFetcher
from modelfs.modelpack import layer_media_type
from modelfs.mount.session import MountOptions, open_source
from modelfs.reference import parse_reference
from modelfs.sources.mirrors import MirroredRepository
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


def push_model(registry: Registry) -> str:
    repository = f"test/mirrors-{uuid.uuid4().hex[:8]}"
    layer = Layer(layer_media_type("weight", "raw"), DATA, {"org.cncf.model.filepath": "w.bin"})
    push_artifact(registry.host, repository, "v1", [layer])
    return f"{repository}:v1"


def hosts_toml(directory: Path, registry: str, text: str) -> Path:
    """A hosts dir holding ``registry``'s hosts.toml."""
    (directory / registry).mkdir(parents=True)
    (directory / registry / "hosts.toml").write_text(text)
    return directory


def read_model(reference: str, hosts_dir: Path, cache_dir: Path) -> tuple[bytes, MountStats]:
    """The model's weights read as a mount reads them (pieces, in runs, checked), on a node of
    its own (its own cache); and what the node counted."""
    options = MountOptions(
        reference=parse_reference(reference),
        mountpoint=Path(),
        plain_http=True,
        hosts_dir=hosts_dir,
        read_timeout=20.0,
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
                blob = BlobRef(DIGEST, len(DATA))
                parts = []
                for offset in range(0, len(DATA), 8 * MIB):
                    parts.append(bytes(await fetcher.read(blob, offset, 8 * MIB)))
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

"""The piece index: hashing, its JSON, and publishing/finding it on the real registry (2.8)."""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import blake3
import pytest
import trio
from click.testing import CliRunner, Result
from mounting import mounted
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.cli import cli
from modelfs.errors import IntegrityError, ManifestError
from modelfs.fetcher.index import (
    PIECE_INDEX_ARTIFACT_TYPE,
    BlobPieces,
    PieceHasher,
    PieceIndex,
    compute_index,
    encode_index,
    find_index,
    parse_index,
    publish_index,
)
from modelfs.modelpack import OCI_INDEX, OCI_MANIFEST
from modelfs.pieces import DEFAULT_PIECE_SIZE
from modelfs.sources.interface import FetchedManifest
from modelfs.sources.referrers import Descriptor, publish_referrer, referrers_tag, with_referrer
from modelfs.sources.registry import RegistryClient, RegistryRepository

RAW = "application/vnd.cncf.model.weight.v1.raw"
PIECE = DEFAULT_PIECE_SIZE
T = TypeVar("T")
BIG = os.urandom(2 * PIECE + 12345)
SMALL = b"tokenizer"
V1_INDEX_TYPE = "application/vnd.modelfs.piece-index.v1+json"  # what modelfs published before v2


def piece_hashes(data: bytes, size: int = PIECE) -> tuple[str, ...]:
    pieces = (data[i : i + size] for i in range(0, len(data), size))
    return tuple(f"blake3:{blake3.blake3(piece).hexdigest()}" for piece in pieces)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def on_repo(host: str, repository: str, action: Callable[[RegistryRepository], Awaitable[T]]) -> T:
    async def main() -> T:
        async with RegistryClient(host, plain_http=True) as client:
            return await action(client.repository(repository))

    return trio.run(main)


def test_hasher_is_independent_of_chunking() -> None:
    data = os.urandom(100)
    for chunk in (1, 7, 10, 33, 100):
        hasher = PieceHasher(10)
        for start in range(0, len(data), chunk):
            hasher.update(data[start : start + chunk])
        assert hasher.finish().pieces == piece_hashes(data, 10)
    assert PieceHasher(10).finish().pieces == ()


def _manifest(layers: list[tuple[str, int]]) -> FetchedManifest:
    data = json.dumps(
        {"layers": [{"mediaType": RAW, "digest": d, "size": s} for d, s in layers]}
    ).encode()
    return FetchedManifest(digest_of(data), OCI_MANIFEST, data)


def test_index_json_round_trip_and_checks() -> None:
    blob = b"x" * 25
    manifest = _manifest([(digest_of(blob), len(blob))])
    hasher = PieceHasher(10)
    hasher.update(blob)
    good = PieceIndex(manifest.digest, 10, {digest_of(blob): hasher.finish()})
    assert parse_index(encode_index(good), manifest) == good
    assert good.expected(digest_of(blob), 2) == f"blake3:{blake3.blake3(b'x' * 5).hexdigest()}"
    assert good.expected(digest_of(blob), 3) is None

    other = _manifest([(digest_of(b"other"), 5)])
    with pytest.raises(IntegrityError, match="describes sha256:"):
        parse_index(encode_index(good), other)
    short = PieceIndex(manifest.digest, 20, good.blobs)
    with pytest.raises(ManifestError, match="does not match layer"):
        parse_index(encode_index(short), manifest)
    with pytest.raises(ManifestError, match="malformed"):
        parse_index(b"{}", manifest)
    unknown = PieceIndex(manifest.digest, 10, {digest_of(blob): BlobPieces(25, ("md5:00",) * 3)})
    with pytest.raises(ManifestError, match="does not match layer"):
        parse_index(encode_index(unknown), manifest)


def _v1_index(manifest: FetchedManifest, blobs: dict[str, bytes], piece_size: int) -> bytes:
    """A piece index as modelfs wrote it before v2: bare sha256 hex."""
    return json.dumps(
        {
            "schemaVersion": 1,
            "manifest": manifest.digest,
            "pieceSize": piece_size,
            "blobs": {
                digest: {
                    "size": len(data),
                    "pieces": [
                        hashlib.sha256(data[i : i + piece_size]).hexdigest()
                        for i in range(0, len(data), piece_size)
                    ],
                }
                for digest, data in blobs.items()
            },
        }
    ).encode()


def test_an_index_published_before_v2_is_read_as_sha256() -> None:
    blob = b"y" * 25
    manifest = _manifest([(digest_of(blob), len(blob))])
    index = parse_index(_v1_index(manifest, {digest_of(blob): blob}, 10), manifest)
    assert index.expected(digest_of(blob), 2) == "sha256:" + hashlib.sha256(b"y" * 5).hexdigest()
    # What the cache keeps of it is read back the same.
    assert parse_index(encode_index(index), manifest) == index
    with pytest.raises(ManifestError, match="not a sha256 digest"):
        referrers_tag("latest")


def test_referrers_tag_index_keeps_other_referrers() -> None:
    first = Descriptor(OCI_MANIFEST, digest_of(b"a"), 1)
    second = Descriptor(OCI_MANIFEST, digest_of(b"b"), 1)
    foreign = json.dumps(
        {"manifests": [{"digest": digest_of(b"sig"), "artifactType": "signature"}]}
    ).encode()

    def add(existing: bytes, referrer: Descriptor) -> bytes:
        return with_referrer(existing, referrer, PIECE_INDEX_ARTIFACT_TYPE)

    updated = json.loads(add(add(foreign, first), second))
    assert updated["mediaType"] == OCI_INDEX
    assert [m["digest"] for m in updated["manifests"]] == [
        digest_of(b"sig"),
        first.digest,
        second.digest,
    ]
    again = json.loads(add(json.dumps(updated).encode(), first))
    assert [m["digest"] for m in again["manifests"]][-1] == first.digest
    assert len(again["manifests"]) == 3


def test_index_command_publishes_a_findable_referrer(registry: Registry) -> None:
    layers = [Layer(RAW, BIG), Layer(RAW, SMALL)]
    manifest_digest = push_artifact(registry.host, "index/model", "v1", layers, piece_index=False)
    reference = f"{registry.host}/index/model:v1"

    first = run("index", reference, "--plain-http")
    assert first.exit_code == 0, first.output
    assert f"{manifest_digest}: index sha256:" in first.output
    assert "(4 pieces)" in first.output
    second = run("index", reference, "--plain-http")
    assert second.exit_code == 0 and "already indexed" in second.output

    async def lookup(repo: RegistryRepository) -> tuple[bytes | None, PieceIndex | None]:
        manifest = await repo.get_manifest("v1")
        return await repo.get_referrers(manifest.digest), await find_index(repo, manifest)

    api_answer, found = on_repo(registry.host, "index/model", lookup)
    assert api_answer is None  # distribution 2.8: no referrers API, so the tag scheme is used
    assert found is not None and found.manifest == manifest_digest
    assert found.blobs[digest_of(BIG)].pieces == piece_hashes(BIG)
    assert found.blobs[digest_of(SMALL)].pieces == piece_hashes(SMALL)

    connection = http.client.HTTPConnection(registry.host, timeout=10)
    connection.request(
        "GET",
        f"/v2/index/model/manifests/{referrers_tag(manifest_digest)}",
        headers={"Accept": OCI_INDEX},
    )
    listed = json.loads(connection.getresponse().read())
    connection.close()
    assert [m["artifactType"] for m in listed["manifests"]] == [PIECE_INDEX_ARTIFACT_TYPE]

    forced = run("index", reference, "--plain-http", "--force")
    assert forced.exit_code == 0, forced.output
    relisted = on_repo(registry.host, "index/model", lookup)
    assert relisted[1] == found


def test_an_index_published_before_v2_is_found_and_a_v2_preferred(registry: Registry) -> None:
    push_artifact(registry.host, "index/both", "v1", [Layer(RAW, BIG)], piece_index=False)

    async def publish_both(repo: RegistryRepository) -> tuple[PieceIndex | None, ...]:
        manifest = await repo.get_manifest("v1")
        old = _v1_index(manifest, {digest_of(BIG): BIG}, PIECE)
        await publish_referrer(repo, manifest, V1_INDEX_TYPE, V1_INDEX_TYPE, old)
        found_v1 = await find_index(repo, manifest)
        await publish_index(repo, manifest, await compute_index(repo, manifest))
        return found_v1, await find_index(repo, manifest)

    found_v1, found_v2 = on_repo(registry.host, "index/both", publish_both)
    assert found_v1 is not None and found_v2 is not None
    assert found_v1.blobs[digest_of(BIG)].pieces == tuple(
        "sha256:" + hashlib.sha256(BIG[i : i + PIECE]).hexdigest()
        for i in range(0, len(BIG), PIECE)
    )
    assert found_v2.blobs[digest_of(BIG)].pieces == piece_hashes(BIG)


def test_a_model_indexed_before_v2_is_checked_piece_by_piece(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    """A mount checks each piece against a v1 index's sha256: the last piece is served while the
    first always arrives altered (without an index the blob would be checked whole, and fail)."""
    data = bytearray(BIG)
    data[50] = data[2 * PIECE + 50] ^ 0xFF
    layer = Layer(RAW, bytes(data), {"org.cncf.model.filepath": "w.raw"})
    push_artifact(registry.host, "index/old", "v1", [layer], piece_index=False)

    async def publish_v1(repo: RegistryRepository) -> None:
        manifest = await repo.get_manifest("v1")
        old = _v1_index(manifest, {digest_of(bytes(data)): bytes(data)}, PIECE)
        await publish_referrer(repo, manifest, V1_INDEX_TYPE, V1_INDEX_TYPE, old)

    on_repo(registry.host, "index/old", publish_v1)
    mnt = tmp_path / "mnt"
    with mounted(f"{proxy.host}/index/old:v1", mnt, tmp_path / "cache", "--prefetch", "none"):
        # Byte 50 of every blob answer: a change in pieces 0 and 1, the very byte in piece 2.
        proxy.patch_blobs(50, bytes([data[2 * PIECE + 50]]), times=1000)
        with (mnt / "w.raw").open("rb", buffering=0) as file:
            file.seek(2 * PIECE)
            assert file.read() == data[2 * PIECE :]
            file.seek(0)
            with pytest.raises(OSError) as raised:
                file.read(PIECE)
            assert raised.value.errno == errno.EIO


def test_unindexed_model_has_no_index(registry: Registry) -> None:
    push_artifact(registry.host, "index/plain", "v1", [Layer(RAW, SMALL)], piece_index=False)

    async def lookup(repo: RegistryRepository) -> PieceIndex | None:
        return await find_index(repo, await repo.get_manifest("v1"))

    assert on_repo(registry.host, "index/plain", lookup) is None


def test_altered_blob_is_never_indexed(proxy: Proxy) -> None:
    push_artifact(proxy.upstream.host, "index/tampered", "v1", [Layer(RAW, BIG)], piece_index=False)
    proxy.tamper = True

    async def index(repo: RegistryRepository) -> PieceIndex:
        return await compute_index(repo, await repo.get_manifest("v1"))

    with pytest.raises(IntegrityError, match="arrived with other bytes"):
        on_repo(proxy.host, "index/tampered", index)


def test_index_errors_are_one_line(registry: Registry) -> None:
    missing = run("index", f"{registry.host}/index/absent:v1", "--plain-http")
    assert missing.exit_code == 1
    assert "not found" in missing.output and missing.output.count("\n") == 1
    bad = run("index", "Not A Reference", "--plain-http")
    assert bad.exit_code == 1 and bad.output.startswith("modelfs: error:")

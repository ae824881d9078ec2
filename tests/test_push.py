"""`modelfs push`: a build from the local store into the real registry, and read back."""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

import blake3
import pytest
import trio
from registry_tools import Proxy, Registry, free_port
from test_build import build, make_model_dir, run

from modelfs.fetcher.index import PieceIndex, find_index
from modelfs.modelpack import ANNOTATION_FILEPATH, OCI_MANIFEST
from modelfs.sources.layout import OciLayout
from modelfs.sources.registry import RegistryClient


def _raw_manifest(host: str, repository: str, tag: str) -> tuple[str, bytes, str]:
    """GET the manifest with a plain HTTP client: (Docker-Content-Digest, body, Content-Type)."""
    connection = http.client.HTTPConnection(host, timeout=10)
    try:
        connection.request(
            "GET", f"/v2/{repository}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
        )
        response = connection.getresponse()
        assert response.status == 200
        return (
            response.headers["Docker-Content-Digest"],
            response.read(),
            response.headers["Content-Type"],
        )
    finally:
        connection.close()


def test_push_then_read_back(registry: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    store = tmp_path / "store"
    reference = f"{registry.host}/push/bert:v1"
    digest = build(model, store, "--tar", ref=reference)

    result = run("push", reference, "--plain-http", "--store", store)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{reference} {digest}\n"

    layout = OciLayout.open(store)
    stored = layout.blob_path(digest).read_bytes()
    pushed_digest, body, content_type = _raw_manifest(registry.host, "push/bert", "v1")
    assert (pushed_digest, body, content_type) == (digest, stored, OCI_MANIFEST)
    manifest = json.loads(body)

    async def read_back() -> None:
        async with RegistryClient(registry.host, plain_http=True) as client:
            repository = client.repository("push/bert")
            config = await repository.get_blob(manifest["config"]["digest"], 1 << 20)
            assert config == layout.blob_path(manifest["config"]["digest"]).read_bytes()
            for layer in manifest["layers"]:
                async with repository.stream_blob(layer["digest"]) as chunks:
                    data = b"".join([chunk async for chunk in chunks])
                assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
                path = layer["annotations"][ANNOTATION_FILEPATH]
                assert (model / path).read_bytes() in data  # the tar member's bytes

    trio.run(read_back)


def test_second_push_uploads_no_blobs(registry: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    store = tmp_path / "store"
    with Proxy(registry) as proxy:
        reference = f"{proxy.host}/push/again:v1"
        digest = build(model, store, ref=reference)
        push = ("push", reference, "--plain-http", "--store", store, "--no-index")
        assert run(*push).exit_code == 0
        uploads = [r for r in proxy.requests if r.method in ("POST", "PUT", "PATCH")]
        # A POST and a PUT per blob (the config and 5 layers), then the manifest's PUT.
        assert len(uploads) == 2 * 6 + 1
        proxy.reset()
        again = run(*push)
        assert again.exit_code == 0 and again.stdout.split()[1] == digest
        methods = sorted(r.method for r in proxy.requests)
        assert methods == ["HEAD"] * 6 + ["PUT"]  # blobs present: only the manifest is sent


def test_push_errors(registry: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    store = tmp_path / "store"
    missing = run("push", f"{registry.host}/push/none:v1", "--plain-http", "--store", store)
    assert missing.exit_code == 1 and "is not an OCI image layout" in missing.stderr
    build(model, store, ref=f"{registry.host}/push/some:v1")
    unknown = run("push", f"{registry.host}/push/none:v1", "--plain-http", "--store", store)
    assert unknown.exit_code == 1
    assert f"{registry.host}/push/none:v1 is not in the store" in unknown.stderr
    pinned = run("push", f"{registry.host}/push/some@sha256:{'a' * 64}", "--store", store)
    assert pinned.exit_code == 1 and "has a digest" in pinned.stderr

    nowhere = f"127.0.0.1:{free_port()}/push/some:v1"
    build(model, store, ref=nowhere)
    refused = run("push", nowhere, "--plain-http", "--store", store)
    assert refused.exit_code == 1
    error = refused.stderr.splitlines()[-1]  # after the progress bar's label
    assert error.startswith(f"modelfs: error: registry {nowhere.split('/')[0]} ")
    assert "check that it is running and reachable" in error


@pytest.mark.parametrize("flag", ["--tar", "--created=2025-01-01T00:00:00Z"])
def test_pushed_digest_is_the_built_digest(registry: Registry, tmp_path: Path, flag: str) -> None:
    model = make_model_dir(tmp_path)
    reference = f"{registry.host}/push/variants:{'tar' if flag == '--tar' else 'dated'}"
    digest = build(model, tmp_path / "store", flag, ref=reference)
    result = run("push", reference, "--plain-http", "--store", tmp_path / "store")
    assert result.exit_code == 0, result.output
    assert _raw_manifest(registry.host, "push/variants", reference.rsplit(":", 1)[1])[0] == digest


@pytest.mark.parametrize("flags", [(), ("--no-index",)], ids=["default", "no-index"])
def test_push_publishes_the_piece_index_unless_told(
    registry: Registry, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    model = make_model_dir(tmp_path)
    store = tmp_path / "store"
    reference = f"{registry.host}/push/indexed-{len(flags)}:v1"
    build(model, store, ref=reference)
    result = run("push", reference, "--plain-http", "--store", store, *flags)
    assert result.exit_code == 0, result.output

    async def index_of() -> PieceIndex | None:
        async with RegistryClient(registry.host, plain_http=True) as client:
            repository = client.repository(f"push/indexed-{len(flags)}")
            return await find_index(repository, await repository.get_manifest("v1"))

    found = trio.run(index_of)
    again = run("push", reference, "--plain-http", "--store", store, *flags)
    assert again.exit_code == 0 and trio.run(index_of) == found  # published once
    if flags:
        assert found is None
        return
    assert found is not None
    layout = OciLayout.open(store)
    for digest, pieces in found.blobs.items():
        data = layout.blob_path(digest).read_bytes()
        assert pieces.size == len(data)
        assert pieces.pieces[0] == "blake3:" + blake3.blake3(data[: found.piece_size]).hexdigest()

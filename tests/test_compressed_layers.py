"""Compressed tar layers whose annotations describe their one file (modctl's form).

The mount shows such a file from its annotations and fetches the layer only on the file's first
read; a layer whose archive differs from its annotations fails that read and serves nothing.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lmdb
import pytest
import trio
import zstandard
from model_files import random_safetensors
from mounting import mounted
from registry_tools import Layer, Proxy, Registry, push_artifact
from test_mount import MIB, raw, read_tree, tar_bytes, wait_until

from modelfs.cache import PieceCache
from modelfs.errors import CacheError
from modelfs.modelpack import ANNOTATION_FILEPATH, ANNOTATION_METADATA, layer_media_type
from modelfs.mount.model import _decompress_into_cache

MTIME = "2024-05-01T12:00:00Z"


def described(path: str, archive: bytes, compression: str, size: int, typeflag: int) -> Layer:
    """A compressed tar layer with modctl's path and file metadata annotations."""
    metadata = {
        "name": os.path.basename(path),
        "mode": 0o100640 if typeflag == ord("0") else 0o20000000755,
        "uid": 0,
        "gid": 0,
        "size": size,
        "mtime": MTIME,
        "typeflag": typeflag,
    }
    data = (
        gzip.compress(archive)
        if compression == "gzip"
        else zstandard.ZstdCompressor().compress(archive)
    )
    return Layer(
        layer_media_type("weight", f"tar+{compression}"),
        data,
        {ANNOTATION_FILEPATH: path, ANNOTATION_METADATA: json.dumps(metadata)},
    )


def one_file(path: str, data: bytes, compression: str) -> Layer:
    return described(path, tar_bytes({path: data}), compression, len(data), ord("0"))


@dataclass(frozen=True)
class Artifact:
    reference: str
    files: dict[str, bytes]  # what reads must give
    digests: dict[str, str]  # file path -> its layer's digest


def push(registry: Registry, name: str, layers: dict[str, Layer]) -> str:
    repository = f"test/{name}-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, "v1", list(layers.values()))
    return f"{repository}:v1"


def digest_of(layer: Layer) -> str:
    assert isinstance(layer.data, bytes)
    return f"sha256:{hashlib.sha256(layer.data).hexdigest()}"


@pytest.fixture(scope="module")
def deferred_model(registry: Registry) -> Artifact:
    files = {
        "config.json": b'{"model_type": "bert"}',
        "model.safetensors": random_safetensors(8 * MIB),  # what hints would read first
        "sub/weights.bin": os.urandom(8 * MIB + 77),
        "tokenizer.json": json.dumps({"vocab": list(range(500))}).encode(),
        "code/a.py": b"print('a')\n",
    }
    layers = {
        "config.json": raw("config.json", files["config.json"], "weight.config"),
        "model.safetensors": one_file("model.safetensors", files["model.safetensors"], "gzip"),
        "sub/weights.bin": one_file("sub/weights.bin", files["sub/weights.bin"], "zstd"),
        "tokenizer.json": one_file("tokenizer.json", files["tokenizer.json"], "zstd"),
        # metadata naming a directory: its members are only known from the archive
        "code": described(
            "code", tar_bytes({"code/a.py": files["code/a.py"]}, ("code",)), "gzip", 0, ord("5")
        ),
    }
    reference = push(registry, "deferred", layers)
    return Artifact(reference, files, {path: digest_of(layer) for path, layer in layers.items()})


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    return tmp_path / "mnt"  # mounted() makes it and unmounts it


def gets_of(proxy: Proxy, digest: str) -> int:
    return sum(1 for request in proxy.blob_requests if request.path.endswith(digest))


def test_listing_costs_no_bytes_of_deferred_layers_and_first_read_fetches_once(
    deferred_model: Artifact, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    deferred = ("model.safetensors", "sub/weights.bin", "tokenizer.json")
    with mounted(f"{proxy.host}/{deferred_model.reference}", mnt, cache_dir):
        listed = {str(p.relative_to(mnt)): p.stat() for p in mnt.rglob("*") if p.is_file()}
        assert {path: stat.st_size for path, stat in listed.items()} == {
            path: len(data) for path, data in deferred_model.files.items()
        }
        stat = listed["sub/weights.bin"]
        assert (stat.st_mode & 0o777, stat.st_mtime) == (0o440, 1714564800)
        time.sleep(1)  # the hints (default prefetch) had their chance to read
        for path in deferred:
            assert gets_of(proxy, deferred_model.digests[path]) == 0, path
        # A layer whose metadata names a directory is read while the mount is built.
        assert gets_of(proxy, deferred_model.digests["code"]) == 1

        def read(path: str) -> bytes:
            return (mnt / path).read_bytes()

        with ThreadPoolExecutor(6) as pool:
            readers = [pool.submit(read, path) for path in [*deferred, *deferred]]
            results = [reader.result() for reader in readers]
        assert results == [deferred_model.files[path] for path in [*deferred, *deferred]]
        for path in deferred:
            assert gets_of(proxy, deferred_model.digests[path]) == 1, path
        assert read_tree(mnt) == deferred_model.files

    proxy.reset()
    with mounted(f"{proxy.host}/{deferred_model.reference}", mnt, cache_dir):
        assert read_tree(mnt) == deferred_model.files
    assert proxy.blob_bytes == 0, proxy.blob_requests


def test_prefetch_all_fetches_deferred_layers(
    deferred_model: Artifact, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    reference = f"{proxy.host}/{deferred_model.reference}"
    with mounted(reference, mnt, cache_dir, "--prefetch", "all"):
        wait_until(
            lambda: all(gets_of(proxy, digest) for digest in deferred_model.digests.values())
        )
        time.sleep(0.5)  # the last layer is decompressed into the cache
    proxy.reset()
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert read_tree(mnt) == deferred_model.files
    assert proxy.blob_bytes == 0, proxy.blob_requests


def test_layer_unlike_its_annotations_fails_its_reads(
    registry: Registry, mnt: Path, cache_dir: Path
) -> None:
    data = os.urandom(MIB)
    layers = {
        "good.bin": one_file("good.bin", data, "gzip"),
        # one byte more than the annotation says
        "size.bin": described(
            "size.bin", tar_bytes({"size.bin": data + b"x"}), "gzip", len(data), ord("0")
        ),
        "name.bin": described(
            "name.bin", tar_bytes({"other.bin": data}), "zstd", len(data), ord("0")
        ),
        "two.bin": described(
            "two.bin", tar_bytes({"two.bin": data, "more.bin": b"m"}), "gzip", len(data), ord("0")
        ),
    }
    reference = push(registry, "lying", layers)
    # --prefetch all fetches (and refuses) them in the background, each apart from the others;
    # the second mount finds them in the cache: still refused.
    for attempt in (("--prefetch", "all"), ()):
        with mounted(f"{registry.host}/{reference}", mnt, cache_dir, *attempt):
            assert sorted(p.name for p in mnt.iterdir()) == sorted(layers)
            for name in ("size.bin", "name.bin", "two.bin"):
                assert (mnt / name).stat().st_size == len(data)
                for _ in range(2):
                    with pytest.raises(OSError) as raised:
                        (mnt / name).read_bytes()
                    assert raised.value.errno == errno.EIO, (attempt, name)
            assert (mnt / "good.bin").read_bytes() == data
    log = "".join(path.read_text() for path in (cache_dir / "logs").glob("*.log"))
    for name in ("size.bin", "name.bin", "two.bin"):
        digest = digest_of(layers[name])
        lines = [line for line in log.splitlines() if f"({digest}): the archive holds" in line]
        assert lines, f"no log line names the layer of {name}"


def test_a_cache_out_of_use_refuses_a_compressed_layer_saying_why(tmp_path: Path) -> None:
    """A compressed layer's stream lives in the cache only: with the cache out of use (its index
    found damaged), inflating it fails with the damage and what to do, not with "a bigger
    --cache-size holds it" (seen in scripts/chaos --only damage_cache)."""
    cache = PieceCache(tmp_path, 64 * MIB)
    cache.put_out_of_use(lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"))
    nothing = cast(Any, None)  # never reached: the cache is asked first
    with pytest.raises(CacheError) as raised:
        trio.run(_decompress_into_cache, nothing, "sha256:x+decompressed", nothing, cache, nothing)
    assert str(raised.value).startswith(f"the cache's index at {tmp_path} is damaged (")
    assert str(raised.value).endswith("remove the cache or use another --cache-dir")
    cache.close()


def test_a_stream_that_lost_a_piece_is_made_again_not_asked_of_the_registry(
    registry: Registry, tmp_path: Path, cache_dir: Path
) -> None:
    """Found by scripts/chaos --only damage_cache: a decompressed stream still marked whole after
    one of its pieces was gone (its record lost to damage) sent reads to the registry for it,
    and every read of the file failed with ESTALE. Now the read makes the stream again."""
    data = os.urandom(9 * MIB)
    layer = one_file("w.bin", data, "gzip")
    reference = f"{registry.host}/{push(registry, 'lost-piece', {'w.bin': layer})}"
    mnt = tmp_path / "mnt"
    with mounted(reference, mnt, cache_dir):
        assert (mnt / "w.bin").read_bytes() == data
    with lmdb.open(str(cache_dir), max_dbs=8) as env, env.begin(write=True) as txn:
        key = f"{digest_of(layer)}+decompressed/{1:010d}".encode()
        assert txn.delete(key, db=env.open_db(b"pieces", txn=txn))  # the blob is still "whole"
    with mounted(reference, mnt, cache_dir):  # a new process: nothing of it in memory
        assert (mnt / "w.bin").read_bytes() == data
    (log,) = (cache_dir / "logs").glob("mount-*.log")
    assert "w.bin: piece 1 of" in log.read_text()

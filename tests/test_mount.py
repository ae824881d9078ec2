"""``modelfs mount`` end to end: a real registry, a real FUSE mount, a real LMDB cache.

Laziness and traffic are judged from outside modelfs, by the counting proxy in front of the
registry.
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import io
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zstandard
from cache_damage import damage_piece
from mounting import MODELFS, is_mounted, modelfs, mounted, unmount
from registry_tools import Layer, Proxy, Registry, push_artifact
from safetensors.numpy import save

from modelfs.cache import PieceCache
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    ANNOTATION_TITLE,
    LEGACY_ANNOTATION_FILEPATH,
    layer_media_type,
)
from modelfs.sources.credentials import Credentials

MIB = 1 << 20


def raw(path: str, data: bytes, kind: str = "weight", **meta: object) -> Layer:
    annotations = {ANNOTATION_FILEPATH: path}
    if meta:
        annotations[ANNOTATION_METADATA] = json.dumps(meta)
    return Layer(layer_media_type(kind, "raw"), data, annotations)


def tar_bytes(files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Model:
    reference: str
    digest: str
    files: dict[str, bytes]


def make_safetensors(size_mib: int) -> tuple[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    tensors = {
        f"layer.{i}.weight": rng.standard_normal((512, 512), dtype=np.float32)
        for i in range(size_mib)
    }
    return save(tensors, metadata={"format": "np"}), tensors


@pytest.fixture(scope="session")
def big_safetensors() -> tuple[bytes, dict[str, np.ndarray]]:
    return make_safetensors(200)  # 200 MiB: the "larger than 64 MiB" file


@pytest.fixture(scope="session")
def model(registry: Registry, big_safetensors: tuple[bytes, dict[str, np.ndarray]]) -> Model:
    """A model with every layer shape modelfs reads, pushed to the shared registry."""
    weights, _ = big_safetensors
    files = {
        "config.json": json.dumps({"model_type": "bert", "hidden_size": 512}).encode(),
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        "model.safetensors": weights,
        "small.bin": os.urandom(3 * MIB + 123),
        "tokenizer.json": json.dumps({"vocab": list(range(1000))}).encode(),
        "docs/README.md": b"# a model\n",
        "code/a.py": b"print('a')\n",
        "code/sub/b.py": b"print('b')\n",
        "notes.txt": b"gzip layer\n" * 100,
        "extra/data.bin": os.urandom(MIB + 1),
    }
    layers = [
        raw(
            "config.json",
            files["config.json"],
            "weight.config",
            mode=0o644,
            size=len(files["config.json"]),
            mtime="2024-05-01T12:00:00Z",
        ),
        raw("1_Pooling/config.json", files["1_Pooling/config.json"], "weight.config"),
        raw("model.safetensors", weights),
        raw("small.bin", files["small.bin"], mode=0o755),
        # modctl's older form: one member, named by its path
        Layer(
            layer_media_type("weight.config", "tar"),
            tar_bytes({"tokenizer.json": files["tokenizer.json"]}),
            {ANNOTATION_FILEPATH: "tokenizer.json"},
        ),
        Layer(
            layer_media_type("doc", "tar"),
            tar_bytes({"docs/README.md": files["docs/README.md"]}, dirs=("docs",)),
            {ANNOTATION_FILEPATH: "docs"},
        ),
        Layer(
            layer_media_type("code", "tar+gzip"),
            gzip.compress(
                tar_bytes(
                    {"code/a.py": files["code/a.py"], "code/sub/b.py": files["code/sub/b.py"]}
                )
            ),
            {ANNOTATION_FILEPATH: "code"},
        ),
        Layer(
            layer_media_type("doc", "tar+zstd"),
            zstandard.ZstdCompressor().compress(tar_bytes({"notes.txt": files["notes.txt"]})),
            {ANNOTATION_FILEPATH: "notes.txt"},
        ),
        # the legacy prefix, everywhere
        Layer(
            "application/vnd.cnai.model.weight.v1.raw",
            files["extra/data.bin"],
            {LEGACY_ANNOTATION_FILEPATH: "extra/data.bin"},
        ),
    ]
    repository = f"test/model-{uuid.uuid4().hex[:8]}"
    digest = push_artifact(registry.host, repository, "v1", layers)
    return Model(f"{repository}:v1", digest, files)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    unmount(path)


def wait_cached(cache_dir: Path, blob: bytes, timeout: float = 10) -> None:
    """Until the node's cache holds every piece of ``blob`` (a mount stores pieces just after
    it served them)."""
    cache = PieceCache(cache_dir, 1 << 30)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    try:
        deadline = time.monotonic() + timeout
        while cache.missing(digest, len(blob)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache.missing(digest, len(blob)) == []
    finally:
        cache.close()


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_listing_fetches_no_file_bytes(
    model: Model, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    with mounted(f"{proxy.host}/{model.reference}", mnt, cache_dir, "--prefetch", "none"):
        listed = {str(p.relative_to(mnt)): p.stat().st_size for p in mnt.rglob("*") if p.is_file()}
        assert listed == {name: len(data) for name, data in model.files.items()}
        # The config and the two small compressed layers are fetched whole, tar layers only by
        # their header blocks, raw files not at all: a few KiB for a 200 MiB model.
        assert proxy.blob_bytes < 64 * 1024, proxy.requests


def test_every_file_reads_identical(
    model: Model, registry: Registry, mnt: Path, cache_dir: Path
) -> None:
    with mounted(f"{registry.host}/{model.reference}", mnt, cache_dir):
        assert read_tree(mnt) == model.files


def test_random_offsets_and_mmap(
    model: Model, registry: Registry, mnt: Path, cache_dir: Path
) -> None:
    expected = model.files["model.safetensors"]
    rng = random.Random(3)
    with mounted(f"{registry.host}/{model.reference}", mnt, cache_dir):
        fd = os.open(mnt / "model.safetensors", os.O_RDONLY)
        try:
            for _ in range(200):
                offset = rng.randrange(len(expected))
                size = rng.choice([1, 4095, 4096, 65536, MIB, 5 * MIB])
                assert os.pread(fd, size, offset) == expected[offset : offset + size]
            assert os.pread(fd, 100, len(expected) - 10) == expected[-10:]
            assert os.pread(fd, 100, len(expected) + 5) == b""
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
                for _ in range(50):
                    offset = rng.randrange(len(expected))
                    assert mapped[offset : offset + 8192] == expected[offset : offset + 8192]
                assert mapped[:] == expected
        finally:
            os.close(fd)


def test_one_tensor_fetches_under_a_tenth(
    model: Model,
    big_safetensors: tuple[bytes, dict[str, np.ndarray]],
    proxy: Proxy,
    mnt: Path,
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    weights, tensors = big_safetensors
    with mounted(f"{proxy.host}/{model.reference}", mnt, cache_dir):
        proxy.reset()
        # A separate process, as a loader is: safetensors copies out of its mmap while holding
        # the GIL, which would stall the in-process proxy that serves the page fault.
        out = tmp_path / "tensor.npy"
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, numpy; from safetensors import safe_open\n"
                "with safe_open(sys.argv[1], framework='numpy') as f:\n"
                "    numpy.save(sys.argv[2], f.get_tensor('layer.117.weight'))",
                str(mnt / "model.safetensors"),
                str(out),
            ],
            check=True,
            timeout=60,
        )
        assert np.array_equal(np.load(out), tensors["layer.117.weight"])
        # The weights' bytes only: the hinted small files may still be arriving from mount time.
        fetched = proxy.bytes_by_blob.get(f"sha256:{hashlib.sha256(weights).hexdigest()}", 0)
        assert 0 < fetched < len(weights) / 10, fetched


def test_modes_mtimes_and_read_only(
    model: Model, registry: Registry, mnt: Path, cache_dir: Path
) -> None:
    with mounted(f"{registry.host}/{model.reference}", mnt, cache_dir):
        config = (mnt / "config.json").stat()
        assert config.st_mode & 0o777 == 0o444
        assert config.st_mtime == 1714564800
        assert (mnt / "small.bin").stat().st_mode & 0o777 == 0o555
        assert (mnt / "1_Pooling").is_dir()
        assert (mnt / "docs" / "README.md").stat().st_mode & 0o222 == 0
        for attempt in (
            lambda: os.open(mnt / "config.json", os.O_RDWR),
            lambda: os.open(mnt / "new.txt", os.O_WRONLY | os.O_CREAT),
            lambda: (mnt / "newdir").mkdir(),
            lambda: (mnt / "config.json").unlink(),
            lambda: os.truncate(mnt / "config.json", 0),
        ):
            with pytest.raises(OSError) as raised:
                attempt()
            assert raised.value.errno == errno.EROFS


def test_plain_oras_artifact_uses_title(registry: Registry, mnt: Path, cache_dir: Path) -> None:
    data = os.urandom(5000)
    repository = f"test/oras-{uuid.uuid4().hex[:8]}"
    push_artifact(
        registry.host,
        repository,
        "v1",
        [Layer("application/octet-stream", data, {ANNOTATION_TITLE: "weights.bin"})],
        config=b"{}",
        config_media_type="application/vnd.oci.empty.v1+json",
        artifact_type="application/vnd.example.model",
    )
    with mounted(f"{registry.host}/{repository}:v1", mnt, cache_dir):
        assert read_tree(mnt) == {"weights.bin": data}


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../../etc/passwd", ".."),
        ("/etc/passwd", "absolute"),
        ("a//b", "empty"),
        ("a/./b", "."),
        ("a\0b", "NUL"),
    ],
)
def test_hostile_paths_are_refused_before_mounting(
    registry: Registry, mnt: Path, cache_dir: Path, path: str, problem: str
) -> None:
    repository = f"test/hostile-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, "v1", [raw(path, b"evil")])
    result = modelfs(
        "mount",
        f"{registry.host}/{repository}:v1",
        str(mnt),
        "--cache-dir",
        str(cache_dir),
        "--plain-http",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("modelfs: error:")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not is_mounted(mnt)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([raw("a.bin", b"1"), raw("a.bin", b"2")], "a.bin"),
        ([raw("a", b"1"), raw("a/b", b"2")], "a"),
        ([raw("a/b", b"1"), raw("a", b"2")], "a"),
        ([raw("a.bin", b"123", size=7)], "7"),
    ],
    ids=["duplicate", "file-then-dir", "dir-then-file", "size-mismatch"],
)
def test_inconsistent_manifests_are_refused(
    registry: Registry, mnt: Path, cache_dir: Path, layers: list[Layer], message: str
) -> None:
    repository = f"test/bad-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, "v1", layers)
    result = modelfs(
        "mount",
        f"{registry.host}/{repository}:v1",
        str(mnt),
        "--cache-dir",
        str(cache_dir),
        "--plain-http",
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not is_mounted(mnt)


def test_unknown_tag_and_bad_reference(
    model: Model, registry: Registry, mnt: Path, cache_dir: Path
) -> None:
    repository = model.reference.split(":")[0]
    result = modelfs(
        "mount",
        f"{registry.host}/{repository}:nope",
        str(mnt),
        "--cache-dir",
        str(cache_dir),
        "--plain-http",
    )
    assert result.returncode == 1 and "nope" in result.stderr, result.stderr
    result = modelfs("mount", "Not A Reference", str(mnt), "--cache-dir", str(cache_dir))
    assert result.returncode == 1 and "invalid reference" in result.stderr
    assert not is_mounted(mnt)


def test_credentials_wrong_and_right(
    auth_registry: Registry, mnt: Path, cache_dir: Path, tmp_path: Path
) -> None:
    data = b"secret weights"
    repository = f"test/private-{uuid.uuid4().hex[:8]}"
    creds = Credentials(auth_registry.username or "", auth_registry.password or "")
    push_artifact(auth_registry.host, repository, "v1", [raw("w.bin", data)], credentials=creds)
    reference = f"{auth_registry.host}/{repository}:v1"
    env_config = tmp_path / "docker"
    env = {**os.environ, "DOCKER_CONFIG": str(env_config)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MODELFS, *args], capture_output=True, text=True, env=env, timeout=60
        )

    result = run("mount", reference, str(mnt), "--cache-dir", str(cache_dir), "--plain-http")
    assert result.returncode == 1 and "login" in result.stderr, result.stderr
    result = run("login", auth_registry.host, "-u", creds.username, "-p", "wrong", "--plain-http")
    assert result.returncode == 1 and auth_registry.host in result.stderr, result.stderr
    result = run(
        "login", auth_registry.host, "-u", creds.username, "-p", creds.password, "--plain-http"
    )
    assert result.returncode == 0, result.stderr
    result = run("mount", reference, str(mnt), "--cache-dir", str(cache_dir), "--plain-http")
    assert result.returncode == 0, result.stderr
    try:
        assert (mnt / "w.bin").read_bytes() == data
    finally:
        unmount(mnt)


def test_redirected_blobs_do_not_leak_credentials(
    auth_proxy: Proxy, mnt: Path, cache_dir: Path, tmp_path: Path
) -> None:
    registry = auth_proxy.upstream
    creds = Credentials(registry.username or "", registry.password or "")
    data = os.urandom(6 * MIB)
    repository = f"test/redirect-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, "v1", [raw("w.bin", data)], credentials=creds)
    config = tmp_path / "docker"
    config.mkdir()
    token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {auth_proxy.host: {"auth": token}}}))
    auth_proxy.redirect = True
    env = {**os.environ, "DOCKER_CONFIG": str(config)}
    result = subprocess.run(
        [
            *MODELFS,
            "mount",
            f"{auth_proxy.host}/{repository}:v1",
            str(mnt),
            "--cache-dir",
            str(cache_dir),
            "--plain-http",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    try:
        assert (mnt / "w.bin").read_bytes() == data
    finally:
        unmount(mnt)
    assert auth_proxy.redirect_requests, "the blob reads were not redirected"
    assert not any(r.had_authorization for r in auth_proxy.redirect_requests)


def test_registry_down_gives_eio_then_recovers(
    fresh_registry: Registry, mnt: Path, cache_dir: Path
) -> None:
    data = os.urandom(12 * MIB)
    repository = "test/flaky"
    push_artifact(fresh_registry.host, repository, "v1", [raw("w.bin", data)])
    with mounted(
        f"{fresh_registry.host}/{repository}:v1", mnt, cache_dir, "--timeout", "2", "--retries", "1"
    ):
        fd = os.open(mnt / "w.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, MIB, 0) == data[:MIB]
            fresh_registry.stop()
            started = time.monotonic()
            with pytest.raises(OSError) as raised:
                os.pread(fd, MIB, 9 * MIB)
            assert raised.value.errno == errno.EIO
            assert time.monotonic() - started < 20
            fresh_registry.start()
            assert os.pread(fd, MIB, 9 * MIB) == data[9 * MIB : 10 * MIB]
            # a stalled registry (SIGSTOP) times out too, and the mount survives it
            fresh_registry.pause()
            try:
                with pytest.raises(OSError) as raised:
                    os.pread(fd, MIB, 5 * MIB)
                assert raised.value.errno == errno.EIO
            finally:
                fresh_registry.resume()
            assert os.pread(fd, 2 * MIB, 4 * MIB) == data[4 * MIB : 6 * MIB]
        finally:
            os.close(fd)


def test_tampered_blob_is_never_served(
    registry: Registry, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    small, big = os.urandom(100_000), os.urandom(10 * MIB)
    repository = f"test/tamper-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, "v1", [raw("small.bin", small), raw("big.bin", big)])
    with mounted(f"{proxy.host}/{repository}:v1", mnt, cache_dir):
        proxy.tamper = True
        with pytest.raises(OSError) as raised:
            (mnt / "small.bin").read_bytes()
        assert raised.value.errno == errno.EIO
        with pytest.raises(OSError) as raised:
            (mnt / "big.bin").read_bytes()
        assert raised.value.errno == errno.EIO
        # Once a blob is proven wrong, no piece of it is served until it checks out whole, and
        # the kernel's page cache of it is dropped (just after the failing read returns).
        time.sleep(0.5)
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        try:
            with pytest.raises(OSError):
                os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        proxy.tamper = False
        assert (mnt / "small.bin").read_bytes() == small
        assert (mnt / "big.bin").read_bytes() == big


def test_cache_survives_remount_and_corruption_is_refetched(
    registry: Registry, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    data = os.urandom(9 * MIB)
    repository = f"test/remount-{uuid.uuid4().hex[:8]}"
    digest = push_artifact(registry.host, repository, "v1", [raw("w.bin", data)])
    layer_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    pinned = f"{proxy.host}/{repository}@{digest}"
    with mounted(pinned, mnt, cache_dir):
        assert (mnt / "w.bin").read_bytes() == data
    proxy.reset()
    with mounted(pinned, mnt, cache_dir):
        assert (mnt / "w.bin").read_bytes() == data
    assert proxy.requests == [], "a remount by digest must need no network"
    damage_piece(cache_dir, layer_digest, 1)
    with mounted(pinned, mnt, cache_dir):
        assert (mnt / "w.bin").read_bytes() == data
    assert proxy.blob_bytes == 4 * MIB  # just the damaged piece, fetched again


def test_a_mount_goes_on_from_the_registry_when_its_cache_index_is_damaged_under_it(
    registry: Registry, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    """Found by damaging the index under live mounts: LMDB's errors failed reads with EIO or
    killed the mount. Now the mount logs it once and reads from the registry, every byte right."""
    data = os.urandom(64 * MIB)  # more than a mount keeps in memory: reads reach the cache
    repository = f"test/damaged-index-{uuid.uuid4().hex[:8]}"
    digest = push_artifact(registry.host, repository, "v1", [raw("w.bin", data)])
    with mounted(f"{proxy.host}/{repository}@{digest}", mnt, cache_dir):
        assert (mnt / "w.bin").read_bytes() == data
        wait_cached(cache_dir, data)
        with (cache_dir / "data.mdb").open("r+b") as file:  # every page but the meta pages
            used = os.lseek(file.fileno(), 0, os.SEEK_HOLE)  # then the map's sparse rest
            file.seek(2 * 4096)
            file.write(b"\xff" * (used - 2 * 4096))
        proxy.reset()
        fd = os.open(mnt / "w.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the reads reach the mount
            assert os.pread(fd, len(data), 0) == data
        finally:
            os.close(fd)
        assert proxy.blob_bytes >= 4 * MIB  # from the registry, not the damaged cache
        assert (mnt / "w.bin").stat().st_size == len(data)  # still serving
    (log,) = (cache_dir / "logs").glob("mount-*.log")
    lines = [line for line in log.read_text().splitlines() if "goes on without the cache" in line]
    assert len(lines) == 1 and f"the cache's index at {cache_dir} is damaged (" in lines[0]


def test_two_mounts_share_one_cache(
    model: Model, proxy: Proxy, tmp_path: Path, cache_dir: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    reference = f"{proxy.host}/{model.reference}"
    with mounted(reference, first, cache_dir), mounted(reference, second, cache_dir):
        assert (first / "small.bin").read_bytes() == model.files["small.bin"]
        wait_cached(cache_dir, model.files["small.bin"])
        proxy.reset()
        assert (second / "small.bin").read_bytes() == model.files["small.bin"]
        assert proxy.blob_bytes == 0


def test_umount_and_signals_unmount(
    model: Model, registry: Registry, mnt: Path, cache_dir: Path
) -> None:
    reference = f"{registry.host}/{model.reference}"
    with mounted(reference, mnt, cache_dir):
        result = modelfs("umount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
    for signum in (signal.SIGTERM, signal.SIGINT):
        process = subprocess.Popen(
            [
                *MODELFS,
                "mount",
                "--foreground",
                reference,
                str(mnt),
                "--cache-dir",
                str(cache_dir),
                "--plain-http",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mnt / "config.json").read_bytes() == model.files["config.json"]
        process.send_signal(signum)
        assert process.wait(timeout=30) == 0, process.stderr.read() if process.stderr else ""
        assert not is_mounted(mnt)


# -- prefetch ---------------------------------------------------------------------------------


@dataclass
class ShardedModel:
    reference: str
    files: dict[str, bytes]
    digests: dict[str, str]  # path -> layer digest


@pytest.fixture(scope="module")
def sharded_model(registry: Registry) -> ShardedModel:
    """A transformers-style model: config, tokenizer, two safetensors shards and their index."""
    rng = np.random.default_rng(11)
    shard_tensors = [
        {
            f"layer.{shard}.{i}": rng.standard_normal((1024, 1024), dtype=np.float32)
            for i in range(6)
        }
        for shard in range(2)
    ]
    names = [f"model-0000{shard + 1}-of-00002.safetensors" for shard in range(2)]
    index = {
        "metadata": {},
        "weight_map": {
            tensor: names[shard] for shard, t in enumerate(shard_tensors) for tensor in t
        },
    }
    files = {
        "config.json": json.dumps({"model_type": "bert"}).encode(),
        "tokenizer.json": json.dumps({"vocab": list(range(5000))}).encode(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        names[0]: save(shard_tensors[0]),
        names[1]: save(shard_tensors[1]),
        "notes.bin": os.urandom(5 * MIB),
    }
    repository = f"test/sharded-{uuid.uuid4().hex[:8]}"
    push_artifact(
        registry.host, repository, "v1", [raw(path, data) for path, data in files.items()]
    )
    digests = {path: "sha256:" + hashlib.sha256(data).hexdigest() for path, data in files.items()}
    return ShardedModel(f"{repository}:v1", files, digests)


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def requested_ranges(proxy: Proxy, digest: str) -> list[str | None]:
    return [r.range for r in proxy.blob_requests if r.path.endswith(digest)]


def test_hints_fetch_config_tokenizer_and_headers_right_after_mount(
    sharded_model: ShardedModel, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    digests = sharded_model.digests
    shards = [path for path in digests if path.endswith(".safetensors")]
    with mounted(f"{proxy.host}/{sharded_model.reference}", mnt, cache_dir):
        wait_until(lambda: all(requested_ranges(proxy, digests[path]) for path in shards), 20)
        time.sleep(0.5)  # anything else would be fetched by now
        for path in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
            assert requested_ranges(proxy, digests[path]) == [
                f"bytes=0-{len(sharded_model.files[path]) - 1}"
            ]
        for path in shards:  # the header's piece only: the first 4 MiB
            assert requested_ranges(proxy, digests[path]) == [f"bytes=0-{4 * MIB - 1}"]
        assert requested_ranges(proxy, digests["notes.bin"]) == []


def test_prefetch_none_fetches_only_what_is_read(
    sharded_model: ShardedModel, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    shard = "model-00002-of-00002.safetensors"
    with mounted(f"{proxy.host}/{sharded_model.reference}", mnt, cache_dir, "--prefetch", "none"):
        after_mount = proxy.blob_bytes  # the model's config blob
        time.sleep(1)
        assert proxy.blob_bytes == after_mount
        assert (mnt / shard).read_bytes() == sharded_model.files[shard]
        time.sleep(0.5)
        assert proxy.blob_bytes == after_mount + len(sharded_model.files[shard])


def test_prefetch_all_caches_the_whole_model_fetching_each_byte_once(
    sharded_model: ShardedModel, proxy: Proxy, mnt: Path, cache_dir: Path
) -> None:
    reference = f"{proxy.host}/{sharded_model.reference}"
    size = sum(len(data) for data in sharded_model.files.values())
    with mounted(reference, mnt, cache_dir, "--prefetch", "all"):
        # A reader going through a shard while the background fetch runs.
        shard = "model-00002-of-00002.safetensors"
        assert (mnt / shard).read_bytes() == sharded_model.files[shard]
        wait_until(lambda: proxy.blob_bytes >= size)
        time.sleep(0.5)
        assert proxy.blob_bytes <= 1.02 * size
    proxy.reset()
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert read_tree(mnt) == sharded_model.files
    assert proxy.blob_bytes == 0


def bdi_read_ahead_kb(mountpoint: Path) -> int:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as mounts:
        device = [line.split()[2] for line in mounts if line.split()[4] == target][-1]
    return int(Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a bdi's readahead needs root")
def test_kernel_readahead_is_raised_after_fuse_init(
    sharded_model: ShardedModel, registry: Registry, mnt: Path, cache_dir: Path
) -> None:
    # Written before the kernel saw the INIT reply, it would fall back to 128 KiB.
    reference = f"{registry.host}/{sharded_model.reference}"
    with mounted(reference, mnt, cache_dir):
        wait_until(lambda: bdi_read_ahead_kb(mnt) == 4096, 10)
    with mounted(reference, mnt, cache_dir, "--read-ahead-kb", "1024"):
        wait_until(lambda: bdi_read_ahead_kb(mnt) == 1024, 10)


def rss_file_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_pieces_through_the_cache_leave_no_mapped_pages(tmp_path: Path) -> None:
    # Pieces move by pread and pwrite, not through a map: when they lived in LMDB's map, every
    # piece read or stored stayed in the process's RSS until let go.
    cache = PieceCache(tmp_path / "cache", 1 << 30)
    digest = "sha256:" + "b" * 64
    before = rss_file_kb()
    for index in range(16):
        cache.put(digest, index, os.urandom(4 * MIB), 64 * MIB, vouched=True)
    for index in range(16):
        assert cache.get(digest, index) is not None
    assert rss_file_kb() - before < 40 * 1024
    cache.close()

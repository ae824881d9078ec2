"""Hostile artifacts and broken surroundings (issue 26, points 5-7): a real mount refuses them in
one line, or fails the read that meets them, and never crashes after it reported ready.

Manifests whose numbers a registry would not store (sizes past 2^63) come from an OCI layout on
disk (``oci:PATH``), read by the same mount.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import uuid
import zlib
from pathlib import Path

import pytest
import zstandard
from mounting import MODELFS, is_mounted, modelfs, mount_pid, mounted, unmount
from registry_tools import Layer, Proxy, Registry, push_artifact
from test_compressed_layers import one_file

from modelfs.artifact.tree import MAX_MTIME_NS
from modelfs.cache import PieceCache
from modelfs.cache.store import PIECES_FILE
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    MAX_FILE_SIZE,
    MAX_TOTAL_SIZE,
    MODEL_ARTIFACT_TYPE,
    MODEL_CONFIG,
    OCI_MANIFEST,
    layer_media_type,
)
from modelfs.sources.layout import OciLayout

TAG = "v1"


def layout_model(root: Path, layers: list[tuple[str, bytes, int | None]]) -> str:
    """An OCI layout holding a manifest of raw layers (path, bytes, declared size or None for
    the true one); its ``oci:`` reference."""
    layout = OciLayout.create(root)
    config = layout.write_blob([b"{}"])
    descriptors = []
    for path, data, declared in layers:
        blob = layout.write_blob([data])
        descriptors.append(
            {
                "mediaType": layer_media_type("weight", "raw"),
                "digest": blob.digest,
                "size": blob.size if declared is None else declared,
                "annotations": {ANNOTATION_FILEPATH: path},
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODEL_ARTIFACT_TYPE,
        "config": {"mediaType": MODEL_CONFIG, "digest": config.digest, "size": config.size},
        "layers": descriptors,
    }
    stored = layout.write_blob([json.dumps(manifest).encode()])
    layout.set_tag(TAG, {"mediaType": OCI_MANIFEST, "digest": stored.digest, "size": stored.size})
    return f"oci:{root}:{TAG}"


def mount_fails(reference: str, mnt: Path, cache_dir: Path) -> str:
    """The one line ``modelfs mount`` printed when it refused ``reference``."""
    mnt.mkdir(exist_ok=True)
    result = modelfs("mount", reference, str(mnt), "--cache-dir", str(cache_dir), timeout=60)
    assert result.returncode != 0
    assert not is_mounted(mnt)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- point 5: hostile numbers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        (1 << 63, "layer 0"),
        ((1 << 64) + 5, "layer 0"),
        (MAX_FILE_SIZE + 1, "'big.bin'"),
    ],
)
def test_sizes_past_the_limits_are_refused_in_one_line(
    tmp_path: Path, declared: int, expected: str
) -> None:
    reference = layout_model(tmp_path / "store", [("big.bin", b"x" * 100, declared)])
    line = mount_fails(reference, tmp_path / "mnt", tmp_path / "cache")
    assert expected in line and str(declared) in line and "modctl" in line


def test_a_total_past_the_limit_is_refused(tmp_path: Path) -> None:
    count = MAX_TOTAL_SIZE // MAX_FILE_SIZE + 1  # each file within its limit, not their sum
    layers = [(f"shard-{n:03}.bin", b"x" * (n + 1), MAX_FILE_SIZE) for n in range(count)]
    line = mount_fails(layout_model(tmp_path / "store", layers), tmp_path / "mnt", tmp_path / "c")
    assert "add up to" in line and str(MAX_TOTAL_SIZE) in line


def pax_member(name: str, data: bytes, mtime: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.pax_headers = {"mtime": mtime}
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_far_mtimes_are_clamped_and_df_works(registry: Registry, tmp_path: Path) -> None:
    far = pax_member("far.bin", b"far", "1" + "0" * 30)  # 1e30 s
    early = pax_member("early.bin", b"early", "-" + "9" * 25)
    repository = f"test/hostile-{uuid.uuid4().hex[:8]}"
    media_type = layer_media_type("weight", "tar")
    push_artifact(
        registry.host, repository, TAG, [Layer(media_type, far), Layer(media_type, early)]
    )
    with mounted(f"{registry.host}/{repository}:{TAG}", tmp_path / "mnt", tmp_path / "c") as mnt:
        assert (mnt / "far.bin").stat().st_mtime_ns == MAX_MTIME_NS
        assert (mnt / "early.bin").stat().st_mtime_ns == -(1 << 63)
        df = subprocess.run(["df", str(mnt)], capture_output=True, text=True, timeout=30)
        assert df.returncode == 0, df.stderr
        assert (mnt / "far.bin").read_bytes() == b"far"


# A bug in the FUSE session (a handler raising what no one expected), injected into a real
# mount process: it fails that request, with its traceback in the log; the mount goes on.
_BROKEN_STATFS = """
import sys
from modelfs.cli import main
from modelfs.fs.fuse import ReadOnlyTreeFS

def statfs(self):
    raise OverflowError("injected into statfs")

ReadOnlyTreeFS.statfs = statfs
sys.argv[0] = "modelfs"
main()
"""


def test_an_unexpected_error_fails_its_request_only_and_is_logged(
    registry: Registry, tmp_path: Path
) -> None:
    repository = f"test/hostile-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, TAG, [Layer(layer_media_type("weight", "raw"),
                  b"weights", {ANNOTATION_FILEPATH: "w.bin"})])  # fmt: skip
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    argv = [sys.executable, "-c", _BROKEN_STATFS, "mount", f"{registry.host}/{repository}:{TAG}",
            str(mnt), "--cache-dir", str(cache_dir), "--plain-http"]  # fmt: skip
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        pid = next(
            int(entry.name)
            for entry in Path("/proc").glob("[0-9]*")
            if _BROKEN_STATFS.encode() in entry.joinpath("cmdline").read_bytes()
        )
        df = subprocess.run(["df", str(mnt)], capture_output=True, text=True, timeout=30)
        assert df.returncode != 0 and "Input/output error" in df.stderr, df.stderr
        log = next((cache_dir / "logs").iterdir()).read_text()
        assert "failed unexpectedly" in log and "injected into statfs" in log, log
        assert "Traceback" in log, log
        assert (mnt / "w.bin").read_bytes() == b"weights"  # the mount goes on
        umount = modelfs("umount", str(mnt))
        assert umount.returncode == 0, umount.stderr
        assert not is_mounted(mnt)
        assert wait_gone(pid)
    finally:
        unmount(mnt)


_BROKEN_BEFORE_READY = _BROKEN_STATFS.replace(
    "def statfs(self):", "def statfs(self, *args):"
).replace("ReadOnlyTreeFS.statfs = statfs", "ReadOnlyTreeFS.__init__ = statfs")


def test_an_unexpected_error_before_ready_is_reported_and_logged(
    small_model: str, tmp_path: Path
) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    argv = [sys.executable, "-c", _BROKEN_BEFORE_READY, "mount", small_model, str(mnt),
            "--cache-dir", str(cache_dir), "--plain-http"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert not is_mounted(mnt)
    [line] = result.stderr.strip().splitlines()
    assert "failed unexpectedly (OverflowError: injected into statfs)" in line, line
    log = next((cache_dir / "logs").iterdir()).read_text()
    assert "Traceback" in log and "injected into statfs" in log, log


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# -- point 7: dead mounts, a truncated cache, control characters ------------------------------


@pytest.fixture
def small_model(registry: Registry) -> str:
    repository = f"test/hostile-{uuid.uuid4().hex[:8]}"
    layer = Layer(layer_media_type("weight", "raw"), b"w" * 5000, {ANNOTATION_FILEPATH: "w.bin"})
    push_artifact(registry.host, repository, TAG, [layer])
    return f"{registry.host}/{repository}:{TAG}"


def test_mounting_on_a_dead_mount_is_refused_in_one_line(small_model: str, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    try:
        with mounted(small_model, mnt, cache_dir):
            os.kill(mount_pid(mnt), signal.SIGKILL)
            time.sleep(0.5)
            with pytest.raises(OSError) as dead:
                os.stat(mnt)
            assert dead.value.errno == errno.ENOTCONN
            result = modelfs("mount", small_model, str(mnt), "--cache-dir", str(cache_dir),
                             "--plain-http")  # fmt: skip
            assert result.returncode != 0
            assert result.stderr.strip().splitlines() == [
                f"modelfs: error: mountpoint {mnt} is a dead mount (its process is gone); "
                f"run `modelfs umount {mnt}` first"
            ]
            umount = modelfs("umount", str(mnt))
            assert umount.returncode == 0, umount.stderr
            assert not is_mounted(mnt)
            with mounted(small_model, mnt, cache_dir):
                assert (mnt / "w.bin").read_bytes() == b"w" * 5000
    finally:
        unmount(mnt)


def test_a_truncated_cache_is_refused_in_one_line(small_model: str, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(small_model, mnt, cache_dir):
        assert (mnt / "w.bin").read_bytes() == b"w" * 5000
    data = cache_dir / "data.mdb"
    with data.open("r+b") as file:
        file.truncate(3 * 4096)  # the meta pages and a little, not the pages they point to
    line = mount_fails(small_model, mnt, cache_dir)
    assert line.startswith(f"modelfs: error: the cache at {cache_dir} is truncated"), line
    verify = modelfs("cache", "verify", "--cache-dir", str(cache_dir))
    assert verify.returncode == 1, verify.stderr
    assert verify.returncode != -signal.SIGBUS
    assert "is truncated" in verify.stderr


def test_control_characters_in_names_do_not_forge_log_lines(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    name = "evil\nmodelfs: FORGED line\x1b[31m.bin"
    repository = f"test/hostile-{uuid.uuid4().hex[:8]}"
    layer = Layer(layer_media_type("weight", "raw"), b"x" * 100, {ANNOTATION_FILEPATH: name})
    push_artifact(registry.host, repository, TAG, [layer], piece_index=False)
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(f"{proxy.host}/{repository}:{TAG}", mnt, cache_dir, "--retries", "0") as at:
        proxy.fail_next(100)  # the read fails, and its error names the file
        with pytest.raises(OSError):
            (at / name).read_bytes()
    log = next((cache_dir / "logs").iterdir()).read_text()
    assert "evil\\nmodelfs: FORGED line\\x1b[31m.bin" in log, log
    assert not any(line.startswith("modelfs: FORGED") for line in log.splitlines())


# -- point 6: decompression bombs --------------------------------------------------------------

BOMB_MEMBER = "zeros.bin"
RSS_BOUND = 300 << 20


def compressed_bomb(compression: str, size: int) -> bytes:
    """A tar of one member of ``size`` zero bytes, compressed as it is made (never whole)."""
    info = tarfile.TarInfo(BOMB_MEMBER)
    info.size = size
    out = io.BytesIO()
    writer: io.BufferedIOBase = (
        gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9)
        if compression == "gzip"
        else zstandard.ZstdCompressor().stream_writer(out, closefd=False)
    )
    with writer:
        writer.write(info.tobuf(format=tarfile.GNU_FORMAT))
        zeros = bytes(4 << 20)
        for _ in range(size // len(zeros)):
            writer.write(zeros)
    return out.getvalue()


@pytest.fixture(scope="module")
def bombs(registry: Registry) -> dict[str, str]:
    """References to bombs: {gzip,zstd} x {plain (inflated at mount), declared (on first read,
    its annotations declaring 1 MiB)}. 1 GiB of zeros as gzip, 4 GiB as zstd."""
    references = {}
    for compression, size in (("gzip", 1 << 30), ("zstd", 4 << 30)):
        data = compressed_bomb(compression, size)
        media_type = layer_media_type("weight", f"tar+{compression}")
        metadata = {"name": BOMB_MEMBER, "mode": 0o644, "size": 1 << 20, "typeflag": ord("0")}
        for kind, described in (
            ("plain", {}),
            ("declared", {ANNOTATION_FILEPATH: BOMB_MEMBER,
                          ANNOTATION_METADATA: json.dumps(metadata)}),
        ):  # fmt: skip
            repository = f"test/bomb-{uuid.uuid4().hex[:8]}"
            push_artifact(registry.host, repository, TAG, [Layer(media_type, data, described)])
            references[f"{compression}-{kind}"] = f"{registry.host}/{repository}:{TAG}"
    return references


def high_water_mark(pid: int) -> int:
    """The process's peak RSS in bytes (VmHWM); 0 once it is gone or a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(found[0]) << 10 if found else 0


@pytest.mark.parametrize(
    ("compression", "extra", "limit"),
    [
        ("gzip", ["--cache-size", "64M"], "what the cache can hold"),
        ("zstd", ["--cache-size", "64M"], "what the cache can hold"),
        ("zstd", [], "1100 times its compressed size (--max-inflate-ratio)"),
        ("zstd", ["--max-inflate-ratio", "10"], "10 times its compressed size"),
        ("gzip", ["--max-inflate-size", "32M"], "--max-inflate-size"),
    ],
)
def test_a_bomb_inflated_at_mount_fails_the_mount_in_bounded_memory(
    bombs: dict[str, str], tmp_path: Path, compression: str, extra: list[str], limit: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = [*MODELFS, "mount", "--foreground", bombs[f"{compression}-plain"], str(mnt),
            "--cache-dir", str(tmp_path / "cache"), "--plain-http", *extra]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        # Its own high-water mark, read while it runs: the rusage wait4 gives counts the memory
        # of the test process it was forked from (the suite's, hundreds of MB by then) as well.
        while process.poll() is None:
            peak = max(peak, high_water_mark(process.pid))
            time.sleep(0.005)
        elapsed = time.monotonic() - started
        stderr = process.stderr.read() if process.stderr else ""
    finally:
        process.kill()
        unmount(mnt)
    assert process.returncode == 1, stderr
    assert peak > 0  # it was seen running
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "layer 0" in lines[0] and limit in lines[0], stderr
    print(f"{compression} {extra}: failed in {elapsed:.1f} s, peak RSS {peak >> 20} MiB")
    assert peak < RSS_BOUND
    assert elapsed < 30


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_bomb_read_on_first_use_fails_the_read_in_bounded_memory(
    bombs: dict[str, str], tmp_path: Path, compression: str
) -> None:
    cache_dir = tmp_path / "cache"
    with mounted(bombs[f"{compression}-declared"], tmp_path / "mnt", cache_dir) as mnt:
        assert (mnt / BOMB_MEMBER).stat().st_size == 1 << 20  # as declared
        started = time.monotonic()
        with pytest.raises(OSError) as failed:
            (mnt / BOMB_MEMBER).read_bytes()
        elapsed = time.monotonic() - started
        assert failed.value.errno == errno.EIO
        peak = high_water_mark(mount_pid(mnt))
    print(f"{compression}: read failed in {elapsed:.1f} s, mount peak RSS {peak >> 20} MiB")
    assert peak < RSS_BOUND
    assert elapsed < 30
    log = next((cache_dir / "logs").iterdir()).read_text()
    assert "bytes its annotations declare, plus tar headers" in log, log


def fast_gzip_bomb(size: int) -> bytes:
    """A tar+gzip of one member of ``size`` zero bytes (a multiple of 4 MiB), as ``gzip -1``
    makes it (~230:1: 4 GiB is 18.7 MB), made in seconds: after a full flush deflate starts
    afresh, so every 4 MiB of zeros compresses to the same block."""
    info = tarfile.TarInfo(BOMB_MEMBER)
    info.size = size
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    end = bytes(1024 + -(len(header) + size + 1024) % tarfile.RECORDSIZE)
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
    zeros = bytes(4 << 20)
    head = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(end) + deflate.flush()
    crc = zlib.crc32(header)
    for _ in range(size // len(zeros)):
        crc = zlib.crc32(zeros, crc)
    trailer = struct.pack("<II", zlib.crc32(end, crc), (len(header) + size + len(end)) % (1 << 32))
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return b"".join([gzip_header, head, block * (size // len(zeros)), tail, trailer])


def test_a_gzip_layer_of_4_gib_of_zeros_is_refused_fast_and_leaves_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    """Issue 22: 18.7 MB of tar+gzip that inflates to 4 GiB, mounted with a small cache, fails
    at once with one line naming the layer, its compressed size and how far it expanded (it
    used to fill the cache for 16 s and blame the registry)."""
    data = fast_gzip_bomb(4 << 30)
    assert len(data) < 20_000_000
    repository = f"test/bomb-{uuid.uuid4().hex[:8]}"
    push_artifact(
        registry.host, repository, TAG, [Layer(layer_media_type("weight", "tar+gzip"), data)]
    )
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    started = time.monotonic()
    reference = f"{registry.host}/{repository}:{TAG}"
    result = modelfs("mount", reference, str(mnt), "--plain-http", "--cache-dir", str(cache_dir),
                     "--cache-size", "256M", timeout=120)  # fmt: skip
    elapsed = time.monotonic() - started
    print(f"refused in {elapsed:.1f} s: {result.stderr.strip()}")
    assert result.returncode == 1 and not is_mounted(mnt)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "layer 0 (sha256:" in lines[0] and "17.9 MiB of tar+gzip" in lines[0], lines[0]
    assert "expanded to 25" in lines[0] and "past 256.0 MiB" in lines[0], lines[0]
    assert "what the cache can hold" in lines[0] and "not found" not in lines[0], lines[0]
    assert elapsed < 30
    # Nothing it wrote is left: no piece of the stream, no spool, no cache grown by it.
    cache_files = {"data.mdb", "lock.mdb", PIECES_FILE}
    assert not [
        path for path in cache_dir.iterdir() if path.is_file() and path.name not in cache_files
    ]
    assert (cache_dir / "data.mdb").stat().st_blocks * 512 < 16 << 20
    assert (cache_dir / PIECES_FILE).stat().st_blocks * 512 < 16 << 20
    cache = PieceCache(cache_dir, 256 << 20)
    try:
        assert cache.blob_states() == [] and cache.stats().size == 0
    finally:
        cache.close()


def read_uncached(path: Path) -> bytes:
    """The file's bytes from the mount, not from the kernel's page cache."""
    with path.open("rb", buffering=0) as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return file.read()


@pytest.mark.parametrize("annotated", [True, False], ids=["deferred", "listed at mount"])
def test_a_decompressed_layer_survives_a_cache_smaller_than_the_model(
    registry: Registry, tmp_path: Path, annotated: bool
) -> None:
    """Issue 22 (found by scripts/chaos): with a cache smaller than the model, reading the other
    files evicted the pieces of a compressed layer's decompressed stream, which cannot be fetched
    again a piece at a time: every later read of its file failed with ESTALE ("...+decompressed
    not found on registry"). The mount now leases the stream whole, and
    decompresses the layer again if the cache lost any of it all the same."""
    # Read twice, more pieces than the mount holds in memory (12) come from the registry, so the
    # stream's are read from the cache, not from memory.
    weights, tokenizer = os.urandom(56 << 20), os.urandom(2 << 20)
    compressed = (
        one_file("tokenizer.model", tokenizer, "gzip")
        if annotated
        else Layer(layer_media_type("weight", "tar+gzip"), gzip_tar("tokenizer.model", tokenizer))
    )
    raw = Layer(layer_media_type("weight", "raw"), weights, {ANNOTATION_FILEPATH: "weights.raw"})
    repository = f"test/evicted-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, TAG, [compressed, raw])
    reference = f"{registry.host}/{repository}:{TAG}"
    with mounted(reference, tmp_path / "mnt", tmp_path / "cache", "--cache-size", "16M") as mnt:
        assert read_uncached(mnt / "tokenizer.model") == tokenizer
        for _ in range(2):
            assert read_uncached(mnt / "weights.raw") == weights  # evicts all it can
        assert read_uncached(mnt / "tokenizer.model") == tokenizer
        # A piece of the stream lost all the same (dropped for failing its checksum, say): the
        # next read decompresses the layer again instead of asking the registry for the piece.
        assert isinstance(compressed.data, bytes)
        stream = f"sha256:{hashlib.sha256(compressed.data).hexdigest()}+decompressed"
        cache = PieceCache(tmp_path / "cache", 16 << 20)
        try:
            cache.drop_piece(stream, 0)
        finally:
            cache.close()
        for _ in range(2):
            assert read_uncached(mnt / "weights.raw") == weights  # out of the mount's memory
        assert read_uncached(mnt / "tokenizer.model") == tokenizer


def gzip_tar(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(archive.getvalue(), compresslevel=1)


# -- point 7: one bound on a read --------------------------------------------------------------

READ_TIMEOUT = 3.0


def timed_read(path: Path) -> tuple[int, float]:
    """``dd`` of the first 4 KiB: its exit status and how long it took."""
    started = time.monotonic()
    result = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=4k", "count=1"], capture_output=True, timeout=300
    )
    return result.returncode, time.monotonic() - started


_DIRECT_READER = (
    "import os, sys; os.pread(os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT), 4096, 0)"
)


def test_a_direct_reader_stopped_by_a_signal_while_the_registry_stalls_stops_at_once(
    small_model: str, proxy: Proxy, tmp_path: Path
) -> None:
    """Ctrl-C on an O_DIRECT reader waiting for a registry that trickles: its read ends at once
    (the kernel's INTERRUPT, answered EINTR), not after --read-timeout (60 s by default), and the
    mount serves the next read of the file with exact bytes. (A buffered read waits on the
    kernel's readahead, which no INTERRUPT reaches: only a fatal signal ends that wait.)"""
    reference = small_model.replace(proxy.upstream.host, proxy.host)
    with mounted(reference, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none") as mnt:
        proxy.trickle = 1.0
        reader = subprocess.Popen(
            [sys.executable, "-c", _DIRECT_READER, mnt / "w.bin"],
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while not proxy.blob_requests and time.monotonic() < deadline:
                time.sleep(0.05)  # until its read waits on the registry
            time.sleep(0.3)
            started = time.monotonic()
            reader.send_signal(signal.SIGINT)
            assert reader.wait(timeout=10) != 0
            elapsed = time.monotonic() - started
        finally:
            reader.kill()
            proxy.trickle = 0  # if it was not interrupted, its read is answered: it can die
            reader.wait()
        assert reader.stderr is not None and b"KeyboardInterrupt" in reader.stderr.read()
        print(f"the interrupted reader ended {elapsed:.2f} s after its signal")
        assert elapsed < 2
        assert (mnt / "w.bin").read_bytes() == b"w" * 5000


@pytest.fixture
def gzip_model(registry: Registry) -> str:
    """One file in a gzip layer its annotations describe: fetched whole on its first read."""
    repository = f"test/hostile-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, TAG, [one_file("w.bin", b"w" * 5000, "gzip")])
    return f"{registry.host}/{repository}:{TAG}"


@pytest.mark.parametrize("model", ["small_model", "gzip_model"])
def test_a_read_from_a_trickling_registry_fails_within_the_read_timeout(
    model: str, proxy: Proxy, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    reference = request.getfixturevalue(model).replace(proxy.upstream.host, proxy.host)
    cache_dir = tmp_path / "cache"
    options = ("--prefetch", "none", "--read-timeout", str(READ_TIMEOUT))
    with mounted(reference, tmp_path / "mnt", cache_dir, *options) as mnt:
        proxy.trickle = 1.0  # one byte a second: never a stall, never done
        # The kernel retries a failed read (a page at a time): one bound for all of it.
        for _ in range(2):
            status, elapsed = timed_read(mnt / "w.bin")
            print(f"{model}: a 4 KiB read failed after {elapsed:.1f} s")
            assert status != 0
            assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + 2
            time.sleep(5)  # past the memory of the late range: the registry is asked again
        proxy.trickle = 0
        status, elapsed = timed_read(mnt / "w.bin")
        assert status == 0 and elapsed < READ_TIMEOUT
    log = next((cache_dir / "logs").iterdir()).read_text()
    assert f"within {READ_TIMEOUT:g} s (--read-timeout, retries included)" in log, log

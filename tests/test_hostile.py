"""Hostile artifacts and broken surroundings (issue 26, points 5-7): a real mount refuses them in
one line, or fails the read that meets them, and never crashes after it reported ready.

Manifests whose numbers a registry would not store (sizes past 2^63) come from an OCI layout on
disk (``oci:PATH``), read by the same mount.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
from mounting import is_mounted, modelfs, mount_pid, mounted, unmount
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.fetcher.layout import OciLayout
from modelfs.fs.tree import MAX_MTIME_NS
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    MAX_FILE_SIZE,
    MAX_TOTAL_SIZE,
    MODEL_ARTIFACT_TYPE,
    MODEL_CONFIG,
    OCI_MANIFEST,
    layer_media_type,
)

TAG = "v1"


def layout_model(root: Path, layers: list[tuple[str, bytes, int | None]]) -> str:
    """An OCI layout holding a manifest of raw layers (path, bytes, declared size or None for
    the true one); its ``oci:`` reference."""
    layout = OciLayout.create(root)
    config = layout.write_blob_bytes(b"{}")
    descriptors = []
    for path, data, declared in layers:
        blob = layout.write_blob_bytes(data)
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
    stored = layout.write_blob_bytes(json.dumps(manifest).encode())
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
# mount process: it must be logged and end the process with a failure, never a silent 0.
_BROKEN_STATFS = """
import sys
from modelfs.cli import main
from modelfs.fs.fuse import ReadOnlyTreeFS

async def statfs(self, ctx):
    raise OverflowError("injected into statfs")

ReadOnlyTreeFS.statfs = statfs
sys.argv[0] = "modelfs"
main()
"""


def test_an_unexpected_error_is_logged_and_exits_non_zero(
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
        subprocess.run(["df", str(mnt)], capture_output=True, timeout=30)
        waited = wait_gone(pid)
        log = next((cache_dir / "logs").iterdir()).read_text()
        assert "failed unexpectedly" in log and "injected into statfs" in log, log
        assert "Traceback" in log, log
        assert waited, "the mount process outlived its broken session"
        umount = modelfs("umount", str(mnt))
        assert umount.returncode == 0, umount.stderr
        assert not is_mounted(mnt)
    finally:
        unmount(mnt)


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

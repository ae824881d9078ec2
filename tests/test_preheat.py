"""``modelfs preheat``: the whole model into the cache, then a mount reads without the registry."""

from __future__ import annotations

import gzip
import io
import tarfile
import uuid
from pathlib import Path

from model_files import random_safetensors
from mounting import modelfs, mounted
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.modelpack import ANNOTATION_FILEPATH, layer_media_type

MIB = 1 << 20


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def push_model(registry: Registry) -> tuple[str, dict[str, bytes]]:
    files = {
        "model.safetensors": random_safetensors(9 * MIB + 17),
        "tokenizer.json": b'{"vocab": []}',
        "code/run.py": b"print('hi')\n",
    }
    layers = [
        Layer(
            layer_media_type("weight", "raw"),
            files["model.safetensors"],
            {ANNOTATION_FILEPATH: "model.safetensors"},
        ),
        Layer(
            layer_media_type("weight.config", "tar"),
            _tar({"tokenizer.json": files["tokenizer.json"]}),
            {ANNOTATION_FILEPATH: "tokenizer.json"},
        ),
        Layer(
            layer_media_type("code", "tar+gzip"),
            gzip.compress(_tar({"code/run.py": files["code/run.py"]})),
            {ANNOTATION_FILEPATH: "code"},
        ),
    ]
    repository = f"test/preheat-{uuid.uuid4().hex[:8]}"
    push_artifact(registry.host, repository, "v1", layers)
    return f"{repository}:v1", files


def test_preheat_then_mount_reads_without_registry_blob_traffic(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    reference, files = push_model(registry)
    cache_dir = tmp_path / "cache"
    result = modelfs(
        "preheat", f"{proxy.host}/{reference}", "--cache-dir", str(cache_dir), "--plain-http"
    )
    assert result.returncode == 0, result.stderr
    assert "cached" in result.stderr
    fetched_once = proxy.blob_bytes
    assert fetched_once >= len(files["model.safetensors"])

    proxy.reset()
    again = modelfs(
        "preheat", f"{proxy.host}/{reference}", "--cache-dir", str(cache_dir), "--plain-http"
    )
    assert again.returncode == 0, again.stderr
    assert proxy.blob_bytes == 0, "a second preheat finds everything cached"

    with mounted(f"{proxy.host}/{reference}", tmp_path / "mnt", cache_dir) as mnt:
        read = {
            str(path.relative_to(mnt)): path.read_bytes()
            for path in mnt.rglob("*")
            if path.is_file()
        }
    assert read == files
    assert proxy.blob_bytes == 0, proxy.blob_requests


def test_preheat_resumes_from_a_partial_cache(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    reference, files = push_model(registry)
    cache_dir = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    with mounted(f"{proxy.host}/{reference}", mnt, cache_dir, "--prefetch", "none"):
        assert (mnt / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    proxy.reset()
    result = modelfs(
        "preheat", f"{proxy.host}/{reference}", "--cache-dir", str(cache_dir), "--plain-http"
    )
    assert result.returncode == 0, result.stderr
    # Only the weights' pieces were missing: the tar and gzip layers came with the first mount.
    assert proxy.blob_bytes == len(files["model.safetensors"]), proxy.blob_requests
    # Its three pieces, consecutive, came with one range GET.
    size = len(files["model.safetensors"])
    assert [r.range for r in proxy.blob_requests] == [f"bytes=0-{size - 1}"]


def test_preheat_errors_are_one_line(registry: Registry, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache"), "--plain-http"]
    bad = modelfs("preheat", "Not A Reference", *cache)
    assert bad.returncode != 0
    missing = modelfs("preheat", f"{registry.host}/test/absent-{uuid.uuid4().hex[:6]}:v1", *cache)
    assert missing.returncode == 1
    for result in (bad, missing):
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

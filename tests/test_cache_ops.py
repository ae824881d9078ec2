"""``modelfs cache ls|gc|verify|rm`` on a real LMDB cache filled by ``modelfs preheat``."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from cache_damage import damage_piece
from mounting import modelfs
from registry_tools import Layer, Proxy, Registry, push_artifact
from test_preheat import MIB, push_model

from modelfs.cache import CacheStats, PieceCache
from modelfs.modelpack import ANNOTATION_FILEPATH, layer_media_type


def preheated(proxy: Proxy, registry: Registry, cache_dir: Path) -> tuple[str, dict[str, bytes]]:
    reference, files = push_model(registry)
    full = f"{proxy.host}/{reference}"
    result = modelfs("preheat", full, "--cache-dir", str(cache_dir), "--plain-http")
    assert result.returncode == 0, result.stderr
    return full, files


def cache_cli(cache_dir: Path, *args: str) -> tuple[int, str]:
    result = modelfs("cache", *args, "--cache-dir", str(cache_dir))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout + result.stderr


def weights_digest(files: dict[str, bytes]) -> str:
    return "sha256:" + hashlib.sha256(files["model.safetensors"]).hexdigest()


def test_ls_lists_models_with_what_is_present(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    preheated(proxy, registry, cache_dir)
    digest = _manifest_digest(cache_dir)
    code, out = cache_cli(cache_dir, "ls")
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith(digest))
    assert line.split()[1] == "3" and line.endswith("100.0%"), line


def _manifest_digest(cache_dir: Path) -> str:
    store = PieceCache(cache_dir, 1 << 30)
    try:
        (key,) = store.meta_keys("manifest/")
    finally:
        store.close()
    return key.removeprefix("manifest/")


def test_gc_evicts_down_to_the_size(registry: Registry, proxy: Proxy, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    preheated(proxy, registry, cache_dir)
    before = _cache_stats(cache_dir)
    code, out = cache_cli(cache_dir, "gc", "--size", "5M")
    assert code == 0, out
    after = _cache_stats(cache_dir)
    assert after.size <= 5 * MIB
    # The node-wide counter (the metric modelfs_cache_evicted_pieces_total) saw gc's evictions.
    assert after.evicted_pieces == before.evicted_pieces + before.pieces - after.pieces > 0
    code, out = cache_cli(cache_dir, "ls")
    assert "100.0%" not in out, out
    assert f"{after.evicted_pieces} pieces evicted so far" in out, out


def _cache_stats(cache_dir: Path) -> CacheStats:
    store = PieceCache(cache_dir, 1 << 30)
    try:
        return store.stats()
    finally:
        store.close()


@pytest.mark.parametrize("fix_checksum", [False, True], ids=["piece", "blob"])
def test_verify_finds_and_drops_a_corrupted_piece(
    registry: Registry, proxy: Proxy, tmp_path: Path, fix_checksum: bool
) -> None:
    cache_dir = tmp_path / "cache"
    reference, files = preheated(proxy, registry, cache_dir)
    code, out = cache_cli(cache_dir, "verify")
    assert code == 0, out
    weights = weights_digest(files)
    damage_piece(cache_dir, weights, 1, reseal=fix_checksum)
    code, out = cache_cli(cache_dir, "verify")
    assert code == 1, out
    if fix_checksum:
        assert f"blob {weights} does not match its digest: dropped" in out
    else:
        assert f"corrupt piece 1 of {weights}: dropped" in out
    assert cache_cli(cache_dir, "verify")[0] == 0
    proxy.reset()
    again = modelfs("preheat", reference, "--cache-dir", str(cache_dir), "--plain-http")
    assert again.returncode == 0, again.stderr
    dropped = 4 * MIB if not fix_checksum else len(files["model.safetensors"])
    assert proxy.blob_bytes == dropped


def test_rm_removes_a_model_but_not_blobs_another_uses(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    reference, files = preheated(proxy, registry, cache_dir)
    first = _manifest_digest(cache_dir)
    # A second model sharing the weights blob.
    repository = f"test/sibling-{uuid.uuid4().hex[:8]}"
    layer = Layer(
        layer_media_type("weight", "raw"),
        files["model.safetensors"],
        {ANNOTATION_FILEPATH: "model.safetensors"},
    )
    sibling = push_artifact(registry.host, repository, "v1", [layer])
    result = modelfs(
        "preheat", f"{proxy.host}/{repository}:v1", "--cache-dir", str(cache_dir), "--plain-http"
    )
    assert result.returncode == 0, result.stderr

    code, out = cache_cli(cache_dir, "rm", reference, "--plain-http")
    assert code == 0, out
    assert f"removed {first} and 2 blobs" in out
    code, out = cache_cli(cache_dir, "ls")
    assert first not in out and sibling in out and "100.0%" in out
    code, out = cache_cli(cache_dir, "rm", sibling)
    assert code == 0 and "and 1 blobs" in out, out
    store = PieceCache(cache_dir, 1 << 30)
    try:
        assert store.stats().pieces == 0
        assert store.meta_keys("manifest/") == []
    finally:
        store.close()


def test_cache_errors_are_one_line(tmp_path: Path) -> None:
    code, out = cache_cli(tmp_path / "nowhere", "ls")
    assert code == 1 and "no modelfs cache at" in out and len(out.strip().splitlines()) == 1
    PieceCache(tmp_path / "cache", 1 << 30).close()
    code, out = cache_cli(tmp_path / "cache", "rm", "sha256:" + "0" * 64)
    assert code == 1 and "holds no model" in out and len(out.strip().splitlines()) == 1

"""No wrong byte, ever: bytes altered between the registry and the node never reach a reader.

A real registry, a proxy that flips one bit of a blob answer (an attacker on the path, or a
transient fault), real FUSE mounts and a real LMDB cache. Every case reads the whole file, as
``cat`` does, and compares every byte; and the cache a bad answer passed through serves right
bytes to the next mount.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import threading
import time
import uuid
from pathlib import Path

import lmdb
import pytest
from cache_damage import damage_piece
from mounting import modelfs, mounted
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.cache import PieceCache
from modelfs.modelpack import layer_media_type

MIB = 1 << 20
DATA = os.urandom(12 * MIB)  # three pieces
LAYER_DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
FLIPPED_50 = bytes([DATA[50] ^ 0x01])  # one bit of byte 50, flipped


def push(registry: Registry, *, piece_index: bool) -> str:
    repository = f"test/integrity-{uuid.uuid4().hex[:8]}"
    layer = Layer(
        layer_media_type("weight", "raw"),
        DATA,
        {"org.cncf.model.filepath": "w.bin"},
    )
    push_artifact(registry.host, repository, "v1", [layer], piece_index=piece_index)
    return f"{repository}:v1"


def read_all(path: Path) -> bytes:
    with path.open("rb", buffering=0) as file:
        chunks = []
        while chunk := file.read(1 * MIB):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("piece_index", [True, False], ids=["piece-index", "no-index"])
@pytest.mark.parametrize("prefetch", ["hints", "none"])
def test_a_bit_flipped_in_transit_never_reaches_a_reader(
    registry: Registry, proxy: Proxy, tmp_path: Path, piece_index: bool, prefetch: str
) -> None:
    reference = f"{proxy.host}/{push(registry, piece_index=piece_index)}"
    mnt = tmp_path / "mnt"
    with mounted(reference, mnt, tmp_path / "cache", "--prefetch", prefetch):
        proxy.patch_blobs(50, FLIPPED_50)  # byte 50 of the first blob answer: piece 0
        assert read_all(mnt / "w.bin") == DATA  # checked, fetched again, served right
    assert proxy.blob_bytes > len(DATA)  # the altered answer was fetched again


@pytest.mark.parametrize("piece_index", [True, False], ids=["piece-index", "no-index"])
def test_bytes_altered_on_every_try_fail_the_read_and_are_never_cached(
    registry: Registry, proxy: Proxy, tmp_path: Path, piece_index: bool
) -> None:
    reference = f"{proxy.host}/{push(registry, piece_index=piece_index)}"
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        proxy.patch_blobs(50, FLIPPED_50, times=1000)
        with pytest.raises(OSError) as raised:
            read_all(mnt / "w.bin")
        assert raised.value.errno == errno.EIO
        proxy.patch_blobs(50, FLIPPED_50, times=0)
        assert read_all(mnt / "w.bin") == DATA  # the mount stays usable
    cache = PieceCache(cache_dir, 1 << 30)
    try:
        assert cache.get(LAYER_DIGEST, 0) == DATA[: 4 * MIB]
    finally:
        cache.close()


def test_pieces_served_unverified_do_not_poison_the_cache_for_the_next_mount(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    # The worst case: a mount that opted into serving unverified pieces reads 64 KiB while the
    # path alters bytes. Its reader may get them (that is what the flag says); the pieces it
    # stored are vouched for by nothing, so no other reader on the node ever gets them.
    reference = f"{proxy.host}/{push(registry, piece_index=False)}"
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    # w.bin would be scanned as a pickle, and a scan waits for the whole check: not scanned here.
    flags = ("--prefetch", "none", "--serve-unverified", "--scan", "pickle=off")
    with mounted(reference, mnt, cache_dir, *flags):
        proxy.patch_blobs(50, FLIPPED_50, times=1000)
        with (mnt / "w.bin").open("rb", buffering=0) as file:
            assert file.read(64 << 10) != DATA[: 64 << 10]  # the opt-in's documented risk
        # The rest of the piece may still be arriving: an unmount would cancel its store.
        wait_stored(cache_dir, LAYER_DIGEST, 0)
    proxy.patch_blobs(50, FLIPPED_50, times=0)
    cache = PieceCache(cache_dir, 1 << 30)
    try:
        assert cache.has(LAYER_DIGEST, 0) and cache.get(LAYER_DIGEST, 0) is None
    finally:
        cache.close()
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert read_all(mnt / "w.bin") == DATA
    result = modelfs("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stdout + result.stderr


def wait_stored(cache_dir: Path, digest: str, index: int, timeout: float = 10) -> None:
    """Until the node's cache holds piece ``index`` of ``digest`` (stored after it was served)."""
    cache = PieceCache(cache_dir, 1 << 30)
    try:
        deadline = time.monotonic() + timeout
        while not cache.has(digest, index) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        cache.close()


@pytest.mark.parametrize("prefetch", ["hints", "none"])
def test_serve_unverified_fails_the_open_file_that_was_given_altered_bytes(
    registry: Registry, proxy: Proxy, tmp_path: Path, prefetch: str
) -> None:
    reference = f"{proxy.host}/{push(registry, piece_index=False)}"
    mnt = tmp_path / "mnt"
    flags = ("--prefetch", prefetch, "--serve-unverified", "--scan", "pickle=off")
    with mounted(reference, mnt, tmp_path / "cache", *flags):
        proxy.patch_blobs(50, FLIPPED_50)
        # Like cat: one open file read to its end. It never ends with exit 0 and a wrong byte.
        with pytest.raises(OSError) as raised:
            read_all(mnt / "w.bin")
        assert raised.value.errno == errno.EIO
        assert read_all(mnt / "w.bin") == DATA  # opened again: the checked bytes


def test_cache_verify_checks_blobs_against_their_digests(
    registry: Registry, tmp_path: Path
) -> None:
    reference = f"{registry.host}/{push(registry, piece_index=True)}"
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert read_all(mnt / "w.bin") == DATA
    damage_piece(cache_dir, LAYER_DIGEST, 0, at=50, reseal=True)
    result = modelfs("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 1
    assert f"blob {LAYER_DIGEST} does not match its digest: dropped" in result.stdout
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert read_all(mnt / "w.bin") == DATA


def test_cache_verify_checks_the_pieces_of_a_partial_blob_against_the_piece_index(
    registry: Registry, tmp_path: Path
) -> None:
    reference = f"{registry.host}/{push(registry, piece_index=True)}"
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with (
        mounted(reference, mnt, cache_dir, "--prefetch", "none"),
        (mnt / "w.bin").open("rb", buffering=0) as file,
    ):
        assert file.read(64 << 10) == DATA[: 64 << 10]
    damage_piece(cache_dir, LAYER_DIGEST, 0, at=50, reseal=True)
    result = modelfs("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 1
    assert f"corrupt piece 0 of {LAYER_DIGEST}: dropped" in result.stdout
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert read_all(mnt / "w.bin") == DATA


def flip_record(cache_dir: Path, key: str, at: int) -> None:
    env = lmdb.open(str(cache_dir), max_dbs=8, map_size=1 << 34)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        value = bytearray(txn.get(f"record/{key}".encode(), db=meta))
        value[at] ^= 0x01
        txn.put(f"record/{key}".encode(), bytes(value), db=meta)
    env.close()


def test_a_flipped_bit_in_a_cached_manifest_is_a_miss_not_a_renamed_file(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    name = push(registry, piece_index=True)
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(f"{proxy.host}/{name}", mnt, cache_dir):
        assert read_all(mnt / "w.bin") == DATA
    cache = PieceCache(cache_dir, 1 << 30)
    try:
        [key] = cache.meta_keys("manifest/")
        record = cache.get_meta(key)
    finally:
        cache.close()
    assert record is not None
    # 8 bytes of checksum, then the media type line: flip a letter of the file's name.
    flip_record(cache_dir, key, 8 + record.index(b"w.bin"))
    pinned = f"{proxy.host}/{name.split(':')[0]}@{key.removeprefix('manifest/')}"
    proxy.reset()
    with mounted(pinned, mnt, cache_dir, "--prefetch", "none"):
        assert sorted(path.name for path in mnt.iterdir()) == ["w.bin"]
        assert read_all(mnt / "w.bin") == DATA
    assert any("/manifests/" in request.path for request in proxy.requests)  # fetched again


LONG_NAME = "weights/" + "w" * 120 + ".bin"  # past ustar's 100 bytes: a pax path record
TAR_FILES = {LONG_NAME: os.urandom(5 * MIB), "config.json": b'{"hidden_size": 8}'}


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def push_tar(registry: Registry, tar: bytes, *, piece_index: bool) -> str:
    repository = f"test/integrity-tar-{uuid.uuid4().hex[:8]}"
    layer = Layer(layer_media_type("weight", "tar"), tar)
    push_artifact(registry.host, repository, "v1", [layer], piece_index=piece_index)
    return f"{repository}:v1"


def tree_of(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): read_all(path) for path in root.rglob("*") if path.is_file()
    }


@pytest.mark.parametrize("piece_index", [True, False], ids=["piece-index", "no-index"])
def test_a_tar_path_altered_in_transit_fails_reads_and_is_never_kept(
    registry: Registry, proxy: Proxy, tmp_path: Path, piece_index: bool
) -> None:
    tar = tar_of(TAR_FILES)
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    reference = f"{proxy.host}/{push_tar(registry, tar, piece_index=piece_index)}"
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    # One bit of the pax path record: weights/... reads as veights/... (b"w" ^ 1 == b"v").
    proxy.patch_blobs(tar.index(b"weights/"), b"v", digest=digest)
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        veights = mnt / ("v" + LONG_NAME[1:])
        assert veights.exists()  # listed from headers nothing vouched for yet: provisional
        for path in (veights, mnt / "config.json"):
            with pytest.raises(OSError) as raised:
                read_all(path)
            assert raised.value.errno == errno.EIO
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert tree_of(mnt) == TAR_FILES  # the altered list was never kept


def test_a_tar_size_that_swallows_the_next_member_fails_reads_of_the_layer(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    files = {"a.bin": os.urandom(1 * MIB), "b.bin": os.urandom(3000)}
    tar = tar_of(files)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        first = archive.getmember("a.bin")
    # The header of a.bin, its size grown over b.bin's header and data, checksum recomputed.
    first.size += 512 + 3072
    header = first.tobuf(format=tarfile.USTAR_FORMAT)
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    reference = f"{proxy.host}/{push_tar(registry, tar, piece_index=True)}"
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    proxy.patch_blobs(0, header, digest=digest)
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert sorted(path.name for path in mnt.iterdir()) == ["a.bin"]  # b.bin hidden
        with pytest.raises(OSError) as raised:
            read_all(mnt / "a.bin")
        assert raised.value.errno == errno.EIO
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert tree_of(mnt) == files


def test_a_tar_of_many_members_is_listed_in_a_few_requests(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    files = {f"shard{n // 1000}/part{n}.txt": b"%d\n" % n for n in range(20_000)}
    tar = tar_of(files)
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    reference = f"{proxy.host}/{push_tar(registry, tar, piece_index=True)}"
    mnt = tmp_path / "mnt"
    proxy.reset()
    with mounted(reference, mnt, tmp_path / "cache", "--prefetch", "none"):
        header_reads = [r for r in proxy.blob_requests if r.path.endswith(digest)]
        # A window that doubles while headers come close together: ~20 MB in a dozen reads,
        # not one request per member.
        assert 0 < len(header_reads) <= 20, len(header_reads)
        assert read_all(mnt / "shard19" / "part19999.txt") == b"19999\n"
        assert len(list((mnt / "shard7").iterdir())) == 1000


def test_a_flipped_bit_in_a_cached_member_list_is_a_miss_not_a_shifted_file(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    files = {"a.bin": os.urandom(3000), "b.bin": os.urandom(5000)}
    tar = tar_of(files)
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    reference = f"{proxy.host}/{push_tar(registry, tar, piece_index=True)}"
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert tree_of(mnt) == files  # the list was checked, and kept
    cache = PieceCache(cache_dir, 1 << 30)
    try:
        record = cache.get_meta(f"tar-index/{digest}")
    finally:
        cache.close()
    assert record is not None
    # One bit of b.bin's data_offset (8 bytes of checksum come first): 4096 -> 4097.
    at = record.index(b'"data_offset": 4096') + len(b'"data_offset": 4096') - 1
    flip_record(cache_dir, f"tar-index/{digest}", 8 + at)
    proxy.reset()
    with mounted(reference, mnt, cache_dir, "--prefetch", "none"):
        assert tree_of(mnt) == files
    assert any(request.path.endswith(digest) for request in proxy.blob_requests)  # read again


def test_a_mount_by_tag_asks_for_its_manifest_once(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    # The piece index is looked up for the manifest the mount pinned, not by the tag again.
    name = push(registry, piece_index=True)
    proxy.reset()
    with mounted(f"{proxy.host}/{name}", tmp_path / "mnt", tmp_path / "cache"):
        by_tag = [r for r in proxy.requests if r.path.endswith("/manifests/v1")]
        assert len(by_tag) == 1, by_tag
        assert read_all(tmp_path / "mnt" / "w.bin") == DATA


def test_a_blob_checked_while_its_last_pieces_wait_for_the_cache_is_served(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    """A blob without a piece index checked whole (by prefetch) while its last pieces still wait
    to be stored, with a piece stored unvouched before (a process died before checking it): a
    read of that piece gets its bytes. It got EIO ("could not be checked whole"): the check is
    marked in the cache only once every piece is stored, so the stored piece looked unchecked,
    and the recheck looked at the cache alone, not at the pieces on their way to it.

    Another process holding the cache's write lock keeps the pieces waiting for as long as the
    test needs (a busy node's writer is just slower); the proxy holds the blob back until then.
    """
    reference = f"{proxy.host}/{push(registry, piece_index=False)}"
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    cache = PieceCache(cache_dir, 1 << 30)
    cache.put(LAYER_DIGEST, 0, DATA[: cache.piece_size], len(DATA))
    cache.close()
    released = proxy.hold_blob(LAYER_DIGEST)
    with mounted(reference, mnt, cache_dir, "--prefetch", "all", verbose=2):
        log = next((cache_dir / "logs").iterdir())
        env = lmdb.open(str(cache_dir), max_dbs=8, map_size=1 << 34)
        writing = env.begin(write=True)
        try:
            released.set()  # prefetch fetches pieces 1 and 2; the mount cannot store them
            deadline = time.monotonic() + 30
            while f"blob {LAYER_DIGEST} matches its digest" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            got: list[bytes | OSError] = []

            def read_first_bytes() -> None:
                try:
                    with (mnt / "w.bin").open("rb", buffering=0) as file:
                        got.append(file.read(4096))
                except OSError as error:
                    got.append(error)

            reader = threading.Thread(target=read_first_bytes)
            reader.start()
            # Refused, it fails at once; served, it may wait for the cache's write lock.
            reader.join(timeout=2)
        finally:
            writing.abort()
            env.close()
        reader.join(timeout=30)
        assert got == [DATA[:4096]]
        assert read_all(mnt / "w.bin") == DATA
    # The stored piece is the one the check hashed: served as it is, the blob not hashed again.
    assert log.read_text().count(f"blob {LAYER_DIGEST} matches its digest") == 1

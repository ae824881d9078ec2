"""The limits a mount keeps against hostile artifacts (issue 26, points 5-7): pure logic."""

from __future__ import annotations

import gzip
import io
import logging
import tarfile
from functools import partial
from pathlib import Path

import pytest
import zstandard

from modelfs.artifact.inflate import (
    MAX_RATIO,
    STEP,
    TAR_OVERHEAD,
    ChunkReader,
    InflateBounds,
    InflateLimitError,
    InflateRoom,
    inflate,
    inflate_limit,
)
from modelfs.artifact.tar import parse_member
from modelfs.artifact.tree import (
    MAX_LAYER_SIZE,
    MAX_MTIME_NS,
    MIN_MTIME_NS,
    BlobRef,
    FileSpec,
    LayerPlan,
    Tree,
    check_sizes,
    clamp_mtime_ns,
    plan_layers,
)
from modelfs.errors import ManifestError
from modelfs.logs import TextFormatter, escape_controls
from modelfs.modelpack import MAX_FILE_SIZE, MAX_TOTAL_SIZE
from modelfs.mount.session import mountinfo_path
from modelfs.service.config import ConfigError, parse_config
from modelfs.service.supervisor import mount_options
from modelfs.sizes import format_size
from modelfs.sources.registry import LateRanges

DIGEST = "sha256:" + "a" * 64


def manifest(size: object) -> dict[str, object]:
    return {
        "layers": [
            {
                "mediaType": "application/vnd.cncf.model.weight.v1.raw",
                "digest": DIGEST,
                "size": size,
                "annotations": {"org.cncf.model.filepath": "w.bin"},
            }
        ]
    }


def spec(path: str, size: int, mtime_ns: int = 0) -> FileSpec:
    return FileSpec(path, size, 0o444, mtime_ns, BlobRef(DIGEST, size), 0)


@pytest.mark.parametrize("size", [1 << 63, (1 << 64) + 5, MAX_TOTAL_SIZE + 1])
def test_a_layer_past_the_limit_is_refused(size: int) -> None:
    with pytest.raises(ManifestError, match=rf"layer 0 .*size {size} is more than"):
        plan_layers(manifest(size))


def test_a_file_or_a_total_past_the_limit_is_refused() -> None:
    assert check_sizes([spec("a", MAX_FILE_SIZE), spec("b", 1)]) == MAX_FILE_SIZE + 1
    with pytest.raises(ManifestError, match=r"file 'a': size"):
        check_sizes([spec("a", MAX_FILE_SIZE + 1)])
    many = [spec(f"f{n}", MAX_FILE_SIZE) for n in range(MAX_TOTAL_SIZE // MAX_FILE_SIZE + 1)]
    with pytest.raises(ManifestError, match="add up to"):
        Tree(many)


def test_mtimes_are_clamped_to_what_the_kernel_shows() -> None:
    assert clamp_mtime_ns(10**39) == MAX_MTIME_NS
    assert clamp_mtime_ns(-(10**39)) == MIN_MTIME_NS
    assert clamp_mtime_ns(-5) == -5
    tree = Tree([spec("far", 1, 10**39)], default_mtime_ns=-(10**40))
    assert [file.mtime_ns for file in tree.files()] == [MAX_MTIME_NS]
    assert tree.node(tree.root).mtime_ns == MIN_MTIME_NS


def pax_header(records: dict[str, str]) -> bytes:
    info = tarfile.TarInfo("m")
    info.pax_headers = records
    return info.tobuf(format=tarfile.PAX_FORMAT)


@pytest.mark.parametrize("records", [{"size": "9" * 5000}, {"mtime": "9" * 5000}, {"size": "²"}])
def test_pax_numbers_of_too_many_digits_are_corrupt(records: dict[str, str]) -> None:
    with pytest.raises(ManifestError, match="pax"):
        parse_member(pax_header(records) + bytes(1024), 0)


def plan(size: int, meta_size: int | None = None) -> LayerPlan:
    return LayerPlan(0, DIGEST, size, "m", "tar+zstd", None, None, None, meta_size)


def test_the_inflate_limit_is_the_smallest_that_applies() -> None:
    room = InflateRoom(cache=1 << 30, disk=1 << 40)
    assert inflate_limit(plan(1000), room, InflateBounds()).size == 1000 * MAX_RATIO
    cache = inflate_limit(plan(1 << 30), InflateRoom(64 << 20, 1 << 40), InflateBounds())
    assert cache.size == 64 << 20 and cache.reason.startswith("what the cache can hold")
    disk = inflate_limit(plan(1 << 30), InflateRoom(1 << 40, 64 << 20), InflateBounds())
    assert disk.size == 32 << 20 and "free space" in disk.reason
    declared = inflate_limit(plan(1 << 20, meta_size=5), room, InflateBounds())
    assert declared.size == 5 + TAR_OVERHEAD and "annotations declare" in declared.reason


def test_the_operator_sets_the_ratio_and_size_bounds() -> None:
    room = InflateRoom(cache=1 << 40, disk=1 << 50)
    ratio = inflate_limit(plan(1000), room, InflateBounds(ratio=10))
    assert ratio.size == 10_000 and "--max-inflate-ratio" in ratio.reason
    size = inflate_limit(plan(1 << 20), room, InflateBounds(size=5 << 20))
    assert size.size == 5 << 20 and "--max-inflate-size" in size.reason


def test_sizes_are_shown_in_binary_units() -> None:
    assert [format_size(n) for n in (0, 1023, 1024, 18_749_558, 4 << 30, 1 << 60)] == [
        "0 B", "1023 B", "1.0 KiB", "17.9 MiB", "4.0 GiB", "1024.0 PiB",
    ]  # fmt: skip


def bomb(compression: str, size: int) -> bytes:
    zeros = bytes(STEP)
    out = io.BytesIO()
    if compression == "gzip":
        with gzip.GzipFile(fileobj=out, mode="wb") as writer:
            for _ in range(size // STEP):
                writer.write(zeros)
    else:
        with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as writer:
            for _ in range(size // STEP):
                writer.write(zeros)
    return out.getvalue()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_inflate_stops_a_step_past_the_limit(compression: str) -> None:
    compressed = bomb(compression, 256 << 20)
    chunks = iter([compressed])  # one network chunk that inflates to 256 MiB
    written: list[int] = []
    with pytest.raises(InflateLimitError) as passed:
        inflate(
            f"tar+{compression}",
            ChunkReader(lambda: next(chunks, b"")),
            lambda step: written.append(len(step)),
            4 * STEP,
        )
    assert passed.value.size <= 5 * STEP and sum(written) <= 4 * STEP
    assert max(written) <= STEP


def test_inflate_reads_across_members_and_frames() -> None:
    gz = gzip.compress(b"one ") + gzip.compress(b"two")
    zst = zstandard.ZstdCompressor().compress(b"one ") + zstandard.ZstdCompressor().compress(b"two")
    for fmt, data in (("tar+gzip", gz), ("tar+zstd", zst)):
        chunks = iter([data[:3], data[3:]])
        out = io.BytesIO()
        assert inflate(fmt, ChunkReader(partial(next, chunks, b"")), out.write, 100) == 7
        assert out.getvalue() == b"one two"


def test_control_characters_never_start_a_log_line() -> None:
    assert escape_controls("a\nb\x1b[0m\x85\tc é") == "a\\nb\\x1b[0m\\x85\\tc é"
    record = logging.LogRecord("x", logging.ERROR, "f", 1, "read %s", ("evil\nforged",), None)
    assert TextFormatter("modelfs: %(message)s").format(record) == "modelfs: read evil\\nforged"


def test_a_late_range_is_remembered_for_a_while_and_only_where_it_overlaps() -> None:
    late = LateRanges(memory=5)
    late.note("sha256:a", 100, 200, now=10)
    assert late.is_late("sha256:a", 150, 160, now=14)
    assert late.is_late("sha256:a", 0, 101, now=14)
    assert not late.is_late("sha256:a", 200, 300, now=14)  # past its end
    assert not late.is_late("sha256:b", 150, 160, now=14)  # another blob
    assert not late.is_late("sha256:a", 150, 160, now=15)  # forgotten: asked again


def testmountinfo_paths_are_escaped_as_the_kernel_writes_them() -> None:
    assert mountinfo_path(Path("/mnt/a b\\c\td")) == "/mnt/a\\040b\\134c\\011d"


def test_the_daemon_s_inflate_bounds_reach_its_mounts() -> None:
    mount = '[[mounts]]\nref = "r.example/m:v1"\npath = "/m"\n'
    bounded = '[cache]\nmax_inflate_ratio = 50\nmax_inflate_size = "2G"\n' + mount
    for text, bounds in [(bounded, (50, 2 << 30)), (mount, (MAX_RATIO, MAX_LAYER_SIZE))]:
        config = parse_config(text, "config.toml")
        options = mount_options(config.mounts[0], config)
        assert (options.max_inflate_ratio, options.max_inflate_size) == bounds
    for bad, says in [
        ("max_inflate_ratio = 0", "at least 1"),
        ('max_inflate_ratio = "x"', "must be a int"),
        ('max_inflate_size = "lots"', "'lots' is not a size"),
    ]:
        with pytest.raises(ConfigError, match=says):
            parse_config(f"[cache]\n{bad}\n", "config.toml")

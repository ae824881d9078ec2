"""Read profiles: recording and coalescing (pure), and ``modelfs profile`` / mounts / ``preheat
--hints-only`` with the real registry and real FUSE mounts, judged by the counting proxy.

The load being profiled is a ``python -c`` subprocess that reads ``config.json`` and a few
tensors of a safetensors file with ``pread`` under ``POSIX_FADV_RANDOM``, so that the kernel
asks the mount for exactly the pages read (no readahead around them): what the profile must
hold is then known from the safetensors header alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio
from mounting import MODELFS, modelfs, mounted
from registry_tools import Layer, Proxy, Registry, push_artifact
from safetensors.numpy import save

from modelfs.artifact.tree import BlobRef, FileNode, FileSpec, Tree
from modelfs.errors import IntegrityError, ManifestError
from modelfs.fetcher.index import PieceIndex, find_index
from modelfs.modelpack import ANNOTATION_FILEPATH, layer_media_type
from modelfs.mount.profiling import command_for
from modelfs.pieces import DEFAULT_PIECE_SIZE, pieces_covering
from modelfs.prefetch.hints import Hint, hinted_pieces
from modelfs.prefetch.prefetcher import feed_hints
from modelfs.prefetch.profile import (
    Profile,
    ProfiledRange,
    ReadRecorder,
    encode_profile,
    find_profile,
    parse_profile,
    profile_hints,
)
from modelfs.sources.registry import RegistryClient

MIB = 1 << 20
PIECE = DEFAULT_PIECE_SIZE

# -- pure parts -----------------------------------------------------------------------------------


def tree_of(files: dict[str, tuple[int, BlobRef, int]]) -> Tree:
    """path -> (size, blob, offset in blob)."""
    return Tree(
        [
            FileSpec(path, size, 0o444, 0, blob, offset)
            for path, (size, blob, offset) in files.items()
        ]
    )


def blob(name: str, size: int) -> BlobRef:
    return BlobRef("sha256:" + hashlib.sha256(name.encode()).hexdigest(), size)


def recorded(piece: int, tree: Tree, reads: list[tuple[str, int, int]]) -> list[ProfiledRange]:
    recorder = ReadRecorder(piece)
    nodes = {node.path: node for node in tree.files()}
    for path, offset, size in reads:
        recorder.note(nodes[path], offset, size)
    return list(recorder.profile("sha256:" + "0" * 64).ranges)


def test_reads_are_recorded_as_pieces_in_first_touch_order_and_coalesced() -> None:
    weights = blob("w", 100)
    tree = tree_of({"w": (100, weights, 0), "c": (7, blob("c", 7), 0)})
    ranges = recorded(
        10,
        tree,
        [
            ("c", 0, 7),
            ("w", 0, 8),  # piece 0
            ("w", 55, 20),  # pieces 5-7
            ("w", 3, 2),  # piece 0 again: nothing new
            ("w", 80, 5),  # piece 8 follows piece 7: one range
            ("w", 30, 1),  # piece 3
            ("w", 95, 50),  # piece 9, the read clamped to the file
        ],
    )
    assert ranges == [
        ProfiledRange("c", 0, 7),
        ProfiledRange("w", 0, 10),
        ProfiledRange("w", 50, 40),
        ProfiledRange("w", 30, 10),
        ProfiledRange("w", 90, 10),
    ]


def test_tar_members_sharing_a_piece_record_it_once_clipped_to_the_file() -> None:
    tar = blob("tar", 64)
    tree = tree_of({"a": (10, tar, 5), "b": (20, tar, 17), "z": (30, tar, 30)})
    ranges = recorded(16, tree, [("b", 0, 20), ("a", 0, 10), ("z", 25, 5)])
    # b covers blob bytes 17-36: pieces 1 (16-31) and 2 (32-47), clipped to b: file bytes 0-19.
    # a (5-14) is in piece 0, which nobody touched yet. z's bytes 55-59 are in piece 3.
    assert ranges == [
        ProfiledRange("b", 0, 20),
        ProfiledRange("a", 0, 10),
        ProfiledRange("z", 18, 12),
    ]


def test_profile_json_round_trip_and_checks() -> None:
    manifest = "sha256:" + "a" * 64
    profile = Profile(manifest, PIECE, (ProfiledRange("x/y", 0, 5), ProfiledRange("z", 8, 1)))
    assert parse_profile(encode_profile(profile), manifest) == profile
    assert profile.total_bytes == 6
    with pytest.raises(IntegrityError, match="describes sha256:a"):
        parse_profile(encode_profile(profile), "sha256:" + "b" * 64)
    for broken in (b"not json", b"{}", b'{"manifest": "m", "pieceSize": 1, "ranges": [[1]]}'):
        with pytest.raises(ManifestError, match="malformed"):
            parse_profile(broken, manifest)


def test_profile_ranges_that_do_not_fit_the_tree_are_ignored() -> None:
    tree = tree_of({"a": (100, blob("a", 100), 0), "d/b": (10, blob("b", 10), 0)})
    profile = Profile(
        "sha256:" + "0" * 64,
        PIECE,
        (
            ProfiledRange("d/b", 0, 10),
            ProfiledRange("missing", 0, 1),
            ProfiledRange("a", 90, 11),  # past the end
            ProfiledRange("a", -1, 5),
            ProfiledRange("a", 5, 0),
            ProfiledRange("a", 50, 50),
        ),
    )
    hints, ignored = profile_hints(tree, profile)
    assert [(hint.file.path, hint.offset, hint.length) for hint in hints] == [
        ("d/b", 0, 10),
        ("a", 50, 50),
    ]
    assert ignored == [profile.ranges[i] for i in (1, 2, 3, 4)]


def test_a_recorded_profile_takes_the_builtin_hints_place_in_its_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tree = tree_of(
        {
            "config.json": (10, blob("c", 10), 0),
            "w.safetensors": (100, blob("w", 100), 0),
        }
    )
    profile = Profile(
        "sha256:" + "0" * 64,
        PIECE,
        (
            ProfiledRange("w.safetensors", 60, 40),
            ProfiledRange("gone.bin", 0, 5),
            ProfiledRange("config.json", 0, 10),
        ),
    )
    reads: list[tuple[str, int, int]] = []

    async def read(node: FileNode, offset: int, size: int) -> bytes:
        reads.append((node.path, offset, size))
        return struct.pack("<Q", 20)  # a safetensors header of 20 bytes

    def feed_all(recorded: Profile | None) -> list[list[tuple[str, int, int]]]:
        batches: list[list[tuple[str, int, int]]] = []

        async def feed(hints: list[Hint]) -> None:
            batches.append([(hint.file.path, hint.offset, hint.length) for hint in hints])

        async def lookup() -> Profile | None:
            return recorded

        trio.run(feed_hints, tree, read, lookup, feed)
        return batches

    with caplog.at_level(logging.WARNING):
        assert feed_all(profile) == [[("w.safetensors", 60, 40), ("config.json", 0, 10)]]
    assert reads == []  # nothing read to work out hints: the profile says it all
    assert "1 of 3 ranges do not fit the tree" in caplog.text
    assert "gone.bin" in caplog.text
    assert feed_all(None) == [
        [("config.json", 0, 10), ("w.safetensors", 0, 8)],
        [("w.safetensors", 8, 20)],
    ]
    assert reads == [("w.safetensors", 0, 8)]


def test_hinted_pieces_are_in_hint_order_each_once() -> None:
    tree = tree_of({"a": (100, blob("a", 100), 0), "b": (10, blob("b", 10), 0)})
    a, b = tree.files()
    pieces = hinted_pieces([Hint(a, 55, 10), Hint(b, 0, 10), Hint(a, 0, 70), Hint(a, 99, 1)], 20)
    assert [(node.path, index) for node, index in pieces] == [
        ("a", 2),
        ("a", 3),
        ("b", 0),
        ("a", 0),
        ("a", 1),
        ("a", 4),
    ]


def test_command_gets_the_mountpoint_in_place_of_braces() -> None:
    assert command_for(["cat", "{}/config.json", "-n", "{}{}"], Path("/m")) == [
        "cat",
        "/m/config.json",
        "-n",
        "/m/m",
    ]


# -- with the registry and FUSE -------------------------------------------------------------------

# Reads config.json, the safetensors header and the named tensors; prints each tensor's sha256.
LOADER = """
import hashlib, json, os, struct, sys
root, names = sys.argv[1], sys.argv[2].split(",")
with open(os.path.join(root, "config.json"), "rb") as file:
    json.loads(file.read())
fd = os.open(os.path.join(root, "model.safetensors"), os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
(length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
header = json.loads(os.pread(fd, length, 8))
for name in names:
    start, end = header[name]["data_offsets"]
    print(name, hashlib.sha256(os.pread(fd, end - start, 8 + length + start)).hexdigest())
"""
LOADED = ["t17", "t09", "t02"]


@dataclass(frozen=True)
class SafetensorsModel:
    reference: str
    digest: str
    files: dict[str, bytes]
    layer_digests: dict[str, str]  # path -> blob digest

    def tensor_range(self, name: str) -> tuple[int, int]:
        """(offset in model.safetensors, length) of tensor ``name``."""
        data = self.files["model.safetensors"]
        length = int.from_bytes(data[:8], "little")
        start, end = json.loads(data[8 : 8 + length])[name]["data_offsets"]
        return 8 + length + start, end - start

    def loader_reads(self, names: list[str]) -> list[tuple[str, int, int]]:
        """The (path, offset, length) reads LOADER makes, in order."""
        data = self.files["model.safetensors"]
        header = int.from_bytes(data[:8], "little")
        reads = [("config.json", 0, len(self.files["config.json"]))]
        reads += [("model.safetensors", 0, 8), ("model.safetensors", 8, header)]
        return reads + [("model.safetensors", *self.tensor_range(name)) for name in names]

    def expected_ranges(self, names: list[str]) -> dict[str, list[str]]:
        """Per layer digest, the sorted Range headers of the pieces ``names``' reads touch."""
        expected: dict[str, list[str]] = {digest: [] for digest in self.layer_digests.values()}
        for path, index in touched_pieces(self, self.loader_reads(names)):
            size = len(self.files[path])
            end = min((index + 1) * PIECE, size) - 1
            header = f"bytes={index * PIECE}-{end}"
            if header not in expected[self.layer_digests[path]]:
                expected[self.layer_digests[path]].append(header)
        return {digest: sorted(ranges) for digest, ranges in expected.items()}


def touched_pieces(
    model: SafetensorsModel, reads: list[tuple[str, int, int]]
) -> list[tuple[str, int]]:
    """(path, piece) in the order reads first touch them (every file is a raw layer)."""
    touched: list[tuple[str, int]] = []
    for path, offset, size in reads:
        for index in pieces_covering(offset, size, len(model.files[path]), PIECE):
            if (path, index) not in touched:
                touched.append((path, index))
    return touched


def push_model(registry: Registry) -> SafetensorsModel:
    rng = np.random.default_rng(5)
    tensors = {f"t{i:02d}": rng.standard_normal((512, 512), dtype=np.float32) for i in range(24)}
    files = {
        "config.json": json.dumps({"model_type": "bert"}).encode(),
        "tokenizer.json": json.dumps({"vocab": list(range(3000))}).encode(),
        "model.safetensors": save(tensors),
    }
    layers = [
        Layer(layer_media_type("weight", "raw"), data, {ANNOTATION_FILEPATH: path})
        for path, data in files.items()
    ]
    repository = f"test/profile-{uuid.uuid4().hex[:8]}"
    digest = push_artifact(registry.host, repository, "v1", layers)
    digests = {path: "sha256:" + hashlib.sha256(data).hexdigest() for path, data in files.items()}
    return SafetensorsModel(f"{repository}:v1", digest, files, digests)


def loader(root: str, names: list[str]) -> list[str]:
    return [sys.executable, "-c", LOADER, root, ",".join(names)]


def tensor_hashes(model: SafetensorsModel, names: list[str]) -> str:
    data = model.files["model.safetensors"]
    lines = []
    for name in names:
        offset, length = model.tensor_range(name)
        lines.append(f"{name} {hashlib.sha256(data[offset : offset + length]).hexdigest()}\n")
    return "".join(lines)


def lookup_profile(host: str, model: SafetensorsModel) -> Profile | None:
    async def main() -> Profile | None:
        async with RegistryClient(host, plain_http=True) as client:
            return await find_profile(
                client.repository(model.reference.split(":")[0]), model.digest
            )

    return trio.run(main)


def layer_ranges(proxy: Proxy, model: SafetensorsModel) -> dict[str, list[str]]:
    """Per layer digest, the sorted Range headers of the blob GETs the proxy saw.

    Pieces are fetched several at a time, so they may reach the registry in any order; each
    one shows up once per fetch, so a piece fetched twice would show up twice.
    """
    ranges: dict[str, list[str]] = {digest: [] for digest in model.layer_digests.values()}
    for request in proxy.blob_requests:
        digest = request.path.rsplit("/", 1)[-1]
        if digest in ranges:
            ranges[digest].append(request.range or "whole")
    return {digest: sorted(found) for digest, found in ranges.items()}


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def no_profile_mount_left() -> bool:
    with open("/proc/self/mountinfo") as mounts:
        return not any("modelfs-profile-" in line for line in mounts)


@pytest.fixture(scope="module")
def profiled(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SafetensorsModel, subprocess.CompletedProcess[str]]:
    """A model pushed, then profiled with LOADER reading LOADED (the mount's {} placeholder)."""
    model = push_model(registry)
    cache_dir = tmp_path_factory.mktemp("profile-cache")
    result = modelfs(
        "profile",
        f"{registry.host}/{model.reference}",
        "--plain-http",
        "--cache-dir",
        str(cache_dir),
        "--",
        *loader("{}", LOADED),
    )
    return model, result


def test_profile_publishes_the_ranges_the_load_read_in_order(
    registry: Registry, profiled: tuple[SafetensorsModel, subprocess.CompletedProcess[str]]
) -> None:
    model, result = profiled
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(tensor_hashes(model, LOADED))  # the load saw right bytes
    assert no_profile_mount_left()
    profile = lookup_profile(registry.host, model)
    assert profile is not None and profile.manifest == model.digest
    recorded_pieces = [
        (entry.path, index)
        for entry in profile.ranges
        for index in pieces_covering(
            entry.offset, entry.length, len(model.files[entry.path]), PIECE
        )
    ]
    assert recorded_pieces == touched_pieces(model, model.loader_reads(LOADED))
    assert "tokenizer.json" not in {entry.path for entry in profile.ranges}
    assert f"{len(profile.ranges)} ranges, {profile.total_bytes} bytes" in result.stdout


def test_profile_and_piece_index_share_the_referrers_tag(
    registry: Registry, profiled: tuple[SafetensorsModel, subprocess.CompletedProcess[str]]
) -> None:
    model, result = profiled
    assert result.returncode == 0, result.stderr
    before = lookup_profile(registry.host, model)
    indexed = modelfs("index", f"{registry.host}/{model.reference}", "--plain-http")
    assert indexed.returncode == 0, indexed.stderr

    async def lookup() -> tuple[PieceIndex | None, Profile | None]:
        async with RegistryClient(registry.host, plain_http=True) as client:
            repository = client.repository(model.reference.split(":")[0])
            manifest = await repository.get_manifest(model.digest)
            return await find_index(repository, manifest), await find_profile(
                repository, model.digest
            )

    index, profile = trio.run(lookup)
    assert index is not None and index.manifest == model.digest
    assert profile is not None and profile == before


def test_a_mount_prefetches_the_profile_before_any_read(
    profiled: tuple[SafetensorsModel, subprocess.CompletedProcess[str]],
    proxy: Proxy,
    tmp_path: Path,
) -> None:
    model, result = profiled
    assert result.returncode == 0, result.stderr
    expected = model.expected_ranges(LOADED)
    with mounted(f"{proxy.host}/{model.reference}", tmp_path / "mnt", tmp_path / "cache") as mnt:
        wait_until(lambda: layer_ranges(proxy, model) == expected)
        time.sleep(0.5)  # anything else would be fetched by now
        assert layer_ranges(proxy, model) == expected
        load = subprocess.run(loader(str(mnt), LOADED), capture_output=True, text=True)
        assert load.returncode == 0, load.stderr
        assert load.stdout == tensor_hashes(model, LOADED)
        assert layer_ranges(proxy, model) == expected, "the load found everything prefetched"


def test_preheat_hints_only_caches_the_profile_and_nothing_else(
    profiled: tuple[SafetensorsModel, subprocess.CompletedProcess[str]],
    proxy: Proxy,
    tmp_path: Path,
) -> None:
    model, result = profiled
    assert result.returncode == 0, result.stderr
    reference = f"{proxy.host}/{model.reference}"
    cache_dir = tmp_path / "cache"
    preheat = modelfs(
        "preheat", reference, "--hints-only", "--plain-http", "--cache-dir", str(cache_dir)
    )
    assert preheat.returncode == 0, preheat.stderr
    expected = model.expected_ranges(LOADED)
    assert layer_ranges(proxy, model) == expected

    proxy.reset()
    with mounted(reference, tmp_path / "mnt", cache_dir, "--prefetch", "none") as mnt:
        load = subprocess.run(loader(str(mnt), LOADED), capture_output=True, text=True)
        assert load.stdout == tensor_hashes(model, LOADED), load.stderr
        assert all(not ranges for ranges in layer_ranges(proxy, model).values())
        # The rest of the model was left out: another tensor comes from the registry.
        other = [name for name in ("t21", "t13", "t06") if name not in LOADED][:1]
        load = subprocess.run(loader(str(mnt), other), capture_output=True, text=True)
        assert load.stdout.endswith(tensor_hashes(model, other)), load.stderr
        assert layer_ranges(proxy, model)[model.layer_digests["model.safetensors"]]


def test_preheat_hints_only_without_a_profile_takes_the_builtin_hints(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    model = push_model(registry)
    preheat = modelfs(
        "preheat",
        f"{proxy.host}/{model.reference}",
        "--hints-only",
        "--plain-http",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert preheat.returncode == 0, preheat.stderr
    whole = {path: f"bytes=0-{len(model.files[path]) - 1}" for path in model.files}
    assert layer_ranges(proxy, model) == {
        model.layer_digests["config.json"]: [whole["config.json"]],
        model.layer_digests["tokenizer.json"]: [whole["tokenizer.json"]],
        model.layer_digests["model.safetensors"]: [f"bytes=0-{PIECE - 1}"],  # the header's piece
    }


def test_a_failing_command_publishes_nothing(registry: Registry, tmp_path: Path) -> None:
    model = push_model(registry)
    failing = (
        "import os, sys; open(os.environ['MODELFS_MOUNT'] + '/config.json').read(); sys.exit(3)"
    )
    common = ["--plain-http", "--cache-dir", str(tmp_path / "cache"), "--"]
    reference = f"{registry.host}/{model.reference}"
    fails = modelfs("profile", reference, *common, sys.executable, "-c", failing)
    assert fails.returncode == 1
    assert "exited with status 3: no profile published" in fails.stderr
    reads_nothing = modelfs("profile", reference, *common, "true")
    assert reads_nothing.returncode == 1
    assert "read nothing from the mount" in reads_nothing.stderr
    missing = modelfs("profile", reference, *common, str(tmp_path / "no-such-command"))
    assert missing.returncode == 1
    for result in (fails, reads_nothing, missing):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert lookup_profile(registry.host, model) is None
    assert no_profile_mount_left()


def test_a_read_only_registry_gets_one_line_and_no_profile(
    fresh_registry: Registry, tmp_path: Path
) -> None:
    model = push_model(fresh_registry)
    fresh_registry.stop()
    config = json.loads(fresh_registry.config_path.read_text())
    config["storage"]["maintenance"]["readonly"] = {"enabled": True}
    fresh_registry.config_path.write_text(json.dumps(config))
    fresh_registry.start()
    result = modelfs(
        "profile",
        f"{fresh_registry.host}/{model.reference}",
        "--plain-http",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--",
        *loader("{}", LOADED),
    )
    assert result.returncode == 1
    assert "cannot publish the read profile" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert lookup_profile(fresh_registry.host, model) is None


def test_an_interrupted_profile_publishes_nothing_and_leaves_no_mount(
    registry: Registry, tmp_path: Path
) -> None:
    model = push_model(registry)
    started = tmp_path / "started"
    waits = (
        "import os, pathlib, sys, time; open(os.environ['MODELFS_MOUNT'] + '/config.json').read();"
        " pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
    )
    stderr = tmp_path / "stderr"
    with stderr.open("w") as errors:
        profiling = subprocess.Popen(
            [*MODELFS, "profile", f"{registry.host}/{model.reference}", "--plain-http",
             "--cache-dir", str(tmp_path / "cache"), "--", sys.executable, "-c", waits,
             str(started)],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )  # fmt: skip
        try:
            wait_until(started.exists)
            profiling.send_signal(signal.SIGINT)
            assert profiling.wait(timeout=30) == 1
        finally:
            if profiling.poll() is None:
                profiling.kill()
                profiling.wait()
    assert "no profile published" in stderr.read_text()
    assert len(stderr.read_text().strip().splitlines()) == 1, stderr.read_text()
    assert lookup_profile(registry.host, model) is None
    assert no_profile_mount_left()

"""The modelfs snapshotter under a real containerd (Debian's 1.6.20) and runc: images pull and run
through it, containerd's snapshot operations behave, bad requests leave it serving, and its
snapshots survive its restart. Also driven directly over its gRPC API, as containerd drives it."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from containerd_tools import (
    Containerd,
    Snapshotter,
    containerd_missing,
    leased_snapshots,
    push_busybox_image,
)
from registry_tools import Registry

from modelfs.snapshot.api import pb, services

MISSING = containerd_missing()
pytestmark = pytest.mark.skipif(
    MISSING is not None, reason=f"CONTAINERD CANNOT RUN HERE, its tests are skipped: {MISSING}"
)
HELLO = b"hello from the second layer\n"
SNAPSHOTS = ("snapshots", "--snapshotter", "modelfs")


@pytest.fixture(scope="module")
def snapshotter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshotter]:
    server = Snapshotter(tmp_path_factory.mktemp("snapshotter"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, snapshotter: Snapshotter
) -> Iterator[Containerd]:
    server = Containerd(tmp_path_factory.mktemp("containerd"), snapshotter)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image(registry: Registry, containerd: Containerd) -> str:
    """The busybox image, pulled through the snapshotter."""
    reference = push_busybox_image(registry.host, f"busybox-{uuid.uuid4().hex[:8]}", "v1", HELLO)
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "modelfs", reference)
    return reference


@pytest.fixture
def lone(tmp_path: Path) -> Iterator[Snapshotter]:
    """A snapshotter no containerd uses, for calls made directly over its API: containerd's
    garbage collection removes the backend snapshots its own metadata does not know."""
    server = Snapshotter(tmp_path / "lone")
    server.root.parent.mkdir()
    server.start()
    yield server
    server.stop()


def _client(snapshotter: Snapshotter) -> Any:
    channel = grpc.insecure_channel(f"unix://{snapshotter.address}")
    return services.SnapshotsStub(channel)


def _ls(containerd: Containerd) -> list[list[str]]:
    lines = containerd.ctr("snapshots", "--snapshotter", "modelfs", "ls").splitlines()[1:]
    return [line.split() for line in lines]


def _committed(containerd: Containerd) -> list[str]:
    return [row[0] for row in _ls(containerd) if row[-1] == "Committed"]


def _run(containerd: Containerd, image: str, *command: str) -> str:
    name = f"c-{uuid.uuid4().hex[:8]}"
    return containerd.ctr("run", "--snapshotter", "modelfs", "--rm", image, name, *command)


def test_an_image_pulls_and_runs_with_its_layers_stacked(
    containerd: Containerd, snapshotter: Snapshotter, image: str
) -> None:
    assert _run(containerd, image, "/bin/busybox", "echo", "hi") == "hi\n"
    # /etc/hello comes from the second layer, busybox and /bin/sh from the first.
    assert _run(containerd, image, "/bin/sh", "-c", "cat /etc/hello").encode() == HELLO
    # The two layers are committed snapshots of the modelfs snapshotter, stored under its root.
    assert len(_committed(containerd)) == 2
    # Each layer's files lie once on disk, in its own directory (containers' upper dirs beside
    # them go with containerd's garbage collection, in the background).
    layers = list((snapshotter.root / "snapshots").glob("*/fs"))
    assert len([layer for layer in layers if (layer / "bin" / "busybox").is_file()]) == 1
    assert len([layer for layer in layers if (layer / "etc" / "hello").is_file()]) == 1


def test_a_container_writes_to_its_own_upper_dir_only(containerd: Containerd, image: str) -> None:
    script = "echo changed > /etc/hello && cat /etc/hello"
    assert _run(containerd, image, "/bin/sh", "-c", script) == "changed\n"
    assert _run(containerd, image, "/bin/sh", "-c", "cat /etc/hello").encode() == HELLO


def _mount(containerd: Containerd, key: str, target: Path) -> None:
    """Mount a snapshot as containerd would, from the command ``ctr snapshots mounts`` prints."""
    target.mkdir()
    command = containerd.ctr("snapshots", "--snapshotter", "modelfs", "mounts", str(target), key)
    subprocess.run(command, shell=True, check=True)


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def leased(containerd: Containerd) -> Iterator[Any]:
    with leased_snapshots(containerd) as client:
        yield client


def test_prepare_commit_view_stat_usage_walk_remove(
    containerd: Containerd, image: str, leased: Any, tmp_path: Path
) -> None:
    top = next(row[0] for row in _ls(containerd) if row[1] in _committed(containerd))
    key, name, view = (f"{what}-{uuid.uuid4().hex[:8]}" for what in ("key", "name", "view"))
    leased.Prepare(pb.PrepareSnapshotRequest(snapshotter="modelfs", key=key, parent=top))
    _mount(containerd, key, tmp_path / "active")
    (tmp_path / "active" / "etc" / "added").write_bytes(b"new file\n")
    _umount(tmp_path / "active")
    usage = containerd.ctr(*SNAPSHOTS, "usage", key).splitlines()[1].split()
    assert usage[0] == key and usage[1] != "0.0"  # the new file and its directory
    leased.Commit(pb.CommitSnapshotRequest(snapshotter="modelfs", name=name, key=key))
    info = json.loads(containerd.ctr(*SNAPSHOTS, "info", name))
    assert (info["Kind"], info["Parent"]) == ("Committed", top)

    leased.View(pb.ViewSnapshotRequest(snapshotter="modelfs", key=view, parent=name))
    _mount(containerd, view, tmp_path / "view")
    try:
        # A view of three layers: the files of all of them, read-only.
        assert (tmp_path / "view" / "etc" / "added").read_bytes() == b"new file\n"
        assert (tmp_path / "view" / "etc" / "hello").read_bytes() == HELLO
        assert (tmp_path / "view" / "bin" / "busybox").stat().st_size > 100_000
        with pytest.raises(OSError, match="Read-only"):
            (tmp_path / "view" / "etc" / "more").write_bytes(b"x")
    finally:
        _umount(tmp_path / "view")
    tree = containerd.ctr(*SNAPSHOTS, "tree")
    assert name in tree and view in tree

    # The parent of a snapshot cannot go before it; then the branch goes, leaf first.
    refused = containerd.ctr(*SNAPSHOTS, "rm", name, check=False)
    assert "failed precondition" in refused.lower() or "has a child" in refused
    containerd.ctr(*SNAPSHOTS, "rm", view)
    containerd.ctr(*SNAPSHOTS, "rm", name)
    assert name not in containerd.ctr(*SNAPSHOTS, "ls")


def test_a_view_of_one_layer_is_a_read_only_bind(
    containerd: Containerd, image: str, leased: Any
) -> None:
    bottom = next(row[0] for row in _ls(containerd) if len(row) == 2)  # no parent
    view = f"view-{uuid.uuid4().hex[:8]}"
    request = pb.ViewSnapshotRequest(snapshotter="modelfs", key=view, parent=bottom)
    mounts = leased.View(request).mounts
    assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["ro", "rbind"])]
    assert Path(mounts[0].source, "bin", "busybox").exists()
    assert json.loads(containerd.ctr(*SNAPSHOTS, "info", view))["Kind"] == "View"
    containerd.ctr(*SNAPSHOTS, "rm", view)


def test_labels_are_kept_updated_and_filtered(lone: Snapshotter) -> None:
    client = _client(lone)
    key = f"labelled-{uuid.uuid4().hex[:8]}"
    labels = {"containerd.io/snapshot/x": "1", "other": "2"}
    client.Prepare(pb.PrepareSnapshotRequest(key=key, labels=labels))
    assert dict(client.Stat(pb.StatSnapshotRequest(key=key)).info.labels) == labels
    mask = pb.google_dot_protobuf_dot_field__mask__pb2.FieldMask(paths=["labels.other"])
    info = pb.Info(name=key, labels={})  # labels.other absent: deleted
    updated = client.Update(pb.UpdateSnapshotRequest(info=info, update_mask=mask)).info
    assert dict(updated.labels) == {"containerd.io/snapshot/x": "1"}
    # The filter containerd's unpacker uses to find a layer a remote snapshotter made.
    found = client.List(
        pb.ListSnapshotsRequest(filters=[f'labels."containerd.io/snapshot/x"==1,name=={key}'])
    )
    assert [info.name for reply in found for info in reply.info] == [key]
    client.Remove(pb.RemoveSnapshotRequest(key=key))


def _code(call: Any, request: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call(request)
    code: grpc.StatusCode = error.value.code()
    return code


def test_bad_requests_get_their_status_and_the_snapshotter_serves_on(
    containerd: Containerd, snapshotter: Snapshotter, lone: Snapshotter, image: str
) -> None:
    client = _client(lone)
    key = f"bad-{uuid.uuid4().hex[:8]}"
    assert _code(client.Prepare, pb.PrepareSnapshotRequest(key=key, parent="nope")) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert _code(client.Stat, pb.StatSnapshotRequest(key=key)) == grpc.StatusCode.NOT_FOUND
    assert _code(client.Usage, pb.UsageRequest(key=key)) == grpc.StatusCode.NOT_FOUND
    assert _code(client.Mounts, pb.MountsRequest(key=key)) == grpc.StatusCode.NOT_FOUND
    client.View(pb.ViewSnapshotRequest(key=key))
    assert _code(client.View, pb.ViewSnapshotRequest(key=key)) == grpc.StatusCode.ALREADY_EXISTS
    commit = pb.CommitSnapshotRequest(name=key + "-c", key=key)
    assert _code(client.Commit, commit) == grpc.StatusCode.FAILED_PRECONDITION
    list_ = lambda request: list(client.List(request))  # noqa: E731
    bad_filter = pb.ListSnapshotsRequest(filters=['labels."unterminated==1'])
    assert _code(list_, bad_filter) == grpc.StatusCode.INVALID_ARGUMENT
    mask = pb.google_dot_protobuf_dot_field__mask__pb2.FieldMask(paths=["parent"])
    update = pb.UpdateSnapshotRequest(info=pb.Info(name=key), update_mask=mask)
    assert _code(client.Update, update) == grpc.StatusCode.INVALID_ARGUMENT
    # Through containerd too: a clear error, nothing left behind.
    refused = containerd.ctr(
        "snapshots", "--snapshotter", "modelfs", "prepare", "x", "nope", check=False
    )
    assert "not found" in refused
    client.Remove(pb.RemoveSnapshotRequest(key=key))
    assert lone.process is not None and lone.process.poll() is None
    assert _run(containerd, image, "/bin/busybox", "echo", "still") == "still\n"


def test_cleanup_removes_what_the_metadata_does_not_know(lone: Snapshotter) -> None:
    client = _client(lone)
    client.Prepare(pb.PrepareSnapshotRequest(key="kept"))
    orphan = lone.root / "snapshots" / "999999"
    (orphan / "fs").mkdir(parents=True)
    client.Cleanup(pb.CleanupRequest())
    assert not orphan.exists()
    assert [path.name for path in (lone.root / "snapshots").iterdir()] == ["1"]
    assert client.Stat(pb.StatSnapshotRequest(key="kept")).info.kind == pb.ACTIVE


def test_snapshots_survive_a_snapshotter_restart(
    containerd: Containerd, snapshotter: Snapshotter, image: str
) -> None:
    before = _ls(containerd)
    snapshotter.stop()
    snapshotter.start()
    # containerd's gRPC connection to the plugin fails the calls made while it reconnects
    # (grpc-go's backoff after the socket went away; docs/containerd.md gives the figure).
    started = time.monotonic()
    while "unavailable" in (listed := containerd.ctr(*SNAPSHOTS, "ls", check=False)):
        assert time.monotonic() - started < 10, listed
        time.sleep(0.1)
    print(f"containerd reached the restarted snapshotter after {time.monotonic() - started:.2f} s")
    assert _ls(containerd) == before
    assert _run(containerd, image, "/bin/sh", "-c", "cat /etc/hello").encode() == HELLO


def test_snapshots_survive_a_containerd_restart(containerd: Containerd, image: str) -> None:
    before = _ls(containerd)
    containerd.stop()
    containerd.start()
    assert _ls(containerd) == before
    assert _run(containerd, image, "/bin/sh", "-c", "cat /etc/hello").encode() == HELLO

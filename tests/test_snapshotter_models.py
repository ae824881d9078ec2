"""ModelPack models through the modelfs snapshotter under a real containerd: a model image (an
ordinary image whose top layer is a marker naming the model) pulls without the model's bytes,
the model is mounted lazily in the marker's place, containers read it exactly; the unpacker's
path (Prepare with the remote-snapshot labels, answered AlreadyExists) as containerd drives it;
one mount per model, gone with its last snapshot; bad models get a clear error and leave
nothing behind."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from containerd_tools import (
    MODELFS,
    NAMESPACE,
    Containerd,
    Snapshotter,
    containerd_missing,
    leased_snapshots,
    push_busybox_image,
    push_model_image,
)
from mounting import mount_pid
from registry_tools import Layer, Proxy, Registry, free_port, push_artifact
from safetensors.numpy import load, save

from modelfs.modelpack import ANNOTATION_FILEPATH, OCI_INDEX
from modelfs.reference import Reference, parse_reference
from modelfs.snapshot.api import cri_pb, cri_services, pb, services
from modelfs.snapshot.models import MODEL_LABEL, SNAPSHOT_REF_LABEL, marker_layer

MISSING = containerd_missing()
pytestmark = pytest.mark.skipif(
    MISSING is not None, reason=f"CONTAINERD CANNOT RUN HERE, its tests are skipped: {MISSING}"
)
SNAPSHOTS = ("snapshots", "--snapshotter", "modelfs")
RAW = "application/vnd.cncf.model.weight.v1.raw"
CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
TAR = "application/vnd.cncf.model.weight.v1.tar"
TENSORS = 100
TENSOR_ELEMENTS = 2 * 2**20 // 4  # 2 MiB of float32 each: a 200 MiB safetensors file


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(18)
    return {
        f"layer.{index}": rng.random(TENSOR_ELEMENTS, dtype=np.float32) for index in range(TENSORS)
    }


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"model_type": "test", "hidden_size": 8}).encode(),
        "model.safetensors": save(_tensors()),
    }


@pytest.fixture(scope="module")
def model(registry: Registry, model_files: dict[str, bytes]) -> Reference:
    """The model, raw layers (modctl's default), pushed with its piece index."""
    layers = [
        Layer(CONFIG_RAW, model_files["config.json"], {ANNOTATION_FILEPATH: "config.json"}),
        Layer(RAW, model_files["model.safetensors"], {ANNOTATION_FILEPATH: "model.safetensors"}),
    ]
    repository = f"models/raw-{uuid.uuid4().hex[:8]}"
    digest = push_artifact(registry.host, repository, "v1", layers)
    return parse_reference(f"{registry.host}/{repository}@{digest}")


@pytest.fixture(scope="module")
def module_proxy(registry: Registry) -> Iterator[Proxy]:
    with Proxy(registry) as server:
        yield server


@pytest.fixture(scope="module")
def mirror_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def snapshotter(
    tmp_path_factory: pytest.TempPathFactory, module_proxy: Proxy, mirror_port: int
) -> Iterator[Snapshotter]:
    root = tmp_path_factory.mktemp("model-snapshotter")
    # No prefetch: what a pull and a read fetch is what they asked for (as test_real_model).
    options = (
        *("--plain-http-registry", module_proxy.host, "--cache-dir", str(root / "cache")),
        *("--prefetch", "none", "--mirror-addr", f"127.0.0.1:{mirror_port}"),
    )
    server = Snapshotter(root, *options)
    server.start()
    yield server
    server.stop()
    server.unmount_models()


@pytest.fixture(scope="module")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, snapshotter: Snapshotter
) -> Iterator[Containerd]:
    server = Containerd(tmp_path_factory.mktemp("model-containerd"), snapshotter)
    server.start()
    yield server
    server.stop()


def _through(proxy: Proxy, model: Reference) -> Reference:
    """The model named through the counting proxy."""
    return Reference(proxy.host, model.repository, None, model.digest)


def _weights_fetched(proxy: Proxy, data: bytes) -> int:
    return proxy.bytes_by_blob.get("sha256:" + hashlib.sha256(data).hexdigest(), 0)


def _client(snapshotter: Snapshotter) -> Any:
    return services.SnapshotsStub(grpc.insecure_channel(f"unix://{snapshotter.address}"))


def test_a_model_image_pulls_without_the_model_and_runs_reading_it_exactly(
    containerd: Containerd,
    snapshotter: Snapshotter,
    registry: Registry,
    module_proxy: Proxy,
    model: Reference,
    model_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    module_proxy.reset()
    image = push_model_image(
        registry.host, f"images/m-{uuid.uuid4().hex[:8]}", "v1", _through(module_proxy, model)
    )
    started = time.monotonic()
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "modelfs", image)
    print(f"\nctr images pull of the model image: {time.monotonic() - started:.2f} s")
    # The pull mounted the model: its manifest, config and piece index, none of its weights.
    assert _weights_fetched(module_proxy, model_files["model.safetensors"]) == 0
    assert module_proxy.blob_bytes < 64 << 10, module_proxy.blob_bytes
    [mount] = snapshotter.model_mounts()
    assert sorted(path.name for path in mount.iterdir()) == ["config.json", "model.safetensors"]

    name = f"c-{uuid.uuid4().hex[:8]}"
    run = ("run", "--snapshotter", "modelfs", "--rm", image, name)
    printed = containerd.ctr(*run, "/bin/busybox", "cat", "/config.json")
    assert printed.encode() == model_files["config.json"]
    # One tensor read through the container's overlay fetches a small part of the file.
    header = int.from_bytes(model_files["model.safetensors"][:8], "little")
    offsets = json.loads(model_files["model.safetensors"][8 : 8 + header])["layer.50"]
    start, end = (8 + header + offset for offset in offsets["data_offsets"])
    dd = "dd if=/model.safetensors bs=1M iflag=skip_bytes,count_bytes"
    read = f"{dd} skip={start} count={end - start} 2>/dev/null | md5sum"
    name = f"c-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    printed = containerd.ctr(
        "run", "--snapshotter", "modelfs", "--rm", image, name, "/bin/sh", "-c", read
    )
    print(f"ctr run reading one tensor (2 MiB, cold): {time.monotonic() - started:.2f} s")
    expected = hashlib.md5(model_files["model.safetensors"][start:end]).hexdigest()
    assert printed.split()[0] == expected
    fetched = _weights_fetched(module_proxy, model_files["model.safetensors"])
    size = len(model_files["model.safetensors"])
    print(f"one tensor of {size >> 20} MiB through a container: {fetched / size:.1%} fetched")
    assert 0 < fetched < size // 10
    # Containers share the one mount of the model.
    assert snapshotter.model_mounts() == [mount]


def test_two_running_containers_read_the_model_through_one_mount(
    containerd: Containerd,
    snapshotter: Snapshotter,
    registry: Registry,
    module_proxy: Proxy,
    model: Reference,
    model_files: dict[str, bytes],
) -> None:
    image = push_model_image(
        registry.host, f"images/two-{uuid.uuid4().hex[:8]}", "v1", _through(module_proxy, model)
    )
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "modelfs", image)
    assert model.digest is not None
    place = snapshotter.root / "models" / model.digest.removeprefix("sha256:")
    names = [f"c-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        for name in names:
            run = ("run", "-d", "--snapshotter", "modelfs", image, name)
            containerd.ctr(*run, "/bin/busybox", "sleep", "300")
        # Both containers' root filesystems stack the one model mount, at the same time.
        overlays = [
            line for line in Path("/proc/mounts").read_text().splitlines()
            if line.startswith("overlay ") and f"lowerdir={place}:" in line
        ]  # fmt: skip
        assert len(overlays) == 2, overlays
        assert snapshotter.model_mounts().count(place) == 1
        expected = hashlib.md5(model_files["model.safetensors"][-(1 << 20) :]).hexdigest()
        for name in names:
            read = "tail -c 1048576 /model.safetensors | md5sum"
            exec_ = ("task", "exec", "--exec-id", f"read-{name}", name, "/bin/sh", "-c", read)
            assert containerd.ctr(*exec_).split()[0] == expected
            config = (
                "task",
                "exec",
                "--exec-id",
                f"cat-{name}",
                name,
                "/bin/busybox",
                "cat",
                "/config.json",
            )
            assert containerd.ctr(*config).encode() == model_files["config.json"]
    finally:
        for name in names:
            containerd.ctr("task", "rm", "-f", name, check=False)
            containerd.ctr("containers", "rm", name, check=False)
    assert snapshotter.model_mounts().count(place) == 1  # the image still holds the model


@pytest.fixture
def lone(tmp_path: Path, module_proxy: Proxy) -> Iterator[Snapshotter]:
    """A snapshotter no containerd uses (whose garbage collection would remove the snapshots
    made here by hand), called as containerd's unpacker calls it."""
    (tmp_path / "lone").mkdir()
    options = ("--plain-http-registry", module_proxy.host, "--cache-dir", str(tmp_path / "cache"))
    server = Snapshotter(tmp_path / "lone", *options, "--prefetch", "none")
    server.start()
    yield server
    server.stop()
    server.unmount_models()


def _remote_prepare(client: Any, chain_id: str, model: Reference) -> grpc.StatusCode:
    """The unpacker's Prepare of a model image's marker layer: its status code."""
    labels = {SNAPSHOT_REF_LABEL: chain_id, MODEL_LABEL: str(model)}
    request = pb.PrepareSnapshotRequest(key=f"{NAMESPACE}/1/extract-1 {chain_id}", labels=labels)
    try:
        client.Prepare(request)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def _names(client: Any, *filters: str) -> list[str]:
    replies = client.List(pb.ListSnapshotsRequest(filters=list(filters)))
    return [info.name for reply in replies for info in reply.info]


@pytest.mark.parametrize("packing", ["raw", "tar"])
def test_the_unpackers_path_mounts_the_model_and_answers_already_exists(
    lone: Snapshotter,
    registry: Registry,
    module_proxy: Proxy,
    model: Reference,
    model_files: dict[str, bytes],
    packing: str,
) -> None:
    if packing == "tar":  # modctl's older packing: each file a one-member tar
        model = _push_tar_model(registry, model_files)
    client = _client(lone)
    module_proxy.reset()
    through = _through(module_proxy, model)
    assert _remote_prepare(client, "sha256:" + "1" * 64, through) == grpc.StatusCode.ALREADY_EXISTS
    # What containerd then does: find the committed layer by its label and parent, Stat it.
    found = _names(client, f'labels."{SNAPSHOT_REF_LABEL}"==sha256:{"1" * 64}')
    assert found == ["sha256:" + "1" * 64]
    info = client.Stat(pb.StatSnapshotRequest(key=found[0])).info
    assert (info.kind, info.parent) == (pb.COMMITTED, "")
    assert _weights_fetched(module_proxy, model_files["model.safetensors"]) == 0

    # A view of it is a read-only bind of the model's mount: the same tree modelfs mount shows.
    view = client.View(pb.ViewSnapshotRequest(key="view", parent=found[0])).mounts
    assert [(m.type, list(m.options)) for m in view] == [("bind", ["ro", "rbind"])]
    source = Path(view[0].source)
    assert sorted(p.name for p in source.iterdir()) == ["config.json", "model.safetensors"]
    assert (source / "config.json").read_bytes() == model_files["config.json"]
    tensors = load((source / "model.safetensors").read_bytes())
    assert all(np.array_equal(tensors[k], v) for k, v in _tensors().items())

    # A second layer of the same model (another image) shares the mount.
    assert _remote_prepare(client, "sha256:" + "2" * 64, through) == grpc.StatusCode.ALREADY_EXISTS
    assert lone.model_mounts() == [source]
    for key in ("view", "sha256:" + "1" * 64):
        client.Remove(pb.RemoveSnapshotRequest(key=key))
    assert lone.model_mounts() == [source]
    client.Remove(pb.RemoveSnapshotRequest(key="sha256:" + "2" * 64))
    assert lone.model_mounts() == []  # the last snapshot of the model took its mount along
    assert not source.exists()


def _push_tar_model(registry: Registry, files: dict[str, bytes]) -> Reference:
    layers = []
    for path, data in files.items():
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            member = tarfile.TarInfo(path)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        layers.append(Layer(TAR, out.getvalue(), {ANNOTATION_FILEPATH: path}))
    repository = f"models/tar-{uuid.uuid4().hex[:8]}"
    digest = push_artifact(registry.host, repository, "v1", layers)
    return parse_reference(f"{registry.host}/{repository}@{digest}")


def test_a_bad_model_gets_a_clear_error_and_leaves_nothing(
    lone: Snapshotter, module_proxy: Proxy, model: Reference
) -> None:
    client = _client(lone)
    unknown = Reference(module_proxy.host, "models/none", None, "sha256:" + "0" * 64)
    labels = {SNAPSHOT_REF_LABEL: "sha256:" + "3" * 64, MODEL_LABEL: str(unknown)}
    with pytest.raises(grpc.RpcError) as error:
        client.Prepare(pb.PrepareSnapshotRequest(key="extract-3", labels=labels))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"cannot mount model {unknown}" in error.value.details()
    unpinned = {**labels, MODEL_LABEL: f"{module_proxy.host}/{model.repository}:v1"}
    with pytest.raises(grpc.RpcError) as error:
        client.Prepare(pb.PrepareSnapshotRequest(key="extract-3", labels=unpinned))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not pinned by digest" in error.value.details()
    assert _names(client) == []
    assert not list((lone.root / "models").glob("*"))
    assert not list((lone.root / "snapshots").glob("*"))
    # It serves on: an ordinary layer, then the good model.
    client.Prepare(pb.PrepareSnapshotRequest(key="ordinary"))
    through = _through(module_proxy, model)
    assert _remote_prepare(client, "sha256:" + "4" * 64, through) == grpc.StatusCode.ALREADY_EXISTS


def test_a_model_mount_outlives_a_snapshotter_restart(
    lone: Snapshotter, module_proxy: Proxy, model: Reference, model_files: dict[str, bytes]
) -> None:
    client = _client(lone)
    chain_id = "sha256:" + "5" * 64
    assert _remote_prepare(client, chain_id, _through(module_proxy, model)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    [mount] = lone.model_mounts()
    with (mount / "model.safetensors").open("rb") as reader:
        head = reader.read(1 << 20)
        lone.stop()
        # A reader of the mount (a running container) goes on reading while it is down.
        reader.seek(100 << 20)
        assert reader.read(1 << 20) == model_files["model.safetensors"][100 << 20 : 101 << 20]
        lone.start()
    assert head == model_files["model.safetensors"][: 1 << 20]
    client = _client(lone)
    assert _names(client) == [chain_id] and lone.model_mounts() == [mount]
    client.Remove(pb.RemoveSnapshotRequest(key=chain_id))
    assert lone.model_mounts() == []


def test_modelfs_model_image_makes_an_image_that_is_the_model(
    containerd: Containerd,
    snapshotter: Snapshotter,
    registry: Registry,
    module_proxy: Proxy,
    model: Reference,
    model_files: dict[str, bytes],
) -> None:
    """What an image volume gets: the image of ``modelfs model-image`` is the model's tree."""
    repository = f"images/only-{uuid.uuid4().hex[:8]}"
    source = Reference(module_proxy.host, model.repository, "v1", None)
    published = subprocess.run(
        [MODELFS, "model-image", "--plain-http", str(source), f"{registry.host}/{repository}:v1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert published.startswith(f"{registry.host}/{repository}:v1@sha256:")
    module_proxy.reset()
    image = f"{registry.host}/{repository}:v1"
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "modelfs", image)
    assert _weights_fetched(module_proxy, model_files["model.safetensors"]) == 0
    # A one-layer image: its layer's chain id is the marker layer's digest.
    assert model.digest is not None
    layer = "sha256:" + hashlib.sha256(marker_layer(source.pinned(model.digest))).hexdigest()
    assert layer in containerd.ctr(*SNAPSHOTS, "ls")
    with leased_snapshots(containerd) as client:
        key = f"volume-{uuid.uuid4().hex[:8]}"
        mounts = client.View(pb.ViewSnapshotRequest(snapshotter="modelfs", key=key, parent=layer))
        [mount] = mounts.mounts
        assert (mount.type, list(mount.options)) == ("bind", ["ro", "rbind"])
        tree = Path(mount.source)
        assert sorted(path.name for path in tree.iterdir()) == sorted(model_files)
        assert all((tree / name).read_bytes() == data for name, data in model_files.items())
        containerd.ctr(*SNAPSHOTS, "rm", key)


def test_model_image_refuses_what_is_not_a_model(registry: Registry, tmp_path: Path) -> None:
    repository = f"images/busybox-{uuid.uuid4().hex[:8]}"
    image = push_busybox_image(registry.host, repository, "v1", b"hi\n")
    target = f"{registry.host}/{repository}:v1-image"
    result = subprocess.run(
        [MODELFS, "model-image", "--plain-http", image, target], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "is not a ModelPack model" in result.stderr


def _hosts_toml(directory: Path, registry: str, mirror_port: int) -> Path:
    """containerd's hosts directory: ``registry`` over HTTP, the snapshotter's mirror first."""
    (directory / registry).mkdir(parents=True)
    (directory / registry / "hosts.toml").write_text(
        f'server = "http://{registry}"\n'
        f'[host."http://127.0.0.1:{mirror_port}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    return directory


@pytest.fixture(scope="module")
def cri(
    tmp_path_factory: pytest.TempPathFactory, module_proxy: Proxy
) -> Iterator[tuple[Snapshotter, Containerd]]:
    """A snapshotter and a containerd whose CRI plugin pulls with it, as a Kubernetes node's,
    through the snapshotter's mirror (their own pair: a containerd removes the backend snapshots
    its metadata does not know)."""
    root = tmp_path_factory.mktemp("cri")
    port = free_port()
    options = ("--plain-http-registry", module_proxy.host, "--cache-dir", str(root / "cache"))
    options += ("--prefetch", "none", "--mirror-addr", f"127.0.0.1:{port}")
    snapshotter = Snapshotter(root, *options)
    snapshotter.start()
    (root / "containerd").mkdir()
    hosts = _hosts_toml(root / "certs.d", module_proxy.host, port)
    containerd = Containerd(root / "containerd", snapshotter, cri_hosts=hosts)
    containerd.start()
    yield snapshotter, containerd
    containerd.stop()
    snapshotter.stop()
    snapshotter.unmount_models()


def test_cri_pulls_a_model_image_as_kubelet_does_without_fetching_its_layer(
    cri: tuple[Snapshotter, Containerd],
    registry: Registry,
    module_proxy: Proxy,
    model: Reference,
    model_files: dict[str, bytes],
) -> None:
    repository = f"images/cri-{uuid.uuid4().hex[:8]}"
    source = Reference(module_proxy.host, model.repository, None, model.digest)
    subprocess.run(
        [MODELFS, "model-image", "--plain-http", str(source), f"{registry.host}/{repository}:v1"],
        check=True,
        capture_output=True,
    )
    module_proxy.reset()
    snapshotter, containerd = cri
    images = cri_services.ImageServiceStub(grpc.insecure_channel(f"unix://{containerd.address}"))
    started = time.monotonic()
    request = cri_pb.PullImageRequest(
        image=cri_pb.ImageSpec(image=f"{module_proxy.host}/{repository}:v1")
    )
    reply = images.PullImage(request, timeout=120)
    print(f"\nCRI PullImage of the model image: {time.monotonic() - started:.2f} s")
    assert reply.image_ref.startswith("sha256:")

    # The unpacker's Prepare carried the model label: the snapshotter answered AlreadyExists,
    # and containerd fetched neither the marker layer nor, of course, the model.
    assert model.digest is not None
    marker = marker_layer(source)
    marker_digest = "sha256:" + hashlib.sha256(marker).hexdigest()
    fetched = [r.path for r in module_proxy.requests if r.method == "GET" and "/blobs/" in r.path]
    assert not [path for path in fetched if path.endswith(marker_digest)], fetched
    assert _weights_fetched(module_proxy, model_files["model.safetensors"]) == 0
    [info] = [
        info
        for reply in _client(snapshotter).List(pb.ListSnapshotsRequest())
        for info in reply.info
        if info.name == marker_digest  # one layer: its chain id is its diff id
    ]
    assert info.kind == pb.COMMITTED
    assert info.labels[MODEL_LABEL] == str(source)
    assert "containerd.io/snapshot/cri.layer-digest" in info.labels  # CRI's own labels too
    [mount] = snapshotter.model_mounts()
    assert (mount / "config.json").read_bytes() == model_files["config.json"]


def test_cri_gets_a_clear_error_for_a_model_that_cannot_be_mounted_and_serves_on(
    cri: tuple[Snapshotter, Containerd],
    registry: Registry,
    module_proxy: Proxy,
    model: Reference,
) -> None:
    """What kubelet sees for an image naming an unknown model: containerd's PullImage fails
    with the snapshotter's one line; nothing of the model is left; the next pull works."""
    snapshotter, containerd = cri
    unknown = Reference(module_proxy.host, "models/none", None, "sha256:" + "0" * 64)
    image = push_model_image(registry.host, f"images/bad-{uuid.uuid4().hex[:8]}", "v1", unknown)
    images = cri_services.ImageServiceStub(grpc.insecure_channel(f"unix://{containerd.address}"))
    with pytest.raises(grpc.RpcError) as error:
        images.PullImage(cri_pb.PullImageRequest(image=cri_pb.ImageSpec(image=image)))
    print(f"\nCRI PullImage of an unknown model: {error.value.details()}")
    assert f"cannot mount model {unknown}: " in error.value.details()
    client = _client(snapshotter)
    infos = [info for reply in client.List(pb.ListSnapshotsRequest()) for info in reply.info]
    assert not [info for info in infos if info.labels.get(MODEL_LABEL) == str(unknown)]
    assert not [info for info in infos if info.kind == pb.ACTIVE], infos  # no extraction left
    assert not (snapshotter.root / "models" / ("0" * 64)).exists()
    good = push_model_image(
        registry.host, f"images/good-{uuid.uuid4().hex[:8]}", "v1", _through(module_proxy, model)
    )
    request = cri_pb.PullImageRequest(image=cri_pb.ImageSpec(image=good))
    try:
        reply = images.PullImage(request)
    except grpc.RpcError as raced:
        # containerd 1.6's garbage collection of the failed pull's first layer (which both
        # model images share) can remove it between the unpacker's Stat and its Prepare:
        # containerd's own race, which kubelet's retry of a pull gets past, as here.
        assert "parent snapshot" in raced.details() and "does not exist" in raced.details()
        reply = images.PullImage(request)
    assert reply.image_ref.startswith("sha256:")


def test_a_model_mount_that_died_comes_back_when_a_snapshot_needs_it(
    lone: Snapshotter, module_proxy: Proxy, model: Reference, model_files: dict[str, bytes]
) -> None:
    """After a reboot, or a killed mount process, the next View or Prepare over a model layer
    mounts the model again (the snapshot itself is in the snapshotter's metadata)."""
    client = _client(lone)
    chain_id = "sha256:" + "6" * 64
    assert _remote_prepare(client, chain_id, _through(module_proxy, model)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    [mount] = lone.model_mounts()
    os.kill(mount_pid(mount), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.listdir(mount)  # asks the mount (a stat may come from the kernel's cache)
        except OSError as error:
            assert error.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            break
        assert time.monotonic() < deadline, "the mount never died"
        time.sleep(0.05)
    view = client.View(pb.ViewSnapshotRequest(key="after-death", parent=chain_id)).mounts
    assert Path(view[0].source, "config.json").read_bytes() == model_files["config.json"]
    assert lone.model_mounts() == [mount]
    for key in ("after-death", chain_id):
        client.Remove(pb.RemoveSnapshotRequest(key=key))
    assert lone.model_mounts() == []


def _push_model(registry: Registry, files: dict[str, bytes], paths: dict[str, str]) -> Reference:
    layers = [Layer(RAW, data, {ANNOTATION_FILEPATH: paths[name]}) for name, data in files.items()]
    repository = f"models/bad-{uuid.uuid4().hex[:8]}"
    digest = push_artifact(
        registry.host, repository, "v1", layers, credentials=registry.credentials
    )
    return parse_reference(f"{registry.host}/{repository}@{digest}")


@pytest.mark.parametrize("fault", ["hostile path", "registry down", "wrong credentials"])
def test_a_model_that_cannot_be_mounted_fails_the_prepare_and_leaves_nothing(
    tmp_path: Path,
    fresh_registry: Registry,
    auth_registry: Registry,
    fault: str,
) -> None:
    files = {"config.json": b"{}"}
    if fault == "hostile path":
        registry = fresh_registry
        model = _push_model(registry, files, {"config.json": "../../etc/cron.d/evil"})
    elif fault == "registry down":
        registry = fresh_registry
        model = _push_model(registry, files, {"config.json": "config.json"})
        registry.stop()
    else:  # no credentials for this registry in the snapshotter's docker config
        registry = auth_registry
        model = _push_model(registry, files, {"config.json": "config.json"})
    (tmp_path / "s").mkdir()
    # A cache of its own: the default one may hold the same small model (same digest), which
    # would mount from it by digest without asking the registry.
    options = ("--plain-http-registry", registry.host, "--cache-dir", str(tmp_path / "cache"))
    snapshotter = Snapshotter(tmp_path / "s", *options)
    snapshotter.start()
    try:
        client = _client(snapshotter)
        with pytest.raises(grpc.RpcError) as error:
            _remote_prepare_raising(client, "sha256:" + "7" * 64, model)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"cannot mount model {model}: " in error.value.details()
        print(f"{fault}: {error.value.details()}")
        assert _names(client) == []
        assert not list((snapshotter.root / "models").glob("*"))
        assert not list((snapshotter.root / "snapshots").glob("*"))
        client.Prepare(pb.PrepareSnapshotRequest(key="it-serves-on"))
    finally:
        snapshotter.stop()
        snapshotter.unmount_models()


def _remote_prepare_raising(client: Any, chain_id: str, model: Reference) -> None:
    labels = {SNAPSHOT_REF_LABEL: chain_id, MODEL_LABEL: str(model)}
    client.Prepare(pb.PrepareSnapshotRequest(key=f"extract {chain_id}", labels=labels))


def test_metrics_count_calls_snapshots_and_models(
    tmp_path: Path, module_proxy: Proxy, model: Reference
) -> None:
    port = free_port()
    (tmp_path / "m").mkdir()
    options = ("--plain-http-registry", module_proxy.host, "--metrics-addr", f"127.0.0.1:{port}")
    snapshotter = Snapshotter(tmp_path / "m", *options, "--prefetch", "none")
    snapshotter.start()
    try:
        client = _client(snapshotter)
        client.Prepare(pb.PrepareSnapshotRequest(key="active"))
        with pytest.raises(grpc.RpcError):
            client.Stat(pb.StatSnapshotRequest(key="absent"))
        chain_id = "sha256:" + "8" * 64
        assert _remote_prepare(client, chain_id, _through(module_proxy, model)) == (
            grpc.StatusCode.ALREADY_EXISTS
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        for line in (
            'modelfs_snapshotter_requests_total{code="OK",method="Prepare"} 1.0',
            'modelfs_snapshotter_requests_total{code="ALREADY_EXISTS",method="Prepare"} 1.0',
            'modelfs_snapshotter_requests_total{code="NOT_FOUND",method="Stat"} 1.0',
            'modelfs_snapshotter_snapshots{kind="active"} 1.0',
            'modelfs_snapshotter_snapshots{kind="committed"} 1.0',
            "modelfs_snapshotter_models 1.0",
            'modelfs_snapshotter_model_layers_total{path="unpacker"} 1.0',
        ):
            assert line in text.splitlines(), text
        client.Remove(pb.RemoveSnapshotRequest(key=chain_id))
    finally:
        snapshotter.stop()
        snapshotter.unmount_models()


def test_the_mirror_lets_containerd_pull_a_model_by_its_own_reference(
    containerd: Containerd,
    snapshotter: Snapshotter,
    registry: Registry,
    module_proxy: Proxy,
    mirror_port: int,
    model: Reference,
    model_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    """With hosts.toml naming the snapshotter's mirror first, the model's own tag pulls as its
    model image (the registry untouched), and an ordinary image still pulls from the registry."""
    _hosts_toml(tmp_path / "certs.d", module_proxy.host, mirror_port)
    pull = ("images", "pull", "--hosts-dir", str(tmp_path / "certs.d"), "--snapshotter", "modelfs")
    own = Reference(module_proxy.host, model.repository, "v1", None)
    module_proxy.reset()
    containerd.ctr(*pull, str(own))
    assert _weights_fetched(module_proxy, model_files["model.safetensors"]) == 0
    assert model.digest is not None
    layer = "sha256:" + hashlib.sha256(marker_layer(own.pinned(model.digest))).hexdigest()
    with leased_snapshots(containerd) as client:
        key = f"own-{uuid.uuid4().hex[:8]}"
        mounts = client.View(pb.ViewSnapshotRequest(snapshotter="modelfs", key=key, parent=layer))
        tree = Path(mounts.mounts[0].source)
        assert all((tree / name).read_bytes() == data for name, data in model_files.items())
        containerd.ctr(*SNAPSHOTS, "rm", key)

    # Not a model: the mirror answers 404 and containerd goes to the registry.
    image = push_busybox_image(registry.host, f"images/plain-{uuid.uuid4().hex[:8]}", "v1", b"")
    containerd.ctr(*pull, image.replace(registry.host, module_proxy.host))


def test_cri_pulls_a_model_by_its_own_reference_through_the_mirror(
    cri: tuple[Snapshotter, Containerd],
    module_proxy: Proxy,
    model: Reference,
    model_files: dict[str, bytes],
) -> None:
    """What a pod's image volume naming ``registry/models/qwen:v1`` asks of containerd."""
    snapshotter, containerd = cri
    images = cri_services.ImageServiceStub(grpc.insecure_channel(f"unix://{containerd.address}"))
    own = Reference(module_proxy.host, model.repository, "v1", None)
    module_proxy.reset()
    started = time.monotonic()
    reply = images.PullImage(cri_pb.PullImageRequest(image=cri_pb.ImageSpec(image=str(own))))
    print(f"\nCRI PullImage of the model's own reference: {time.monotonic() - started:.2f} s")
    assert reply.image_ref.startswith("sha256:")
    assert _weights_fetched(module_proxy, model_files["model.safetensors"]) == 0
    assert model.digest is not None
    layer = "sha256:" + hashlib.sha256(marker_layer(own.pinned(model.digest))).hexdigest()
    names = [i.name for r in _client(snapshotter).List(pb.ListSnapshotsRequest()) for i in r.info]
    assert layer in names
    [mount] = [p for p in snapshotter.model_mounts() if p.name == model.digest[len("sha256:") :]]
    # The same lazy result as any modelfs mount: one tensor read fetches a sliver of the file.
    weights = model_files["model.safetensors"]
    header = int.from_bytes(weights[:8], "little")
    offsets = json.loads(weights[8 : 8 + header])["layer.70"]["data_offsets"]
    start, end = (8 + header + offset for offset in offsets)
    with (mount / "model.safetensors").open("rb") as reader:
        reader.seek(start)
        assert reader.read(end - start) == weights[start:end]
    fetched = _weights_fetched(module_proxy, weights)
    assert 0 < fetched < len(weights) // 10, fetched


def test_with_the_node_daemon_the_daemon_makes_and_keeps_the_model_mounts(
    tmp_path: Path, module_proxy: Proxy, model: Reference, model_files: dict[str, bytes]
) -> None:
    """As on a node with modelfsd.service: the model mount is the daemon's (its cache, its
    ``modelfs status``), and goes when the model's last snapshot does. The snapshotter's own
    --cache-dir is for the mounts it makes itself: the daemon's take the daemon's cache."""
    control = tmp_path / "run" / "control.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f'control_socket = "{control}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\nsize = "1G"\n'
        f'[registries."{module_proxy.host}"]\nplain_http = true\n'
    )
    daemon = subprocess.Popen([MODELFS, "daemon", "--config", str(config)])
    (tmp_path / "s").mkdir()
    options = ("--plain-http-registry", module_proxy.host, "--control-socket", str(control))
    own_cache = tmp_path / "snapshotter-cache"
    options += ("--cache-dir", str(own_cache))
    snapshotter = Snapshotter(tmp_path / "s", *options, "--prefetch", "none")
    try:
        deadline = time.monotonic() + 30
        while not control.exists():
            assert daemon.poll() is None and time.monotonic() < deadline, "no daemon"
            time.sleep(0.05)
        snapshotter.start()
        client = _client(snapshotter)
        chain_id = "sha256:" + "9" * 64
        assert _remote_prepare(client, chain_id, _through(module_proxy, model)) == (
            grpc.StatusCode.ALREADY_EXISTS
        )
        [mount] = snapshotter.model_mounts()
        assert (mount / "config.json").read_bytes() == model_files["config.json"]
        status = ("status", "--control-socket", str(control), "--snapshotter-root")
        status += (str(snapshotter.root),)
        listed = json.loads(
            subprocess.run([MODELFS, *status, "--json"], capture_output=True).stdout
        )
        assert [m["mountpoint"] for m in listed["mounts"]] == [str(mount)]
        assert not own_cache.exists()
        through = str(_through(module_proxy, model))
        assert listed["snapshotter"]["models"] == {through: 1}
        assert listed["snapshotter"]["kinds"] == {"committed": 1}
        text = subprocess.run([MODELFS, *status], capture_output=True, text=True).stdout
        assert f"snapshotter {snapshotter.root}: 1 committed" in text
        assert f"  model {through}: 1 snapshot" in text
        client.Remove(pb.RemoveSnapshotRequest(key=chain_id))
        assert snapshotter.model_mounts() == []
        listed = json.loads(
            subprocess.run([MODELFS, *status, "--json"], capture_output=True).stdout
        )
        assert listed["mounts"] == [] and listed["snapshotter"]["models"] == {}
    finally:
        snapshotter.stop()
        snapshotter.unmount_models()
        daemon.terminate()
        daemon.wait(timeout=60)


def test_cleanup_unmounts_a_model_no_snapshot_holds(
    lone: Snapshotter, module_proxy: Proxy, model: Reference
) -> None:
    client = _client(lone)
    chain_id = "sha256:" + "a" * 64
    assert _remote_prepare(client, chain_id, _through(module_proxy, model)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    assert len(lone.model_mounts()) == 1
    # A crash between a Remove's transaction and its unmount: the record gone, the mount not.
    lone.stop()
    with sqlite3.connect(lone.root / "metadata.db") as db:
        db.execute("DELETE FROM snapshots WHERE name = ?", (chain_id,))
    lone.start()
    assert len(lone.model_mounts()) == 1
    _client(lone).Cleanup(pb.CleanupRequest())
    assert lone.model_mounts() == []
    assert not list((lone.root / "models").iterdir())


def test_with_hosts_dir_its_model_mounts_and_its_mirror_read_through_the_node_s_mirrors(
    tmp_path: Path, registry: Registry, module_proxy: Proxy
) -> None:
    """--hosts-dir: containerd's hosts.toml names the snapshotter's own mirror, then a
    pull-through mirror (a recording proxy here), the registry last. The snapshotter's mirror
    resolves a model's tag for containerd through that mirror (passing over itself: it answers
    modelfs 404), and the model mount it makes reads the model from that mirror."""
    data = os.urandom(64 << 10)  # its own digest: no cache anywhere holds it
    repository = f"models/hosts-{uuid.uuid4().hex[:8]}"
    digest = push_artifact(
        registry.host, repository, "v1", [Layer(RAW, data, {ANNOTATION_FILEPATH: "w.bin"})]
    )
    port = free_port()
    with Proxy(registry) as mirror:
        hosts = _hosts_toml(tmp_path / "certs.d", module_proxy.host, port)
        with (hosts / module_proxy.host / "hosts.toml").open("a") as toml:
            toml.write(f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n')
        (tmp_path / "s").mkdir()
        options = ("--plain-http-registry", module_proxy.host, "--cache-dir", str(tmp_path / "c"))
        options += ("--mirror-addr", f"127.0.0.1:{port}", "--hosts-dir", str(hosts))
        snapshotter = Snapshotter(tmp_path / "s", *options)
        snapshotter.start()
        try:
            module_proxy.reset()
            tag = f"/v2/{repository}/manifests/v1"
            asked = urllib.request.Request(
                f"http://127.0.0.1:{port}{tag}?ns={module_proxy.host}",
                headers={"User-Agent": "containerd/v1.6.20"},
            )
            with urllib.request.urlopen(asked, timeout=30) as answer:
                assert json.loads(answer.read())["mediaType"] == OCI_INDEX
            assert [r.path for r in mirror.requests].count(tag) == 1
            assert [r.path for r in module_proxy.requests].count(tag) == 0

            model = Reference(module_proxy.host, repository, None, digest)
            chain_id = "sha256:" + "b" * 64
            client = _client(snapshotter)
            assert _remote_prepare(client, chain_id, model) == grpc.StatusCode.ALREADY_EXISTS
            [mount] = snapshotter.model_mounts()
            assert (mount / "w.bin").read_bytes() == data
            assert _weights_fetched(mirror, data) == len(data)
            assert module_proxy.blob_bytes == 0
            client.Remove(pb.RemoveSnapshotRequest(key=chain_id))
            assert snapshotter.model_mounts() == []
        finally:
            snapshotter.stop()
            snapshotter.unmount_models()

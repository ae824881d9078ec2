"""The credentials kubelet gives a pull, for the model it mounts: the snapshotter's CRI image
proxy (kubelet's ``--image-service-endpoint``) in front of a real containerd's CRI, a model in a
registry behind htpasswd, and a node with no login of its own."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import trio
from containerd_tools import MODELFS, Containerd, Snapshotter, containerd_missing
from mounting import mount_pid
from registry_tools import Layer, Registry, free_port, push_artifact
from safetensors.numpy import save

from modelfs.modelpack import ANNOTATION_FILEPATH
from modelfs.reference import Reference
from modelfs.snapshot.api import cri_pb, cri_services, pb, services
from modelfs.snapshot.cri import IMAGE_REF_LABEL
from modelfs.snapshot.models import MODEL_LABEL, SNAPSHOT_REF_LABEL
from modelfs.sources.registry import RegistryClient

MISSING = containerd_missing()
pytestmark = pytest.mark.skipif(
    MISSING is not None, reason=f"CONTAINERD CANNOT RUN HERE, its tests are skipped: {MISSING}"
)
RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHTS = {"w": np.random.default_rng(18).random(3 << 18, dtype=np.float32)}  # 3 MiB
FILES = {"config.json": b'{"model_type": "test"}', "model.safetensors": save(WEIGHTS)}


@pytest.fixture
def private_model(auth_registry: Registry) -> Reference:
    """A model only the registry's user may read (tag v1), in no cache yet: its own digest
    (the cache serves by digest)."""
    repository = f"models/private-{uuid.uuid4().hex[:8]}"
    files = {**FILES, "README.md": repository.encode()}
    layers = [Layer(RAW, data, {ANNOTATION_FILEPATH: name}) for name, data in files.items()]
    push_artifact(
        auth_registry.host, repository, "v1", layers, credentials=auth_registry.credentials
    )
    return Reference(auth_registry.host, repository, "v1", None)


@dataclass
class Node:
    snapshotter: Snapshotter
    containerd: Containerd
    control: Path | None  # the node daemon's control socket, if it runs


def _start_daemon(root: Path, registry: str) -> tuple[subprocess.Popen[bytes], Path]:
    """modelfsd with no registry credentials, as on a node with no login."""
    control = root / "run" / "control.sock"
    config = root / "daemon.toml"
    config.write_text(
        f'control_socket = "{control}"\n'
        f'[cache]\ndir = "{root / "daemon-cache"}"\nsize = "1G"\n'
        f'[registries."{registry}"]\nplain_http = true\n'
    )
    daemon = subprocess.Popen([MODELFS, "daemon", "--config", str(config)])
    deadline = time.monotonic() + 30
    while not control.exists():
        assert daemon.poll() is None and time.monotonic() < deadline, "no daemon"
        time.sleep(0.05)
    return daemon, control


@pytest.fixture(scope="module", params=["alone", "with modelfsd"])
def node(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    auth_registry: Registry,
) -> Iterator[Node]:
    """As a Kubernetes node: containerd's CRI pulls with the snapshotter, through its mirror,
    and kubelet talks to the snapshotter's CRI image proxy; with the node daemon or not. The
    node has no registry login."""
    root = tmp_path_factory.mktemp("cri-proxy")
    port = free_port()
    (root / "containerd").mkdir()
    daemon, control = None, None
    if request.param == "with modelfsd":
        daemon, control = _start_daemon(root, auth_registry.host)
    options: tuple[str, ...] = ("--plain-http-registry", auth_registry.host)
    options += ("--cache-dir", str(root / "cache"))
    if control is not None:
        options += ("--control-socket", str(control))
    options += ("--prefetch", "none", "--mirror-addr", f"127.0.0.1:{port}")
    options += ("--cri-image-proxy", str(root / "cri.sock"))
    options += ("--cri-endpoint", str(root / "containerd" / "containerd.sock"))
    options += ("--metrics-addr", f"127.0.0.1:{free_port()}")
    snapshotter = Snapshotter(root, *options)
    snapshotter.start()
    hosts = root / "certs.d"
    (hosts / auth_registry.host).mkdir(parents=True)
    (hosts / auth_registry.host / "hosts.toml").write_text(
        f'server = "http://{auth_registry.host}"\n'
        f'[host."http://127.0.0.1:{port}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    containerd = Containerd(root / "containerd", snapshotter, cri_hosts=hosts)
    assert containerd.address == root / "containerd" / "containerd.sock"
    containerd.start()
    yield Node(snapshotter, containerd, control)
    containerd.stop()
    snapshotter.stop()
    snapshotter.unmount_models()
    if daemon is not None:
        daemon.terminate()
        daemon.wait(timeout=60)


def _pull(kubelet: Any, image: str, auth: Any = None) -> str:
    request = cri_pb.PullImageRequest(image=cri_pb.ImageSpec(image=image), auth=auth)
    reply = kubelet.PullImage(request, timeout=120)
    image_ref: str = reply.image_ref
    return image_ref


def _snapshots(snapshotter: Snapshotter) -> list[str]:
    client = services.SnapshotsStub(grpc.insecure_channel(f"unix://{snapshotter.address}"))
    return [info.name for reply in client.List(pb.ListSnapshotsRequest()) for info in reply.info]


def _holding(directory: Path, secret: bytes) -> list[Path]:
    """The files under ``directory`` (mounts left out) that hold ``secret``."""
    found = []
    for parent, names, files in os.walk(directory):
        names[:] = [name for name in names if not Path(parent, name).is_mount()]
        for name in files:
            path = Path(parent, name)
            if path.is_file() and secret in path.read_bytes():
                found.append(path)
    return found


def test_a_model_pulled_through_the_cri_proxy_mounts_with_kubelets_credentials(
    node: Node, auth_registry: Registry, private_model: Reference
) -> None:
    snapshotter = node.snapshotter
    proxy = snapshotter.root.parent / "cri.sock"
    assert proxy.stat().st_mode & 0o777 == 0o600
    kubelet = cri_services.ImageServiceStub(grpc.insecure_channel(f"unix://{proxy}"))
    image = str(private_model)
    assert auth_registry.username is not None and auth_registry.password is not None

    # The node has no login: without credentials, and with wrong ones, the pull is refused,
    # with containerd's error passed on as it came, and leaves no snapshot nor mount.
    wrong = cri_pb.AuthConfig(username=auth_registry.username, password="not-the-password")
    for auth in (None, wrong):
        with pytest.raises(grpc.RpcError) as error:
            _pull(kubelet, image, auth)
        print(f"\npull with {'wrong' if auth else 'no'} credentials: {error.value.details()}")
        assert error.value.code() == grpc.StatusCode.UNKNOWN
        assert image in error.value.details() and "401 Unauthorized" in error.value.details()
        assert _snapshots(snapshotter) == [] and snapshotter.model_mounts() == []

    # With kubelet's credentials (a pod's imagePullSecret): pulled by the model's own reference
    # (through the mirror, which looked the tag up with them), the model mounted with them.
    right = cri_pb.AuthConfig(username=auth_registry.username, password=auth_registry.password)
    started = time.monotonic()
    image_ref = _pull(kubelet, image, right)
    print(f"CRI PullImage through the proxy: {time.monotonic() - started:.2f} s")
    assert image_ref.startswith("sha256:")
    [mount] = snapshotter.model_mounts()
    assert sorted(path.name for path in mount.iterdir()) == sorted([*FILES, "README.md"])
    assert all((mount / name).read_bytes() == data for name, data in FILES.items())
    # Every other call of the image service is containerd's, answered through the proxy.
    listed = kubelet.ListImages(cri_pb.ListImagesRequest()).images
    assert [image_ref] == [found.id for found in listed if image in found.repo_tags]

    # The credentials are in no file, log, command line or environment.
    secret = auth_registry.password.encode()
    pid = mount_pid(mount)
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert secret not in Path(f"/proc/{pid}/environ").read_bytes()
    assert _holding(snapshotter.root.parent, secret) == []
    if node.control is not None:  # the daemon is not handed them: the mount is not the daemon's
        status = [MODELFS, "status", "--control-socket", str(node.control), "--json"]
        listed = json.loads(subprocess.run(status, capture_output=True, check=True).stdout)
        assert listed["mounts"] == []

    # Removing the image (kubelet's image garbage collection) removes its snapshots, and the
    # model's mount with the last of them.
    kubelet.RemoveImage(cri_pb.RemoveImageRequest(image=cri_pb.ImageSpec(image=image_ref)))
    deadline = time.monotonic() + 20
    while snapshotter.model_mounts() or _snapshots(snapshotter):
        assert time.monotonic() < deadline, (_snapshots(snapshotter), snapshotter.model_mounts())
        time.sleep(0.1)
    assert not mount.exists()

    # Its metrics count kubelet's calls as containerd answered them, and the credentials kept.
    address = snapshotter.options[snapshotter.options.index("--metrics-addr") + 1]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    for line in (
        'modelfs_snapshotter_cri_requests_total{code="UNKNOWN",method="PullImage"} 2.0',
        'modelfs_snapshotter_cri_requests_total{code="OK",method="PullImage"} 1.0',
        'modelfs_snapshotter_cri_requests_total{code="OK",method="ListImages"} 1.0',
        'modelfs_snapshotter_cri_requests_total{code="OK",method="RemoveImage"} 1.0',
        "modelfs_snapshotter_cri_credentials_kept_total 2.0",  # the wrong ones, the right ones
    ):
        assert line in lines, lines


def test_wrong_credentials_from_a_pull_fail_the_model_mount_clearly_and_leave_nothing(
    node: Node, auth_registry: Registry, private_model: Reference
) -> None:
    """Credentials kubelet gave that the registry refuses, used for a model mount (as when
    containerd itself pulled with other credentials): the Prepare fails with one line saying
    whose credentials were refused, nothing is left, and the snapshotter serves on. (A model
    in the node's cache would mount: its pieces, checked by digest, are not asked again.)"""
    snapshotter = node.snapshotter
    kubelet = cri_services.ImageServiceStub(
        grpc.insecure_channel(f"unix://{snapshotter.root.parent / 'cri.sock'}")
    )
    image = str(private_model)
    wrong = cri_pb.AuthConfig(username="someone", password="not-the-password")
    with pytest.raises(grpc.RpcError):
        _pull(kubelet, image, wrong)  # refused by containerd; the proxy kept them on the way
    client = services.SnapshotsStub(grpc.insecure_channel(f"unix://{snapshotter.address}"))
    model = _pinned(auth_registry, private_model)
    chain_id = "sha256:" + "c" * 64
    labels = {SNAPSHOT_REF_LABEL: chain_id, MODEL_LABEL: str(model), IMAGE_REF_LABEL: image}
    with pytest.raises(grpc.RpcError) as error:
        client.Prepare(pb.PrepareSnapshotRequest(key=f"extract {chain_id}", labels=labels))
    print(f"\n{error.value.details()}")
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"cannot mount model {model} with the credentials of the image's pull: " in (
        error.value.details()
    )
    assert "rejected the credentials" in error.value.details()
    assert _snapshots(snapshotter) == [] and snapshotter.model_mounts() == []
    assert not list((snapshotter.root / "models").iterdir())
    client.Prepare(pb.PrepareSnapshotRequest(key="it-serves-on"))
    client.Remove(pb.RemoveSnapshotRequest(key="it-serves-on"))


def _pinned(registry: Registry, model: Reference) -> Reference:
    """``model`` pinned by its manifest's digest, asked with the registry's own credentials."""

    async def digest() -> str:
        async with RegistryClient(
            registry.host, plain_http=True, credentials=registry.credentials
        ) as client:
            fetched = await client.repository(model.repository).get_manifest(model.selector)
            return fetched.digest

    return model.pinned(trio.run(digest))

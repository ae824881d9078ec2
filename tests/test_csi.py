"""``modelfs csi``, the CSI node plugin, called as kubelet calls it: a gRPC client on the plugin's
unix socket, a real node daemon making the model mounts with real FUSE, a real registry behind a
counting proxy. Publish reads lazily and exactly; a second pod's volume of the model shares its
one mount; the last unpublish unmounts it; repeated calls succeed; every error a pod's events
can show is one line with the CSI spec's status; a plugin killed with volumes published leaves
their reads going, and the plugin started again knows them."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from mounting import MODELFS, is_mounted, mount_pid
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.csi import DEFAULT_DRIVER
from modelfs.csi.api import pb, services
from modelfs.csi.volumes import PREFETCH, REFERENCE
from modelfs.modelpack import ANNOTATION_FILEPATH

RAW = "application/vnd.cncf.model.weight.v1.raw"
TAR = "application/vnd.cncf.model.weight.v1.tar"
WEIGHTS_SIZE = 48 << 20  # 12 pieces of 4 MiB
NODE_ID = "node-a"


def _push(registry: Registry, files: dict[str, bytes], repository: str = "") -> str:
    """Push ``files`` as raw layers; the model's reference by tag."""
    repository = repository or f"models/csi-{uuid.uuid4().hex[:8]}"
    layers = [Layer(RAW, data, {ANNOTATION_FILEPATH: name}) for name, data in files.items()]
    push_artifact(registry.host, repository, "v1", layers, credentials=registry.credentials)
    return f"{registry.host}/{repository}:v1"


def _wait_for(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    """Until ``process`` accepts connections on ``path`` (a socket left by a killed one is
    there, and refuses them)."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"the {what} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"the {what} never listened on {path}"
        with socket.socket(socket.AF_UNIX) as client:
            try:
                client.connect(str(path))
                return
            except OSError:
                time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)


@dataclass
class Node:
    """A node as the DaemonSet makes it: the modelfs daemon (its control socket) and the CSI
    plugin beside it."""

    root: Path
    control: Path
    plain_http: list[str]
    plugin: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> Path:
        return self.root / "plugin" / "csi.sock"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def start_plugin(self, *options: str, env: dict[str, str] | None = None) -> None:
        hosts = [option for host in self.plain_http for option in ("--plain-http-registry", host)]
        self.plugin = subprocess.Popen(
            [
                *MODELFS,
                "csi",
                "--endpoint",
                str(self.endpoint),
                "--node-id",
                NODE_ID,
                "--state-dir",
                str(self.state),
                "--control-socket",
                str(self.control),
                *hosts,
                *options,
            ],
            env=env,
        )
        _wait_for(self.endpoint, self.plugin, "plugin")

    def stop_plugin(self) -> None:
        assert self.plugin is not None
        _stop(self.plugin)

    def model_mounts(self) -> list[Path]:
        models = self.state / "models"
        return sorted(path for path in models.glob("*") if is_mounted(path))

    def daemon_mounts(self) -> list[str]:
        result = subprocess.run(
            [*MODELFS, "status", "--json", "--control-socket", str(self.control)],
            capture_output=True,
            text=True,
            check=True,
        )
        return [mount["mountpoint"] for mount in json.loads(result.stdout)["mounts"]]


@pytest.fixture(scope="module")
def weights() -> bytes:
    return np.random.default_rng(19).integers(0, 256, WEIGHTS_SIZE, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def model(registry: Registry, weights: bytes) -> str:
    return _push(registry, {"config.json": b'{"layers": 2}', "weights.raw": weights})


@pytest.fixture(scope="module")
def counting(registry: Registry) -> Iterator[Proxy]:
    with Proxy(registry) as server:
        yield server


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, counting: Proxy, auth_registry: Registry
) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("csi-node")
    node = Node(root, root / "run" / "control.sock", [counting.host, auth_registry.host])
    config = root / "config.toml"
    config.write_text(f'control_socket = "{node.control}"\n[cache]\ndir = "{root / "cache"}"\n')
    daemon = subprocess.Popen([*MODELFS, "daemon", "--config", str(config)])
    try:
        _wait_for(node.control, daemon, "daemon")
        node.start_plugin()
        yield node
    finally:
        if node.plugin is not None:
            node.stop_plugin()
        _stop(daemon)
        for path in (root / "state" / "models").glob("*"):
            assert not is_mounted(path), f"{path} left mounted"


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[Path]:
    """The pods' directories; binds a failed test left there are detached after it."""
    yield tmp_path / "kubelet"
    with open("/proc/self/mountinfo") as mounts:
        left = [line.split()[4] for line in mounts if f"{tmp_path}/kubelet/" in line]
    for target in left:
        subprocess.run(["umount", "-l", target], check=False)


@pytest.fixture
def channel(node: Node) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix://{node.endpoint}") as channel:
        yield channel


def _through(proxy: Proxy, reference: str) -> str:
    return proxy.host + reference[reference.index("/") :]


class Pod:
    """One pod's inline volume, published and unpublished as kubelet does it."""

    def __init__(self, kubelet: Path, attributes: dict[str, str], **request: Any) -> None:
        self.uid = str(uuid.uuid4())
        self.volume_id = "csi-" + uuid.uuid4().hex  # kubelet names ephemeral volumes so
        volume_dir = kubelet / "pods" / self.uid / "volumes" / "kubernetes.io~csi" / "model"
        volume_dir.mkdir(parents=True)  # kubelet makes the parent; the plugin the target
        self.target = volume_dir / "mount"
        self.attributes = attributes
        self.request = request

    def publish_request(self, **changes: Any) -> Any:
        context = {
            **self.attributes,
            "csi.storage.k8s.io/pod.name": "inference-0",
            "csi.storage.k8s.io/pod.namespace": "default",
            "csi.storage.k8s.io/pod.uid": self.uid,
            "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "true",
        }
        capability = pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(),
            access_mode=pb.VolumeCapability.AccessMode(
                mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        fields = {
            "volume_id": self.volume_id,
            "target_path": str(self.target),
            "volume_capability": capability,
            "readonly": False,  # an inline volume's default: the plugin publishes it ro anyway
            "volume_context": context,
            **self.request,
            **changes,
        }
        return pb.NodePublishVolumeRequest(**fields)

    def publish(self, channel: grpc.Channel, **changes: Any) -> None:
        services.NodeStub(channel).NodePublishVolume(self.publish_request(**changes), timeout=120)

    def unpublish(self, channel: grpc.Channel) -> None:
        request = pb.NodeUnpublishVolumeRequest(
            volume_id=self.volume_id, target_path=str(self.target)
        )
        services.NodeStub(channel).NodeUnpublishVolume(request, timeout=120)


def _refusal(pod: Pod, channel: grpc.Channel, **changes: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        pod.publish(channel, **changes)
    error = caught.value
    print(f"{error.code().name}: {error.details()}")
    assert "\n" not in error.details()
    return error


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_identity_and_node_info_as_kubelet_and_the_registrar_ask(
    channel: grpc.Channel,
) -> None:
    identity = services.IdentityStub(channel)
    info = identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == DEFAULT_DRIVER and info.vendor_version
    assert (
        list(identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities) == []
    )
    probe = identity.Probe(pb.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value
    node = services.NodeStub(channel)
    assert node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == NODE_ID
    assert list(node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities) == []


def test_two_pods_share_one_lazy_mount_read_exact_bytes_and_the_last_unpublish_unmounts_it(
    kubelet: Path,
    node: Node,
    channel: grpc.Channel,
    counting: Proxy,
    model: str,
    weights: bytes,
) -> None:
    reference = _through(counting, model)
    first = Pod(kubelet, {REFERENCE: reference, PREFETCH: "none"})
    counting.reset()
    started = time.monotonic()
    first.publish(channel)
    print(f"first pod's publish (the model mounted): {time.monotonic() - started:.2f} s")
    assert sorted(os.listdir(first.target)) == ["config.json", "weights.raw"]
    assert (first.target / "config.json").read_bytes() == b'{"layers": 2}'
    start = 29 << 20
    with (first.target / "weights.raw").open("rb") as reader:
        reader.seek(start)
        assert reader.read(1 << 20) == weights[start : start + (1 << 20)]
    fetched = counting.bytes_by_blob.get(_digest_of(weights), 0)
    print(f"read 1 MiB of {WEIGHTS_SIZE >> 20} MiB: {fetched} bytes of the file fetched")
    assert 0 < fetched <= WEIGHTS_SIZE // 4, fetched
    with pytest.raises(OSError) as refused:
        (first.target / "new").write_bytes(b"x")
    assert refused.value.errno == errno.EROFS
    [mount] = node.model_mounts()
    assert node.daemon_mounts() == [str(mount)]

    # A repeated publish is idempotent; the same target for another model is not.
    first.publish(channel)
    other = _through(counting, model).replace(":v1", ":v2")
    context = {**first.publish_request().volume_context, REFERENCE: other}
    error = _refusal(first, channel, volume_context=context)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS

    second = Pod(kubelet, {REFERENCE: reference})
    started = time.monotonic()
    second.publish(channel)
    print(f"second pod's publish (the mount shared): {time.monotonic() - started:.2f} s")
    assert node.model_mounts() == [mount]
    assert (second.target / "weights.raw").read_bytes()[-4096:] == weights[-4096:]

    first.unpublish(channel)
    assert not first.target.exists()
    assert node.model_mounts() == [mount]
    assert (second.target / "config.json").read_bytes() == b'{"layers": 2}'
    second.unpublish(channel)
    assert not second.target.exists()
    assert node.model_mounts() == [] and node.daemon_mounts() == []
    assert not list((node.state / "volumes").glob("*"))
    # Unpublishing what is no longer (or never was) published succeeds.
    second.unpublish(channel)
    Pod(kubelet, {}).unpublish(channel)


def test_a_pinned_reference_and_the_tag_of_the_same_model_share_its_mount(
    kubelet: Path, node: Node, channel: grpc.Channel, counting: Proxy, model: str
) -> None:
    by_tag = Pod(kubelet, {REFERENCE: _through(counting, model)})
    by_tag.publish(channel)
    [mount] = node.model_mounts()
    pinned = f"{_through(counting, model)}@sha256:{mount.name}".replace(":v1@", "@")
    by_digest = Pod(kubelet, {REFERENCE: pinned, PREFETCH: "all"})
    by_digest.publish(channel)
    assert node.model_mounts() == [mount]
    by_tag.unpublish(channel)
    by_digest.unpublish(channel)
    assert node.model_mounts() == []


def test_the_plugin_killed_and_started_again_leaves_published_volumes_readable(
    kubelet: Path,
    node: Node,
    channel: grpc.Channel,
    counting: Proxy,
    model: str,
    weights: bytes,
) -> None:
    pod = Pod(kubelet, {REFERENCE: _through(counting, model), PREFETCH: "none"})
    pod.publish(channel)
    assert node.plugin is not None
    node.plugin.send_signal(signal.SIGKILL)
    node.plugin.wait(timeout=30)
    start = 7 << 20
    with (pod.target / "weights.raw").open("rb") as reader:
        reader.seek(start)
        assert reader.read(65536) == weights[start : start + 65536]
    node.start_plugin()
    with grpc.insecure_channel(f"unix://{node.endpoint}") as again:
        pod.publish(again)  # it knows the volume: idempotent
        assert (pod.target / "config.json").read_bytes() == b'{"layers": 2}'
        pod.unpublish(again)
    assert not pod.target.exists() and node.model_mounts() == []


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("no reference", grpc.StatusCode.INVALID_ARGUMENT),
        ("bad reference", grpc.StatusCode.INVALID_ARGUMENT),
        ("bad prefetch", grpc.StatusCode.INVALID_ARGUMENT),
        ("attribute modelfs cannot honour", grpc.StatusCode.INVALID_ARGUMENT),
        ("block volume", grpc.StatusCode.FAILED_PRECONDITION),
        ("a secret without credentials", grpc.StatusCode.INVALID_ARGUMENT),
        ("a secret's malformed docker config", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown tag", grpc.StatusCode.NOT_FOUND),
        ("unknown repository", grpc.StatusCode.NOT_FOUND),
        ("hostile path in the manifest", grpc.StatusCode.INVALID_ARGUMENT),
        ("hostile path in a tar layer", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_a_volume_that_cannot_be_published_is_one_line_with_the_spec_s_status(
    kubelet: Path,
    node: Node,
    channel: grpc.Channel,
    counting: Proxy,
    registry: Registry,
    model: str,
    case: str,
    code: grpc.StatusCode,
) -> None:
    attributes = {REFERENCE: _through(counting, model)}
    changes: dict[str, Any] = {}
    if case == "no reference":
        attributes = {}
    elif case == "bad reference":
        attributes[REFERENCE] = "Registry.example.com/Models/UPPER:v1"
    elif case == "bad prefetch":
        attributes[PREFETCH] = "eager"
    elif case == "attribute modelfs cannot honour":
        attributes[DEFAULT_DRIVER + "/exclude-model-weights"] = "true"
    elif case == "block volume":
        changes["volume_capability"] = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume())
    elif case == "a secret without credentials":
        changes["secrets"] = {"token": "abc"}
    elif case == "a secret's malformed docker config":
        malformed = {"auths": {counting.host: {"auth": "!!"}}}
        changes["secrets"] = {".dockerconfigjson": json.dumps(malformed)}
    elif case == "unknown tag":
        attributes[REFERENCE] = attributes[REFERENCE].replace(":v1", ":no-such-tag")
    elif case == "unknown repository":
        attributes[REFERENCE] = f"{counting.host}/models/none-{uuid.uuid4().hex[:8]}:v1"
    elif case == "hostile path in the manifest":
        hostile = _push(registry, {"../../etc/cron.d/evil": b"* * * * * root sh\n"})
        attributes[REFERENCE] = _through(counting, hostile)
    else:
        repository = f"models/csi-tar-{uuid.uuid4().hex[:8]}"
        layer = Layer(TAR, _tar({"../../evil": b"x"}), {ANNOTATION_FILEPATH: "weights"})
        push_artifact(registry.host, repository, "v1", [layer])
        attributes[REFERENCE] = f"{counting.host}/{repository}:v1"
    pod = Pod(kubelet, attributes)
    error = _refusal(pod, channel, **changes)
    assert error.code() == code
    assert not pod.target.exists()
    assert node.model_mounts() == [] and node.daemon_mounts() == []
    assert not list((node.state / "volumes").glob("*"))
    assert not list((node.state / "models").glob("*"))


def test_a_registry_that_is_down_is_unavailable(
    kubelet: Path, tmp_path: Path, fresh_registry: Registry, node: Node
) -> None:
    reference = _push(fresh_registry, {"config.json": b"{}"})
    fresh_registry.stop()
    plugin = Node(tmp_path / "node", node.control, [fresh_registry.host])
    plugin.start_plugin()
    try:
        with grpc.insecure_channel(f"unix://{plugin.endpoint}") as channel:
            pod = Pod(kubelet, {REFERENCE: reference})
            assert _refusal(pod, channel).code() == grpc.StatusCode.UNAVAILABLE
            assert not pod.target.exists()
    finally:
        plugin.stop_plugin()


def test_no_node_daemon_is_unavailable_and_probe_says_not_ready(
    kubelet: Path, tmp_path: Path, counting: Proxy, model: str
) -> None:
    plugin = Node(tmp_path / "node", tmp_path / "no-daemon.sock", [counting.host])
    plugin.start_plugin()
    try:
        with grpc.insecure_channel(f"unix://{plugin.endpoint}") as channel:
            assert not services.IdentityStub(channel).Probe(pb.ProbeRequest()).ready.value
            pod = Pod(kubelet, {REFERENCE: _through(counting, model)})
            error = _refusal(pod, channel)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot reach the modelfs daemon" in error.details()
            assert not pod.target.exists()
    finally:
        plugin.stop_plugin()


def _dockerconfigjson(host: str, username: str, password: str) -> str:
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}})


@pytest.mark.parametrize("secret", ["dockerconfigjson", "username and password"])
def test_credentials_from_the_volume_s_secret(
    kubelet: Path,
    node: Node,
    channel: grpc.Channel,
    auth_registry: Registry,
    secret: str,
) -> None:
    assert auth_registry.username is not None and auth_registry.password is not None
    data = b"secret weights " * 1000
    reference = _push(auth_registry, {"model.bin": data})
    # The node has no login for this registry: without the pod's secret it may not pull.
    pod = Pod(kubelet, {REFERENCE: reference})
    assert _refusal(pod, channel).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = {"username": auth_registry.username, "password": "not-the-password"}
    assert _refusal(pod, channel, secrets=wrong).code() == grpc.StatusCode.UNAUTHENTICATED
    assert not pod.target.exists() and node.model_mounts() == []
    if secret == "dockerconfigjson":
        host, user, password = auth_registry.host, auth_registry.username, auth_registry.password
        secrets = {".dockerconfigjson": _dockerconfigjson(host, user, password)}
    else:
        secrets = {"username": auth_registry.username, "password": auth_registry.password}
    pod.publish(channel, secrets=secrets)
    try:
        assert (pod.target / "model.bin").read_bytes() == data
        # The password reached the mount process over a pipe: no file, argv or environment.
        [mount] = node.model_mounts()
        process = Path("/proc") / str(mount_pid(mount))
        password = auth_registry.password.encode()
        for place in [process / "cmdline", process / "environ"]:
            assert password not in place.read_bytes(), place
        for directory in (node.root, node.control.parent):
            for path in directory.rglob("*"):
                if path.is_file() and not path.is_relative_to(node.state / "models"):
                    assert password not in path.read_bytes(), path
        # Another pod without the secret gets no volume, though the model is mounted here.
        stranger = Pod(kubelet, {REFERENCE: reference})
        assert _refusal(stranger, channel).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        pod.unpublish(channel)
    assert node.model_mounts() == []


def _mirrored(hosts_dir: Path, registry: str, mirror: Proxy) -> None:
    """containerd's hosts.toml for ``registry``: ``mirror`` first, the registry last."""
    (hosts_dir / registry).mkdir(parents=True)
    (hosts_dir / registry / "hosts.toml").write_text(
        f'server = "http://{registry}"\n'
        f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )


def _tag_requests(proxy: Proxy, reference: str) -> list[Any]:
    repository = reference.split("/", 1)[1].rsplit(":", 1)[0]
    return [r for r in proxy.requests if r.path == f"/v2/{repository}/manifests/v1"]


def test_a_publish_resolves_through_the_mirrors_hosts_toml_names_the_pod_s_secret_not(
    kubelet: Path,
    tmp_path: Path,
    node: Node,
    counting: Proxy,
    model: str,
    registry: Registry,
    auth_registry: Registry,
) -> None:
    """With --hosts-dir, a pod's tag is resolved by the mirror that may resolve (a recording
    proxy here), not the registry; the pod's secret goes to the registry only: the mirror of a
    registry that wants it answers 401 to the node, and the registry is asked next."""
    assert auth_registry.username is not None and auth_registry.password is not None
    hosts = tmp_path / "certs.d"
    with Proxy(registry) as mirror, Proxy(auth_registry) as auth_mirror:
        _mirrored(hosts, counting.host, mirror)
        _mirrored(hosts, auth_registry.host, auth_mirror)
        plugin = Node(tmp_path / "node", node.control, [counting.host, auth_registry.host])
        plugin.start_plugin("--hosts-dir", str(hosts))
        try:
            with grpc.insecure_channel(f"unix://{plugin.endpoint}") as channel:
                reference = _through(counting, model)
                counting.reset()
                pod = Pod(kubelet, {REFERENCE: reference})
                pod.publish(channel)
                try:
                    assert (pod.target / "config.json").read_bytes() == b'{"layers": 2}'
                    assert len(_tag_requests(mirror, reference)) == 1
                    assert _tag_requests(counting, reference) == []
                finally:
                    pod.unpublish(channel)

                data = b"mirrored secret weights " * 1000
                reference = _push(auth_registry, {"model.bin": data})
                secrets = {"username": auth_registry.username, "password": auth_registry.password}
                pod = Pod(kubelet, {REFERENCE: reference})
                pod.publish(channel, secrets=secrets)
                try:
                    assert (pod.target / "model.bin").read_bytes() == data
                    assert len(_tag_requests(auth_mirror, reference)) == 1
                    assert not any(request.had_authorization for request in auth_mirror.requests)
                finally:
                    pod.unpublish(channel)
        finally:
            plugin.stop_plugin()
    assert plugin.model_mounts() == []


def test_pods_published_at_once_share_one_mount_and_a_wrong_volume_id_is_not_found(
    kubelet: Path, node: Node, channel: grpc.Channel, counting: Proxy, model: str
) -> None:
    pods = [Pod(kubelet, {REFERENCE: _through(counting, model)}) for _ in range(4)]
    with ThreadPoolExecutor(len(pods)) as pool:
        list(pool.map(lambda pod: pod.publish(channel), pods))
    [mount] = node.model_mounts()
    assert node.daemon_mounts() == [str(mount)]
    for pod in pods:
        assert (pod.target / "config.json").read_bytes() == b'{"layers": 2}'
    stranger = pb.NodeUnpublishVolumeRequest(
        volume_id="csi-not-this-one", target_path=str(pods[0].target)
    )
    with pytest.raises(grpc.RpcError) as refused:
        services.NodeStub(channel).NodeUnpublishVolume(stranger)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert (pods[0].target / "config.json").exists()
    with ThreadPoolExecutor(len(pods)) as pool:
        list(pool.map(lambda pod: pod.unpublish(channel), pods))
    assert node.model_mounts() == [] and node.daemon_mounts() == []


def test_with_keep_models_the_model_stays_mounted_for_the_next_pod(
    kubelet: Path, tmp_path: Path, node: Node, counting: Proxy, model: str
) -> None:
    plugin = Node(tmp_path / "node", node.control, [counting.host])
    plugin.start_plugin("--keep-models")
    try:
        with grpc.insecure_channel(f"unix://{plugin.endpoint}") as channel:
            first = Pod(kubelet, {REFERENCE: _through(counting, model)})
            first.publish(channel)
            [mount] = plugin.model_mounts()
            first.unpublish(channel)
            assert not first.target.exists() and plugin.model_mounts() == [mount]
            counting.reset()
            second = Pod(kubelet, {REFERENCE: _through(counting, model)})
            second.publish(channel)
            assert plugin.model_mounts() == [mount]
            assert [
                request.path for request in counting.requests if "/blobs/" in request.path
            ] == []
            second.unpublish(channel)
    finally:
        plugin.stop_plugin()
        for path in plugin.model_mounts():
            subprocess.run([*MODELFS, "umount", str(path), "--control-socket", str(node.control)])
    assert plugin.model_mounts() == []


def test_the_node_daemon_killed_and_started_again_leaves_published_volumes_readable(
    kubelet: Path, tmp_path: Path, counting: Proxy, model: str, weights: bytes
) -> None:
    """A node daemon of the test's own: killed outright, its mount processes run on, and the
    next daemon adopts them (the record it keeps all along), so the plugin's unpublish still
    unmounts the model through it."""
    node = Node(tmp_path / "node", tmp_path / "run" / "control.sock", [counting.host])
    config = tmp_path / "config.toml"
    config.write_text(f'control_socket = "{node.control}"\n[cache]\ndir = "{tmp_path / "c"}"\n')
    daemon = subprocess.Popen([*MODELFS, "daemon", "--config", str(config)])
    try:
        _wait_for(node.control, daemon, "daemon")
        node.start_plugin()
        with grpc.insecure_channel(f"unix://{node.endpoint}") as channel:
            pod = Pod(kubelet, {REFERENCE: _through(counting, model), PREFETCH: "none"})
            pod.publish(channel)
            [mount] = node.model_mounts()
            # The daemon writes its mounts down every 0.2 s: wait for this one to be.
            record = node.control.parent / "mounts.json"
            deadline = time.monotonic() + 10
            while not (record.exists() and str(mount) in record.read_text()):
                assert time.monotonic() < deadline, "the daemon never wrote the mount down"
                time.sleep(0.05)
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(timeout=30)
            start = 40 << 20
            with (pod.target / "weights.raw").open("rb") as reader:
                reader.seek(start)
                assert reader.read(65536) == weights[start : start + 65536]
            daemon = subprocess.Popen([*MODELFS, "daemon", "--config", str(config)])
            _wait_for(node.control, daemon, "daemon")
            assert node.daemon_mounts() == [str(mount)]
            pod.unpublish(channel)
            assert node.model_mounts() == [] and node.daemon_mounts() == []
    finally:
        if node.plugin is not None:
            node.stop_plugin()
        _stop(daemon)
        for path in node.model_mounts():  # a mount process no daemon adopted (a failure)
            with contextlib.suppress(LookupError):
                os.kill(mount_pid(path), signal.SIGTERM)
            subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


def test_a_volume_whose_model_mount_died_is_bound_again_by_a_repeated_publish(
    kubelet: Path, node: Node, channel: grpc.Channel, counting: Proxy, model: str
) -> None:
    """The model's mount process killed: the daemon mounts the model again, but the pod's bind
    still points at the dead mount; kubelet's next publish of the volume binds the new one."""
    pod = Pod(kubelet, {REFERENCE: _through(counting, model)})
    pod.publish(channel)
    [mount] = node.model_mounts()
    os.kill(mount_pid(mount), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # until the daemon has it mounted again
        assert time.monotonic() < deadline, "the daemon never mounted the model again"
        with contextlib.suppress(OSError):
            if (mount / "config.json").read_bytes() == b'{"layers": 2}':
                break
        time.sleep(0.1)
    with pytest.raises(OSError) as dead:
        os.listdir(pod.target)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    pod.publish(channel)
    assert (pod.target / "config.json").read_bytes() == b'{"layers": 2}'
    pod.unpublish(channel)
    assert node.model_mounts() == []


def test_the_node_s_login_serves_pods_without_a_secret(
    kubelet: Path, tmp_path: Path, auth_registry: Registry
) -> None:
    """The plugin and the daemon share a docker config with a login for the registry (as the
    DaemonSet mounts one in both containers): a pod without a secret gets its volume."""
    assert auth_registry.username is not None and auth_registry.password is not None
    data = b"weights behind a login " * 500
    reference = _push(auth_registry, {"model.bin": data})
    login = tmp_path / "docker"
    login.mkdir()
    entry = {
        "auths": {
            auth_registry.host: {
                "auth": base64.b64encode(
                    f"{auth_registry.username}:{auth_registry.password}".encode()
                ).decode()
            }
        }
    }
    (login / "config.json").write_text(json.dumps(entry))
    env = {**os.environ, "DOCKER_CONFIG": str(login)}
    node = Node(tmp_path / "node", tmp_path / "run" / "control.sock", [auth_registry.host])
    config = tmp_path / "config.toml"
    config.write_text(f'control_socket = "{node.control}"\n[cache]\ndir = "{tmp_path / "c"}"\n')
    daemon = subprocess.Popen([*MODELFS, "daemon", "--config", str(config)], env=env)
    try:
        _wait_for(node.control, daemon, "daemon")
        node.start_plugin(env=env)
        with grpc.insecure_channel(f"unix://{node.endpoint}") as channel:
            pod = Pod(kubelet, {REFERENCE: reference})
            pod.publish(channel)
            assert (pod.target / "model.bin").read_bytes() == data
            pod.unpublish(channel)
            assert node.model_mounts() == []
    finally:
        if node.plugin is not None:
            node.stop_plugin()
        _stop(daemon)


def test_a_model_no_volume_holds_is_unmounted_when_the_plugin_starts(
    kubelet: Path, tmp_path: Path, node: Node, counting: Proxy, model: str
) -> None:
    """The plugin stopped in an unpublish after the volume went and before its model's unmount
    (or could not reach the daemon then): the next plugin unmounts the model."""
    plugin = Node(tmp_path / "node", node.control, [counting.host])
    plugin.start_plugin()
    with grpc.insecure_channel(f"unix://{plugin.endpoint}") as channel:
        pod = Pod(kubelet, {REFERENCE: _through(counting, model)})
        pod.publish(channel)
    [mount] = plugin.model_mounts()
    plugin.stop_plugin()
    # What the unpublish had done when it stopped: the bind, the target and the record gone.
    subprocess.run(["umount", str(pod.target)], check=True)
    pod.target.rmdir()
    [record] = (plugin.state / "volumes").glob("*.json")
    record.unlink()
    assert plugin.model_mounts() == [mount]
    plugin.start_plugin()
    try:
        assert plugin.model_mounts() == [] and str(mount) not in node.daemon_mounts()
        assert not mount.exists()
    finally:
        plugin.stop_plugin()

"""deploy/: every YAML document parses, and what the plugin relies on agrees with the code: the
driver's name, the socket kubelet and the registrar reach it on, the directories its model
mounts and binds go through (shared with the host both ways), the daemon's control socket, the
daemon's config, /dev/fuse, the service account, the node image's entry point; and what the
cluster relies on: the scheduler's command line and Service, the node config's [cluster], the
cluster secret both read, the address peers on other nodes reach a node at."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from modelfs.cli.cluster import scheduler
from modelfs.cli.csi import csi
from modelfs.csi import DEFAULT_DRIVER, DEFAULT_ENDPOINT, DEFAULT_STATE_DIR
from modelfs.peer.options import ClusterOptions
from modelfs.scheduler.ranking import NodeInfo
from modelfs.service.config import DaemonConfig, NodeCluster, parse_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES_DOC = DEPLOY.parent / "docs" / "kubernetes.md"


def _documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), f"{path.name}: a document is not a mapping"
            assert {"apiVersion", "kind", "metadata"} <= set(document), path.name
            documents.append(document)
    return documents


def _one(kind: str) -> dict[str, Any]:
    [document] = [d for d in _documents() if d["kind"] == kind]
    return document


def _container(name: str) -> dict[str, Any]:
    spec = _one("DaemonSet")["spec"]["template"]["spec"]
    [container] = [c for c in spec["containers"] if c["name"] == name]
    return container


def _host_path(volume: str) -> str:
    spec = _one("DaemonSet")["spec"]["template"]["spec"]
    [entry] = [v for v in spec["volumes"] if v["name"] == volume]
    return str(entry["hostPath"]["path"])


def _mount_of(container: dict[str, Any], path: Path) -> dict[str, Any]:
    """The volume mount ``path`` lies in (the deepest)."""
    mounts = [m for m in container["volumeMounts"] if path.is_relative_to(Path(m["mountPath"]))]
    assert mounts, f"{container['name']} mounts nothing at {path}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def _plugin_settings() -> dict[str, Any]:
    """The plugin's settings as its command line in the DaemonSet gives them."""
    args = _container("modelfs-csi")["args"]
    assert args[0] == "csi"
    return csi.make_context("csi", list(args[1:])).params


def test_every_document_parses_and_names_a_known_kind() -> None:
    kinds = sorted(document["kind"] for document in _documents())
    assert kinds == [
        "CSIDriver",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "Namespace",
        "Service",
        "ServiceAccount",
    ]


def test_the_csi_driver_is_the_plugin_s_for_inline_volumes() -> None:
    driver = _one("CSIDriver")
    assert driver["metadata"]["name"] == DEFAULT_DRIVER
    assert driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["volumeLifecycleModes"] == ["Ephemeral"]
    assert driver["spec"]["attachRequired"] is False
    assert _plugin_settings()["driver_name"] == DEFAULT_DRIVER


def test_the_registrar_and_kubelet_reach_the_plugin_s_socket() -> None:
    settings = _plugin_settings()
    assert settings["endpoint"] == DEFAULT_ENDPOINT
    registrar = _container("node-driver-registrar")
    args = dict(arg.removeprefix("--").split("=", 1) for arg in registrar["args"])
    assert Path(args["csi-address"]) == settings["endpoint"]
    # kubelet's path of the same socket: the host directory the plugin's socket lies in.
    plugin = _container("modelfs-csi")
    socket_mount = _mount_of(plugin, settings["endpoint"])
    assert _mount_of(registrar, Path(args["csi-address"]))["name"] == socket_mount["name"]
    host_dir = Path(_host_path(socket_mount["name"]))
    assert host_dir == Path(f"/var/lib/kubelet/plugins/{DEFAULT_DRIVER}")
    relative = settings["endpoint"].relative_to(socket_mount["mountPath"])
    assert Path(args["kubelet-registration-path"]) == host_dir / relative
    assert _mount_of(registrar, Path("/registration"))["name"] == "registration-dir"
    assert _host_path("registration-dir") == "/var/lib/kubelet/plugins_registry"


def test_model_mounts_and_binds_are_shared_with_the_host_both_ways() -> None:
    settings = _plugin_settings()
    assert settings["state_dir"] == DEFAULT_STATE_DIR
    plugin, daemon = _container("modelfs-csi"), _container("modelfs-daemon")
    # The daemon mounts models under the plugin's state dir; the plugin must see them.
    for container in (plugin, daemon):
        state = _mount_of(container, settings["state_dir"] / "models")
        assert state["mountPropagation"] == "Bidirectional", container["name"]
        assert state["name"] == "state-dir"
        assert container["securityContext"]["privileged"] is True
    # The plugin binds into pods' directories, which kubelet and the runtime must see.
    kubelet = _mount_of(plugin, Path("/var/lib/kubelet/pods"))
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert _host_path(kubelet["name"]) == kubelet["mountPath"] == "/var/lib/kubelet"
    assert _host_path(_mount_of(daemon, Path("/dev/fuse"))["name"]) == "/dev/fuse"


def _daemon_config() -> DaemonConfig:
    """The daemon's config as its command line and the config map give it."""
    daemon = _container("modelfs-daemon")
    assert daemon["args"][:2] == ["daemon", "--config"]
    config_path = Path(daemon["args"][2])
    config_mount = _mount_of(daemon, config_path)
    spec = _one("DaemonSet")["spec"]["template"]["spec"]
    [volume] = [v for v in spec["volumes"] if v["name"] == config_mount["name"]]
    config_map = _one("ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    text = config_map["data"][str(config_path.relative_to(config_mount["mountPath"]))]
    return parse_config(text, "deploy/node-config.yaml")


def test_the_plugin_asks_the_daemon_the_config_map_sets_up() -> None:
    daemon = _container("modelfs-daemon")
    config = _daemon_config()
    control = _plugin_settings()["control_socket"]
    assert config.control_socket == control
    plugin = _container("modelfs-csi")
    assert _mount_of(plugin, control)["name"] == _mount_of(daemon, control)["name"]
    # The cache lives on the host, so a new pod finds what the last one fetched.
    assert _host_path(_mount_of(daemon, config.cache_dir)["name"]) == "/var/lib/modelfs"


def test_both_modelfs_containers_read_the_node_s_registry_mirrors() -> None:
    """containerd's hosts.toml directory, read-only from the host: the plugin resolves tags
    through the mirrors it names, the daemon reads models through them."""
    hosts_dir = _plugin_settings()["hosts_dir"]
    assert hosts_dir == _daemon_config().hosts_dir == Path("/etc/containerd/certs.d")
    hosts_toml = hosts_dir / "registry.example.com" / "hosts.toml"
    for name in ("modelfs-csi", "modelfs-daemon"):
        mount = _mount_of(_container(name), hosts_toml)
        assert mount["readOnly"] is True, name
        assert _host_path(mount["name"]) == mount["mountPath"] == str(hosts_dir), name


def test_the_pods_run_as_the_service_account_in_its_namespace() -> None:
    daemon_set = _one("DaemonSet")
    account = _one("ServiceAccount")
    assert (
        daemon_set["spec"]["template"]["spec"]["serviceAccountName"]
        == (account["metadata"]["name"])
    )
    namespace = _one("Namespace")["metadata"]["name"]
    for kind in ("DaemonSet", "ServiceAccount", "ConfigMap", "Deployment", "Service"):
        assert _one(kind)["metadata"]["namespace"] == namespace, kind
    # The node service's model labels: get and patch on its node, granted to that account.
    binding = _one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == _one("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace}
    ]
    [rule] = _one("ClusterRole")["rules"]
    assert rule["resources"] == ["nodes"] and set(rule["verbs"]) == {"get", "patch"}


def test_both_modelfs_containers_know_their_node_s_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("modelfs-daemon", "modelfs-csi"):
        env = {variable["name"]: variable for variable in _container(name)["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    monkeypatch.setenv("NODE_NAME", "gpu-node-7")
    assert csi.make_context("csi", []).params["node_id"] == "gpu-node-7"


@pytest.mark.parametrize("container", ["modelfs-daemon", "modelfs-csi"])
def test_the_node_image_runs_modelfs_with_fuse_and_mount(container: str) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["modelfs"]' in dockerfile
    runtime = dockerfile.rsplit("FROM ", 1)[1]  # the last stage: the image that runs
    assert "fuse3" in runtime and " mount" in runtime
    image = _container(container)["image"]
    assert image == _container("modelfs-daemon")["image"]


def test_the_plugin_takes_its_socket_as_a_path_or_as_csi_endpoint_writes_it() -> None:
    for given in ("/csi/csi.sock", "unix:///csi/csi.sock"):
        assert csi.make_context("csi", ["--endpoint", given]).params["endpoint"] == Path(
            "/csi/csi.sock"
        )
    with pytest.raises(click.BadParameter, match="unix:///PATH"):
        csi.make_context("csi", ["--endpoint", "csi.sock"])


def _cluster() -> NodeCluster:
    cluster = _daemon_config().cluster
    assert cluster is not None, "deploy/node-config.yaml has no [cluster]"
    return cluster


def _scheduler_pod() -> dict[str, Any]:
    return dict(_one("Deployment")["spec"]["template"])


def _scheduler_settings() -> dict[str, Any]:
    """The scheduler's settings as its command line in the Deployment gives them."""
    [container] = _scheduler_pod()["spec"]["containers"]
    assert container["args"][0] == "scheduler"
    return scheduler.make_context("scheduler", list(container["args"][1:])).params


def _secret_source(pod: dict[str, Any], container: dict[str, Any], path: Path) -> tuple[str, str]:
    """The Secret and key the file at ``path`` in ``container`` of ``pod`` holds."""
    mount = _mount_of(container, path)
    assert mount.get("readOnly") is True, container["name"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    relative = str(path.relative_to(mount["mountPath"]))
    [key] = [item["key"] for item in volume["secret"]["items"] if item["path"] == relative]
    return volume["secret"]["secretName"], key


def test_the_node_daemons_reach_the_scheduler_through_its_service() -> None:
    settings = _scheduler_settings()
    host, port = settings["listen"]
    assert host in ("0.0.0.0", "::")  # other pods reach it
    pod, service = _scheduler_pod(), _one("Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [service_port] = service["spec"]["ports"]
    target = service_port["targetPort"]
    if isinstance(target, str):  # a named port of the container
        [container] = pod["spec"]["containers"]
        [target] = [p["containerPort"] for p in container["ports"] if p["name"] == target]
    assert target == port
    url = urlsplit(_cluster().settings.scheduler)
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert (url.scheme, url.hostname, url.port) == ("http", f"{name}.{namespace}.svc", port)
    assert service_port["port"] == port
    # Replicas keep what they know in memory unless they share Redis: one, replaced whole.
    deployment = _one("Deployment")["spec"]
    if settings["redis_url"] is None:
        assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"


def test_the_scheduler_and_the_node_daemons_read_one_cluster_secret() -> None:
    secret_file = _scheduler_settings()["cluster_secret_file"]
    scheduler_pod = _scheduler_pod()["spec"]
    [scheduler_container] = scheduler_pod["containers"]
    source = _secret_source(scheduler_pod, scheduler_container, secret_file)
    node_pod = _one("DaemonSet")["spec"]["template"]["spec"]
    daemon_file = _cluster().settings.secret_file
    assert _secret_source(node_pod, _container("modelfs-daemon"), daemon_file) == source
    # No secret is committed: the operator creates it, as the install steps say.
    assert "Secret" not in {document["kind"] for document in _documents()}
    name, key = source
    assert f"create secret generic {name} --from-literal={key}=" in KUBERNETES_DOC.read_text()


def test_peers_on_other_nodes_reach_a_node_at_its_pod_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    """peer_listen is the wildcard, so each mount tells the scheduler $POD_IP, which the daemon
    container gets from status.podIP (its mounts, its children, inherit it); not hostNetwork."""
    daemon = _container("modelfs-daemon")
    env = {variable["name"]: variable for variable in daemon["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert not _one("DaemonSet")["spec"]["template"]["spec"].get("hostNetwork", False)
    cluster = _cluster()
    assert len(cluster.peer_ports) >= 2  # a mount and a preheat each serve on their own
    settings = cluster.settings
    monkeypatch.setenv("POD_IP", "10.244.3.17")
    options = ClusterOptions(settings.scheduler, b"", settings.listen)
    assert options.advertised == f"10.244.3.17:{cluster.peer_ports.first}"
    monkeypatch.setenv("POD_IP", "fd00:10:244::3")
    address = ClusterOptions(settings.scheduler, b"", settings.listen).advertised
    assert address == f"[fd00:10:244::3]:{cluster.peer_ports.first}"
    assert NodeInfo(address).problem() is None  # the scheduler takes it

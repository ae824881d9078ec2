"""The daemon's config file (``/etc/modelfs/config.toml``), parsed into plain values.

Example: systemd/config.toml.example. Parsing is pure (text in, DaemonConfig out); every mistake
is a one-line ConfigError naming the file and the key.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelfs.artifact.inflate import InflateBounds
from modelfs.errors import ModelfsError
from modelfs.mount.session import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE
from modelfs.peer.options import ClusterOptions, ClusterSettings
from modelfs.prefetch.prefetcher import PrefetchMode
from modelfs.reference import LayoutReference, Reference, parse_any_reference
from modelfs.scheduler.placement import labels_problem, node_name_problem
from modelfs.service.control import DEFAULT_CONTROL_SOCKET as DEFAULT_CONTROL_SOCKET
from modelfs.service.kube_labels import in_cluster_problem
from modelfs.service.peer_ports import PortRange, parse_port_range
from modelfs.sizes import parse_size
from modelfs.sources.hosts import DEFAULT_HOSTS_DIR, HostsError, mirror_hosts
from modelfs.sources.proxy import parse_proxy_url
from modelfs.trust.scan_policy import ScanPolicy

DEFAULT_CONFIG = Path("/etc/modelfs/config.toml")


class ConfigError(ModelfsError):
    """The daemon's config file is missing or wrong."""


@dataclass(frozen=True)
class RegistrySettings:
    plain_http: bool = False
    insecure: bool = False


@dataclass(frozen=True)
class MountSpec:
    reference: Reference | LayoutReference
    path: Path
    prefetch: PrefetchMode = PrefetchMode.HINTS


@dataclass(frozen=True)
class NodeCluster:
    """``[cluster]``: every mount shares pieces with the cluster's other nodes with the same
    settings, each mount process serving them on its own port of ``peer_ports``
    (modelfs.service.peer_ports)."""

    settings: ClusterSettings  # every mount's, but the port of its ``listen``
    peer_ports: PortRange
    # The node service's name and labels at the scheduler (preheats, where models are);
    # None: the NODE_NAME environment variable (Kubernetes's downward API), else the host name.
    node_name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    kubernetes_labels: bool = False  # keep this Kubernetes node's model labels current

    def for_port(self, port: int) -> ClusterSettings:
        """The settings of the mount that serves peers on ``port``."""
        return replace(self.settings, listen=(self.settings.listen[0], port))


@dataclass(frozen=True)
class DaemonConfig:
    cache_dir: Path = DEFAULT_CACHE_DIR
    cache_size: int = DEFAULT_CACHE_SIZE
    inflate: InflateBounds = field(default_factory=InflateBounds)  # [cache] max_inflate_*
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    metrics_addr: str | None = None
    credentials: Path | None = None  # a docker-style config directory (DOCKER_CONFIG)
    registries: dict[str, RegistrySettings] = field(default_factory=dict)
    # Registry mirrors (modelfs.sources.mirrors): containerd's hosts.toml directory, and
    # modelfs's own per registry ([registries."host"] mirrors), which win.
    hosts_dir: Path | None = DEFAULT_HOSTS_DIR
    mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # [proxy]: HTTP_PROXY, HTTPS_PROXY and NO_PROXY for the mount processes.
    proxy: dict[str, str] = field(default_factory=dict)
    mounts: list[MountSpec] = field(default_factory=list)
    cluster: NodeCluster | None = None
    # [trust]: every mount's signature policy (None: the node's default) and scan policy.
    signature_policy: Path | None = None
    scan: ScanPolicy = field(default_factory=ScanPolicy)

    def registry_for(self, reference: Reference | LayoutReference) -> RegistrySettings:
        if isinstance(reference, LayoutReference):
            return RegistrySettings()
        return self.registries.get(reference.registry, RegistrySettings())


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return value


def _typed(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = table.get(key)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{where}: {key} must be a {kind.__name__}, not {value!r}")
    return value


def _known(table: dict[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")


def parse_config(text: str, origin: str) -> DaemonConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{origin} is not valid TOML: {error}") from None
    _known(
        data,
        {
            "control_socket",
            "metrics_addr",
            "credentials",
            "cache",
            "registries",
            "hosts_dir",
            "proxy",
            "mounts",
            "cluster",
            "trust",
        },
        origin,
    )
    cache = _table(data.get("cache", {}), f"{origin} [cache]")
    _known(cache, {"dir", "size", "max_inflate_ratio", "max_inflate_size"}, f"{origin} [cache]")
    size_text = _typed(cache, "size", str, f"{origin} [cache]")
    inflate_size = _typed(cache, "max_inflate_size", str, f"{origin} [cache]")
    ratio = _typed(cache, "max_inflate_ratio", int, f"{origin} [cache]")
    try:
        size = DEFAULT_CACHE_SIZE if size_text is None else parse_size(size_text)
        inflate = InflateBounds(
            ratio=InflateBounds.ratio if ratio is None else ratio,
            size=InflateBounds.size if inflate_size is None else parse_size(inflate_size),
        )
    except ValueError as error:
        raise ConfigError(f"{origin} [cache]: {error}") from None
    if inflate.ratio < 1:
        raise ConfigError(f"{origin} [cache]: max_inflate_ratio must be at least 1, not {ratio}")
    registries = {}
    mirrors: dict[str, tuple[str, ...]] = {}
    for host, settings in _table(data.get("registries", {}), f"{origin} [registries]").items():
        where = f'{origin} [registries."{host}"]'
        table = _table(settings, where)
        _known(table, {"plain_http", "insecure", "mirrors"}, where)
        mirrors[host] = _mirrors(table, host, where)
        registries[host] = RegistrySettings(
            plain_http=bool(_typed(table, "plain_http", bool, where)),
            insecure=bool(_typed(table, "insecure", bool, where)),
        )
    mounts = []
    raw_mounts = data.get("mounts", [])
    if not isinstance(raw_mounts, list):
        raise ConfigError(f"{origin}: mounts must be an array of tables ([[mounts]])")
    for number, entry in enumerate(raw_mounts, 1):
        where = f"{origin} mount #{number}"
        table = _table(entry, where)
        _known(table, {"ref", "path", "prefetch"}, where)
        ref, path = _typed(table, "ref", str, where), _typed(table, "path", str, where)
        if not ref or not path:
            raise ConfigError(f"{where}: needs both ref and path")
        prefetch = _typed(table, "prefetch", str, where) or PrefetchMode.HINTS.value
        if prefetch not in {mode.value for mode in PrefetchMode}:
            choices = ", ".join(mode.value for mode in PrefetchMode)
            raise ConfigError(f"{where}: prefetch {prefetch!r} is not one of {choices}")
        mounts.append(MountSpec(parse_any_reference(ref), Path(path), PrefetchMode(prefetch)))
    paths = [spec.path for spec in mounts]
    duplicate = next((path for path in paths if paths.count(path) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{origin}: two mounts on {duplicate}; give each its own path")
    cluster = None
    if "cluster" in data:
        cluster = _parse_cluster(
            _table(data["cluster"], f"{origin} [cluster]"), f"{origin} [cluster]"
        )
        ports = cluster.peer_ports
        if len(mounts) > len(ports):
            raise ConfigError(
                f"{origin} [cluster]: peer_ports {ports} has {len(ports)} ports for "
                f"{len(mounts)} mounts (each mount serves peers on its own): widen it"
            )
    credentials = _typed(data, "credentials", str, origin)
    trust = _table(data.get("trust", {}), f"{origin} [trust]")
    _known(trust, {"signature_policy", "scan"}, f"{origin} [trust]")
    policy = _typed(trust, "signature_policy", str, f"{origin} [trust]")
    try:
        scan = ScanPolicy.parse(_typed(trust, "scan", str, f"{origin} [trust]") or "")
    except ModelfsError as error:
        raise ConfigError(f"{origin} [trust]: {error}") from None
    return DaemonConfig(
        cache_dir=Path(_typed(cache, "dir", str, f"{origin} [cache]") or DEFAULT_CACHE_DIR),
        cache_size=size,
        inflate=inflate,
        control_socket=Path(_typed(data, "control_socket", str, origin) or DEFAULT_CONTROL_SOCKET),
        metrics_addr=_typed(data, "metrics_addr", str, origin) or None,
        credentials=None if credentials is None else Path(credentials),
        registries=registries,
        hosts_dir=Path(_typed(data, "hosts_dir", str, origin) or DEFAULT_HOSTS_DIR),
        mirrors={host: urls for host, urls in mirrors.items() if urls},
        proxy=_proxy(_table(data.get("proxy", {}), f"{origin} [proxy]"), f"{origin} [proxy]"),
        mounts=mounts,
        cluster=cluster,
        signature_policy=None if policy is None else Path(policy),
        scan=scan,
    )


def _mirrors(table: dict[str, Any], host: str, where: str) -> tuple[str, ...]:
    urls = table.get("mirrors", [])
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise ConfigError(f"{where}: mirrors must be a list of URLs, not {urls!r}")
    try:
        mirror_hosts(urls, host, where)
    except HostsError as error:
        raise ConfigError(str(error)) from None
    return tuple(urls)


def _proxy(table: dict[str, Any], where: str) -> dict[str, str]:
    """``[proxy]`` as the environment variables it sets: http, https, no_proxy."""
    _known(table, {"http", "https", "no_proxy"}, where)
    environment = {}
    for key in ("http", "https", "no_proxy"):
        value = _typed(table, key, str, where)
        if value is None:
            continue
        if key != "no_proxy":
            try:
                parse_proxy_url(value)
            except ModelfsError as error:
                raise ConfigError(f"{where}: {key}: {error}") from None
        environment[key.upper() if key == "no_proxy" else f"{key.upper()}_PROXY"] = value
    return environment


_TLS_KEYS = ("tls_cert", "tls_key", "tls_ca")


def _parse_cluster(table: dict[str, Any], where: str) -> NodeCluster:
    _known(
        table,
        {"scheduler", "secret_file", "peer_listen", "peer_ports", "zone", "rack"}
        | {"peers_without_index", "max_connections", *_TLS_KEYS}
        | {"node_name", "labels", "kubernetes_labels"},
        where,
    )
    missing = [key for key in ("scheduler", "secret_file", "peer_ports") if key not in table]
    if missing:
        raise ConfigError(f"{where}: needs {', '.join(missing)} (see systemd/config.toml.example)")
    try:
        ports = parse_port_range(table["peer_ports"])
    except ValueError as error:
        raise ConfigError(f"{where}: peer_ports {error}") from None
    tls = {key: _typed(table, key, str, where) for key in _TLS_KEYS}
    listen = _typed(table, "peer_listen", str, where) or "0.0.0.0"
    if listen.count(":") == 1 or "]:" in listen:  # host:port; an IPv6 host has several
        raise ConfigError(
            f"{where}: peer_listen {listen!r} is the host only; ports come from peer_ports"
        )
    max_connections = _typed(table, "max_connections", int, where)
    if max_connections is not None and max_connections < 1:
        raise ConfigError(f"{where}: max_connections must be at least 1, not {max_connections}")
    try:
        settings = ClusterSettings(
            scheduler=_typed(table, "scheduler", str, where),
            secret_file=Path(_typed(table, "secret_file", str, where)),
            listen=(listen.strip("[]"), ports.first),
            zone=_typed(table, "zone", str, where) or "",
            rack=_typed(table, "rack", str, where) or "",
            peers_without_index=bool(_typed(table, "peers_without_index", bool, where)),
            max_connections=max_connections or ClusterOptions.max_connections,
            **{key: None if value is None else Path(value) for key, value in tls.items()},
        )
    except ModelfsError as error:
        raise ConfigError(f"{where}: {error}") from None
    node_name = _typed(table, "node_name", str, where)
    if node_name is not None and (problem := node_name_problem(node_name)) is not None:
        raise ConfigError(f"{where}: {problem}")
    labels = _table(table.get("labels", {}), f"{where} labels")
    if not all(isinstance(value, str) for value in labels.values()):
        raise ConfigError(f"{where}: label values must be strings")
    if (problem := labels_problem(labels)) is not None:
        raise ConfigError(f"{where}: {problem}")
    kubernetes_labels = bool(_typed(table, "kubernetes_labels", bool, where))
    return NodeCluster(settings, ports, node_name, labels, kubernetes_labels)


def node_name(cluster: NodeCluster) -> str:
    """The name this node service goes by at the scheduler: ``node_name``, else the NODE_NAME
    environment variable (a DaemonSet sets it from ``spec.nodeName``), else the host name."""
    return cluster.node_name or os.environ.get("NODE_NAME") or socket.gethostname().lower()


def load_config(path: Path) -> DaemonConfig:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(
            f"cannot read the config {path}: {error.strerror} (see systemd/config.toml.example)"
        ) from None
    config = parse_config(text, str(path))
    if config.cluster is not None:
        check_cluster_files(config.cluster, f"{path} [cluster]")
        if config.cluster.kubernetes_labels and (problem := in_cluster_problem()) is not None:
            raise ConfigError(
                f"{path} [cluster]: kubernetes_labels needs the API server: {problem}"
            )
    return config


def check_cluster_files(cluster: NodeCluster, where: str) -> None:
    """The secret and TLS files load, as each mount process will load them: a mistake is
    reported when the daemon starts (or reloads), not by every mount failing."""
    try:
        cluster.settings.load()
    except ModelfsError as error:
        raise ConfigError(f"{where}: {error}") from None

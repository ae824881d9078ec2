"""Where a registry's bytes may come from: containerd's ``hosts.toml`` and modelfs's own mirrors.

A node that runs containerd names its registry mirrors (Dragonfly's dfdaemon, Spegel, a Harbor
proxy cache) in ``<hosts dir>/<registry>/hosts.toml`` (containerd's docs/hosts.md): the
``[host."URL"]`` tables are tried in order, each for what its ``capabilities`` allow, and
``server`` last. ``[registries."host"] mirrors = [...]`` in modelfs's config says the same for a
node without containerd. Pure: text in, ``RegistryHost`` values out; files are read by the caller
(``modelfs.sources.mirrors``). A mistake is one ``HostsError`` line naming the file and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from modelfs.errors import ModelfsError

PULL, RESOLVE, PUSH = "pull", "resolve", "push"
CAPABILITIES = frozenset({PULL, RESOLVE, PUSH})
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
# containerd's fallback namespace: hosts for every registry without a directory of its own.
DEFAULT_NAMESPACE = "_default"

_HOST_KEYS = frozenset(
    {"capabilities", "ca", "client", "skip_verify", "header", "override_path", "dial_timeout"}
    | {"proxy"}
)
_ROOT_KEYS = _HOST_KEYS | {"server", "host"}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class HostsError(ModelfsError):
    """A hosts.toml (or a ``mirrors`` list) that cannot be used."""


@dataclass(frozen=True)
class RegistryHost:
    """One place a registry's API answers: a mirror, or the registry's own server."""

    scheme: str  # http or https
    netloc: str  # host[:port], as requests name it (Host header, credentials, messages)
    api_root: str  # the path the API's routes go under: /v2, or override_path's own
    capabilities: frozenset[str] = CAPABILITIES
    skip_verify: bool = False
    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()  # (certificate, key or None: in it)
    headers: tuple[tuple[str, str], ...] = ()
    dial_timeout: float | None = None  # seconds a connection may take to open
    proxy: str | None = None  # overrides HTTP(S)_PROXY and NO_PROXY for this host
    # The registry a mirror stands in for: sent as ``?ns=`` (containerd does, and Spegel and
    # Dragonfly use it to know which registry to ask); None for the server itself.
    namespace: str | None = None

    @property
    def is_mirror(self) -> bool:
        return self.namespace is not None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.api_root}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def namespace_dirs(registry: str) -> list[str]:
    """The directories under the hosts dir that may hold ``registry``'s hosts.toml, in the
    order containerd looks (Unix): ``host_port_``, ``host:port``, then ``_default``."""
    host, colon, port = registry.rpartition(":")
    with_port = [f"{host}_{port}_"] if colon and port.isdigit() and "]" not in port else []
    return [*with_port, registry, DEFAULT_NAMESPACE]


def server_host(registry: str, plain_http: bool) -> RegistryHost:
    """The registry itself, as modelfs reaches it without any hosts.toml."""
    return RegistryHost("http" if plain_http else "https", registry, "/v2")


def parse_hosts_toml(
    text: str, origin: Path, registry: str, api_host: str, plain_http: bool
) -> list[RegistryHost]:
    """The hosts a ``hosts.toml`` (read from ``origin``) names for ``registry``: its mirrors
    in order, then the server (``server``, else ``api_host``, the registry's API host).
    Relative paths (``ca``, ``client``) are relative to the file, as containerd reads them."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise HostsError(f"{origin} is not valid TOML ({error}): fix it") from None
    _known(data, _ROOT_KEYS, str(origin))
    base = origin.parent
    mirrors = []
    hosts = data.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsError(f'{origin}: host must be tables ([host."https://mirror"]), not {hosts!r}')
    for url, table in hosts.items():
        where = f'{origin} [host."{url}"]'
        if not isinstance(table, dict):
            raise HostsError(f"{where} must be a table")
        _known(table, _HOST_KEYS, where)
        mirrors.append(_host(url, table, base, where, namespace=registry))
    server_url = data.get("server")
    if server_url is None:
        server_url = f"{'http' if plain_http else 'https'}://{api_host}"
    elif not isinstance(server_url, str):
        raise HostsError(f"{origin}: server must be a URL string, not {server_url!r}")
    root = {key: value for key, value in data.items() if key in _HOST_KEYS}
    server = _host(server_url, root, base, f"{origin} server", namespace=None)
    return [*mirrors, server]


def mirror_hosts(urls: Sequence[str], registry: str, where: str) -> list[RegistryHost]:
    """The hosts of modelfs's own ``mirrors = [...]`` for ``registry`` (pull and resolve, as
    a private mirror containerd-style), in order."""
    return [
        _host(url, {"capabilities": [PULL, RESOLVE]}, Path(), f"{where} mirror {url!r}", registry)
        for url in urls
    ]


def parse_duration(text: str) -> float | None:
    """A Go duration (``1s``, ``500ms``, ``1m30s``) in seconds; None if it is not one."""
    if not text or _DURATION.sub("", text):
        return None
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION.findall(text))


def _known(table: dict[str, Any], keys: frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise HostsError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")


def _host(
    url: str, table: dict[str, Any], base: Path, where: str, namespace: str | None
) -> RegistryHost:
    if "://" not in url:
        url = f"https://{url}"  # containerd's default scheme for a host without one
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise HostsError(f"{where}: {url!r} is not an http:// or https:// URL of a host")
    path = parts.path.rstrip("/")
    override = _bool(table, "override_path", where)
    if not override and not path.endswith("/v2"):
        path += "/v2"
    return RegistryHost(
        scheme=parts.scheme,
        netloc=parts.netloc.lower(),
        api_root=path or "/",
        capabilities=_capabilities(table, where),
        skip_verify=_bool(table, "skip_verify", where),
        ca=tuple(base / path for path in _paths(table, "ca", where)),
        client=_client(table, base, where),
        headers=_headers(table, where),
        dial_timeout=_dial_timeout(table, where),
        proxy=_proxy(table, where),
        namespace=namespace if namespace != parts.netloc.lower() else None,
    )


def _bool(table: dict[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise HostsError(f"{where}: {key} must be true or false, not {value!r}")
    return value


def _capabilities(table: dict[str, Any], where: str) -> frozenset[str]:
    value = table.get("capabilities")
    if value is None:
        return CAPABILITIES
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise HostsError(f'{where}: capabilities must be a list such as ["pull", "resolve"]')
    unknown = sorted(set(value) - CAPABILITIES)
    if unknown:
        raise HostsError(
            f"{where}: capabilities: unknown {unknown[0]!r} (known: pull, push, resolve)"
        )
    return frozenset(value)


def _paths(table: dict[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise HostsError(f"{where}: {key} must be a path or a list of paths, not {value!r}")
    return values


def _client(table: dict[str, Any], base: Path, where: str) -> tuple[tuple[Path, Path | None], ...]:
    value = table.get("client", [])
    entries = [value] if isinstance(value, str) else value
    pairs: list[tuple[Path, Path | None]] = []
    if isinstance(entries, list):
        for entry in entries:
            if isinstance(entry, str) and entry:
                pairs.append((base / entry, None))
            elif (
                isinstance(entry, list)
                and len(entry) == 2
                and all(isinstance(part, str) for part in entry)
                and entry[0]
            ):
                pairs.append((base / entry[0], base / entry[1] if entry[1] else None))
            else:
                break
        else:
            return tuple(pairs)
    raise HostsError(
        f"{where}: client must be a path, a list of paths or a list of [certificate, key] "
        f"pairs, not {value!r}"
    )


def _headers(table: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    value = table.get("header", {})
    if not isinstance(value, dict):
        raise HostsError(f"{where}: header must be a table of names and values")
    headers: list[tuple[str, str]] = []
    for name, given in value.items():
        values = [given] if isinstance(given, str) else given
        if (
            not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name)
            or not isinstance(values, list)
            or not all(isinstance(v, str) and "\r" not in v and "\n" not in v for v in values)
        ):
            raise HostsError(f"{where}: header {name!r} must be a string or a list of strings")
        headers.extend((name, v) for v in values)
    return tuple(headers)


def _dial_timeout(table: dict[str, Any], where: str) -> float | None:
    value = table.get("dial_timeout")
    if value is None:
        return None
    seconds = parse_duration(value) if isinstance(value, str) else None
    if not seconds:
        raise HostsError(f'{where}: dial_timeout must be a duration such as "1s", not {value!r}')
    return seconds


def _proxy(table: dict[str, Any], where: str) -> str | None:
    value = table.get("proxy")
    if value is None:
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    if (
        parts is None
        or parts.scheme != "http"
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise HostsError(
            f"{where}: proxy must be an http:// URL of a proxy (no path), not {value!r}"
        )
    return str(value)

"""HTTP proxies for registry connections: which one a URL goes through, and its tunnel.

``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` (either case), as curl and Go read them, or a host's
``proxy`` in hosts.toml. httpx follows the same variables on its own; this is for the lean
range-GET path (``modelfs.sources.rangeget``): HTTPS goes through a ``CONNECT`` tunnel, so the
proxy sees neither the registry's credentials nor its bytes; plain HTTP is sent to the proxy in
absolute form. ``Proxy-Authorization`` comes from the proxy URL's user and password only.
"""

from __future__ import annotations

import base64
import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from modelfs.errors import RegistryError

_HEAD_LIMIT = 16 * 1024


@dataclass(frozen=True)
class ProxyRoute:
    """A proxy to connect through: its address, and the ``Proxy-Authorization`` its URL gives."""

    host: str
    port: int
    authorization: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_proxy_url(url: str) -> ProxyRoute:
    """``http://user:password@proxy:3128`` -> its route; a URL without a scheme is http://."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise RegistryError(
            f"proxy {url!r} is not an http:// URL (modelfs talks plain HTTP to proxies): fix "
            "HTTPS_PROXY/HTTP_PROXY or the proxy setting"
        )
    authorization = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return ProxyRoute(parts.hostname, parts.port or 80, authorization)


def environment_proxy(scheme: str, host: str, environ: Mapping[str, str]) -> str | None:
    """The proxy URL ``environ`` names for ``scheme://host`` (``host`` with its port, if any);
    None when there is none or ``NO_PROXY`` exempts the host."""
    found = {
        key.lower(): value
        for key, value in environ.items()
        if value and key.lower().endswith("_proxy")
    }
    url = found.get(f"{scheme}_proxy") or found.get("all_proxy")
    if not url:
        return None
    return None if exempt(host, found.get("no_proxy", "")) else url


def exempt(host: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` exempts ``host`` (``name[:port]``), as curl reads it: ``*``, a
    domain and its subdomains (a leading dot or not), ``name:port``, an IP address or a CIDR."""
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name or not port.isdigit():
        name, port = host, ""
    name = name.strip("[]").lower()
    for entry in (part.strip().lower() for part in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        entry_name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else ("", "", "")
        if entry_name and entry_port.isdigit():
            if entry_port != port:
                continue
            entry = entry_name
        entry = entry.strip("[]").lstrip(".")
        if name == entry or name.endswith("." + entry) or _in_network(name, entry):
            return True
    return False


def _in_network(name: str, entry: str) -> bool:
    try:
        return ipaddress.ip_address(name) in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False


def connect_request(host: str, port: int, route: ProxyRoute) -> bytes:
    """The ``CONNECT`` that opens a tunnel to ``host:port``: the proxy's own credentials only."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if route.authorization:
        lines.append(f"Proxy-Authorization: {route.authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def open_tunnel(stream: trio.abc.Stream, host: str, port: int, route: ProxyRoute) -> None:
    """Ask the proxy on ``stream`` for a tunnel to ``host:port``; raises OSError if refused."""
    await stream.send_all(connect_request(host, port, route))
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = await stream.receive_some(_HEAD_LIMIT)
        if not chunk or len(received) > _HEAD_LIMIT:
            raise OSError(f"proxy {route.address} closed the tunnel to {host}:{port}")
        received += chunk
    head, _, early = received.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status.split(" ")[1:2] != ["200"] or early:
        # Nothing may follow the answer: the far end speaks only once spoken to.
        raise OSError(f"proxy {route.address} refused a tunnel to {host}:{port}: {status}")

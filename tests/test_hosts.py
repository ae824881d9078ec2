"""containerd's hosts.toml and modelfs's own mirrors list, parsed (modelfs.sources.hosts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfs.service.config import ConfigError, parse_config
from modelfs.service.supervisor import child_environment, mount_options
from modelfs.sources.hosts import (
    CAPABILITIES,
    PULL,
    RESOLVE,
    HostsError,
    RegistryHost,
    mirror_hosts,
    namespace_dirs,
    parse_duration,
    parse_hosts_toml,
)

ORIGIN = Path("/etc/containerd/certs.d/registry.example:5000/hosts.toml")


def parse(text: str, plain_http: bool = False) -> list[RegistryHost]:
    return parse_hosts_toml(
        text, ORIGIN, "registry.example:5000", "registry.example:5000", plain_http
    )


def test_every_documented_key() -> None:
    hosts = parse(
        """
server = "https://upstream.example"
ca = "server-ca.pem"
skip_verify = false

[host."http://127.0.0.1:4001"]
  capabilities = ["pull", "resolve"]
  dial_timeout = "500ms"

[host."https://mirror.example"]
  capabilities = ["pull"]
  ca = ["/etc/certs/a.pem", "b.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"], ["client.pem", ""]]
  skip_verify = true
  proxy = "http://user:pw@proxy.example:3128"
  [host."https://mirror.example".header]
    x-custom-1 = "one"
    x-custom-2 = ["a", "b"]

[host."https://mirror-bak.example/us"]
  client = "/etc/certs/client.pem"

[host."https://non-compliant.example/v2/upstream"]
  override_path = true
"""
    )
    dragonfly, mirror, bak, noncompliant, server = hosts
    assert dragonfly == RegistryHost(
        "http",
        "127.0.0.1:4001",
        "/v2",
        frozenset({PULL, RESOLVE}),
        dial_timeout=0.5,
        namespace="registry.example:5000",
    )
    assert dragonfly.is_mirror and dragonfly.url == "http://127.0.0.1:4001/v2"
    assert mirror.capabilities == {PULL} and mirror.skip_verify
    assert mirror.ca == (Path("/etc/certs/a.pem"), ORIGIN.parent / "b.pem")
    assert mirror.client == (
        (Path("/etc/certs/client.cert"), Path("/etc/certs/client.key")),
        (ORIGIN.parent / "client.pem", None),
    )
    assert mirror.headers == (("x-custom-1", "one"), ("x-custom-2", "a"), ("x-custom-2", "b"))
    assert mirror.proxy == "http://user:pw@proxy.example:3128"
    assert bak.api_root == "/us/v2" and bak.capabilities == CAPABILITIES
    assert bak.client == ((Path("/etc/certs/client.pem"), None),)
    assert noncompliant.api_root == "/v2/upstream"
    assert not server.is_mirror and server.url == "https://upstream.example/v2"
    assert server.ca == (ORIGIN.parent / "server-ca.pem",)


def test_server_defaults_to_the_registry() -> None:
    (server,) = parse("")
    assert server == RegistryHost("https", "registry.example:5000", "/v2")
    (plain,) = parse("", plain_http=True)
    assert plain.url == "http://registry.example:5000/v2"
    # A host entry for the registry itself is the registry, not a mirror of it.
    first, _ = parse('[host."https://registry.example:5000"]\ncapabilities = ["pull"]\n')
    assert not first.is_mirror


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("server = [", "is not valid TOML"),
        ('servr = "https://x"', "unknown key 'servr'"),
        ("server = 5", "server must be a URL"),
        ('server = "ftp://x"', "server: 'ftp://x' is not an http"),
        (
            '[host."https://m"]\ncapabilities = ["pull", "fly"]',
            "[host.\"https://m\"]: capabilities: unknown 'fly'",
        ),
        ('[host."https://m"]\ncapabilities = "pull"', "capabilities must be a list"),
        ('[host."https://m"]\nskip_verify = "yes"', "skip_verify must be true or false"),
        ('[host."https://m"]\noverride_path = 1', "override_path must be true or false"),
        ('[host."https://m"]\nca = 3', "ca must be a path"),
        ('[host."https://m"]\nclient = [["a", "b", "c"]]', "client must be a path"),
        ('[host."https://m"]\nheader = "x"', "header must be a table"),
        ('[host."https://m".header]\nx-a = 1', "header 'x-a' must be"),
        ('[host."https://m"]\ndial_timeout = "soon"', "dial_timeout must be a duration"),
        ('[host."https://m"]\nproxy = "socks5://p:1080"', "proxy must be an http:// URL"),
        ('[host."https://m"]\nmirrors = []', "unknown key 'mirrors'"),
        ('[host."https://m"]\n[host."https://m".host."https://n"]', "unknown key 'host'"),
        ("host = 3", "host must be tables"),
    ],
)
def test_malformed_files_are_refused_in_one_line(text: str, names: str) -> None:
    with pytest.raises(HostsError) as raised:
        parse(text)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(str(ORIGIN))
    assert names in message


def test_namespace_dirs_in_containerds_order() -> None:
    assert namespace_dirs("myregistry.io:5000") == [
        "myregistry.io_5000_",
        "myregistry.io:5000",
        "_default",
    ]
    assert namespace_dirs("docker.io") == ["docker.io", "_default"]


def test_modelfs_mirrors() -> None:
    first, second = mirror_hosts(["http://127.0.0.1:4001", "mirror.example"], "ghcr.io", "config")
    assert first.url == "http://127.0.0.1:4001/v2" and first.namespace == "ghcr.io"
    assert second.scheme == "https" and first.capabilities == {PULL, RESOLVE}
    with pytest.raises(HostsError, match="config mirror 'ftp://x'"):
        mirror_hosts(["ftp://x"], "ghcr.io", "config")


def test_durations() -> None:
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("10") is None
    assert parse_duration("") is None


def test_the_daemon_config_names_mirrors_hosts_dir_and_proxy(tmp_path: Path) -> None:
    config = parse_config(
        """
hosts_dir = "/srv/certs.d"
[registries."ghcr.io"]
mirrors = ["http://127.0.0.1:4001", "https://harbor.example/v2/ghcr"]
[registries."quay.io"]
plain_http = false
[proxy]
https = "http://user:pw@proxy.example:3128"
no_proxy = "localhost,.cluster.local"
[[mounts]]
ref = "ghcr.io/org/model:v1"
path = "/var/lib/models/m"
""",
        "config.toml",
    )
    assert config.hosts_dir == Path("/srv/certs.d")
    assert config.mirrors == {
        "ghcr.io": ("http://127.0.0.1:4001", "https://harbor.example/v2/ghcr")
    }
    options = mount_options(config.mounts[0], config)
    assert options.mirrors == config.mirrors["ghcr.io"] and options.hosts_dir == config.hosts_dir
    environment = child_environment(config)
    assert environment["HTTPS_PROXY"] == "http://user:pw@proxy.example:3128"
    assert environment["NO_PROXY"] == "localhost,.cluster.local"
    assert parse_config("", "config.toml").hosts_dir == Path("/etc/containerd/certs.d")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (
            '[registries."r.io"]\nmirrors = "http://m"',
            'config.toml [registries."r.io"]: mirrors must be a list',
        ),
        ('[registries."r.io"]\nmirrors = ["ftp://m"]', "mirror 'ftp://m'"),
        (
            '[proxy]\nhttps = "socks5://p:1080"',
            "config.toml [proxy]: https: proxy 'socks5://p:1080'",
        ),
        ('[proxy]\nftp = "http://p"', "config.toml [proxy]: unknown key 'ftp'"),
        ("hosts_dir = 3", "hosts_dir must be a str"),
    ],
)
def test_a_wrong_mirror_or_proxy_setting_is_one_line(text: str, names: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "config.toml")
    assert names in str(raised.value) and "\n" not in str(raised.value)

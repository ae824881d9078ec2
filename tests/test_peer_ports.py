"""The daemon's [cluster] settings: the peer port of each mount, the config, the command line."""

from __future__ import annotations

import logging

import pytest

from modelfs.service.config import ConfigError, parse_config
from modelfs.service.peer_ports import PortRange, choose_port, parse_port_range
from modelfs.service.supervisor import mount_command

CLUSTER = """
[cluster]
scheduler = "http://scheduler.internal:7480"
secret_file = "/etc/modelfs/cluster-secret"
peer_listen = "10.0.0.5"
peer_ports = "7481-7483"
zone = "eu-1a"
[[mounts]]
ref = "r.example/a:v1"
path = "/m/a"
"""

THREE_MORE_MOUNTS = "".join(
    f'[[mounts]]\nref = "r.example/{n}:v1"\npath = "/m/{n}"\n' for n in "bcd"
)


def test_a_range_or_a_base_port() -> None:
    assert parse_port_range("7481-7496") == PortRange(7481, 7496)
    assert parse_port_range(7481) == PortRange(7481, 65535)
    for wrong in ("7496-7481", "7481", "a-b", 0, True, "7481-70000"):
        with pytest.raises(ValueError):
            parse_port_range(wrong)


def test_the_lowest_free_port_and_a_mount_keeps_its_own() -> None:
    ports = PortRange(7481, 7483)
    assert choose_port(ports, set()) == 7481
    assert choose_port(ports, {7481}) == 7482
    # A port released by a stopped mount is the next one given.
    assert choose_port(ports, {7482}) == 7481
    # Restarted or reloaded, a mount keeps its port while it is in the range and its own.
    assert choose_port(ports, {7481}, kept=7483) == 7483
    assert choose_port(ports, {7483}, kept=7483) == 7481
    assert choose_port(PortRange(7482, 7483), set(), kept=7481) == 7482
    assert choose_port(ports, {7481, 7482, 7483}) is None


def test_the_cluster_settings_go_on_every_mount_command_line() -> None:
    config = parse_config(CLUSTER, "config.toml")
    command = mount_command(config.mounts[0], config, ready_fd=3, peer_port=7482)
    joined = " ".join(command)
    assert "--scheduler http://scheduler.internal:7480" in joined
    assert "--cluster-secret-file /etc/modelfs/cluster-secret" in joined
    assert "--peer-listen 10.0.0.5:7482" in joined
    assert "--zone eu-1a" in joined and "--rack" not in joined
    assert "--peers-without-index" not in joined and "--peer-tls-cert" not in joined
    ipv6 = parse_config(CLUSTER.replace('"10.0.0.5"', '"::"'), "config.toml")
    assert "--peer-listen [::]:7481" in " ".join(mount_command(ipv6.mounts[0], ipv6, 3, 7481))
    # Without [cluster], no peers.
    plain = parse_config('[[mounts]]\nref = "r.example/a:v1"\npath = "/m/a"\n', "c.toml")
    assert plain.cluster is None
    assert "--scheduler" not in mount_command(config.mounts[0], plain, 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('zone = "eu-1a"', 'zone = "eu-1a"\ncolour = "blue"'), "unknown key 'colour'"),
        (('secret_file = "/etc/modelfs/cluster-secret"\n', ""), "needs secret_file"),
        (('"7481-7483"', '"7483-7481"'), "peer_ports"),
        (('path = "/m/a"', 'path = "/m/a"\n' + THREE_MORE_MOUNTS), "has 3 ports for 4 mounts"),
        (('"10.0.0.5"', '"10.0.0.5:7481"'), "host only"),
        (('zone = "eu-1a"', 'tls_cert = "/c.pem"'), "needs all of tls_cert, tls_key, tls_ca"),
    ],
)
def test_cluster_config_errors_name_the_key(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config(CLUSTER.replace(*change), "config.toml")
    assert "config.toml [cluster]" in str(caught.value) and "\n" not in str(caught.value)


def test_the_daemons_verbosity_goes_on_every_mount_command_line() -> None:
    config = parse_config('[[mounts]]\nref = "r.example/m:v1"\npath = "/m"\n', "c.toml")
    root = logging.getLogger()
    before = root.level
    try:
        for level, flags in (
            (logging.WARNING, []),
            (logging.INFO, ["-v"]),
            (logging.DEBUG, ["-vv"]),
        ):
            root.setLevel(level)
            command = mount_command(config.mounts[0], config, 3)
            assert command[3 : command.index("mount")] == flags
    finally:
        root.setLevel(before)

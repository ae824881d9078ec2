"""The daemon's [cluster] settings: the peer port of each mount, the config, the command line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from modelfs.mount.session import MountOptions
from modelfs.peer.options import ClusterSettings
from modelfs.service.config import ConfigError, parse_config
from modelfs.service.peer_ports import PortRange, choose_port, parse_port_range
from modelfs.service.supervisor import mount_command, mount_options, write_settings

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


def test_the_cluster_settings_go_to_every_mount_process(tmp_path: Path) -> None:
    config = parse_config(CLUSTER, "config.toml")
    options = mount_options(config.mounts[0], config, peer_port=7482)
    # Handed over as a file, and read back as they were written.
    write_settings(options, tmp_path / "mount.json")
    assert MountOptions.from_json((tmp_path / "mount.json").read_text()) == options
    assert options.cluster == ClusterSettings(
        "http://scheduler.internal:7480",
        Path("/etc/modelfs/cluster-secret"),
        ("10.0.0.5", 7482),
        zone="eu-1a",
    )
    ipv6 = parse_config(CLUSTER.replace('"10.0.0.5"', '"::"'), "config.toml")
    cluster = mount_options(ipv6.mounts[0], ipv6, 7481).cluster
    assert cluster is not None and cluster.listen == ("::", 7481)
    # Without [cluster], no peers.
    plain = parse_config('[[mounts]]\nref = "r.example/a:v1"\npath = "/m/a"\n', "c.toml")
    assert plain.cluster is None
    assert mount_options(config.mounts[0], plain).cluster is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('zone = "eu-1a"', 'zone = "eu-1a"\ncolour = "blue"'), "unknown key 'colour'"),
        (('secret_file = "/etc/modelfs/cluster-secret"\n', ""), "needs secret_file"),
        (('"7481-7483"', '"7483-7481"'), "peer_ports"),
        (('path = "/m/a"', 'path = "/m/a"\n' + THREE_MORE_MOUNTS), "has 3 ports for 4 mounts"),
        (('"10.0.0.5"', '"10.0.0.5:7481"'), "host only"),
        (('zone = "eu-1a"', 'tls_cert = "/c.pem"'), "needs all three"),
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
            command = mount_command(mount_options(config.mounts[0], config), Path("m.json"), 3)
            assert command[3 : command.index("mount")] == flags
    finally:
        root.setLevel(before)

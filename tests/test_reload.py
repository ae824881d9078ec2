"""The reload's pure parts: which mounts are stopped or handed over, and the handover's text."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from modelfs.service.config import RegistrySettings, parse_config
from modelfs.service.mount_table import Supervised
from modelfs.service.reload import (
    HandedOver,
    Handover,
    decode_handover,
    encode_handover,
    to_carry,
    to_stop,
)
from modelfs.service.restart import restart_queued
from modelfs.service.supervisor import MountState

BASE = """
[[mounts]]
ref = "r.example/kept:v1"
path = "/m/kept"
[[mounts]]
ref = "r.example/changed:v1"
path = "/m/changed"
[[mounts]]
ref = "r.example/dropped:v1"
path = "/m/dropped"
[[mounts]]
ref = "r.example/down:v1"
path = "/m/down"
"""
NEW = BASE.replace('path = "/m/dropped"', 'path = "/m/other"').replace(
    'ref = "r.example/changed:v1"', 'ref = "r.example/changed:v2"'
)


def entries(state_of: dict[str, str]) -> list[Supervised]:
    config = parse_config(BASE, "old.toml")
    found = [
        Supervised(
            spec, None, MountState(str(spec.reference), str(spec.path), state_of[str(spec.path)])
        )
        for spec in config.mounts
    ]
    asked = parse_config('[[mounts]]\nref = "r.example/asked:v1"\npath = "/m/asked"\n', "x").mounts
    state = MountState(str(asked[0].reference), "/m/asked", "mounted", origin="control")
    found.append(Supervised(asked[0], RegistrySettings(plain_http=True), state))
    found[-1].first_attempt.set()
    return found


def test_reload_stops_what_the_config_drops_or_changes_and_what_is_not_up() -> None:
    old, new = parse_config(BASE, "old.toml"), parse_config(NEW, "new.toml")
    mounts = entries(
        {
            "/m/kept": "mounted",
            "/m/changed": "mounted",
            "/m/dropped": "mounted",
            "/m/down": "restarting",
        }
    )
    assert to_stop(mounts, old, new) == [Path("/m/changed"), Path("/m/dropped"), Path("/m/down")]
    # Handed over: the kept one, the one down (the new image starts it), the asked-for one.
    assert [str(entry.spec.path) for entry in to_carry(mounts, new)] == [
        "/m/kept",
        "/m/down",
        "/m/asked",
    ]
    # The same config: only what is not up is stopped.
    assert to_stop(mounts, old, old) == [Path("/m/down")]


def test_an_asked_for_mount_not_answered_yet_is_not_handed_over() -> None:
    old = parse_config(BASE, "old.toml")
    mounts = entries(
        {path: "mounted" for path in ("/m/kept", "/m/changed", "/m/dropped", "/m/down")}
    )
    mounts[-1].first_attempt = trio.Event()  # its request still waits for an answer
    mounts[-1].state.state = "starting"
    assert Path("/m/asked") in to_stop(mounts, old, old)
    assert "/m/asked" not in [str(entry.spec.path) for entry in to_carry(mounts, old)]


def test_handover_round_trip_ignores_state_fields_this_version_lacks() -> None:
    config = parse_config(BASE, "old.toml")
    state = MountState("r.example/kept:v1", "/m/kept", "mounted", "sha256:" + "0" * 64, 4242, 3)
    changed = MountState("r.example/changed:v1", "/m/changed")
    handover = Handover(
        Path("/run/modelfs/control.sock"),
        7,
        [
            HandedOver(config.mounts[0], None, state),
            HandedOver(config.mounts[1], RegistrySettings(insecure=True), changed),
        ],
    )
    assert decode_handover(encode_handover(handover)) == handover
    data = json.loads(encode_handover(handover))
    data["mounts"][0]["state"]["from_a_newer_version"] = 1
    assert decode_handover(json.dumps(data)) == handover


CLUSTER = """
[cluster]
scheduler = "http://scheduler.internal:7480"
secret_file = "/etc/modelfs/cluster-secret"
peer_ports = "7481-7490"
"""


def test_reload_restarts_every_mount_the_cluster_settings_change() -> None:
    old = parse_config(BASE + CLUSTER, "old.toml")
    mounts = entries(
        {path: "mounted" for path in ("/m/kept", "/m/changed", "/m/dropped", "/m/down")}
    )
    for port, entry in enumerate(mounts, 7481):
        entry.state.peer_port = port
    assert to_stop(mounts, old, old) == []
    rezoned = parse_config(BASE + CLUSTER + 'zone = "eu-1b"\n', "new.toml")
    # Config mounts and the asked-for one alike; all handed over, to be started again.
    assert len(to_stop(mounts, old, rezoned)) == len(mounts)
    assert to_carry(mounts, rezoned) == mounts
    # A narrower range: only the mounts whose port left it.
    narrower = parse_config(BASE + CLUSTER.replace("7481-7490", "7481-7484"), "new.toml")
    assert to_stop(mounts, old, narrower) == [Path("/m/asked")]
    # Peers switched off, or on.
    assert len(to_stop(mounts, old, parse_config(BASE, "new.toml"))) == len(mounts)
    plain = entries(
        {path: "mounted" for path in ("/m/kept", "/m/changed", "/m/dropped", "/m/down")}
    )
    assert len(to_stop(plain, parse_config(BASE, "old.toml"), old)) == len(plain)


def test_a_restart_is_seen_in_the_units_job_list_only() -> None:
    jobs = (
        "42 modelfsd.service restart running\n"
        "43 vllm.service start waiting\n"
        "44 other.service restart running\n"
    )
    assert restart_queued(jobs, "modelfsd.service")
    assert not restart_queued(jobs, "vllm.service")
    assert not restart_queued("45 modelfsd.service stop running\n", "modelfsd.service")
    assert not restart_queued("", "modelfsd.service")

"""Two nodes as systemd runs them: each a ``modelfs daemon`` with its own config, cache and
control socket, mounting the same model from its config with a ``[cluster]`` table; one
scheduler; the registry behind a counting proxy. What one node read, the other takes from it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from contextlib import ExitStack
from pathlib import Path

import httpx
from cluster_tools import MIB, publish, read_all, scheduler_process
from mounting import modelfs, unmount
from prometheus_client.parser import text_string_to_metric_families
from registry_tools import Proxy, Registry, free_port, free_ports
from test_service import Notifications, running_daemon, status, stop_daemon

SECRET = b"node-peers-test-secret-0123456789abcdef"


def node_config(root: Path, proxy: Proxy, reference: str, scheduler: str, secret: Path) -> Path:
    """A node's config.toml: its own cache, control socket and peer port range."""
    root.mkdir()
    (root / "model").mkdir()
    port = free_ports(4)  # the next free port of the range is asserted below
    config = root / "config.toml"
    config.write_text(
        f'control_socket = "{root / "run" / "control.sock"}"\n'
        f'[cache]\ndir = "{root / "cache"}"\nsize = "1G"\n'
        f'[registries."{proxy.host}"]\nplain_http = true\n'
        f'[cluster]\nscheduler = "{scheduler}"\nsecret_file = "{secret}"\n'
        f'peer_listen = "127.0.0.1"\npeer_ports = "{port}-{port + 3}"\nzone = "test"\n'
        f'[[mounts]]\nref = "{proxy.host}/{reference}"\npath = "{root / "model"}"\n'
        'prefetch = "none"\n'
    )
    return config


def started(
    stack: ExitStack, config: Path, *extra: str
) -> tuple[subprocess.Popen[str], Notifications]:
    """The node's daemon, once READY; stopped (and its mounts detached) when ``stack`` closes."""
    stack.callback(unmount, config.parent / "model")
    stack.callback(unmount, config.parent / "asked")
    notifications = Notifications(config.parent / "notify.sock")
    daemon = stack.enter_context(running_daemon(config, notifications, *extra))
    notifications.wait_for("READY=1")
    return daemon, notifications


def test_a_node_takes_what_another_read_from_it(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> None:
    size = 32 * MIB
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(os.urandom(size))
    expected = hashlib.sha256(data_path.read_bytes()).hexdigest()
    reference = publish(registry.host, "nodes/shared", data_path)
    secret = tmp_path / "cluster-secret"
    secret.write_bytes(SECRET)
    metrics_port = free_port()
    with scheduler_process(secret) as scheduler, ExitStack() as stack:
        a = node_config(tmp_path / "a", proxy, reference, scheduler, secret)
        b = node_config(tmp_path / "b", proxy, reference, scheduler, secret)
        daemon_a, _ = started(stack, a)
        daemon_b, notifications_b = started(stack, b, "--metrics-addr", f"127.0.0.1:{metrics_port}")
        control_b = tmp_path / "b" / "run" / "control.sock"
        (mount_b,) = status(control_b)["mounts"]  # type: ignore[misc]
        assert mount_b["state"] == "mounted" and mount_b["peer_port"] is not None
        proxy.reset()

        assert read_all([tmp_path / "a" / "model" / "model.bin"])[0] == [expected]
        from_registry_a = proxy.blob_bytes
        assert read_all([tmp_path / "b" / "model" / "model.bin"])[0] == [expected]
        print(
            f"\n2 daemons, {size // MIB} MiB: registry served {proxy.blob_bytes / size:.2f} x "
            f"the model ({from_registry_a / size:.2f} x for node A)"
        )
        # About once in total: node B's bytes came from node A.
        assert from_registry_a >= size
        assert proxy.blob_bytes <= 1.1 * size

        live = status(control_b)["mounts"][0]["live"]  # type: ignore[index]
        assert live["fetched_bytes"].get("peer", 0) >= 0.9 * size, live
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        peer_bytes = [
            sample.value
            for family in text_string_to_metric_families(scraped)
            for sample in family.samples
            if sample.name == "modelfs_fetched_bytes_total" and sample.labels["source"] == "peer"
        ]
        assert peer_bytes == [live["fetched_bytes"]["peer"]]

        # A mount asked for over B's control socket serves peers too, on the next free port;
        # a reload keeps both mounts, their processes and their ports.
        asked = tmp_path / "b" / "asked"
        asked.mkdir()
        control_option = ("--control-socket", str(control_b))
        result = modelfs(
            "mount", f"{proxy.host}/{reference}", str(asked), "--plain-http", *control_option
        )
        assert result.returncode == 0, result.stderr
        before = {mount["mountpoint"]: mount for mount in status(control_b)["mounts"]}  # type: ignore[attr-defined]
        assert before[str(asked)]["peer_port"] == mount_b["peer_port"] + 1
        assert (asked / "model.bin").read_bytes()[:MIB] == data_path.read_bytes()[:MIB]
        daemon_b.send_signal(signal.SIGHUP)
        notifications_b.wait_for("READY=1", times=2)
        after = {mount["mountpoint"]: mount for mount in status(control_b)["mounts"]}  # type: ignore[attr-defined]
        for path, mount in before.items():
            assert (after[path]["pid"], after[path]["peer_port"]) == (
                mount["pid"],
                mount["peer_port"],
            )
        for daemon in (daemon_a, daemon_b):
            stop_daemon(daemon)

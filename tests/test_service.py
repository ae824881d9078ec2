"""``modelfs daemon`` started as systemd starts it: its ExecStart command, NOTIFY_SOCKET and
WATCHDOG_USEC set, the notify datagrams read by the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from mounting import MODELFS, is_mounted, modelfs, unmount
from prometheus_client.parser import text_string_to_metric_families
from registry_tools import Proxy, Registry, free_port
from test_preheat import push_model


class Notifications:
    """The socket systemd would listen on for the daemon's sd_notify datagrams, read all along
    (as systemd does) so the keep-alives never fill it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                self.received.append(self.sock.recv(4096).decode())
            except OSError:  # closed
                return

    def wait_for(self, line: str, timeout: float = 60) -> None:
        wait_until(
            lambda: any(line in message.splitlines() for message in list(self.received)),
            timeout,
        )

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join()


def status(control: Path) -> dict[str, object]:
    result = modelfs("status", "--json", "--control-socket", str(control))
    assert result.returncode == 0, result.stderr
    reply: dict[str, object] = json.loads(result.stdout)
    return reply


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        time.sleep(0.1)


@pytest.fixture
def daemon_setup(
    registry: Registry, proxy: Proxy, tmp_path: Path
) -> Iterator[tuple[Path, Path, dict[str, bytes], Path]]:
    reference, files = push_model(registry)
    mnt = tmp_path / "models" / "m"
    mnt.mkdir(parents=True)
    control = tmp_path / "run" / "control.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f'control_socket = "{control}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\nsize = "1G"\n'
        f'[registries."{proxy.host}"]\nplain_http = true\n'
        f'[[mounts]]\nref = "{proxy.host}/{reference}"\npath = "{mnt}"\nprefetch = "none"\n'
    )
    yield config, control, files, mnt
    unmount(mnt)


def test_daemon_lifecycle_ready_restart_metrics_stop(
    daemon_setup: tuple[Path, Path, dict[str, bytes], Path], proxy: Proxy, tmp_path: Path
) -> None:
    config, control, files, mnt = daemon_setup
    notifications = Notifications(tmp_path / "notify.sock")
    metrics_port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(notifications.path), "WATCHDOG_USEC": "1000000"}
    # As modelfsd.service's ExecStart, with the venv's interpreter.
    daemon = subprocess.Popen(
        [*MODELFS, "daemon", "--config", str(config), "--metrics-addr",
         f"127.0.0.1:{metrics_port}"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        notifications.wait_for("READY=1")
        # READY means: the control socket answers, and the config's mounts have been tried.
        assert oct(control.stat().st_mode & 0o777) == "0o600"
        reply = status(control)
        (mount,) = reply["mounts"]  # type: ignore[misc]
        assert mount["state"] == "mounted" and mount["digest"].startswith("sha256:")
        assert (mnt / "model.safetensors").read_bytes() == files["model.safetensors"]
        notifications.wait_for("WATCHDOG=1", timeout=5)

        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        samples = {
            (sample.name, sample.labels.get("mountpoint")): sample.value
            for family in text_string_to_metric_families(scraped)
            for sample in family.samples
        }
        assert samples[("modelfs_mount_up", str(mnt))] == 1
        assert samples[("modelfs_mount_restarts_total", str(mnt))] == 0
        assert samples[("modelfs_cache_size_bytes", None)] >= len(files["model.safetensors"])

        # A mount process killed outright: the stale mount is detached, a new process mounts.
        os.kill(mount["pid"], signal.SIGKILL)
        wait_until(
            lambda: (
                status(control)["mounts"][0]["restarts"] == 1  # type: ignore[index]
                and status(control)["mounts"][0]["state"] == "mounted"
            )  # type: ignore[index]
        )
        after = status(control)["mounts"][0]  # type: ignore[index]
        assert after["last_error"] == "the mount process was killed by SIGKILL"
        proxy.reset()
        assert (mnt / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert proxy.blob_bytes == 0, "the pieces read before are in the cache"

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, daemon.stderr.read() if daemon.stderr else ""
        notifications.wait_for("STOPPING=1", timeout=1)
        assert not is_mounted(mnt)
        assert not control.exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notifications.close()


def test_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    result = modelfs("status", "--control-socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "cannot reach the modelfs daemon" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cache]\nsize = 'lots'\n", "is not a size"),
        ("[[mounts]]\nref = 'r.example/m:v1'\n", "needs both ref and path"),
        ("[[mounts]]\nref = 'r.example/m:v1'\npath = '/m'\nprefetch = 'some'\n", "prefetch"),
        ("colour = 'blue'\n", "unknown key 'colour'"),
        ("[cache\n", "not valid TOML"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = modelfs("daemon", "--config", str(config))
    assert result.returncode == 1
    assert message in result.stderr and str(config) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

"""``modelfs daemon`` started as systemd starts it: its ExecStart command, NOTIFY_SOCKET and
WATCHDOG_USEC set, the notify datagrams read by the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

    def count(self, line: str) -> int:
        return sum(line in message.splitlines() for message in list(self.received))

    def wait_for(self, line: str, timeout: float = 60, times: int = 1) -> None:
        wait_until(lambda: self.count(line) >= times, timeout)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join()


def status(control: Path) -> dict[str, object]:
    result = modelfs("status", "--json", "--control-socket", str(control))
    assert result.returncode == 0, result.stderr
    reply: dict[str, object] = json.loads(result.stdout)
    return reply


def mounts_by_path(control: Path) -> dict[str, dict[str, Any]]:
    return {mount["mountpoint"]: mount for mount in status(control)["mounts"]}  # type: ignore[attr-defined]


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        time.sleep(0.1)


class Reader:
    """tests/reader.py in its own process, reading ``path`` through a mount in a loop."""

    def __init__(self, path: Path, expected: bytes, workdir: Path) -> None:
        workdir.mkdir()
        self.workdir = workdir
        (workdir / "expected").write_bytes(expected)
        script = Path(__file__).parent / "reader.py"
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(path), str(workdir / "expected"), str(workdir)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def last_pass(self) -> float:
        """When the last complete, correct-length pass ended (time.monotonic()); 0: none yet."""
        record = self.workdir / "last_pass"
        return float(record.read_text()) if record.exists() else 0.0

    def finish(self) -> dict[str, Any]:
        (self.workdir / "stop").touch()
        output, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0
        summary: dict[str, Any] = json.loads(output)
        return summary

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextmanager
def running_daemon(
    config: Path, notifications: Notifications, *extra: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """``modelfs daemon`` as modelfsd.service's ExecStart runs it, with the venv's interpreter."""
    env = {
        **(os.environ if env is None else env),
        "NOTIFY_SOCKET": str(notifications.path),
        "WATCHDOG_USEC": "1000000",
    }
    daemon = subprocess.Popen(
        [*MODELFS, "daemon", "--config", str(config), *extra],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notifications.close()


def stop_daemon(daemon: subprocess.Popen[str]) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0, daemon.stderr.read() if daemon.stderr else ""


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
    metrics = ("--metrics-addr", f"127.0.0.1:{metrics_port}")
    with running_daemon(config, notifications, *metrics) as daemon:
        notifications.wait_for("READY=1")
        # READY means: the control socket answers, and the config's mounts have been tried.
        assert oct(control.stat().st_mode & 0o777) == "0o600"
        # The mount process's settings, handed over as a file: root's alone.
        (settings,) = control.parent.glob("mount-*.json")
        assert oct(settings.stat().st_mode & 0o777) == "0o600"
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

        # A mount process killed outright while a reader reads through it: the stale mount is
        # detached, a new process mounts, the reader's reads work again.
        reader = Reader(mnt / "model.safetensors", files["model.safetensors"], tmp_path / "r")
        try:
            wait_until(lambda: reader.last_pass() > 0)
            os.kill(mount["pid"], signal.SIGKILL)
            wait_until(
                lambda: (
                    status(control)["mounts"][0]["restarts"] == 1  # type: ignore[index]
                    and status(control)["mounts"][0]["state"] == "mounted"  # type: ignore[index]
                )
            )
            remounted = time.monotonic()
            wait_until(lambda: reader.last_pass() > remounted)
            summary = reader.finish()
        finally:
            reader.kill()
        # Never a wrong byte. The errors the kernel gives while there is no server: on the dead
        # mount ENOTCONN (new requests) or ECONNABORTED (requests in flight when the process
        # died), then, once it is detached and before the new mount, ENOENT (the empty
        # directory under it); EIO is allowed too. The reader saw the outage (it reopens the
        # file every pass, so at least one open fails).
        assert summary["wrong"] == 0, summary
        assert summary["errors"], summary
        assert set(summary["errors"]) <= {"ENOTCONN", "ECONNABORTED", "ENOENT", "EIO"}, summary
        after = status(control)["mounts"][0]  # type: ignore[index]
        assert after["last_error"] == "the mount process was killed by SIGKILL"
        proxy.reset()
        assert (mnt / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert proxy.blob_bytes == 0, "the pieces read before are in the cache"

        stop_daemon(daemon)
        notifications.wait_for("STOPPING=1", timeout=1)
        assert not is_mounted(mnt)
        assert not control.exists()
        assert not settings.exists()  # gone with its mount


def test_reload_keeps_mounts_being_read_and_applies_the_config(
    daemon_setup: tuple[Path, Path, dict[str, bytes], Path], tmp_path: Path
) -> None:
    config, control, files, mnt = daemon_setup
    asked, added = tmp_path / "models" / "asked", tmp_path / "models" / "added"
    asked.mkdir()
    added.mkdir()
    notifications = Notifications(tmp_path / "notify.sock")
    reader = None
    try:
        with running_daemon(config, notifications) as daemon:
            notifications.wait_for("READY=1")
            reference = mounts_by_path(control)[str(mnt)]["reference"]
            # With the daemon running, `modelfs mount` asks it; the mount is listed as asked for.
            control_option = ("--control-socket", str(control))
            result = modelfs("mount", reference, str(asked), "--plain-http", *control_option)
            assert result.returncode == 0, result.stderr
            assert "by the modelfs daemon" in result.stderr
            assert mounts_by_path(control)[str(asked)]["origin"] == "control"
            assert (asked / "tokenizer.json").read_bytes() == files["tokenizer.json"]
            pids = {path: mount["pid"] for path, mount in mounts_by_path(control).items()}

            reader = Reader(mnt / "model.safetensors", files["model.safetensors"], tmp_path / "r")
            wait_until(lambda: reader is not None and reader.last_pass() > 0)
            original = config.read_text()
            # Reload 1: a mount added to the config comes up; the others keep their process.
            config.write_text(original + f'[[mounts]]\nref = "{reference}"\npath = "{added}"\n')
            daemon.send_signal(signal.SIGHUP)
            notifications.wait_for("READY=1", times=2)
            assert notifications.count("RELOADING=1") == 1
            assert any("MONOTONIC_USEC=" in message for message in notifications.received)
            mounts = mounts_by_path(control)
            assert mounts[str(added)]["state"] == "mounted"
            assert {path: mounts[path]["pid"] for path in pids} == pids
            # Reload 2: the mount dropped from the config goes; the others still stay.
            config.write_text(original)
            daemon.send_signal(signal.SIGHUP)
            notifications.wait_for("READY=1", times=3)
            mounts = mounts_by_path(control)
            assert str(added) not in mounts and not is_mounted(added)
            assert {path: mounts[path]["pid"] for path in pids} == pids
            assert daemon.poll() is None  # the same process all along: exec keeps the PID

            reloaded = time.monotonic()
            wait_until(lambda: reader is not None and reader.last_pass() > reloaded)
            summary = reader.finish()
            assert summary == {"passes": summary["passes"], "wrong": 0, "errors": {}}
            assert summary["passes"] >= 2

            # A config that does not parse: the reload is refused, the daemon runs on as it was.
            config.write_text("[cache\n")
            daemon.send_signal(signal.SIGHUP)
            notifications.wait_for("READY=1", times=4)
            assert any("STATUS=reload refused" in message for message in notifications.received)
            assert {path: mount["pid"] for path, mount in mounts_by_path(control).items()} == pids

            # `modelfs umount` asks the daemon for its mounts: unmounted and no longer kept up.
            result = modelfs("umount", str(asked), *control_option)
            assert result.returncode == 0, result.stderr
            assert not is_mounted(asked) and str(asked) not in mounts_by_path(control)

            # A SIGTERM right behind a SIGHUP is not lost in the exec: the new image stops.
            config.write_text(original)
            daemon.send_signal(signal.SIGHUP)
            stop_daemon(daemon)
            assert not is_mounted(mnt)
    finally:
        if reader is not None:
            reader.kill()
        unmount(asked)
        unmount(added)


def systemd_stand_in(directory: Path) -> tuple[dict[str, str], Path]:
    """What the daemon asks systemd on SIGTERM, answered as systemd answers while it restarts
    modelfsd.service (its job is listed as ``restart`` until the stop is done) whenever the
    returned flag file exists, else with no jobs. systemd cannot run as PID 1 here; everything
    else in the restart (processes, FUSE, registry, readers) is real."""
    directory.mkdir()
    flag = directory / "restarting"
    systemctl = directory / "systemctl"
    systemctl.write_text(
        "#!/bin/sh\n"
        'test "$1 $2 $3 $4 $5" = "list-jobs --no-legend --plain --no-pager modelfsd.service" '
        "|| exit 1\n"
        f'test -e "{flag}" && echo "42 modelfsd.service restart running"\n'
        "exit 0\n"
    )
    systemctl.chmod(0o755)
    env = {**os.environ, "MODELFS_UNIT": "modelfsd.service"}
    env["PATH"] = f"{directory}:{env['PATH']}"
    return env, flag


def test_restart_leaves_mounts_up_for_the_next_daemon_which_adopts_them(
    daemon_setup: tuple[Path, Path, dict[str, bytes], Path], tmp_path: Path
) -> None:
    config, control, files, mnt = daemon_setup
    env, restarting = systemd_stand_in(tmp_path / "bin")
    handover = control.parent / "handover.json"
    reader = None
    try:
        first = Notifications(tmp_path / "notify1.sock")
        with running_daemon(config, first, env=env) as daemon:
            first.wait_for("READY=1")
            pid = mounts_by_path(control)[str(mnt)]["pid"]
            reader = Reader(mnt / "model.safetensors", files["model.safetensors"], tmp_path / "r")
            wait_until(lambda: reader.last_pass() > 0)
            # systemctl restart: SIGTERM while the unit's restart job runs.
            restarting.touch()
            stop_daemon(daemon)
        assert is_mounted(mnt) and handover.exists()
        os.kill(pid, 0)  # the mount process serves on, with no daemon
        assert (mnt / "tokenizer.json").read_bytes() == files["tokenizer.json"]  # a first read
        restarting.unlink()

        second = Notifications(tmp_path / "notify2.sock")
        with running_daemon(config, second, env=env) as daemon:
            second.wait_for("READY=1")
            mount = mounts_by_path(control)[str(mnt)]
            assert (mount["state"], mount["pid"], mount["restarts"]) == ("mounted", pid, 0)
            assert not handover.exists()  # taken once
            adopted = time.monotonic()
            wait_until(lambda: reader.last_pass() > adopted)
            summary = reader.finish()
            assert summary == {"passes": summary["passes"], "wrong": 0, "errors": {}}
            assert (mnt / "code" / "run.py").read_bytes() == files["code/run.py"]

            # The adopted process is not the new daemon's child; its end is still noticed.
            os.kill(pid, signal.SIGKILL)
            wait_until(
                lambda: (
                    mounts_by_path(control)[str(mnt)]["restarts"] == 1
                    and mounts_by_path(control)[str(mnt)]["state"] == "mounted"
                )
            )
            mount = mounts_by_path(control)[str(mnt)]
            assert "adopted after a daemon restart" in mount["last_error"]
            assert (mnt / "model.safetensors").read_bytes() == files["model.safetensors"]

            # A plain stop (no restart job): everything is unmounted, as before.
            stop_daemon(daemon)
            assert not is_mounted(mnt) and not handover.exists()
    finally:
        if reader is not None:
            reader.kill()


def test_mount_by_daemon_refusals_are_one_line_and_no_daemon_mounts_here(
    daemon_setup: tuple[Path, Path, dict[str, bytes], Path], tmp_path: Path
) -> None:
    config, control, files, mnt = daemon_setup
    other = tmp_path / "models" / "other"
    other.mkdir()
    notifications = Notifications(tmp_path / "notify.sock")
    try:
        with running_daemon(config, notifications) as daemon:
            notifications.wait_for("READY=1")
            reference = mounts_by_path(control)[str(mnt)]["reference"]
            control_option = ("--control-socket", str(control))
            missing = reference.rsplit(":", 1)[0] + ":no-such-tag"
            cases = [
                ((missing, str(other), "--plain-http"), "no-such-tag"),
                ((reference, str(mnt), "--plain-http"), "already mounted by the daemon"),
                ((reference, str(other), "--cache-dir", str(tmp_path)), "--no-daemon"),
            ]
            for args, message in cases:
                result = modelfs("mount", *args, *control_option)
                assert result.returncode == 1, result.stderr
                assert message in result.stderr, result.stderr
                assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            # The failed mount is neither kept up nor retried.
            assert list(mounts_by_path(control)) == [str(mnt)] and not is_mounted(other)

            # --no-daemon mounts in this process's child; umount of a mount the daemon does
            # not keep unmounts it here.
            own_cache = ("--cache-dir", str(tmp_path / "own-cache"))
            result = modelfs(
                "mount", reference, str(other), "--plain-http", "--no-daemon", *own_cache,
                *control_option,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert (other / "tokenizer.json").read_bytes() == files["tokenizer.json"]
            assert list(mounts_by_path(control)) == [str(mnt)]
            result = modelfs("umount", str(other), *control_option)
            assert result.returncode == 0, result.stderr
            assert not is_mounted(other) and is_mounted(mnt)
            stop_daemon(daemon)
    finally:
        unmount(other)


def test_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    result = modelfs("status", "--control-socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "cannot reach the modelfs daemon" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


CLUSTER = "[cluster]\nscheduler = 'http://s.example:7480'\nsecret_file = '/nonexistent/s'\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cache]\nsize = 'lots'\n", "is not a size"),
        ("[[mounts]]\nref = 'r.example/m:v1'\n", "needs both ref and path"),
        ("[[mounts]]\nref = 'r.example/m:v1'\npath = '/m'\nprefetch = 'some'\n", "prefetch"),
        ("colour = 'blue'\n", "unknown key 'colour'"),
        ("[cache\n", "not valid TOML"),
        ("[cluster]\nscheduler = 'http://s.example:7480'\n", "needs secret_file, peer_ports"),
        (f"{CLUSTER}peer_ports = 7481\ncolour = 'blue'\n", "[cluster]: unknown key 'colour'"),
        (f"{CLUSTER}peer_ports = '7481:7490'\n", "is not a port or a range LOW-HIGH"),
        (f"{CLUSTER}peer_ports = 7481\n", "cannot read the cluster secret file /nonexistent/s"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = modelfs("daemon", "--config", str(config))
    assert result.returncode == 1
    assert message in result.stderr and str(config) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

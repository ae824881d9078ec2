"""One mount, kept up: a ``modelfs mount --foreground`` child process, restarted when it dies.

Before each start a stale mount on the path (left by a killed process: ``Transport endpoint is
not connected``) is detached with ``fusermount3 -u -z``. Readiness comes over an inherited pipe,
as with ``modelfs mount`` in the background. Cancelling the supervisor stops the child with
SIGTERM, which unmounts, and detaches whatever is left.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from modelfs.mount.session import MountOptions
from modelfs.reference import LayoutReference
from modelfs.service.config import DaemonConfig, MountSpec
from modelfs.service.notify import NOTIFY_VARIABLES
from modelfs.sources.credentials import Credentials

STOP_TIMEOUT = 20.0
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0
# A mount that stayed up this long is healthy again: the next failure retries quickly.
HEALTHY_AFTER = 60.0
_DIGEST = re.compile(r"\((sha256:[0-9a-f]{64})\)")


@dataclass
class MountState:
    """What ``modelfs status`` shows of a supervised mount."""

    reference: str
    mountpoint: str
    state: str = "starting"  # starting, mounted, restarting, stopped
    digest: str | None = None
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None
    origin: str = "config"  # config, or control: asked for over the control socket
    peer_port: int | None = None  # its peer server's, with [cluster] (modelfs.service.peer_ports)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Child(Protocol):
    """A mount process: one this daemon started (trio.Process) or adopted across a reload."""

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int | None: ...  # None: ended, status unknown (not our child)

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def is_mounted(path: Path) -> bool:
    """From /proc/self/mountinfo: stat-ing a dead FUSE mount would fail or hang."""
    target = str(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


async def detach(path: Path) -> None:
    if is_mounted(path):
        await trio.run_process(
            ["fusermount3", "-u", "-z", str(path)],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )


def stats_socket(config: DaemonConfig, mountpoint: Path) -> Path:
    """Where the mount process on ``mountpoint`` serves its counters: beside the control socket,
    named by a hash (a unix socket path is at most 107 bytes)."""
    name = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return config.control_socket.parent / f"mount-{name}.sock"


def settings_file(config: DaemonConfig, mountpoint: Path) -> Path:
    """Where the daemon writes the settings of the mount process on ``mountpoint``."""
    return stats_socket(config, mountpoint).with_suffix(".json")


def mount_options(
    spec: MountSpec, config: DaemonConfig, peer_port: int | None = None
) -> MountOptions:
    """The settings of the mount process for ``spec``, from the daemon's config. ``peer_port``:
    where the mount serves peers; with ``[cluster]`` every mount has one."""
    registry = config.registry_for(spec.reference)
    cluster = None
    if config.cluster is not None:
        if peer_port is None:
            raise ValueError(f"the mount on {spec.path} has no peer port")  # a bug, not input
        cluster = config.cluster.for_port(peer_port)
    return MountOptions(
        reference=spec.reference,
        mountpoint=spec.path,
        cache_dir=config.cache_dir,
        cache_size=config.cache_size,
        max_inflate_ratio=config.inflate.ratio,
        max_inflate_size=config.inflate.size,
        plain_http=registry.plain_http,
        insecure=registry.insecure,
        hosts_dir=config.hosts_dir,
        mirrors=()
        if isinstance(spec.reference, LayoutReference)
        else config.mirrors.get(spec.reference.registry, ()),
        prefetch=spec.prefetch,
        cluster=cluster,
        stats_socket=stats_socket(config, spec.path),
        signature_policy=config.signature_policy,
        scan=config.scan,
    )


def mount_command(
    options: MountOptions, settings: Path, ready_fd: int, credentials_fd: int | None = None
) -> list[str]:
    """The mount process's command line: its settings come from the file it is given (written
    by ``write_settings``), its credentials if any from a pipe; the reference and path are there
    for ``ps`` to show."""
    credentials = [] if credentials_fd is None else ["--credentials-fd", str(credentials_fd)]
    return [
        sys.executable, "-m", "modelfs", *_verbosity(),
        "mount", str(options.reference), str(options.mountpoint),
        "--foreground", "--settings", str(settings), "--ready-fd", str(ready_fd), *credentials,
    ]  # fmt: skip


def write_settings(options: MountOptions, path: Path) -> None:
    """Write the settings for a mount process, atomically (a restart may read them at once)."""
    staged = path.with_suffix(".tmp")
    staged.write_text(options.as_json())
    staged.chmod(0o600)
    staged.replace(path)


def _verbosity() -> list[str]:
    """The daemon's ``-v``/``-vv`` for its mount processes (the log format goes by environment)."""
    level = logging.getLogger().getEffectiveLevel()
    return ["-" + "v" * ((logging.WARNING - level) // 10)] if level < logging.WARNING else []


def child_environment(config: DaemonConfig) -> dict[str, str]:
    # The notify socket and watchdog belong to the daemon alone.
    env = {key: value for key, value in os.environ.items() if key not in NOTIFY_VARIABLES}
    if config.credentials is not None:
        env["DOCKER_CONFIG"] = str(config.credentials)
    for name, value in config.proxy.items():  # [proxy]: in place of the daemon's own, either case
        env.pop(name.lower(), None)
        env[name] = value
    return env


def describe_exit(code: int | None) -> str:
    if code is None:
        return "the mount process ended (adopted after a daemon restart: its status is unknown)"
    if code < 0:
        return f"the mount process was killed by {signal.Signals(-code).name}"
    return f"the mount process exited with status {code}"


async def _read_report(fd: int) -> str:
    report = b""
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some():
            report += chunk
    return report.decode(errors="replace")


async def supervise(
    spec: MountSpec,
    config: DaemonConfig,
    state: MountState,
    first_attempt: trio.Event,
    adopted: Child | None = None,
    credentials: Credentials | None = None,
) -> None:
    """Keep ``spec`` mounted until cancelled; ``first_attempt`` is set once it mounted or
    failed once. ``adopted``: the mount's running process, handed over by a reload.
    ``credentials``: the registry's, given with a control request, for each start (held in
    memory only: a process restarted after a reload or restart of the daemon goes without)."""
    path = spec.path.resolve()
    failures = 0
    try:
        while True:
            started = time.monotonic()
            if adopted is None:
                await detach(path)
                error = await _run_once(spec, config, state, path, first_attempt, credentials)
            else:
                first_attempt.set()  # it is mounted already
                error = await _watch_adopted(adopted)
                adopted = None
            first_attempt.set()
            failures = 1 if time.monotonic() - started > HEALTHY_AFTER else failures + 1
            state.state, state.pid, state.last_error = "restarting", None, error
            state.restarts += 1
            await trio.sleep(min(MAX_RETRY_DELAY, FIRST_RETRY_DELAY * 2 ** (failures - 1)))
    finally:
        state.state, state.pid = "stopped", None
        settings_file(config, spec.path).unlink(missing_ok=True)  # read at each start only
        with trio.CancelScope(shield=True):
            await detach(path)


async def _run_once(
    spec: MountSpec,
    config: DaemonConfig,
    state: MountState,
    path: Path,
    first_attempt: trio.Event,
    credentials: Credentials | None,
) -> str:
    """Run one mount process until it exits; why it ended."""
    options = mount_options(spec, config, state.peer_port)
    settings = settings_file(config, spec.path)
    await trio.to_thread.run_sync(write_settings, options, settings)
    read_end, write_end = os.pipe()
    secret = None if credentials is None else credentials.to_pipe()
    try:
        process = await trio.lowlevel.open_process(
            mount_command(options, settings, write_end, secret),
            pass_fds=(write_end,) if secret is None else (write_end, secret),
            stdin=subprocess.DEVNULL,
            env=child_environment(config),
        )
    finally:
        os.close(write_end)
        if secret is not None:
            os.close(secret)
    state.pid = process.pid
    try:
        report = await _read_report(read_end)  # EOF: ready, failed, or died
        if report.startswith("ready "):
            match = _DIGEST.search(report)
            state.state, state.digest = "mounted", match.group(1) if match else None
            first_attempt.set()
        code = await process.wait()
        return report.strip() if report and not report.startswith("ready ") else describe_exit(code)
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process)


async def _watch_adopted(process: Child) -> str:
    """Wait for an adopted mount process to exit; why it ended. Cancelled: stop it."""
    try:
        return describe_exit(await process.wait())
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process)


async def _stop(process: Child) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)  # the mount unmounts on SIGTERM
    with trio.move_on_after(STOP_TIMEOUT):
        await process.wait()
        return
    process.kill()
    await process.wait()

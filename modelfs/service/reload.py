"""``systemctl reload modelfsd``: the daemon re-executes itself in place and keeps its mounts.

On SIGHUP the daemon checks the config, stops the mounts the new config drops or changes and any
not up at that moment, then ``execve``s its own command line. The PID stays (systemd's main PID
does not change) and so do the children: the mount processes keep serving their mounts, readers
see nothing. What the new image needs (each mount's spec, state and process id, the control
socket's listening descriptor) is handed over in an environment variable; it adopts the processes
(waiting on a pidfd, reaping with waitpid, as for children it started) and starts what the config
adds. That is also how a new modelfs version takes over without unmounting anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import trio

from modelfs.prefetch.prefetcher import PrefetchMode
from modelfs.reference import parse_any_reference
from modelfs.service.config import DaemonConfig, MountSpec, RegistrySettings
from modelfs.service.control import open_control_socket
from modelfs.service.mount_table import MountTable, Supervised, config_for
from modelfs.service.peer_ports import choose_port
from modelfs.service.supervisor import MountState, mount_options

HANDOVER_VARIABLE = "MODELFS_DAEMON_HANDOVER"
# The daemon's signals are blocked in every thread from its start (threads inherit the mask) and
# taken with sigwaitinfo. One that comes while a reload is under way stays pending, across exec,
# for the new image: never lost with a handler in a thread about to vanish, never killing a
# daemon whose mounts would go stale. Its mount processes inherit the mask and unblock them.
DAEMON_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


@dataclass(frozen=True)
class HandedOver:
    spec: MountSpec
    settings: RegistrySettings | None
    state: MountState


@dataclass(frozen=True)
class Handover:
    control_socket: Path
    control_fd: int | None  # the listening control socket; None after a restart (it closed)
    mounts: list[HandedOver]


def encode_handover(handover: Handover) -> str:
    return json.dumps(
        {
            "control_socket": str(handover.control_socket),
            "control_fd": handover.control_fd,
            "mounts": [
                {
                    "reference": str(mount.spec.reference),
                    "path": str(mount.spec.path),
                    "prefetch": mount.spec.prefetch.value,
                    "settings": None if mount.settings is None else vars(mount.settings),
                    "state": mount.state.as_json(),
                }
                for mount in handover.mounts
            ],
        }
    )


def decode_handover(text: str) -> Handover:
    data = json.loads(text)
    known = {field.name for field in fields(MountState)}  # the older image may have had others
    mounts = [
        HandedOver(
            MountSpec(
                parse_any_reference(mount["reference"]),
                Path(mount["path"]),
                PrefetchMode(mount["prefetch"]),
            ),
            None if mount["settings"] is None else RegistrySettings(**mount["settings"]),
            MountState(**{key: value for key, value in mount["state"].items() if key in known}),
        )
        for mount in data["mounts"]
    ]
    return Handover(Path(data["control_socket"]), data["control_fd"], mounts)


def take_handover() -> Handover | None:
    """What the previous image handed over, if this process is a reload; children never see it."""
    text = os.environ.pop(HANDOVER_VARIABLE, None)
    return None if text is None else decode_handover(text)


def _launch(
    spec: MountSpec, config: DaemonConfig, settings: RegistrySettings | None, port: int | None
) -> tuple[Any, ...]:
    """Everything a mount process is started with: if it changes, the mount is restarted."""
    config = config_for(config, spec, settings)
    return (mount_options(spec, config, port), config.credentials)


def _dropped(entry: Supervised, new: DaemonConfig) -> bool:
    """A config mount the new config drops or mounts another way (the new image starts the
    new config's mount in its place)."""
    if entry.state.origin != "config":
        return False
    path = entry.spec.path.resolve()
    wanted = next((spec for spec in new.mounts if spec.path.resolve() == path), None)
    return wanted != entry.spec


def _restarted(entry: Supervised, old: DaemonConfig, new: DaemonConfig) -> bool:
    """A mount whose process the new config would start differently: other cache, registry or
    cluster settings, or a peer port outside the new range (it gets another). Config mounts
    and mounts asked for over the control socket alike."""
    kept = entry.state.peer_port
    cluster = new.cluster
    port = choose_port(cluster.peer_ports, (), kept) if cluster is not None else None
    if cluster is not None and kept is not None and port != kept:
        return True
    return _launch(entry.spec, new, entry.settings, port) != _launch(
        entry.spec, old, entry.settings, kept
    )


def to_stop(entries: Iterable[Supervised], old: DaemonConfig, new: DaemonConfig) -> list[Path]:
    """Mounts to stop before handing over: those the new config drops or starts differently,
    and every mount not up right now (a start in progress cannot be handed over: its readiness
    pipe does not survive exec; the new image starts it again)."""
    return [
        entry.spec.path.resolve()
        for entry in entries
        if _dropped(entry, new) or _restarted(entry, old, new) or entry.state.state != "mounted"
    ]


def to_carry(entries: Iterable[Supervised], new: DaemonConfig) -> list[Supervised]:
    """Mounts the new image takes over: all but the dropped config mounts and a control
    request's mount that has not answered yet (the request fails with the reload; the client
    asks again). Those up and not stopped, the new image adopts; the others it starts again,
    with the new config."""
    return [
        entry
        for entry in entries
        if not _dropped(entry, new)
        and (entry.state.origin == "config" or entry.first_attempt.is_set())
    ]


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def block_daemon_signals() -> None:
    """Before any thread starts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)


async def next_signal() -> int:
    info = await trio.to_thread.run_sync(signal.sigwaitinfo, DAEMON_SIGNALS, abandon_on_cancel=True)
    return info.si_signo


def reexec(handover: Handover) -> None:
    """Replace this process's image by a new start of its own command line, handing ``handover``
    over. Returns only by raising OSError, when exec failed."""
    control_fd = handover.control_fd
    assert control_fd is not None, "a reload hands its listening control socket over"
    os.set_inheritable(control_fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, HANDOVER_VARIABLE: encode_handover(handover)}
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        os.set_inheritable(control_fd, False)
        raise


async def control_listener(path: Path, handover: Handover | None) -> trio.SocketListener:
    """The control socket: the previous image's listening one if it is still at ``path``, so no
    client is refused during a reload."""
    if handover is not None and handover.control_fd is not None:
        if handover.control_socket == path:
            os.set_inheritable(handover.control_fd, False)
            sock = trio.socket.socket(
                socket.AF_UNIX, socket.SOCK_STREAM, fileno=handover.control_fd
            )
            return trio.SocketListener(sock)
        os.close(handover.control_fd)
        handover.control_socket.unlink(missing_ok=True)
    return await open_control_socket(path)


def resume(table: MountTable, mount: HandedOver) -> Supervised:
    """Supervise a handed-over mount again: adopt its process if it was up, else start it."""
    state = mount.state
    process = None
    if state.state == "mounted" and state.pid is not None:
        process = adopt(state.pid, mount.spec.path)
    if process is None:
        state.state, state.pid = "starting", None
    return table.start(mount.spec, state, mount.settings, process)


class AdoptedProcess:
    """A mount process started by an earlier daemon. After a reload it is still this process's
    child (exec keeps children): waited for on a pidfd and reaped with waitpid. After a restart
    it is not (its parent exited; init reaps it): the pidfd tells when it ends, not how."""

    def __init__(self, pid: int, pidfd: int, child: bool) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._child = child
        self._ended = False
        self.returncode: int | None = None

    async def wait(self) -> int | None:
        if not self._ended:
            await trio.lowlevel.wait_readable(self._pidfd)
            if self._child:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            self._ended = True
            os.close(self._pidfd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if not self._ended:
            # By pidfd: never a process that took over the number after this one ended. One
            # that has just ended is for wait() to report.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def adopt(pid: int, mountpoint: Path) -> AdoptedProcess | None:
    """The handed-over process ``pid``, if it still runs the mount on ``mountpoint``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:  # is it our child? WNOWAIT: a zombie stays to be reaped by wait()
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        # Not ours: the pidfd holds the process now, so its command line says whether the
        # number still names the mount process rather than one that took it over since.
        if not _runs_mount(pid, mountpoint):
            os.close(pidfd)
            return None
        return AdoptedProcess(pid, pidfd, child=False)
    return AdoptedProcess(pid, pidfd, child=True)


def _runs_mount(pid: int, mountpoint: Path) -> bool:
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"mount" in arguments and os.fsencode(str(mountpoint)) in arguments

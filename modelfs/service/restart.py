"""``systemctl restart modelfsd``: the daemon exits, its mount processes stay, the next one
adopts them.

systemd runs a restart as a stop and then a start; the stop reaches the daemon as a plain SIGTERM.
While it is under way, though, systemd lists the unit's job as ``restart`` (it becomes a start
only once the stop is done). So on SIGTERM the daemon asks ``systemctl list-jobs`` about its own
unit (``MODELFS_UNIT``, which modelfsd.service sets to ``%n``): a restart job means "leave the
mounts up". It then writes what a reload hands over (each mount's spec, state and process id)
to a file beside the control socket and exits without stopping anything; with
``KillMode=process`` systemd leaves the mount processes running, and the next daemon adopts
them. Readers go on as in a reload. Any other SIGTERM, or no answer from systemd, unmounts
everything as before.

A daemon killed outright (SIGKILL, the OOM killer) hands nothing over, so the daemon keeps the
same list written down all along (``record_file``); the next daemon adopts the mount processes
still running, those of mounts asked for over the control socket too, and starts the others
again, instead of leaving them orphaned (or, for the config's, mounting over them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from modelfs.service.reload import Handover, decode_handover, encode_handover

log = logging.getLogger(__name__)

UNIT_VARIABLE = "MODELFS_UNIT"
# systemctl answers from memory; one that does not answer soon is not going to restart us.
_SYSTEMCTL_TIMEOUT = 5.0


def restart_queued(jobs: str, unit: str) -> bool:
    """From ``systemctl list-jobs --no-legend --plain`` (JOB UNIT TYPE STATE): is a restart of
    ``unit`` among them?"""
    for line in jobs.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit and fields[2] == "restart":
            return True
    return False


async def restart_pending() -> bool:
    """Is systemd restarting this daemon's unit? False when not run by systemd or when it
    does not answer."""
    unit = os.environ.get(UNIT_VARIABLE)
    if not unit:
        return False
    with trio.move_on_after(_SYSTEMCTL_TIMEOUT):
        try:
            result = await trio.run_process(
                ["systemctl", "list-jobs", "--no-legend", "--plain", "--no-pager", unit],
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )
        except OSError as error:
            log.warning("cannot ask systemd whether %s restarts: %s", unit, error)
            return False
        return result.returncode == 0 and restart_queued(result.stdout.decode(), unit)
    log.warning("systemctl did not answer whether %s restarts; unmounting", unit)
    return False


def handover_file(control_socket: Path) -> Path:
    """In the runtime directory, which modelfsd.service keeps across restarts."""
    return control_socket.parent / "handover.json"


def record_file(control_socket: Path) -> Path:
    """The mounts as the running daemon keeps them written down (``Daemon.keep_record``): what
    it would hand over, left behind when it is killed without a chance to (SIGKILL, OOM)."""
    return control_socket.parent / "mounts.json"


def save_handover(handover: Handover, path: Path | None = None) -> None:
    path = path or handover_file(handover.control_socket)
    partial = path.with_suffix(".partial")
    partial.write_text(encode_handover(handover))
    os.chmod(partial, 0o600)
    partial.replace(path)


def take_saved_handover(control_socket: Path) -> Handover | None:
    """What the daemon before this one left, once (the files are gone after this): the
    handover of a restart, else the record of a daemon that was killed, whose mount processes
    may still serve (adopted, not left orphaned or mounted over)."""
    record = _take(record_file(control_socket))
    return _take(handover_file(control_socket)) or record


def _take(path: Path) -> Handover | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    path.unlink()
    try:
        return decode_handover(text)
    except (ValueError, KeyError, TypeError) as error:
        log.error("ignoring %s (the mounts it lists are started again): %s", path, error)
        return None

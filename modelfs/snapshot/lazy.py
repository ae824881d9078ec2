"""The lazily mounted models behind model snapshots: one ``modelfs mount`` per model digest,
shared by every snapshot of that model, unmounted when the last of them goes.

A mount is made by running ``modelfs mount`` (``python -m modelfs``): with the node daemon up,
the daemon makes and keeps it (its cache, its status and metrics); without it, a mount process
of its own, detached. Either way the mount lives outside the snapshotter, so restarting the
snapshotter leaves running containers' reads alone, and a crash in a mount cannot take the
snapshotter down. The command returns once the directory lists, or fails with one line saying
why, which containerd gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path

import trio

from modelfs.errors import ModelfsError
from modelfs.reference import Reference
from modelfs.service.control import DEFAULT_CONTROL_SOCKET, daemon_answers
from modelfs.snapshot.metadata import Code, SnapshotError
from modelfs.sources.credentials import Credentials
from modelfs.sources.hosts import DEFAULT_HOSTS_DIR

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 300.0  # seconds for a mount to list: a manifest, a config, tar headers


class ModelMounts:
    """Mounts under ``directory``, one per model digest."""

    def __init__(
        self,
        directory: Path,
        *,
        plain_http: frozenset[str],
        cache_dir: Path | None,
        prefetch: str | None,
        control_socket: Path | None = None,
        hosts_dir: Path = DEFAULT_HOSTS_DIR,
    ) -> None:
        self.directory = directory
        self.plain_http = plain_http
        # The registries' mirrors and the cache: for the mounts the snapshotter makes itself; a
        # mount the daemon makes takes the daemon's own.
        self.hosts_dir = hosts_dir
        self.cache_dir = cache_dir
        self.prefetch = prefetch
        self.control_socket = control_socket or DEFAULT_CONTROL_SOCKET
        # Where `modelfs mount` and `umount` look for the daemon (None: their default).
        self.daemon = [] if control_socket is None else ["--control-socket", str(control_socket)]
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def path(self, model: Reference) -> Path:
        assert model.digest is not None  # models.model_reference pins them
        return self.directory / model.digest.removeprefix("sha256:")

    async def ensure(self, model: Reference, credentials: Credentials | None = None) -> Path:
        """The model's mount, made if it is not up (after a restart it still is), with
        ``credentials`` if given (else the node's: its docker config, or the daemon's)."""
        path = self.path(model)
        async with self._locks[path.name]:
            if _dead(path):  # its process was killed: detach what is left, mount again
                log.warning("model %s: the mount on %s had died; mounting it again", model, path)
                await _modelfs(["umount", str(path), *self.daemon])
            if os.path.ismount(path):
                return path
            path.mkdir(parents=True, exist_ok=True)
            arguments = ["mount", str(model), str(path), *self.daemon]
            if model.registry in self.plain_http:
                arguments.append("--plain-http")
            if self.prefetch is not None:
                arguments += ["--prefetch", self.prefetch]
            # The daemon's mounts take no credentials: with them, a process of its own.
            if credentials is not None or not await self._daemon_up():
                arguments.append("--no-daemon")
                if self.hosts_dir != DEFAULT_HOSTS_DIR:
                    arguments += ["--hosts-dir", str(self.hosts_dir)]
                if self.cache_dir is not None:
                    arguments += ["--cache-dir", str(self.cache_dir)]
            failure = await _modelfs(arguments, credentials)
            if failure is not None:
                path.rmdir()
                given = " with the credentials of the image's pull" if credentials else ""
                raise SnapshotError(
                    Code.FAILED_PRECONDITION, f"cannot mount model {model}{given}: {failure}"
                )
            log.info("mounted model %s on %s", model, path)
            return path

    async def _daemon_up(self) -> bool:
        """Whether the node daemon answers, so that it makes the mount (a daemon that is there
        but does not answer: not up; the mount is then the snapshotter's own)."""
        try:
            return await asyncio.to_thread(trio.run, daemon_answers, self.control_socket)
        except ModelfsError:
            return False

    def places(self) -> list[Path]:
        """Every model's place, mounted or not: their names are the models' digests."""
        return sorted(self.directory.iterdir()) if self.directory.exists() else []

    async def release(self, path: Path) -> None:
        """Unmount the model at ``path`` (its last snapshot went); a failure is logged, not
        raised: the snapshot is gone whatever happens to its mount."""
        async with self._locks[path.name]:
            if os.path.ismount(path) or _dead(path):
                failure = await _modelfs(["umount", str(path), *self.daemon])
                if failure is not None:
                    log.warning("could not unmount the model on %s: %s", path, failure)
                    return
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()
            log.info("unmounted the model on %s", path)


def _dead(path: Path) -> bool:
    """A FUSE mount whose process is gone (the kernel answers ENOTCONN, or ECONNABORTED once
    the connection was aborted). Opening it asks the mount: a stat could be answered from the
    kernel's attribute cache (kept a day)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as error:
        return error.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


async def _modelfs(arguments: list[str], credentials: Credentials | None = None) -> str | None:
    """Run ``modelfs ARGUMENTS``: None if it succeeded, else its last line of error. The
    ``credentials`` go over a pipe (``--credentials-fd``): no file, command line or environment
    holds them, and the mount process keeps them in memory only."""
    pipe = None if credentials is None else credentials.to_pipe()
    if pipe is not None:
        arguments = [*arguments, "--credentials-fd", str(pipe)]
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "modelfs",
            *arguments,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=() if pipe is None else (pipe,),
        )
    finally:
        if pipe is not None:
            os.close(pipe)
    try:
        _, error = await asyncio.wait_for(process.communicate(), MOUNT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        return f"modelfs {arguments[0]} took more than {MOUNT_TIMEOUT:.0f} s"
    if process.returncode == 0:
        return None
    lines = error.decode(errors="replace").strip().splitlines()
    return lines[-1].removeprefix("modelfs: error: ") if lines else f"exit {process.returncode}"

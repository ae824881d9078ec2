"""``modelfs mount`` and ``modelfs umount``.

Without ``--foreground`` the command starts the mount process in the background and returns once
the directory lists (or prints why it could not mount); the process reports readiness through an
inherited pipe, so there is no polling and no race with the first ``ls``. When the node service
(``modelfs daemon``) answers on its control socket, both commands ask it instead, so the mount is
supervised like the config's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import trio
from click.core import ParameterSource

from modelfs.cli import F, cli
from modelfs.cli.cluster import cluster_options, cluster_settings
from modelfs.errors import ModelfsError
from modelfs.fetcher.prefetch import PrefetchMode
from modelfs.fs.model import Model
from modelfs.fs.mount import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CACHE_SIZE,
    DEFAULT_READ_AHEAD_KB,
    MountOptions,
    serve,
)
from modelfs.reference import parse_any_reference
from modelfs.service.control import DEFAULT_CONTROL_SOCKET, ask, daemon_answers

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*$", re.IGNORECASE)
READY_TIMEOUT = 600.0


def parse_size(text: str) -> int:
    """``100G``, ``512MiB``, ``1.5t`` or plain bytes; binary units."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size (examples: 100G, 512M, 1073741824)")
    number, unit = match.groups()
    factor = 1024 ** ("kmgtp".index(unit.lower()) + 1) if unit else 1
    return int(float(number) * factor)


# The options that mean something to a mount the daemon makes; its own settings (cache...) do
# the rest.
_FOR_DAEMON = {"reference", "mountpoint", "prefetch", "plain_http", "insecure", "control_socket"}


def daemon_options(command: F) -> F:
    command = click.option(
        "--no-daemon", is_flag=True, help="Do it here even if the modelfs daemon is running."
    )(command)
    return click.option(
        "--control-socket",
        type=click.Path(dir_okay=False, path_type=Path),
        default=DEFAULT_CONTROL_SOCKET,
        show_default=True,
        help="Where the modelfs daemon listens; when it answers, it is asked to do it.",
    )(command)


def _log_path(cache_dir: Path, mountpoint: Path) -> Path:
    escaped = str(mountpoint.resolve()).strip("/").replace("/", "-") or "root"
    return cache_dir / "logs" / f"mount-{escaped}.log"


@cli.command()
@click.argument("reference")
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--foreground", "-f", is_flag=True, help="Stay attached until unmounted.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_CACHE_DIR,
    show_default=True,
    help="The node's LMDB piece cache.",
)
@click.option(
    "--cache-size",
    default=str(DEFAULT_CACHE_SIZE >> 30) + "G",
    show_default=True,
    help="Most bytes the cache may hold (K, M, G, T suffixes).",
)
@click.option("--plain-http", is_flag=True, help="Talk HTTP, not HTTPS, to this registry.")
@click.option("--insecure", is_flag=True, help="Accept a registry certificate that fails checks.")
@click.option(
    "--timeout", default=30.0, show_default=True, help="Seconds one registry request may take."
)
@click.option(
    "--retries",
    default=3,
    show_default=True,
    help="Retries of a failed registry request before a read gets EIO.",
)
@click.option(
    "--read-ahead-kb",
    default=DEFAULT_READ_AHEAD_KB,
    show_default=True,
    help="Kernel readahead window of the mount.",
)
@click.option(
    "--prefetch",
    type=click.Choice([mode.value for mode in PrefetchMode]),
    default=PrefetchMode.HINTS.value,
    show_default=True,
    help="none: fetch only what is read; hints: also read ahead of sequential readers and "
    "fetch config, tokenizer and safetensors headers first; all: then the whole model.",
)
@click.option(
    "--allow-other/--no-allow-other",
    default=None,
    help="Let other users read the mount (default: yes when run as root).",
)
@click.option("--ready-fd", type=int, hidden=True)
@daemon_options
@cluster_options
@click.pass_context
def mount(
    context: click.Context,
    /,
    reference: str,
    mountpoint: Path,
    foreground: bool,
    cache_dir: Path,
    cache_size: str,
    plain_http: bool,
    insecure: bool,
    timeout: float,
    retries: int,
    read_ahead_kb: int,
    prefetch: str,
    allow_other: bool | None,
    ready_fd: int | None,
    control_socket: Path,
    no_daemon: bool,
    **cluster: Any,
) -> None:
    """Mount REFERENCE (host/repo:tag, host/repo@sha256:..., oci:PATH[:TAG]) on MOUNTPOINT.

    The directory lists as soon as the manifest is read; file bytes are fetched when read.
    With the modelfs daemon running (and neither --foreground nor --no-daemon), the daemon
    mounts it, with its cache settings, and keeps it up until `modelfs umount`.
    """
    ref = parse_any_reference(reference)
    if not mountpoint.is_dir():
        raise ModelfsError(f"mountpoint {mountpoint} is not a directory; create it first")
    if not (foreground or no_daemon) and trio.run(daemon_answers, control_socket):
        _mount_by_daemon(context, control_socket)
        return
    options = MountOptions(
        reference=ref,
        mountpoint=mountpoint,
        cache_dir=cache_dir,
        cache_size=parse_size(cache_size),
        plain_http=plain_http,
        insecure=insecure,
        timeout=timeout,
        retries=retries,
        read_ahead_kb=read_ahead_kb,
        prefetch=PrefetchMode(prefetch),
        cluster=cluster_settings(**cluster),
    )
    if allow_other is not None:
        options.allow_other = allow_other
    if not foreground:
        _mount_in_background(options)
        return
    _mount_in_foreground(options, ready_fd)


def _mount_by_daemon(context: click.Context, control_socket: Path) -> None:
    params = context.params
    for name, value in params.items():
        if name not in _FOR_DAEMON and (
            context.get_parameter_source(name) == ParameterSource.COMMANDLINE
        ):
            option = "--" + name.replace("_", "-")
            raise ModelfsError(
                f"{option} {value} does not apply to a mount the modelfs daemon makes (it uses "
                "its own settings); drop it, or pass --no-daemon to mount without the daemon"
            )
    request = {
        "command": "mount",
        "reference": params["reference"],
        "path": str(params["mountpoint"].resolve()),
        "prefetch": params["prefetch"],
        "plain_http": params["plain_http"],
        "insecure": params["insecure"],
    }
    state = trio.run(ask, control_socket, request)["mount"]
    click.echo(
        f"mounted {state['reference']} ({state['digest']}) on {state['mountpoint']} "
        "by the modelfs daemon",
        err=True,
    )


def _mount_in_foreground(options: MountOptions, ready_fd: int | None) -> None:
    started = time.monotonic()
    # The daemon starts its mounts with these blocked (they are its own); ours stop the mount.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    def on_ready(model: Model) -> None:
        message = (
            f"mounted {options.reference} ({model.digest}) on {options.mountpoint}: "
            f"{len(model.tree.files())} files, {model.tree.total_size} bytes, "
            f"ready in {time.monotonic() - started:.2f}s"
        )
        if ready_fd is None:
            click.echo(message, err=True)
        else:
            os.write(ready_fd, b"ready " + message.encode() + b"\n")
            os.close(ready_fd)

    try:
        trio.run(serve, options, on_ready)
    except ModelfsError as error:
        if ready_fd is not None:
            os.write(ready_fd, str(error).encode())
        raise


def _mount_in_background(options: MountOptions) -> None:
    log_path = _log_path(options.cache_dir, options.mountpoint)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    command = [
        sys.executable,
        "-m",
        "modelfs",
        *sys.argv[1:],
        "--foreground",
        "--ready-fd",
        str(write_end),
    ]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        report = ready.read().decode(errors="replace")  # EOF: ready, failed, or died
    if report.startswith("ready "):
        click.echo(report[len("ready ") :].strip(), err=True)
        return
    process.wait(timeout=READY_TIMEOUT)
    raise ModelfsError(
        report.strip() or f"the mount process exited with {process.returncode}; see {log_path}"
    )


@cli.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@daemon_options
def umount(mountpoint: Path, control_socket: Path, no_daemon: bool) -> None:
    """Unmount a modelfs MOUNTPOINT (a dead mount's stale endpoint included).

    A mount the modelfs daemon keeps up is unmounted by the daemon, which then stops keeping it.
    """
    if not no_daemon and trio.run(daemon_answers, control_socket):
        request = {"command": "umount", "path": str(mountpoint.resolve())}
        if trio.run(ask, control_socket, request)["unmounted"]:
            return
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        if "not connected" in result.stderr or "Transport endpoint" in result.stderr:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            return
        raise ModelfsError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")

"""``modelfs mount``, ``modelfs umount`` and ``modelfs profile``.

Without ``--foreground`` the command starts the mount process in the background and returns once
the directory lists (or prints why it could not mount); the process reports readiness through an
inherited pipe, so there is no polling and no race with the first ``ls``. When the node service
(``modelfs daemon``) answers on its control socket, ``mount`` and ``umount`` ask it instead, so
the mount is supervised like the config's.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import trio
from click.core import ParameterSource

from modelfs.artifact.inflate import MAX_RATIO
from modelfs.cli import F
from modelfs.cli.cluster import CLUSTER_PARAMETERS, cluster_options, cluster_settings
from modelfs.cli.options import (
    cache_options,
    parse_size,
    scan_policy,
    source_options,
    trust_options,
)
from modelfs.errors import ModelfsError
from modelfs.mount.model import Model
from modelfs.mount.profiling import profile_model
from modelfs.mount.session import (
    DEFAULT_READ_AHEAD_KB,
    MountOptions,
    check_mountpoint,
    is_mount_point,
    serve,
)
from modelfs.prefetch.prefetcher import PrefetchMode
from modelfs.reference import LayoutReference, Reference, parse_any_reference
from modelfs.service.control import DEFAULT_CONTROL_SOCKET, ask, daemon_answers
from modelfs.sources.credentials import Credentials
from modelfs.sources.registry import DEFAULT_READ_TIMEOUT

log = logging.getLogger(__name__)

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


def mount_options(command: F) -> F:
    """The options of one mount: cache, registry access, readahead, prefetch, sharing."""
    for option in reversed(
        [
            click.option(
                "--timeout",
                default=30.0,
                show_default=True,
                help="Seconds one registry request may take.",
            ),
            click.option(
                "--retries",
                default=3,
                show_default=True,
                help="Retries of a failed registry request before a read gets EIO.",
            ),
            click.option(
                "--read-timeout",
                default=DEFAULT_READ_TIMEOUT,
                show_default=True,
                help="Seconds a piece (4 MiB) may take to come from the registry, retries "
                "included; a read waiting for it then gets EIO.",
            ),
            click.option(
                "--read-ahead-kb",
                default=DEFAULT_READ_AHEAD_KB,
                show_default=True,
                help="Kernel readahead window of the mount.",
            ),
            click.option(
                "--max-inflate-ratio",
                type=click.IntRange(min=1),
                default=MAX_RATIO,
                show_default=True,
                help="Most times its compressed size a tar+gzip or tar+zstd layer may inflate to; "
                "past it the layer is refused as a decompression bomb (docs/limits.md).",
            ),
            click.option(
                "--max-inflate-size",
                default="8T",
                show_default=True,
                help="Most bytes one compressed layer may inflate to (K, M, G, T suffixes).",
            ),
            click.option(
                "--prefetch",
                type=click.Choice([mode.value for mode in PrefetchMode]),
                default=PrefetchMode.HINTS.value,
                show_default=True,
                help="none: fetch only what is read; hints: also read ahead of sequential "
                "readers and fetch the recorded profile's ranges (modelfs profile), else config, "
                "tokenizer and safetensors headers, first; all: then the whole model.",
            ),
            click.option(
                "--serve-unverified",
                is_flag=True,
                help="Serve the pieces of a file that has no piece index before the whole file "
                "matched its digest (faster first bytes; a reader may get bytes that then fail "
                "the check, and its next read gets EIO). Default: a file without a piece index "
                "is fetched and checked whole before any byte of it is served.",
            ),
            click.option(
                "--allow-other/--no-allow-other",
                default=None,
                help="Let other users read the mount (default: yes when run as root).",
            ),
        ]
    ):
        command = option(command)
    return trust_options(cache_options(source_options(command)))


def mount_settings(
    reference: Reference | LayoutReference,
    mountpoint: Path,
    *,
    cache_dir: Path,
    cache_size: str,
    plain_http: bool,
    insecure: bool,
    hosts_dir: Path,
    timeout: float,
    retries: int,
    read_timeout: float,
    read_ahead_kb: int,
    max_inflate_ratio: int,
    max_inflate_size: str,
    prefetch: str,
    serve_unverified: bool,
    allow_other: bool | None,
    signature_policy: Path | None,
    scan: str,
) -> MountOptions:
    """What ``mount_options`` gave, as the options of a mount of ``reference``."""
    options = MountOptions(
        reference=reference,
        mountpoint=mountpoint,
        cache_dir=cache_dir,
        cache_size=parse_size(cache_size),
        plain_http=plain_http,
        insecure=insecure,
        hosts_dir=hosts_dir,
        timeout=timeout,
        retries=retries,
        read_timeout=read_timeout,
        read_ahead_kb=read_ahead_kb,
        max_inflate_ratio=max_inflate_ratio,
        max_inflate_size=parse_size(max_inflate_size),
        prefetch=PrefetchMode(prefetch),
        serve_unverified=serve_unverified,
        signature_policy=signature_policy,
        scan=scan_policy(scan),
    )
    if allow_other is not None:
        options.allow_other = allow_other
    return options


@click.command()
@click.argument("reference")
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--foreground", "-f", is_flag=True, help="Stay attached until unmounted.")
@click.option(
    "--allow-non-empty",
    is_flag=True,
    help="Mount on a directory that holds files (hidden while mounted), as FUSE's nonempty.",
)
@mount_options
@click.option("--ready-fd", type=int, hidden=True)
@click.option(
    "--stats-socket", type=click.Path(dir_okay=False, path_type=Path), hidden=True
)  # where the mount answers for its counters (the benchmark asks them)
@click.option(
    "--settings", "settings_file", type=click.Path(dir_okay=False, path_type=Path), hidden=True
)  # a daemon's mount process: every setting from this file (MountOptions.as_json), no other
@click.option(
    "--credentials-fd", type=int, hidden=True
)  # registry credentials (Credentials.as_json) read from this pipe: the snapshotter's, from CRI,
# or a CSI volume's secret, which the daemon hands its mount process
@daemon_options
@cluster_options
@click.pass_context
def mount(
    context: click.Context,
    /,
    reference: str,
    mountpoint: Path,
    foreground: bool,
    allow_non_empty: bool,
    ready_fd: int | None,
    stats_socket: Path | None,
    settings_file: Path | None,
    credentials_fd: int | None,
    control_socket: Path,
    no_daemon: bool,
    **settings: Any,
) -> None:
    """Mount REFERENCE (host/repo:tag, host/repo@sha256:..., oci:PATH[:TAG]) on MOUNTPOINT.

    The directory lists as soon as the manifest is read; file bytes are fetched when read.
    With the modelfs daemon running (and neither --foreground nor --no-daemon), the daemon
    mounts it, with its cache settings, and keeps it up until `modelfs umount`.

    \b
    Example:
      modelfs mount registry.example.com/models/qwen:v1 /models
    """
    ref = parse_any_reference(reference)
    check_mountpoint(mountpoint, allow_non_empty)
    credentials = None if credentials_fd is None else _read_credentials(credentials_fd)
    if settings_file is not None:  # a daemon's mount process
        options = _read_settings(settings_file)
        options.credentials = credentials
        _mount_in_foreground(options, ready_fd)
        return
    if not (foreground or no_daemon) and trio.run(daemon_answers, control_socket):
        _mount_by_daemon(context, control_socket)
        return
    cluster = {name: settings.pop(name) for name in CLUSTER_PARAMETERS}
    options = mount_settings(ref, mountpoint, **settings)
    options.cluster = cluster_settings(**cluster)
    options.stats_socket = stats_socket
    options.credentials = credentials
    if foreground:
        _mount_in_foreground(options, ready_fd)
    else:
        _mount_in_background(options)


def _read_settings(path: Path) -> MountOptions:
    try:
        return MountOptions.from_json(path.read_text())
    except OSError as error:
        raise ModelfsError(f"cannot read the mount settings {path}: {error.strerror}") from None


def _read_credentials(fd: int) -> Credentials:
    """The credentials written to the pipe ``fd`` (to its end), which is then closed."""
    with os.fdopen(fd, "rb") as pipe:
        return Credentials.from_json(pipe.read(64 << 10))


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

    ready = False

    def on_ready(model: Model) -> None:
        nonlocal ready
        message = (
            f"mounted {options.reference} ({model.digest}) on {options.mountpoint}: "
            f"{len(model.tree.files())} files, {model.tree.total_size} bytes, "
            f"ready in {time.monotonic() - started:.2f}s"
        )
        ready = True
        if ready_fd is None:
            click.echo(message, err=True)
        else:
            os.write(ready_fd, b"ready " + message.encode() + b"\n")
            os.close(ready_fd)

    try:
        _serve(options, on_ready)
    except ModelfsError as error:
        if ready_fd is not None and not ready:
            os.write(ready_fd, str(error).encode())
        raise


def _serve(options: MountOptions, on_ready: Callable[[Model], None]) -> None:
    """Serve the mount; a bug (an error modelfs does not know) is logged with its traceback (a
    background mount's log is its only output) and raised as a ModelfsError: exit status 1."""
    try:
        trio.run(serve, options, on_ready)
    except ModelfsError:
        raise
    except Exception as error:
        log.critical("mount of %s on %s failed unexpectedly", options.reference,
                     options.mountpoint, exc_info=True)  # fmt: skip
        raise ModelfsError(
            f"the mount of {options.reference} on {options.mountpoint} failed unexpectedly "
            f"({type(error).__name__}: {error}); please report it with the log above"
        ) from None


def _mount_in_background(options: MountOptions) -> NoReturn:
    """Fork the mount process and exit once it reports the mount ready (or raise why it failed).

    A fork, not a new interpreter: the child already holds every module this command imported,
    which halves the time from command to listing (no second interpreter start).
    """
    log_path = _log_path(options.cache_dir, options.mountpoint)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    with open(log_path, "ab") as log_file:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the mount process: detached from the terminal, logging to the file
            os.close(read_end)
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            os.close(null)
            code = 1  # whatever ends the mount but its unmounting is a failure
            try:
                _mount_in_foreground(options, write_end)
                code = 0
            except ModelfsError as error:
                click.echo(f"modelfs: error: {error}", err=True)
            finally:
                sys.stderr.flush()
                os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        report = ready.read().decode(errors="replace")  # EOF: ready, failed, or died
    if report.startswith("ready "):
        click.echo(report[len("ready ") :].strip(), err=True)
        # Done: exit now rather than tear the interpreter down (freeing every module of trio,
        # httpx, grpc...), which held the shell, and so the first `ls`, ~0.1 s longer.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    raise ModelfsError(report.strip() or _died(status, log_path, options.cache_dir))


# How LMDB ends a process on a damaged index: an assertion (abort), or a damaged page read
# through its map past the file or the map.
_INDEX_DAMAGE_SIGNALS = (signal.SIGABRT, signal.SIGBUS, signal.SIGSEGV)


def _died(status: int, log_path: Path, cache_dir: Path) -> str:
    """Why the mount process ended before it was ready, when it could not say so itself."""
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in _INDEX_DAMAGE_SIGNALS:
        name = signal.Signals(os.WTERMSIG(status)).name
        return (
            f"the mount process was killed by {name}, as a damaged cache index does (see "
            f"{log_path}); remove the cache at {cache_dir} or use another --cache-dir"
        )
    code = os.waitstatus_to_exitcode(status)
    return f"the mount process exited with status {code}; see {log_path}"


@click.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@daemon_options
def umount(mountpoint: Path, control_socket: Path, no_daemon: bool) -> None:
    """Unmount a modelfs MOUNTPOINT (a dead mount's stale endpoint included).

    A mount the modelfs daemon keeps up is unmounted by the daemon, which then stops keeping it.

    \b
    Example:
      modelfs umount /models
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
        if not is_mount_point(Path(os.path.realpath(mountpoint))):
            # Already gone (a mount process that failed unmounts itself): nothing left to do.
            click.echo(f"modelfs: {mountpoint} is not mounted", err=True)
            return
        raise ModelfsError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("reference")
@mount_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def profile(reference: str, command: tuple[str, ...], **settings: Any) -> None:
    """Record what COMMAND reads from REFERENCE and publish it with the model.

    Put COMMAND after --. REFERENCE is mounted on a temporary directory, given to COMMAND as
    $MODELFS_MOUNT and in place of {} in its arguments; the ranges the command reads, in order,
    are published as a referrer of the model's manifest (nothing is if the command fails). Mounts
    then fetch them first (--prefetch hints or all), as does preheat --hints-only.

    \b
    Example:
      modelfs profile registry.example.com/models/qwen:v1 -- python load.py {}
    """
    options = mount_settings(parse_any_reference(reference), Path(), **settings)
    published = trio.run(profile_model, options, list(command))
    recorded = published.profile
    click.echo(
        f"{reference} {published.digest}: profile {published.referrer} published in "
        f"{published.repository}: {len(recorded.ranges)} ranges, {recorded.total_bytes} bytes"
    )

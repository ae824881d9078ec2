"""``modelfs preheat``, ``modelfs cache ...``, ``modelfs daemon`` and ``modelfs status``."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import trio

from modelfs.cache import PieceCache
from modelfs.cli import F, cli
from modelfs.cli.mount import parse_size
from modelfs.errors import CacheError
from modelfs.fs.mount import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE
from modelfs.reference import LayoutReference, Reference, parse_any_reference
from modelfs.service.cache_ops import cached_models, remove_model, verify
from modelfs.service.config import (
    DEFAULT_CONFIG,
    DEFAULT_CONTROL_SOCKET,
    DaemonConfig,
    load_config,
)
from modelfs.service.control import ask
from modelfs.service.daemon import Daemon
from modelfs.service.preheat import PreheatPlan, SourceSettings, resolve_digest
from modelfs.service.preheat import preheat as preheat_model
from modelfs.service.reload import block_daemon_signals, take_handover


def cache_options(command: F) -> F:
    command = click.option(
        "--cache-size",
        default=str(DEFAULT_CACHE_SIZE >> 30) + "G",
        show_default=True,
        help="Most bytes the cache may hold (K, M, G, T suffixes).",
    )(command)
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_CACHE_DIR,
        show_default=True,
        help="The node's LMDB piece cache.",
    )(command)


def source_options(command: F) -> F:
    command = click.option(
        "--plain-http", is_flag=True, help="Talk HTTP, not HTTPS, to this registry."
    )(command)
    return click.option(
        "--insecure", is_flag=True, help="Accept a registry certificate that fails checks."
    )(command)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


@cli.command()
@click.argument("references", nargs=-1, required=True)
@cache_options
@source_options
def preheat(
    references: tuple[str, ...], cache_dir: Path, cache_size: str, plain_http: bool, insecure: bool
) -> None:
    """Fetch every piece of each model REFERENCE into the node's cache, without mounting.

    Resumable: pieces already cached are skipped, so running it again finishes the job.
    """
    refs = [parse_any_reference(text) for text in references]
    settings = SourceSettings(plain_http=plain_http, insecure=insecure)
    cache = PieceCache(cache_dir, parse_size(cache_size))
    try:
        for ref in refs:
            _preheat_one(ref, cache, settings)
    finally:
        cache.close()


def _preheat_one(
    ref: Reference | LayoutReference, cache: PieceCache, settings: SourceSettings
) -> None:
    with ExitStack() as bar_scope:
        bars: list[Any] = []  # the bar exists once the plan says how many bytes are missing

        def on_plan(plan: PreheatPlan) -> None:
            label = f"{ref}: {_mib(plan.missing_bytes)} of {_mib(plan.total_bytes)} to fetch"
            bar = click.progressbar(length=plan.missing_bytes, label=label, file=sys.stderr)
            bars.append(bar_scope.enter_context(bar))

        def on_piece(size: int) -> None:
            bars[0].update(size)

        plan = trio.run(preheat_model, ref, cache, settings, on_plan, on_piece)
    click.echo(f"{ref}: {plan.digest} cached ({_mib(plan.total_bytes)})", err=True)


@cli.group()
def cache() -> None:
    """Inspect and manage the node's piece cache."""


def _open_cache(cache_dir: Path, cache_size: str) -> PieceCache:
    if not (cache_dir / "data.mdb").exists():
        raise CacheError(f"no modelfs cache at {cache_dir}; pass the --cache-dir mounts use")
    return PieceCache(cache_dir, parse_size(cache_size))


@cache.command("ls")
@cache_options
def cache_ls(cache_dir: Path, cache_size: str) -> None:
    """List cached models with how much of each is present."""
    store = _open_cache(cache_dir, cache_size)
    try:
        models = cached_models(store)
        stats = store.stats()
    finally:
        store.close()
    click.echo(f"{'MODEL':<72} {'BLOBS':>5} {'PRESENT':>12} {'TOTAL':>12} {'%':>6}")
    for model in models:
        percent = 100 * model.present_bytes / model.total_bytes if model.total_bytes else 100.0
        click.echo(
            f"{model.digest:<72} {len(model.blobs):>5} {_mib(model.present_bytes):>12} "
            f"{_mib(model.total_bytes):>12} {percent:>5.1f}%"
        )
    click.echo(
        f"cache {cache_dir}: {_mib(stats.size)} of {_mib(stats.limit)}, "
        f"{stats.blobs} blobs, {stats.pieces} pieces"
    )


@cache.command("gc")
@cache_options
@click.option("--size", "target", required=True, help="Evict until at most this much is held.")
def cache_gc(cache_dir: Path, cache_size: str, target: str) -> None:
    """Evict least recently used pieces (pieces of mounted models last) down to --size."""
    store = _open_cache(cache_dir, cache_size)
    try:
        freed = store.evict_to(parse_size(target))
        size = store.stats().size
    finally:
        store.close()
    click.echo(f"evicted {_mib(freed)}; the cache holds {_mib(size)}")


@cache.command("verify")
@cache_options
def cache_verify(cache_dir: Path, cache_size: str) -> None:
    """Check every piece's checksum and every verified blob's digest; drop what fails.

    Exits 1 when something was corrupt (it is fetched again when next read).
    """
    store = _open_cache(cache_dir, cache_size)
    try:
        report = verify(store)
    finally:
        store.close()
    for digest, index in report.corrupt_pieces:
        click.echo(f"corrupt piece {index} of {digest}: dropped")
    for digest in report.corrupt_blobs:
        click.echo(f"blob {digest} does not match its digest: dropped")
    click.echo(
        f"checked {report.pieces_checked} pieces and {report.blobs_checked} whole blobs: "
        f"{len(report.corrupt_pieces)} corrupt pieces, {len(report.corrupt_blobs)} corrupt blobs"
    )
    if report.corrupt_pieces or report.corrupt_blobs:
        sys.exit(1)


@cache.command("rm")
@click.argument("reference")
@cache_options
@source_options
def cache_rm(
    reference: str, cache_dir: Path, cache_size: str, plain_http: bool, insecure: bool
) -> None:
    """Remove a model (REFERENCE, or its bare manifest digest) and the blobs only it uses.

    A reference by tag is resolved at the registry; by digest, no network is needed.
    """
    store = _open_cache(cache_dir, cache_size)
    try:
        if reference.startswith("sha256:"):
            digest = reference
        else:
            settings = SourceSettings(plain_http=plain_http, insecure=insecure)
            digest = trio.run(resolve_digest, parse_any_reference(reference), store, settings)
        dropped = remove_model(store, digest)
    finally:
        store.close()
    click.echo(f"removed {digest} and {len(dropped)} blobs")


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The daemon's config file (see systemd/config.toml.example).",
)
@click.option("--metrics-addr", help="Serve Prometheus metrics on HOST:PORT (default: off).")
def daemon(config_path: Path, metrics_addr: str | None) -> None:
    """Run the node service: the config's mounts, the control socket, metrics.

    SIGHUP (systemctl reload) re-reads the config and re-executes, keeping the mounts up.
    """
    block_daemon_signals()
    handover = take_handover()

    def current_config() -> DaemonConfig:
        config = load_config(config_path)
        return replace(config, metrics_addr=metrics_addr) if metrics_addr else config

    trio.run(Daemon(current_config(), current_config, handover).run)


@cli.command()
@click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONTROL_SOCKET,
    show_default=True,
    help="Where the daemon listens.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's answer as JSON.")
def status(control_socket: Path, as_json: bool) -> None:
    """Show the daemon's mounts and the node's cache."""
    reply = trio.run(ask, control_socket, {"command": "status"})
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    click.echo(f"{'MOUNTPOINT':<32} {'STATE':<10} {'RESTARTS':>8}  {'REFERENCE / DIGEST'}")
    for mount in reply["mounts"]:
        click.echo(
            f"{mount['mountpoint']:<32} {mount['state']:<10} {mount['restarts']:>8}  "
            f"{mount['reference']} {mount['digest'] or ''}"
        )
        if mount["last_error"]:
            click.echo(f"{'':<32} last error: {mount['last_error']}")
    cache_state = reply["cache"]
    click.echo(
        f"cache {cache_state['dir']}: {_mib(cache_state['size'])} of "
        f"{_mib(cache_state['limit'])}, {cache_state['models']} models, "
        f"{cache_state['blobs']} blobs"
    )

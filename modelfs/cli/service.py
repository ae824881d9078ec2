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
from modelfs.cli.options import cache_options, parse_size, source_options
from modelfs.errors import CacheError
from modelfs.fetcher.stats import MountStats
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


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


@click.command()
@click.argument("references", nargs=-1, required=True)
@cache_options
@source_options
@click.option(
    "--hints-only",
    is_flag=True,
    help="Only what a mount prefetches first: the recorded profile (modelfs profile), else "
    "config and tokenizer files and safetensors headers.",
)
def preheat(
    references: tuple[str, ...],
    cache_dir: Path,
    cache_size: str,
    plain_http: bool,
    insecure: bool,
    hints_only: bool,
) -> None:
    """Fetch every piece of each model REFERENCE into the node's cache, without mounting.

    Resumable: pieces already cached are skipped, so running it again finishes the job.

    \b
    Example:
      modelfs preheat --hints-only registry.example.com/models/qwen:v1
    """
    refs = [parse_any_reference(text) for text in references]
    settings = SourceSettings(plain_http=plain_http, insecure=insecure)
    cache = PieceCache(cache_dir, parse_size(cache_size))
    try:
        for ref in refs:
            _preheat_one(ref, cache, settings, hints_only)
    finally:
        cache.close()


def _preheat_one(
    ref: Reference | LayoutReference, cache: PieceCache, settings: SourceSettings, hints_only: bool
) -> None:
    with ExitStack() as bar_scope:
        bars: list[Any] = []  # the bar exists once the plan says how many bytes are missing

        def on_plan(plan: PreheatPlan) -> None:
            label = f"{ref}: {_mib(plan.missing_bytes)} of {_mib(plan.total_bytes)} to fetch"
            bar = click.progressbar(length=plan.missing_bytes, label=label, file=sys.stderr)
            bars.append(bar_scope.enter_context(bar))

        def on_piece(size: int) -> None:
            bars[0].update(size)

        plan = trio.run(preheat_model, ref, cache, settings, on_plan, on_piece, hints_only)
    what = "hinted ranges" if hints_only else "model"
    click.echo(f"{ref}: {plan.digest} cached ({what}: {_mib(plan.total_bytes)})", err=True)


@click.group()
def cache() -> None:
    """Inspect and manage the node's piece cache.

    \b
    Example:
      modelfs cache gc --size 50G
    """


def _open_cache(cache_dir: Path, cache_size: str) -> PieceCache:
    if not (cache_dir / "data.mdb").exists():
        raise CacheError(f"no modelfs cache at {cache_dir}; pass the --cache-dir mounts use")
    return PieceCache(cache_dir, parse_size(cache_size))


@cache.command("ls", short_help="List cached models and how much of each is present.")
@cache_options
def cache_ls(cache_dir: Path, cache_size: str) -> None:
    """List cached models with how much of each is present.

    \b
    Example:
      modelfs cache ls
    """
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
        f"{stats.blobs} blobs, {stats.pieces} pieces, {stats.evicted_pieces} pieces evicted so far"
    )


@cache.command("gc", short_help="Evict least recently used pieces down to --size.")
@cache_options
@click.option("--size", "target", required=True, help="Evict until at most this much is held.")
def cache_gc(cache_dir: Path, cache_size: str, target: str) -> None:
    """Evict least recently used pieces (pieces of mounted models last) down to --size.

    \b
    Example:
      modelfs cache gc --size 50G
    """
    store = _open_cache(cache_dir, cache_size)
    try:
        freed = store.evict_to(parse_size(target))
        size = store.stats().size
    finally:
        store.close()
    click.echo(f"evicted {_mib(freed)}; the cache holds {_mib(size)}")


@cache.command("verify", short_help="Check pieces and blobs; drop what fails.")
@cache_options
def cache_verify(cache_dir: Path, cache_size: str) -> None:
    """Check every piece's checksum, every whole blob's digest, and the pieces of partial
    blobs against the piece index; drop what fails.

    Exits 1 when something was corrupt (it is fetched again when next read).

    \b
    Example:
      modelfs cache verify
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


@cache.command("rm", short_help="Remove a model and the blobs only it uses.")
@click.argument("reference")
@cache_options
@source_options
def cache_rm(
    reference: str, cache_dir: Path, cache_size: str, plain_http: bool, insecure: bool
) -> None:
    """Remove a model (REFERENCE, or its bare manifest digest) and the blobs only it uses.

    A reference by tag is resolved at the registry; by digest, no network is needed.

    \b
    Example:
      modelfs cache rm registry.example.com/models/qwen:v1
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


@click.command()
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

    \b
    Example:
      modelfs daemon --metrics-addr 127.0.0.1:9464
    """
    block_daemon_signals()
    handover = take_handover()

    def current_config() -> DaemonConfig:
        config = load_config(config_path)
        return replace(config, metrics_addr=metrics_addr) if metrics_addr else config

    trio.run(Daemon(current_config(), current_config, handover).run)


@click.command()
@click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONTROL_SOCKET,
    show_default=True,
    help="Where the daemon listens.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's answer as JSON.")
def status(control_socket: Path, as_json: bool) -> None:
    """Show the daemon's mounts and the node's cache.

    \b
    Example:
      modelfs status --json
    """
    reply = trio.run(ask, control_socket, {"command": "status"})
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    rows = [
        [
            "REFERENCE",
            "DIGEST",
            "MOUNTPOINT",
            "STATE",
            "FILES",
            "FETCHED",
            "SOURCES",
            "READS WAITED",
        ]
    ]
    errors = []
    for mount in reply["mounts"]:
        live = mount.get("live") or {}
        rows.append(
            [
                mount["reference"],
                short_digest(mount["digest"]),
                mount["mountpoint"],
                mount["state"] + (f" ({mount['restarts']} restarts)" if mount["restarts"] else ""),
                str(live.get("files", "-")),
                describe_fetched(mount.get("present_bytes"), mount.get("total_bytes")),
                describe_sources(live.get("fetched_bytes", {})),
                describe_waits(live),
            ]
        )
        # The mount's own last failure is the newer news; else why its process last ended.
        last_error = live.get("last_error") or mount["last_error"]
        if last_error:
            errors.append(f"{mount['mountpoint']}: last error: {last_error}")
    for line in table(rows):
        click.echo(line)
    for line in errors:
        click.echo(line)
    cache_state = reply["cache"]
    ratio = cache_state.get("hit_ratio")
    click.echo(
        f"cache {cache_state['dir']}: {_mib(cache_state['size'])} of "
        f"{_mib(cache_state['limit'])}, {cache_state['models']} models, "
        f"{cache_state['blobs']} blobs, hit ratio "
        + ("-" if ratio is None else f"{100 * ratio:.0f}%")
    )


def short_digest(digest: str | None) -> str:
    return "-" if digest is None else digest[: len("sha256:") + 12]


def describe_fetched(present: int | None, total: int | None) -> str:
    """``12.0 of 16.0 MiB (75%)``: how much of the model the cache holds."""
    if present is None or not total:
        return "-"
    return f"{present / (1 << 20):.1f} of {_mib(total)} ({100 * present // total}%)"


def describe_sources(fetched_bytes: dict[str, int]) -> str:
    """``registry 80% peer 20%``: where the mount's bytes came from, largest share first."""
    total = sum(fetched_bytes.values())
    if not total:
        return "-"
    shares = sorted(fetched_bytes.items(), key=lambda item: (-item[1], item[0]))

    def share(size: int) -> str:
        percent = round(100 * size / total)
        return f"{percent}%" if percent else "<1%"  # a sliver still shows it was there

    return " ".join(f"{source} {share(size)}" for source, size in shares if size)


def describe_waits(live: dict[str, Any]) -> str:
    """``12 of 2335``: the reads slower than ``SLOW_READ`` (they waited on a fetch)."""
    try:
        stats = MountStats.from_json(live)
    except (KeyError, TypeError, ValueError):
        return "-"
    return f"{stats.slow_reads()} of {stats.read_seconds.count}"


def table(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]

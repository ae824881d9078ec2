"""``modelfs cache ls|gc|verify|rm``: the node's piece cache."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import trio

from modelfs.cache import PieceCache
from modelfs.cli.options import cache_options, mib, parse_size, source_options
from modelfs.errors import CacheError
from modelfs.reference import parse_any_reference
from modelfs.service.cache_ops import cached_models, remove_model, verify
from modelfs.service.preheat import SourceSettings, resolve_digest


@click.group()
def cache() -> None:
    """Inspect and manage the node's piece cache.

    \b
    Example:
      modelfs cache gc --size 50G
    """


@contextmanager
def _opened_cache(cache_dir: Path, cache_size: str) -> Iterator[PieceCache]:
    """The cache, closed after; a damaged index found meanwhile is the command's error (a
    cache out of use answers as if it held nothing, which is no answer here)."""
    if not (cache_dir / "data.mdb").exists():
        raise CacheError(f"no modelfs cache at {cache_dir}; pass the --cache-dir mounts use")
    store = PieceCache(cache_dir, parse_size(cache_size))
    try:
        yield store
    finally:
        store.close()
    store.raise_if_out_of_use()


@cache.command("ls", short_help="List cached models and how much of each is present.")
@cache_options
def cache_ls(cache_dir: Path, cache_size: str) -> None:
    """List cached models with how much of each is present.

    \b
    Example:
      modelfs cache ls
    """
    with _opened_cache(cache_dir, cache_size) as store:
        models = cached_models(store)
        stats = store.stats()
    click.echo(f"{'MODEL':<72} {'BLOBS':>5} {'PRESENT':>12} {'TOTAL':>12} {'%':>6}")
    for model in models:
        percent = 100 * model.present_bytes / model.total_bytes if model.total_bytes else 100.0
        click.echo(
            f"{model.digest:<72} {len(model.blobs):>5} {mib(model.present_bytes):>12} "
            f"{mib(model.total_bytes):>12} {percent:>5.1f}%"
        )
    click.echo(
        f"cache {cache_dir}: {mib(stats.size)} of {mib(stats.limit)}, "
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
    with _opened_cache(cache_dir, cache_size) as store:
        freed = store.evict_to(parse_size(target))
        size = store.stats().size
    click.echo(f"evicted {mib(freed)}; the cache holds {mib(size)}")


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
    with _opened_cache(cache_dir, cache_size) as store:
        report = verify(store)
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
    reference: str,
    cache_dir: Path,
    cache_size: str,
    plain_http: bool,
    insecure: bool,
    hosts_dir: Path,
) -> None:
    """Remove a model (REFERENCE, or its bare manifest digest) and the blobs only it uses.

    A reference by tag is resolved at the registry; by digest, no network is needed.

    \b
    Example:
      modelfs cache rm registry.example.com/models/qwen:v1
    """
    with _opened_cache(cache_dir, cache_size) as store:
        if reference.startswith("sha256:"):
            digest = reference
        else:
            settings = SourceSettings(plain_http=plain_http, insecure=insecure, hosts_dir=hosts_dir)
            digest = trio.run(resolve_digest, parse_any_reference(reference), store, settings)
        dropped = remove_model(store, digest)
    click.echo(f"removed {digest} and {len(dropped)} blobs")

"""``modelfs preheat``, ``modelfs cache ...``, ``modelfs daemon`` and ``modelfs status``."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import trio

from modelfs.cache import PieceCache
from modelfs.cli import F, cli
from modelfs.cli.mount import parse_size
from modelfs.fs.mount import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE
from modelfs.reference import LayoutReference, Reference, parse_any_reference
from modelfs.service.preheat import PreheatPlan, SourceSettings
from modelfs.service.preheat import preheat as preheat_model


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

"""``modelfs preheat``: models into the node's cache without mounting them."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import trio

from modelfs.cache import PieceCache
from modelfs.cli.options import cache_options, mib, parse_size, source_options
from modelfs.reference import LayoutReference, Reference, parse_any_reference
from modelfs.service.preheat import PreheatPlan, SourceSettings
from modelfs.service.preheat import preheat as preheat_model


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
    hosts_dir: Path,
    hints_only: bool,
) -> None:
    """Fetch every piece of each model REFERENCE into the node's cache, without mounting.

    Resumable: pieces already cached are skipped, so running it again finishes the job.

    \b
    Example:
      modelfs preheat --hints-only registry.example.com/models/qwen:v1
    """
    refs = [parse_any_reference(text) for text in references]
    settings = SourceSettings(plain_http=plain_http, insecure=insecure, hosts_dir=hosts_dir)
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
            label = f"{ref}: {mib(plan.missing_bytes)} of {mib(plan.total_bytes)} to fetch"
            bar = click.progressbar(length=plan.missing_bytes, label=label, file=sys.stderr)
            bars.append(bar_scope.enter_context(bar))

        def on_piece(size: int) -> None:
            bars[0].update(size)

        plan = trio.run(preheat_model, ref, cache, settings, on_plan, on_piece, hints_only)
    what = "hinted ranges" if hints_only else "model"
    click.echo(f"{ref}: {plan.digest} cached ({what}: {mib(plan.total_bytes)})", err=True)

"""``modelfs preheat``: models into the node's cache without mounting them, here or, through the
scheduler, on chosen nodes of the cluster."""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import trio

from modelfs.cache import PieceCache
from modelfs.cli.cluster import fleet_client, scheduler_options
from modelfs.cli.options import cache_options, mib, parse_size, source_options
from modelfs.errors import ModelfsError
from modelfs.peer.options import ClusterOptions, ClusterSettings
from modelfs.reference import LayoutReference, Reference, parse_any_reference, parse_reference
from modelfs.scheduler.fleet_client import FleetClient
from modelfs.service.preheat import PreheatPlan, SourceSettings
from modelfs.service.preheat import preheat as preheat_model
from modelfs.untrusted import loads_json

POLL = 0.5  # how often a preheat on nodes asks the scheduler for their progress
JSON_EVERY = 0.2  # the most often --json prints progress


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
@click.option(
    "--nodes",
    default=None,
    help="Preheat on these nodes of the cluster (node service names, comma-separated), "
    "through the scheduler, instead of here.",
)
@click.option(
    "--selector",
    "-l",
    default=None,
    help="Preheat on the nodes whose labels (from their [cluster] labels) match: "
    "key=value, key!=value, key or !key, comma-separated.",
)
@scheduler_options
@click.option(
    "--cluster-settings",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    hidden=True,  # the node service's preheats: its [cluster] settings, with a peer port
    help="Take pieces from peers and serve them, with these cluster settings (JSON).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Progress as JSON lines on stdout: the model's digest, held_bytes, total_bytes and "
    "state (and the node, with --nodes or --selector).",
)
def preheat(
    references: tuple[str, ...],
    cache_dir: Path,
    cache_size: str,
    plain_http: bool,
    insecure: bool,
    hosts_dir: Path,
    hints_only: bool,
    nodes: str | None,
    selector: str | None,
    scheduler: str | None,
    cluster_secret_file: Path | None,
    config_path: Path,
    cluster_settings: Path | None,
    as_json: bool,
) -> None:
    """Fetch every piece of each model REFERENCE into the node's cache, without mounting; with
    --nodes or --selector, into those nodes' caches, and follow their progress.

    Resumable: pieces already cached are skipped, so running it again finishes the job. A node
    that is down is reported and the others go on; the exit status is 1 unless every node
    preheated every model. Stopping this command does not stop preheats on nodes.

    \b
    Example:
      modelfs preheat --hints-only registry.example.com/models/qwen:v1
      modelfs preheat --nodes gpu-1,gpu-2 registry.example.com/models/qwen:v1
      modelfs preheat --selector pool=a100 registry.example.com/models/qwen:v1
    """
    if nodes is not None or selector is not None:
        if hints_only or plain_http or insecure:
            raise click.UsageError(
                "--hints-only, --plain-http and --insecure apply to a preheat here: each node "
                "uses its own [registries] settings"
            )
        if nodes is not None and selector is not None:
            raise click.UsageError("give --nodes or --selector, not both")
        target: dict[str, Any] = {"selector": selector}
        if nodes is not None:
            target = {"nodes": [name.strip() for name in nodes.split(",") if name.strip()]}
        for text in references:
            parse_reference(text)  # a typo is told here, not by every node
        client = fleet_client(scheduler, cluster_secret_file, config_path)
        trio.run(_preheat_on_nodes, client, references, target, as_json)
        return
    cluster = None
    if cluster_settings is not None:
        cluster = ClusterSettings.from_json(loads_json(cluster_settings.read_text())).load()
    refs = [parse_any_reference(text) for text in references]
    settings = SourceSettings(plain_http=plain_http, insecure=insecure, hosts_dir=hosts_dir)
    cache = PieceCache(cache_dir, parse_size(cache_size))
    try:
        for ref in refs:
            _preheat_one(ref, cache, settings, hints_only, as_json, cluster)
        cache.raise_if_out_of_use()  # else it fetched what it could not keep
    finally:
        cache.close()


def _preheat_one(
    ref: Reference | LayoutReference,
    cache: PieceCache,
    settings: SourceSettings,
    hints_only: bool,
    as_json: bool,
    cluster: ClusterOptions | None,
) -> None:
    with ExitStack() as bar_scope:
        bars: list[Any] = []  # the bar exists once the plan says how many bytes are missing
        plans: list[PreheatPlan] = []
        held = [0]
        printed = [0.0]

        def on_plan(plan: PreheatPlan) -> None:
            plans.append(plan)
            held[0] = plan.total_bytes - plan.missing_bytes
            if as_json:
                _print_json(ref, plan, held[0], "running")
                return
            label = f"{ref}: {mib(plan.missing_bytes)} of {mib(plan.total_bytes)} to fetch"
            bar = click.progressbar(length=plan.missing_bytes, label=label, file=sys.stderr)
            bars.append(bar_scope.enter_context(bar))

        def on_piece(size: int) -> None:
            held[0] += size
            if not as_json:
                bars[0].update(size)
            elif time.monotonic() - printed[0] >= JSON_EVERY:
                printed[0] = time.monotonic()
                _print_json(ref, plans[0], held[0], "running")

        plan = trio.run(preheat_model, ref, cache, settings, on_plan, on_piece, hints_only, cluster)
    if as_json:
        _print_json(ref, plan, plan.total_bytes, "done")
        return
    what = "hinted ranges" if hints_only else "model"
    click.echo(f"{ref}: {plan.digest} cached ({what}: {mib(plan.total_bytes)})", err=True)


def _print_json(ref: Reference | LayoutReference, plan: PreheatPlan, held: int, state: str) -> None:
    line = {
        "reference": str(ref),
        "digest": plan.digest,
        "held_bytes": held,
        "total_bytes": plan.total_bytes,
        "state": state,
    }
    click.echo(json.dumps(line))
    sys.stdout.flush()


def describe(node: str, progress: dict[str, Any]) -> str:
    """One node's progress on one preheat, for people."""
    state = progress["state"]
    held, total = progress["held_bytes"], progress["total_bytes"]
    if state in ("failed", "down"):
        return f"{node}: {state}: {progress['error']}"
    if state == "queued" or not total:
        return f"{node}: {state}"
    percent = 100 * held // total
    return f"{node}: {state}, {mib(held)} of {mib(total)} ({percent}%) {progress['digest'][:19]}"


def _milestone(progress: dict[str, Any]) -> tuple[str, int]:
    """What changed enough to print a line again: the state, or ten more percent."""
    total = progress["total_bytes"]
    return progress["state"], 10 * progress["held_bytes"] // total if total else 0


async def _preheat_on_nodes(
    client: FleetClient, references: tuple[str, ...], target: dict[str, Any], as_json: bool
) -> None:
    failed: list[str] = []
    async with client:
        jobs = [
            await client.call("/v1/preheat", {"reference": text, **target}) for text in references
        ]
        shown: dict[tuple[str, str], tuple[str, int]] = {}
        while True:
            statuses = [await client.call("/v1/preheat/status", {"id": j["id"]}) for j in jobs]
            finished = True
            for status in statuses:
                for node, progress in status["progress"].items():
                    finished &= progress["state"] in ("done", "failed", "down")
                    key = (status["id"], node)
                    if shown.get(key) == (mark := _milestone(progress)):
                        continue
                    shown[key] = mark
                    if as_json:
                        click.echo(json.dumps({"reference": status["reference"], "node": node,
                                               **progress}))  # fmt: skip
                    else:
                        click.echo(f"{status['reference']}: {describe(node, progress)}", err=True)
            if finished:
                break
            await trio.sleep(POLL)
    for status in statuses:
        failed += [
            f"{node} ({progress['state']})"
            for node, progress in status["progress"].items()
            if progress["state"] != "done"
        ]
    if failed:
        raise ModelfsError(f"not preheated on {len(failed)} node(s): {', '.join(failed)}")

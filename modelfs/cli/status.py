"""``modelfs status``: the daemon's mounts and the node's cache, as a table or JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import trio

from modelfs.cli.options import mib
from modelfs.cli.snapshotter import DEFAULT_ROOT
from modelfs.service.config import (
    DEFAULT_CONTROL_SOCKET,
)
from modelfs.service.control import ask
from modelfs.snapshot.disk import Layout
from modelfs.snapshot.metadata import read_census
from modelfs.sources.stats import MountStats
from modelfs.trust.scan_policy import Finding


@click.command()
@click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONTROL_SOCKET,
    show_default=True,
    help="Where the daemon listens.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's answer as JSON.")
@click.option(
    "--snapshotter-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_ROOT,
    show_default=True,
    help="The containerd snapshotter's root: its snapshots and models are shown if it has one.",
)
def status(control_socket: Path, as_json: bool, snapshotter_root: Path) -> None:
    """Show the daemon's mounts and the node's cache (and the snapshotter's models).

    \b
    Example:
      modelfs status --json
    """
    reply = trio.run(ask, control_socket, {"command": "status"})
    census = read_census(Layout(snapshotter_root).database)
    if census is not None:
        reply["snapshotter"] = {"root": str(snapshotter_root), **dataclasses.asdict(census)}
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
        for mirror, size in sorted(live.get("mirror_bytes", {}).items()):
            errors.append(f"{mount['mountpoint']}: from mirror {mirror}: {mib(size)}")
        if live.get("signature"):  # which key verified the model (docs/trust.md)
            errors.append(f"{mount['mountpoint']}: signature: {live['signature']}")
        for found in live.get("findings", []):
            finding = Finding(found["path"], found["format"], found["finding"], found["action"])
            errors.append(f"{mount['mountpoint']}: scan: {finding.line()}")
    for line in table(rows):
        click.echo(line)
    for line in errors:
        click.echo(line)
    cache_state = reply["cache"]
    ratio = cache_state.get("hit_ratio")
    click.echo(
        f"cache {cache_state['dir']}: {mib(cache_state['size'])} of "
        f"{mib(cache_state['limit'])}, {cache_state['models']} models, "
        f"{cache_state['blobs']} blobs, hit ratio "
        + ("-" if ratio is None else f"{100 * ratio:.0f}%")
    )
    if cache_state.get("damage"):
        click.echo(f"cache out of use: {cache_state['damage']}")
    if "cluster" in reply:
        for line in describe_cluster(reply["cluster"]):
            click.echo(line)
    if census is not None:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(census.kinds.items()))
        click.echo(f"snapshotter {snapshotter_root}: {kinds or 'no snapshots'}")
        for model, count in sorted(census.models.items()):
            click.echo(f"  model {model}: {count} snapshot{'s' if count > 1 else ''}")


def describe_cluster(cluster: dict[str, Any]) -> list[str]:
    """The node's name at the scheduler, its labels, and the preheats it ran or runs."""
    labels = ",".join(f"{key}={value}" for key, value in sorted(cluster["labels"].items()))
    lines = [f"node {cluster['node']} at the scheduler" + (f" ({labels})" if labels else "")]
    for job in cluster["preheats"]:
        done = describe_fetched(job["held_bytes"], job["total_bytes"])
        what = f"{job['state']}: {job['error']}" if job["error"] else f"{job['state']}, {done}"
        lines.append(f"  preheat {job['reference']}: {what}")
    return lines


def short_digest(digest: str | None) -> str:
    return "-" if digest is None else digest[: len("sha256:") + 12]


def describe_fetched(present: int | None, total: int | None) -> str:
    """``12.0 of 16.0 MiB (75%)``: how much of the model the cache holds."""
    if present is None or not total:
        return "-"
    return f"{present / (1 << 20):.1f} of {mib(total)} ({100 * present // total}%)"


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

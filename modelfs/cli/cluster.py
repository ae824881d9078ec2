"""``modelfs index`` and ``modelfs scheduler``: what a cluster of peers needs besides the mount."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import trio

from modelfs.cli.options import mib, source_options
from modelfs.errors import ModelfsError
from modelfs.fetcher.index import compute_index, find_index, publish_index
from modelfs.peer.options import ClusterOptions, ClusterSettings
from modelfs.reference import parse_reference
from modelfs.service.config import DEFAULT_CONFIG
from modelfs.sources.mirrors import find_hosts
from modelfs.sources.registry import RegistryClient
from modelfs.transport.server import parse_listen
from modelfs.transport.tokens import load_secret

if TYPE_CHECKING:
    from modelfs.scheduler.fleet_client import FleetClient

F = TypeVar("F", bound=Callable[..., Any])


@click.command("index")
@click.argument("reference")
@source_options
@click.option("--force", is_flag=True, help="Publish a new index even if one exists.")
def index(reference: str, plain_http: bool, insecure: bool, hosts_dir: Path, force: bool) -> None:
    """Publish the piece index of REFERENCE (sha256 of each piece) as a referrer of its manifest.

    Peers' pieces are checked against it, so a node can take bytes from a peer without trusting it.

    \b
    Example:
      modelfs index registry.example.com/models/qwen:v1
    """
    parsed = parse_reference(reference)

    # The index is published on the registry's server, never a mirror: all of it goes there.
    *_, server = find_hosts(
        parsed.registry, parsed.api_host, plain_http=plain_http, hosts_dir=hosts_dir
    )

    async def run() -> str:
        async with RegistryClient(server.netloc, insecure=insecure, endpoint=server) as client:
            repository = client.repository(parsed.repository)
            manifest = await repository.get_manifest(parsed.selector)
            if not force and await find_index(repository, manifest) is not None:
                return f"{parsed} {manifest.digest}: already indexed"
            pieces = await compute_index(repository, manifest)
            referrer = await publish_index(repository, manifest, pieces)
            count = sum(len(blob.pieces) for blob in pieces.blobs.values())
            return f"{parsed} {manifest.digest}: index {referrer} ({count} pieces)"

    click.echo(trio.run(run))


def _listen_address(
    _: click.Context, __: click.Parameter, value: str | None
) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_listen(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


_secret_file = click.option(
    "--cluster-secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the secret every node of the cluster shares.",
)


def _tls_file(name: str, help: str) -> Callable[[F], F]:
    return click.option(
        name, type=click.Path(dir_okay=False, path_type=Path), default=None, help=help
    )


# The parameters ``cluster_options`` adds to a command: what ``cluster_settings`` takes.
CLUSTER_PARAMETERS = (
    "scheduler",
    "cluster_secret_file",
    "peer_listen",
    "zone",
    "rack",
    "peers_without_index",
    "peer_max_connections",
    "peer_tls_cert",
    "peer_tls_key",
    "peer_tls_ca",
)


def cluster_options(command: F) -> F:
    """The options of a node that shares pieces with its peers (``modelfs mount``)."""
    for option in reversed(
        [
            click.option("--scheduler", default=None, help="Scheduler URL (enables peers)."),
            _secret_file,
            click.option(
                "--peer-listen",
                default=None,
                callback=_listen_address,
                help="host:port this node serves pieces to peers on (reachable by them).",
            ),
            click.option("--zone", default="", help="Zone label, for peer locality."),
            click.option("--rack", default="", help="Rack label, for peer locality."),
            click.option(
                "--peers-without-index",
                is_flag=True,
                help="Also take pieces of blobs no piece index covers from peers; such a blob "
                "is then served only once it matched its digest whole (reads wait for it).",
            ),
            click.option(
                "--peer-max-connections",
                default=ClusterOptions.max_connections,
                show_default=True,
                type=click.IntRange(1, 100_000),
                help="Connections the peer server serves at once; more are refused at once.",
            ),
            _tls_file("--peer-tls-cert", "This node's certificate (PEM), signed by the CA."),
            _tls_file("--peer-tls-key", "The private key of --peer-tls-cert (PEM)."),
            _tls_file("--peer-tls-ca", "The cluster CA (PEM) that signed every peer's cert."),
        ]
    ):
        command = option(command)
    return command


def cluster_settings(
    scheduler: str | None,
    cluster_secret_file: Path | None,
    peer_listen: tuple[str, int] | None,
    zone: str,
    rack: str,
    peers_without_index: bool,
    peer_max_connections: int,
    peer_tls_cert: Path | None,
    peer_tls_key: Path | None,
    peer_tls_ca: Path | None,
) -> ClusterSettings | None:
    """What ``cluster_options`` gave: None when peers are not in use."""
    if scheduler is None and cluster_secret_file is None and peer_listen is None:
        return None
    if scheduler is None or cluster_secret_file is None or peer_listen is None:
        raise ModelfsError("peers need all of --scheduler, --cluster-secret-file and --peer-listen")
    return ClusterSettings(
        scheduler,
        cluster_secret_file,
        peer_listen,
        zone,
        rack,
        peers_without_index,
        peer_max_connections,
        peer_tls_cert,
        peer_tls_key,
        peer_tls_ca,
    )


@click.command("scheduler")
@click.option(
    "--listen",
    default="0.0.0.0:7480",
    show_default=True,
    callback=_listen_address,
    help="Address (host:port) to serve the scheduler API on.",
)
@_secret_file
@click.option(
    "--redis",
    "redis_url",
    default=None,
    help="redis://host:port/db to share state between scheduler replicas (default: memory).",
)
def scheduler(
    listen: tuple[str, int], cluster_secret_file: Path | None, redis_url: str | None
) -> None:
    """Tell nodes which peers hold a piece, and ration trips to the registry.

    \b
    Example:
      modelfs scheduler --listen 0.0.0.0:7480 \\
          --cluster-secret-file /etc/modelfs/cluster-secret
    """
    # Here, not at the top: the scheduler's server, Redis client and Prometheus metrics would
    # slow down ``modelfs mount``, which imports this module for the cluster options.
    from modelfs.scheduler.service import run_scheduler

    if cluster_secret_file is None:
        raise ModelfsError("the scheduler needs --cluster-secret-file (the nodes' shared secret)")
    secret = load_secret(cluster_secret_file)
    host, port = listen

    click.echo(f"scheduler: serving on {host}:{port}", err=True)
    trio.run(run_scheduler, host, port, secret, redis_url)


def scheduler_options(command: F) -> F:
    """How a command reaches the scheduler: its URL and the cluster secret, given, or read from
    the node's config (``[cluster]``)."""
    for option in reversed(
        [
            click.option(
                "--scheduler", default=None, help="Scheduler URL (default: the config's)."
            ),
            _secret_file,
            click.option(
                "--config",
                "config_path",
                type=click.Path(dir_okay=False, path_type=Path),
                default=DEFAULT_CONFIG,
                show_default=True,
                help="A node's config, whose [cluster] gives the scheduler and secret when "
                "the options do not.",
            ),
        ]
    ):
        command = option(command)
    return command


def fleet_client(
    scheduler: str | None, cluster_secret_file: Path | None, config_path: Path
) -> FleetClient:
    """A client of the scheduler the options (or else the node's config) name."""
    from modelfs.scheduler.fleet_client import FleetClient
    from modelfs.service.config import load_config

    if scheduler is None or cluster_secret_file is None:
        if not config_path.exists():
            raise ModelfsError(
                "say where the scheduler is: --scheduler and --cluster-secret-file, or --config "
                f"with a [cluster] table ({config_path} does not exist)"
            )
        cluster = load_config(config_path).cluster
        if cluster is None:
            raise ModelfsError(
                f"{config_path} has no [cluster] table: pass --scheduler and --cluster-secret-file"
            )
        scheduler = scheduler or cluster.settings.scheduler
        cluster_secret_file = cluster_secret_file or cluster.settings.secret_file
    return FleetClient(scheduler, load_secret(cluster_secret_file))


@click.group("cluster")
def cluster_group() -> None:
    """Ask the scheduler about the cluster's node services and the models they hold.

    \b
    Example:
      modelfs cluster models --json
    """


@cluster_group.command("models")
@click.argument("model", required=False)
@scheduler_options
@click.option("--json", "as_json", is_flag=True, help="The scheduler's answer, as JSON.")
def models(
    model: str | None,
    scheduler: str | None,
    cluster_secret_file: Path | None,
    config_path: Path,
    as_json: bool,
) -> None:
    """Which nodes hold how much of each model (or of MODEL: a digest, or a reference a node
    mounted or preheated it by), as their node services last reported (every few seconds).

    \b
    Example:
      modelfs cluster models
      modelfs cluster models --json registry.example.com/models/qwen:v1
    """
    answer = _ask(fleet_client(scheduler, cluster_secret_file, config_path), "/v1/models")
    found = [entry for entry in answer["models"] if model is None or _names(entry, model)]
    if as_json:
        click.echo(json.dumps({"models": found}, indent=1))
        return
    rows = [("MODEL", "REFERENCES", "NODE", "HELD")]
    for entry in found:
        for node in entry["nodes"]:
            held = f"{mib(node['present_bytes'])} of {mib(entry['total_bytes'])}"
            references = ",".join(entry["references"]) or "-"
            rows.append(
                (entry["digest"][:19], references, node["name"], f"{held} ({node['percent']}%)")
            )
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        click.echo("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[3]]))


@cluster_group.command("nodes")
@scheduler_options
@click.option("--json", "as_json", is_flag=True, help="The scheduler's answer, as JSON.")
def nodes(
    scheduler: str | None, cluster_secret_file: Path | None, config_path: Path, as_json: bool
) -> None:
    """The node services the scheduler heard from in the last 15 s, and their labels.

    \b
    Example:
      modelfs cluster nodes
    """
    answer = _ask(fleet_client(scheduler, cluster_secret_file, config_path), "/v1/nodes")
    if as_json:
        click.echo(json.dumps(answer, indent=1))
        return
    for node in answer["nodes"]:
        labels = ",".join(f"{key}={value}" for key, value in sorted(node["labels"].items()))
        click.echo(f"{node['name']}  {labels}".rstrip())


def _ask(client: FleetClient, path: str) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        async with client:
            return await client.call(path, {})

    return trio.run(ask)


def _names(entry: dict[str, Any], model: str) -> bool:
    """Whether ``model`` (a digest, a reference, or one pinned by digest) names ``entry``."""
    digest = model.rpartition("@")[2]
    return entry["digest"] == digest or model in entry["references"]

"""``modelfs index`` and ``modelfs scheduler``: what a cluster of peers needs besides the mount."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from modelfs.cli.options import source_options
from modelfs.errors import ModelfsError
from modelfs.fetcher.index import compute_index, find_index, publish_index
from modelfs.peer.options import ClusterOptions, ClusterSettings
from modelfs.reference import parse_reference
from modelfs.sources.mirrors import find_hosts
from modelfs.sources.registry import RegistryClient
from modelfs.transport.server import parse_listen
from modelfs.transport.tokens import load_secret

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

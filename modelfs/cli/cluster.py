"""``modelfs index`` and ``modelfs scheduler``: what a cluster of peers needs besides the mount."""

from __future__ import annotations

from pathlib import Path

import click
import trio

from modelfs.cli import cli
from modelfs.fetcher.index import compute_index, find_index, publish_index
from modelfs.fetcher.registry import RegistryClient
from modelfs.peer.auth import load_secret
from modelfs.peer.http import parse_listen
from modelfs.reference import parse_reference
from modelfs.scheduler.service import run_scheduler


@cli.command("index")
@click.argument("reference")
@click.option("--plain-http", is_flag=True, help="Talk HTTP, not HTTPS, to the registry.")
@click.option("--insecure", is_flag=True, help="Accept any TLS certificate.")
@click.option("--force", is_flag=True, help="Publish a new index even if one exists.")
def index(reference: str, plain_http: bool, insecure: bool, force: bool) -> None:
    """Publish the piece index of REFERENCE (sha256 of each piece) as a referrer of its manifest.

    Peers' pieces are checked against it, so a node can take bytes from a peer without trusting it.
    """
    parsed = parse_reference(reference)

    async def run() -> str:
        async with RegistryClient(
            parsed.api_host, plain_http=plain_http, insecure=insecure
        ) as client:
            repository = client.repository(parsed.repository)
            manifest = await repository.get_manifest(parsed.selector)
            if not force and await find_index(repository, manifest) is not None:
                return f"{parsed} {manifest.digest}: already indexed"
            pieces = await compute_index(repository, manifest)
            referrer = await publish_index(repository, manifest, pieces)
            count = sum(len(blob.pieces) for blob in pieces.blobs.values())
            return f"{parsed} {manifest.digest}: index {referrer} ({count} pieces)"

    click.echo(trio.run(run))


def _listen_address(_: click.Context, __: click.Parameter, value: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@cli.command("scheduler")
@click.option(
    "--listen",
    default="0.0.0.0:7480",
    show_default=True,
    callback=_listen_address,
    help="Address (host:port) to serve the scheduler API on.",
)
@click.option(
    "--cluster-secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File holding the secret every node of the cluster shares.",
)
@click.option(
    "--redis",
    "redis_url",
    default=None,
    help="redis://host:port/db to share state between scheduler replicas (default: memory).",
)
def scheduler(listen: tuple[str, int], cluster_secret_file: Path, redis_url: str | None) -> None:
    """Tell nodes which peers hold a piece, and ration trips to the registry."""
    secret = load_secret(cluster_secret_file)
    host, port = listen

    click.echo(f"scheduler: serving on {host}:{port}", err=True)
    trio.run(run_scheduler, host, port, secret, redis_url)

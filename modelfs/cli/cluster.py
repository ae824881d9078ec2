"""``modelfs index`` and ``modelfs scheduler``: what a cluster of peers needs besides the mount."""

from __future__ import annotations

import click
import trio

from modelfs.cli import cli
from modelfs.fetcher.index import compute_index, find_index, publish_index
from modelfs.fetcher.registry import RegistryClient
from modelfs.reference import parse_reference


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

"""``modelfs model-image``: publish the image containerd pulls to get a model lazily."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import click
import trio

from modelfs.cli.options import source_options
from modelfs.modelpack import OCI_INDEX, OCI_MANIFEST
from modelfs.reference import Reference, parse_reference
from modelfs.snapshot.models import check_model_manifest, model_image
from modelfs.sources.mirrors import find_hosts, open_repository
from modelfs.sources.registry import RegistryClient


@click.command("model-image")
@click.argument("model")
@click.argument("image")
@source_options
def model_image_command(
    model: str, image: str, plain_http: bool, insecure: bool, hosts_dir: Path
) -> None:
    """Publish IMAGE, the image of MODEL that the modelfs snapshotter mounts lazily.

    IMAGE is a small OCI image (one marker layer naming MODEL by digest, for every common
    platform): containerd pulls it in place of the model (it cannot pull a ModelPack
    artifact), and the snapshotter puts the lazily mounted model where its layer would be. Name
    IMAGE in a pod's image volume, or pull it with ctr (docs/kubernetes.md).

    \b
    Example:
      modelfs model-image reg.example.com/models/qwen:v1 reg.example.com/models/qwen:v1-image
    """
    source, target = parse_reference(model), parse_reference(image)
    pinned = trio.run(_publish, source, target, plain_http, insecure, hosts_dir)
    click.echo(pinned)


async def _publish(
    model: Reference, image: Reference, plain_http: bool, insecure: bool, hosts_dir: Path
) -> str:
    hosts = find_hosts(model.registry, model.api_host, plain_http=plain_http, hosts_dir=hosts_dir)
    async with open_repository(model.repository, hosts, insecure=insecure) as repository:
        fetched = await repository.get_manifest(model.selector)
    check_model_manifest(model, fetched.data)
    built = model_image(model.pinned(fetched.digest), OCI_MANIFEST, OCI_INDEX)
    # A push goes to the image registry's server, never a mirror.
    *_, server = find_hosts(
        image.registry, image.api_host, plain_http=plain_http, hosts_dir=hosts_dir
    )
    async with RegistryClient(server.netloc, insecure=insecure, endpoint=server) as client:
        repository = client.repository(image.repository)
        for digest, data in built.blobs.items():
            await repository.push_blob(digest, len(data), _once(data))
        for digest, data in built.manifests.items():
            await repository.push_manifest(digest, OCI_MANIFEST, data)
        digest = await repository.push_manifest(image.selector, OCI_INDEX, built.index)
    return f"{image.pinned(digest)}"


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data

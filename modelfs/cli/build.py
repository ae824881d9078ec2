"""`modelfs modelfile generate`, `build`, `push`, `tag`, `ls`: make artifacts and publish them.

Builds go to a local store, an OCI layout whose index.json names each manifest by its full
reference (``localhost:5000/models/bert:v1``): ``$MODELFS_STORE``, else
``$XDG_DATA_HOME/modelfs/store`` (``~/.local/share/modelfs/store``). ``-t oci:PATH:TAG``
builds into the layout at PATH instead, under the plain tag (what ``oci:PATH:TAG`` mounts).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import trio

from modelfs.builder.build import DEFAULT_CREATED, generate_for_directory, plan_build, write_build
from modelfs.cli.options import source_options
from modelfs.errors import BadReferenceError, ManifestError, NotFoundError
from modelfs.fetcher.index import compute_index, find_index, publish_index
from modelfs.reference import Reference, parse_layout_reference, parse_reference
from modelfs.sources.hosts import RegistryHost
from modelfs.sources.interface import FetchedManifest
from modelfs.sources.layout import CHUNK_SIZE, MAX_MANIFEST_SIZE, LayoutSource, OciLayout
from modelfs.sources.mirrors import find_hosts
from modelfs.sources.registry import RegistryClient

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar


def default_store() -> Path:
    if store := os.environ.get("MODELFS_STORE"):
        return Path(store)
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "modelfs" / "store"


def store_name(reference: Reference) -> str:
    """How the store's index.json names a build: the full reference without digest."""
    return f"{reference.registry}/{reference.repository}:{reference.tag or 'latest'}"


def _registry_reference(text: str) -> Reference:
    reference = parse_reference(text)
    if reference.digest:
        raise BadReferenceError(
            f"{text!r} has a digest; builds in the store are named by tag: drop the @sha256:..."
        )
    return reference


def _parse_created(_: click.Context, __: click.Parameter, value: str | None) -> datetime:
    if value is None:
        return DEFAULT_CREATED
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an RFC 3339 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


_store_option = click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local store (OCI layout). Default: $MODELFS_STORE or ~/.local/share/modelfs/store.",
)


@click.group("modelfile")
def modelfile_group() -> None:
    """Write Modelfiles.

    \b
    Example:
      modelfs modelfile generate ./qwen
    """


@modelfile_group.command("generate", short_help="Write a Modelfile for DIRECTORY, as modctl does.")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the Modelfile here instead of to standard output.",
)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def generate(directory: Path, output: Path | None, force: bool) -> None:
    """Write a Modelfile listing the files of DIRECTORY by kind (as modctl does).

    \b
    Example:
      modelfs modelfile generate ./qwen -o ./qwen/Modelfile
    """
    text = generate_for_directory(directory)
    if output is None:
        click.echo(text, nl=False)
        return
    if output.exists() and not force:
        raise click.ClickException(f"{output} exists: use --force to replace it")
    output.write_text(text)
    click.echo(f"wrote {output}", err=True)


@click.command("build")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-t",
    "--tag",
    "target",
    required=True,
    help="Name: registry/repo:tag (in the store) or oci:PATH:TAG (a layout).",
)
@click.option(
    "-f",
    "--file",
    "modelfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The Modelfile. Default: DIRECTORY/Modelfile.",
)
@click.option("--tar", is_flag=True, help="One-member tar layers (older modctl form), not raw.")
@click.option(
    "--created",
    callback=_parse_created,
    help="Creation time recorded (RFC 3339). Default: 1970-01-01, for reproducibility.",
)
@_store_option
def build(
    directory: Path,
    target: str,
    modelfile: Path | None,
    tar: bool,
    created: datetime,
    store: Path | None,
) -> None:
    """Pack DIRECTORY as a ModelPack artifact, as its Modelfile says.

    \b
    Example:
      modelfs build -t registry.example.com/models/qwen:v1 ./qwen
    """
    if target.startswith("oci:"):
        layout_reference = parse_layout_reference(target)
        if layout_reference.digest or store is not None:
            raise BadReferenceError(
                f"{target!r}: an oci: target takes a tag only, and no --store (it is the store)"
            )
        root, name = Path(layout_reference.path), layout_reference.tag or "latest"
    else:
        root, name = store or default_store(), store_name(_registry_reference(target))
    plan = plan_build(directory, modelfile or directory / "Modelfile")
    layout = OciLayout.create(root)
    with _progress(plan.total_size, f"Packing {len(plan.files)} files") as bar:
        result = write_build(
            plan,
            layout,
            name,
            layer_format="tar" if tar else "raw",
            created=created,
            progress=bar.update,
        )
    click.echo(f"{name} {result.digest}")


@click.command("push")
@click.argument("reference")
@source_options
@click.option(
    "--no-index",
    is_flag=True,
    help="Do not publish the piece index (then a mount checks each file whole before serving "
    "a byte of it, and peers are not used for it).",
)
@_store_option
def push(
    reference: str,
    plain_http: bool,
    insecure: bool,
    hosts_dir: Path,
    no_index: bool,
    store: Path | None,
) -> None:
    """Push the build named REFERENCE from the store to its registry, with its piece index.

    The piece index (the sha256 of every 4 MiB piece, a referrer of the manifest) is what lets
    a mount serve each piece as soon as it arrives, checked, and take pieces from peers.

    \b
    Example:
      modelfs push registry.example.com/models/qwen:v1
    """
    parsed = _registry_reference(reference)
    layout = _open_store(store)
    descriptor = _resolve(layout, store_name(parsed))
    # Pushes go to the registry's server (hosts.toml's, if it names one), never a mirror.
    *_, server = find_hosts(
        parsed.registry, parsed.api_host, plain_http=plain_http, hosts_dir=hosts_dir
    )
    digest = trio.run(_push, layout, descriptor, parsed, server, insecure, not no_index)
    click.echo(f"{store_name(parsed)} {digest}")


async def _push(
    layout: OciLayout,
    descriptor: dict[str, Any],
    reference: Reference,
    server: RegistryHost,
    insecure: bool,
    with_index: bool,
) -> str:
    manifest_digest = str(descriptor.get("digest"))
    data = layout.read_small_blob(manifest_digest, MAX_MANIFEST_SIZE)
    blobs = _blobs_of(data, manifest_digest)
    async with RegistryClient(server.netloc, insecure=insecure, endpoint=server) as client:
        repository = client.repository(reference.repository)
        total = sum(size for _, size in blobs)
        with _progress(total, f"Pushing {len(blobs)} blobs") as bar:
            for digest, size in blobs:
                done = bar.pos + size
                await repository.push_blob(digest, size, _read_blob(layout, digest, bar.update))
                # A blob the registry already had was not read: count it as sent.
                bar.update(done - bar.pos)
        media_type = str(descriptor.get("mediaType") or json.loads(data).get("mediaType"))
        pushed = await repository.push_manifest(reference.tag or "latest", media_type, data)
        if pushed != manifest_digest:
            raise ManifestError(
                f"the registry stored the manifest as {pushed}, not {manifest_digest}"
            )
        manifest = FetchedManifest(pushed, media_type, data)
        if with_index and await find_index(repository, manifest) is None:
            layers = sum(size for _, size in blobs[1:])  # the config (first) is not indexed
            source = LayoutSource(layout.root)
            with _progress(layers, "Indexing pieces") as bar:
                index = await compute_index(source, manifest, progress=bar.update)
            await publish_index(repository, manifest, index)
    return pushed


def _blobs_of(data: bytes, digest: str) -> list[tuple[str, int]]:
    """(digest, size) of the config and each layer, once each, config first."""
    try:
        manifest = json.loads(data)
        descriptors = [manifest["config"], *manifest["layers"]]
        pairs = [(str(entry["digest"]), int(entry["size"])) for entry in descriptors]
    except (ValueError, KeyError, TypeError):
        raise ManifestError(f"manifest {digest} in the store is malformed: build again") from None
    return list(dict.fromkeys(pairs))


async def _read_blob(
    layout: OciLayout, digest: str, advance: Callable[[int], None]
) -> AsyncIterator[bytes]:
    """The blob's bytes, read in a worker thread chunk by chunk (never whole in memory)."""
    with open(layout.blob_path(digest), "rb") as blob:
        while chunk := await trio.to_thread.run_sync(blob.read, CHUNK_SIZE):
            advance(len(chunk))
            yield chunk


@click.command("tag")
@click.argument("source")
@click.argument("target")
@_store_option
def tag(source: str, target: str, store: Path | None) -> None:
    """Give the build SOURCE in the store a second name, TARGET.

    \b
    Example:
      modelfs tag registry.example.com/models/qwen:v1 \\
          registry.example.com/models/qwen:stable
    """
    layout = _open_store(store)
    descriptor = _resolve(layout, store_name(_registry_reference(source)))
    with layout.lock():
        layout.set_tag(store_name(_registry_reference(target)), descriptor)


@click.command("ls")
@_store_option
def list_store(store: Path | None) -> None:
    """List the builds in the store: name and manifest digest.

    \b
    Example:
      modelfs ls
    """
    for name, descriptor in _open_store(store).tags():
        click.echo(f"{name} {descriptor.get('digest')}")


def _open_store(store: Path | None) -> OciLayout:
    return OciLayout.open(store or default_store())


def _resolve(layout: OciLayout, name: str) -> dict[str, Any]:
    descriptor = layout.resolve(name)
    if descriptor is None:
        raise NotFoundError(
            f"{name} is not in the store {layout.root}: build it with"
            f" `modelfs build -t {name} DIR` (`modelfs ls` lists the store)"
        )
    return descriptor


@contextlib.contextmanager
def _progress(total: int, label: str) -> Iterator[ProgressBar[int]]:
    """A byte progress bar on stderr."""
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar

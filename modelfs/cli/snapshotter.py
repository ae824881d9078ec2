"""``modelfs snapshotter``: the containerd proxy snapshotter."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

DEFAULT_ROOT = Path("/var/lib/modelfs-snapshotter")
DEFAULT_ADDRESS = Path("/run/modelfs-snapshotter/snapshotter.sock")


@click.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_ROOT,
    show_default=True,
    help="Where the snapshots' layers and metadata live (a filesystem overlayfs accepts as "
    "upper dir, such as ext4 or xfs).",
)
@click.option(
    "--address",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="The unix socket containerd's proxy_plugins entry names.",
)
def snapshotter(root: Path, address: Path) -> None:
    """Serve containerd's snapshots API: image layers stacked with overlayfs.

    Register it in containerd's config as the proxy plugin "modelfs" (docs/containerd.md),
    then pull with it: ctr images pull --snapshotter modelfs IMAGE.

    \b
    Example:
      modelfs snapshotter --address /run/modelfs-snapshotter/snapshotter.sock
    """
    # Imported here: grpcio and the compiled API cost ~0.3 s that other commands need not pay.
    from modelfs.service.notify import notify
    from modelfs.snapshot.server import serve

    asyncio.run(serve(root, address, ready=lambda: notify("READY=1")))

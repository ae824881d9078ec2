"""``modelfs snapshotter``: the containerd proxy snapshotter."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import click

from modelfs.cli.options import hosts_dir_option

DEFAULT_ROOT = Path("/var/lib/modelfs-snapshotter")
DEFAULT_ADDRESS = Path("/run/modelfs-snapshotter/snapshotter.sock")
DEFAULT_CRI_ENDPOINT = Path("/run/containerd/containerd.sock")


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
@click.option(
    "--plain-http-registry",
    "plain_http",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Mount models from this registry over HTTP, not HTTPS (repeatable).",
)
@hosts_dir_option
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The piece cache of the models it mounts without the daemon (default: modelfs "
    "mount's). With the daemon running, the daemon mounts them with its own settings.",
)
@click.option(
    "--prefetch",
    type=click.Choice(["none", "hints", "all"]),
    help="The prefetch of the models it mounts (default: modelfs mount's, hints).",
)
@click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the modelfs daemon that makes the model mounts listens (default: modelfs "
    "mount's); without a daemon there, each model gets a mount process of its own.",
)
@click.option("--metrics-addr", help="Serve Prometheus metrics on HOST:PORT (default: off).")
@click.option(
    "--mirror-addr",
    help="Serve, on HOST:PORT, the registry mirror that answers a model's own reference with "
    "its model image, for containerd's hosts.toml (docs/kubernetes.md; default: off).",
)
@click.option(
    "--cri-image-proxy",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serve CRI's image service on this unix socket, for kubelet's --image-service-endpoint: "
    "every call goes on to --cri-endpoint, and the model mounts of a pull use the credentials "
    "kubelet gave it (docs/containerd.md; default: off).",
)
@click.option(
    "--cri-endpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CRI_ENDPOINT,
    show_default=True,
    help="containerd's CRI socket, where --cri-image-proxy forwards.",
)
def snapshotter(
    root: Path,
    address: Path,
    plain_http: tuple[str, ...],
    hosts_dir: Path,
    cache_dir: Path | None,
    prefetch: str | None,
    control_socket: Path | None,
    metrics_addr: str | None,
    mirror_addr: str | None,
    cri_image_proxy: Path | None,
    cri_endpoint: Path,
) -> None:
    """Serve containerd's snapshots API: image layers stacked with overlayfs, models mounted
    lazily in place of their model image's marker layer (docs/kubernetes.md).

    Register it in containerd's config as the proxy plugin "modelfs" (docs/containerd.md),
    then pull with it: ctr images pull --snapshotter modelfs IMAGE.

    \b
    Example:
      modelfs snapshotter --address /run/modelfs-snapshotter/snapshotter.sock
    """
    # Imported here: grpcio and the compiled API cost ~0.3 s that other commands need not pay.
    from modelfs.metrics import serving_metrics
    from modelfs.service.notify import notify
    from modelfs.snapshot.cri import PulledCredentials
    from modelfs.snapshot.lazy import ModelMounts
    from modelfs.snapshot.mirror import ModelImages, serving_mirror
    from modelfs.snapshot.server import CriProxy, serve
    from modelfs.snapshot.stats import SnapshotterCollector, SnapshotterStats

    models = ModelMounts(
        root / "models",
        plain_http=frozenset(plain_http),
        hosts_dir=hosts_dir,
        cache_dir=cache_dir,
        prefetch=prefetch,
        control_socket=control_socket,
    )
    stats = SnapshotterStats()
    cri = None
    if cri_image_proxy is not None:
        cri = CriProxy(cri_image_proxy, cri_endpoint, PulledCredentials())
    with contextlib.ExitStack() as stack:
        if metrics_addr is not None:
            stack.enter_context(serving_metrics(metrics_addr, SnapshotterCollector(stats)))
        if mirror_addr is not None:
            pulled = None if cri is None else cri.pulled
            images = ModelImages(frozenset(plain_http), hosts_dir, pulled)
            stack.enter_context(serving_mirror(mirror_addr, images))
        asyncio.run(serve(root, address, models, stats, cri, ready=lambda: notify("READY=1")))

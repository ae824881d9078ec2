"""``modelfs csi``: the Kubernetes CSI node plugin."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from modelfs.cli.options import hosts_dir_option
from modelfs.csi import DEFAULT_DRIVER, DEFAULT_ENDPOINT, DEFAULT_STATE_DIR
from modelfs.service.control import DEFAULT_CONTROL_SOCKET


def _socket_path(context: click.Context, parameter: click.Parameter, value: str) -> Path:
    """A socket's path, also as CSI drivers' ``CSI_ENDPOINT`` writes it (``unix:///csi.sock``)."""
    path = value.removeprefix("unix://")
    if not path.startswith("/"):
        raise click.BadParameter(f"{value!r} is not an absolute path or unix:///PATH")
    return Path(path)


@click.command()
@click.option(
    "--endpoint",
    envvar="CSI_ENDPOINT",
    default=str(DEFAULT_ENDPOINT),
    show_default=True,
    callback=_socket_path,
    help="The unix socket to serve CSI on, a path or unix:///PATH (node-driver-registrar's "
    "--csi-address).",
)
@click.option(
    "--driver-name",
    default=DEFAULT_DRIVER,
    show_default=True,
    help="The CSI driver this plugin is (the CSIDriver object's name, pods' csi.driver).",
)
@click.option(
    "--node-id",
    envvar="NODE_NAME",
    default=socket.gethostname,
    show_default="$NODE_NAME, else the host name",
    help="This node's name, as NodeGetInfo tells kubelet.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where the models are mounted and the published volumes written down (a directory "
    "kubelet's mount namespace shares).",
)
@click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONTROL_SOCKET,
    show_default=True,
    help="Where the node's modelfs daemon, which makes the model mounts, listens.",
)
@click.option(
    "--plain-http-registry",
    "plain_http",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Reach this registry over HTTP, not HTTPS (repeatable).",
)
@hosts_dir_option
@click.option(
    "--keep-models",
    is_flag=True,
    help="Keep a model mounted after its last volume is unpublished, for the next pod.",
)
def csi(
    endpoint: Path,
    driver_name: str,
    node_id: str,
    state_dir: Path,
    control_socket: Path,
    plain_http: tuple[str, ...],
    hosts_dir: Path,
    keep_models: bool,
) -> None:
    """Serve CSI's Identity and Node services: pods' inline volumes of driver
    model.csi.modelpack.org mount their model lazily, one mount per model per node, bound
    read-only into each pod (docs/kubernetes.md; deploy/ has the DaemonSet).

    \b
    Example:
      modelfs csi --endpoint /csi/csi.sock --control-socket /run/modelfs/control.sock
    """
    # Imported here: grpcio and the compiled API cost ~0.3 s that other commands need not pay.
    from modelfs.csi.node import Node
    from modelfs.csi.server import serve
    from modelfs.service.notify import notify

    node = Node(
        state_dir,
        control_socket,
        plain_http=frozenset(plain_http),
        hosts_dir=hosts_dir,
        keep_models=keep_models,
    )
    node.release_unused()
    serve(node, endpoint, driver_name, node_id, ready=lambda: notify("READY=1"))

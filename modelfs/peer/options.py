"""How a mount takes part in a cluster: the scheduler, this node's peer server, its limits.

Apart from the peer source itself, so that a mount without a cluster never imports the peer and
scheduler modules (~20 ms on the way to a listing).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelfs.errors import ModelfsError

if TYPE_CHECKING:
    from modelfs.peer.tls import PeerTLS


@dataclass(frozen=True)
class ClusterOptions:
    scheduler_url: str
    secret: bytes
    listen: tuple[str, int]  # where this node's peer server listens
    zone: str = ""
    rack: str = ""
    wait_budget: float = 10.0  # longest a read waits on peers before it goes to the registry
    peer_timeout: float = 2.0  # one attempt at one peer: a slow peer costs a read this at most
    without_index: bool = False  # peers for blobs the piece index does not cover
    tls: PeerTLS | None = None  # mutual TLS between peers
    max_connections: int = 64  # served at once by this node's peer server

    @property
    def advertised(self) -> str:
        """The address other nodes reach this one at."""
        host, port = self.listen
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_cluster_options(
    scheduler: str | None,
    cluster_secret_file: Path | None,
    peer_listen: tuple[str, int] | None,
    zone: str,
    rack: str,
    peers_without_index: bool = False,
    peer_max_connections: int = ClusterOptions.max_connections,
    peer_tls_cert: Path | None = None,
    peer_tls_key: Path | None = None,
    peer_tls_ca: Path | None = None,
) -> ClusterOptions | None:
    """Cluster settings as the command line or the node's config give them, checked and with
    their files loaded: None when peers are not in use."""
    # Here, not at the top: a mount outside a cluster does not import the peer modules.
    from modelfs.peer.tls import PeerTLS
    from modelfs.transport.tokens import load_secret

    if scheduler is None and cluster_secret_file is None and peer_listen is None:
        return None
    if scheduler is None or cluster_secret_file is None or peer_listen is None:
        raise ModelfsError("peers need all of --scheduler, --cluster-secret-file and --peer-listen")
    tls_files = (peer_tls_cert, peer_tls_key, peer_tls_ca)
    tls = None
    if peer_tls_cert is not None and peer_tls_key is not None and peer_tls_ca is not None:
        tls = PeerTLS(peer_tls_cert, peer_tls_key, peer_tls_ca)
        tls.client_context()  # a bad file is reported now, not at the first peer
    elif any(path is not None for path in tls_files):
        raise ModelfsError(
            "mutual TLS between peers needs all of --peer-tls-cert, --peer-tls-key and "
            "--peer-tls-ca"
        )
    return ClusterOptions(
        scheduler,
        load_secret(cluster_secret_file),
        peer_listen,
        zone,
        rack,
        without_index=peers_without_index,
        tls=tls,
        max_connections=peer_max_connections,
    )

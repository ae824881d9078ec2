"""How a mount takes part in a cluster: the scheduler, this node's peer server, its limits.

Apart from the peer source itself, so that a mount without a cluster never imports the peer and
scheduler modules (~20 ms on the way to a listing).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

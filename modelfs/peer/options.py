"""How a mount takes part in a cluster: the scheduler, this node's peer server, its limits.

Apart from the peer source itself, so that a mount without a cluster never imports the peer and
scheduler modules (~20 ms on the way to a listing).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        """The address other nodes reach this one at: the listen host, or for a wildcard
        one the POD_IP environment variable (a DaemonSet sets it from ``status.podIP``: a pod's
        name resolves nowhere else), else this host's FQDN."""
        host, port = self.listen
        if host in ("0.0.0.0", "::", ""):
            host = os.environ.get("POD_IP") or socket.getfqdn()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ClusterSettings:
    """A mount's part in a cluster as an operator gives it, on the command line (``modelfs mount
    --scheduler ...``) or in the node's config (``[cluster]``), before any file is read: the one
    model both produce, and what a mount process is handed (``MountOptions``). ``load`` reads
    the secret and TLS files into the ``ClusterOptions`` the peer source runs with."""

    scheduler: str
    secret_file: Path
    listen: tuple[str, int]  # where this mount's peer server listens
    zone: str = ""
    rack: str = ""
    peers_without_index: bool = False  # peers for blobs the piece index does not cover
    max_connections: int = ClusterOptions.max_connections
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    def __post_init__(self) -> None:
        tls_files = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(path is not None for path in tls_files) and None in tls_files:
            raise ModelfsError(
                "mutual TLS between peers needs all three of the certificate, its key and the "
                "CA (--peer-tls-cert, --peer-tls-key, --peer-tls-ca; tls_cert, tls_key, tls_ca)"
            )

    def load(self) -> ClusterOptions:
        """The options with the secret and TLS files read and checked (one line if they fail)."""
        # Here, not at the top: a mount outside a cluster does not import the peer modules.
        from modelfs.peer.tls import PeerTLS
        from modelfs.transport.tokens import load_secret

        tls = None
        if self.tls_cert is not None and self.tls_key is not None and self.tls_ca is not None:
            tls = PeerTLS(self.tls_cert, self.tls_key, self.tls_ca)
            tls.client_context()  # a bad file is reported now, not at the first peer
        return ClusterOptions(
            self.scheduler,
            load_secret(self.secret_file),
            self.listen,
            self.zone,
            self.rack,
            without_index=self.peers_without_index,
            tls=tls,
            max_connections=self.max_connections,
        )

    def as_json(self) -> dict[str, object]:
        return {
            "scheduler": self.scheduler,
            "secret_file": str(self.secret_file),
            "listen": list(self.listen),
            "zone": self.zone,
            "rack": self.rack,
            "peers_without_index": self.peers_without_index,
            "max_connections": self.max_connections,
            **{name: None if path is None else str(path) for name, path in self._tls_files()},
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ClusterSettings:
        host, port = document["listen"]
        tls = {
            name: None if document[name] is None else Path(document[name])
            for name in ("tls_cert", "tls_key", "tls_ca")
        }
        return cls(
            str(document["scheduler"]),
            Path(document["secret_file"]),
            (str(host), int(port)),
            str(document["zone"]),
            str(document["rack"]),
            bool(document["peers_without_index"]),
            int(document["max_connections"]),
            **tls,
        )

    def _tls_files(self) -> list[tuple[str, Path | None]]:
        return [("tls_cert", self.tls_cert), ("tls_key", self.tls_key), ("tls_ca", self.tls_ca)]

"""Mutual TLS between peers (optional; the cluster's HMAC token is required either way).

Every node holds a certificate signed by the cluster's CA. The server requires a client
certificate from that CA; the client checks that the peer's certificate comes from that CA and
names the address the scheduler gave for it (an IP or DNS subject alternative name).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from modelfs.errors import ModelfsError


class TLSConfigError(ModelfsError):
    """A certificate, key or CA file that cannot be used."""


@dataclass(frozen=True)
class PeerTLS:
    cert: Path
    key: Path
    ca: Path

    def server_context(self) -> ssl.SSLContext:
        context = self._context(ssl.Purpose.CLIENT_AUTH)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.SERVER_AUTH)

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as error:
            raise TLSConfigError(
                f"cannot load the peer CA certificate {self.ca} ({error}): check --peer-tls-ca"
            ) from None
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as error:
            raise TLSConfigError(
                f"cannot load the peer certificate {self.cert} with key {self.key} ({error}): "
                "check --peer-tls-cert and --peer-tls-key (PEM, the key matching the certificate)"
            ) from None
        return context

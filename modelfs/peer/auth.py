"""The cluster secret and the request tokens made from it (HMAC-SHA256, time-bounded).

A token signs the method, the path, the body's sha256 and the time, so it is worthless for
another request and stale after ``MAX_SKEW`` seconds; it is compared in constant time. Within
the skew window a captured token can be replayed for the same request, which gives an
eavesdropper nothing it has not already seen on the wire.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from pathlib import Path

from modelfs.errors import AuthError

SCHEME = "Modelfs-HMAC"
MAX_SKEW = 30.0
MIN_SECRET_BYTES = 16


class Verdict(enum.Enum):
    ACCEPTED = 200
    MISSING = 401  # no token at all
    REFUSED = 403  # a token that is wrong, stale or malformed


def load_secret(path: Path) -> bytes:
    """The cluster secret from a file (surrounding whitespace ignored)."""
    try:
        secret = path.read_bytes().strip()
    except OSError as error:
        raise AuthError(
            f"cannot read the cluster secret file {path} ({error.strerror}): check the path "
            "and that this user may read it"
        ) from None
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthError(
            f"the cluster secret in {path} is shorter than {MIN_SECRET_BYTES} bytes: write a "
            "random one, e.g. `openssl rand -hex 32 > FILE`, the same on every node"
        )
    return secret


def _signature(secret: bytes, method: str, path: str, body: bytes, timestamp: str) -> str:
    message = f"{method}\n{path}\n{hashlib.sha256(body).hexdigest()}\n{timestamp}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, path: str, now: float, body: bytes = b"") -> str:
    """The ``Authorization`` header value for one request."""
    timestamp = str(int(now))
    return f"{SCHEME} {timestamp}:{_signature(secret, method, path, body, timestamp)}"


def check(
    secret: bytes, header: str | None, method: str, path: str, now: float, body: bytes = b""
) -> Verdict:
    if not header:
        return Verdict.MISSING
    scheme, _, token = header.partition(" ")
    timestamp, _, signature = token.partition(":")
    if scheme != SCHEME or not timestamp.isdigit() or abs(now - int(timestamp)) > MAX_SKEW:
        return Verdict.REFUSED
    expected = _signature(secret, method, path, body, timestamp)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return Verdict.REFUSED
    return Verdict.ACCEPTED

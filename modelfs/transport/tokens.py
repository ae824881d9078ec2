"""The cluster secret and the request tokens made from it (HMAC-SHA256, time-bounded).

A token signs the method, the path, the time and the sha256 the client declares for its body
(``DIGEST_HEADER``; absent means an empty body). The server checks the token from the headers
alone, before it reads a byte of the body, so a stranger cannot make it buffer anything; then it
reads the body (bounded) and refuses it if its sha256 is not the one signed. A token is
worthless for another request, stale after ``MAX_SKEW`` seconds, and compared in constant time.
Within the skew window a captured token can be replayed for the same request, which gives an
eavesdropper nothing it has not already seen on the wire.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from pathlib import Path

from modelfs.errors import AuthError
from modelfs.untrusted import decimal

SCHEME = "Modelfs-HMAC"
DIGEST_HEADER = "X-Modelfs-Content-SHA256"
EMPTY_BODY = hashlib.sha256(b"").hexdigest()
MAX_SKEW = 30.0
MIN_SECRET_BYTES = 16
TIMESTAMP_DIGITS = 12  # Unix seconds until the year 33658
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _signature(secret: bytes, method: str, path: str, digest: str, timestamp: str) -> str:
    message = f"{method}\n{path}\n{digest}\n{timestamp}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, path: str, now: float, body: bytes = b"") -> dict[str, str]:
    """The headers that authenticate one request: ``Authorization`` and ``DIGEST_HEADER``."""
    digest = hashlib.sha256(body).hexdigest()
    timestamp = str(int(now))
    token = _signature(secret, method, path, digest, timestamp)
    return {"Authorization": f"{SCHEME} {timestamp}:{token}", DIGEST_HEADER: digest}


def check(
    secret: bytes,
    header: str | None,
    method: str,
    path: str,
    now: float,
    digest: str = EMPTY_BODY,
) -> Verdict:
    """Whether ``header`` (the Authorization value) signs this request and its declared body
    ``digest`` (hex sha256). Never raises, whatever the header holds."""
    if not header:
        return Verdict.MISSING
    scheme, _, token = header.partition(" ")
    timestamp, _, signature = token.partition(":")
    seconds = decimal(timestamp, TIMESTAMP_DIGITS)
    if scheme != SCHEME or seconds is None or abs(now - seconds) > MAX_SKEW:
        return Verdict.REFUSED
    if not _HEX_SHA256.fullmatch(digest):
        return Verdict.REFUSED
    expected = _signature(secret, method, path, digest, timestamp)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        return Verdict.REFUSED
    return Verdict.ACCEPTED

"""Where registries sent blobs: a redirected blob's location, kept per blob until it expires.

Registries that keep blobs in object storage or behind a CDN (Harbor or distribution on S3, GCS
or Azure, ECR, GHCR, Docker Hub) answer every blob GET with a redirect, often to a presigned URL.
Asking the registry for each run of pieces would add a round trip and a request it has to
authorize; so the location it named is kept for the blob and range GETs go straight there, until
the URL's own expiry (or ``MAX_AGE`` when it states none), or until that place refuses a request.

Pure bookkeeping: the caller supplies the clocks.
"""

from __future__ import annotations

import calendar
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from modelfs.untrusted import decimal

# A location that states no expiry is asked for again after this long: cheap (one registry
# request per blob) and it bounds how long a revoked or moved location could be tried.
MAX_AGE = 600.0
# A presigned URL is not used in its last seconds: a request sent then may arrive after it.
EXPIRY_MARGIN = 10.0
# Blobs whose locations are kept; one model has tens of blobs.
MAX_LOCATIONS = 1024


def stated_expiry(url: str) -> float | None:
    """The wall-clock time (seconds since the epoch) a presigned URL says it expires at.

    AWS SigV4 and GCS V4 (``X-Amz-Date`` + ``X-Amz-Expires``, ``X-Goog-Date`` +
    ``X-Goog-Expires``), SigV2, GCS V2 and CloudFront (``Expires``, epoch seconds), Azure SAS
    (``se``, ISO 8601). None when it states none or states it badly; the earliest if several.
    """
    params = {name.lower(): value for name, value in parse_qsl(urlsplit(url).query)}
    found: list[float] = []
    for vendor in ("amz", "goog"):
        signed = _compact_time(params.get(f"x-{vendor}-date", ""))
        lifetime = decimal(params.get(f"x-{vendor}-expires", ""))
        if signed is not None and lifetime is not None:
            found.append(signed + lifetime)
    epoch = decimal(params.get("expires", ""))
    if epoch is not None:
        found.append(float(epoch))
    azure = _iso_time(params.get("se", ""))
    if azure is not None:
        found.append(azure)
    return min(found) if found else None


def _compact_time(text: str) -> float | None:
    """``20261204T093000Z`` -> epoch seconds."""
    return _parsed(text, "%Y%m%dT%H%M%SZ")


def _iso_time(text: str) -> float | None:
    """``2026-12-04T09:30:00Z`` (seconds optional, as SAS allows) -> epoch seconds."""
    return _parsed(text, "%Y-%m-%dT%H:%M:%SZ") or _parsed(text, "%Y-%m-%dT%H:%MZ")


def _parsed(text: str, layout: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, layout)))
    except ValueError:
        return None


@dataclass(frozen=True)
class Location:
    """Where a blob was sent, and until when (on the caller's monotonic clock) to go there."""

    url: str
    until: float


class BlobLocations:
    """Redirected locations by blob, the key naming the blob at its endpoint (its URL there)."""

    def __init__(self, capacity: int = MAX_LOCATIONS) -> None:
        self._capacity = capacity
        self._kept: OrderedDict[str, Location] = OrderedDict()

    def get(self, blob: str, now: float) -> Location | None:
        """The blob's location if one is kept and still good at ``now``."""
        location = self._kept.get(blob)
        if location is None:
            return None
        if now >= location.until:
            del self._kept[blob]
            return None
        return location

    def keep(self, blob: str, url: str, now: float, wall_now: float) -> Location:
        """Keep ``url`` as the blob's location from ``now`` (monotonic; ``wall_now`` the same
        moment on the wall clock the URL's expiry is stated in)."""
        until = now + MAX_AGE
        expiry = stated_expiry(url)
        if expiry is not None:
            until = min(until, now + expiry - wall_now - EXPIRY_MARGIN)
        location = Location(url, until)
        self._kept[blob] = location
        self._kept.move_to_end(blob)
        while len(self._kept) > self._capacity:
            self._kept.popitem(last=False)
        return location

    def forget(self, blob: str, location: Location) -> None:
        """Drop ``location`` (refused or expired), unless another run has replaced it since."""
        if self._kept.get(blob) == location:
            del self._kept[blob]

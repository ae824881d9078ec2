"""Read profiles: which ranges of which files a real load read, in order, published with the model.

``modelfs profile`` mounts a model, runs a load against it and records every read at the FUSE
layer; later mounts (and ``modelfs preheat --hints-only``) fetch those ranges, in that order,
before anyone asks. The recording is coalesced to pieces, the unit of fetch: each piece is
recorded once, at its first touch, clipped to the file that touched it, and consecutive new
pieces of one file merge into one range. The profile names files by path, so it is advice about
a tree, never trusted for bytes: ranges for paths not in the tree or beyond a file's end are
ignored, and every byte fetched is still checked against its blob digest as always.

It is published as an OCI referrer of the model manifest (``modelfs.sources.referrers``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import trio

from modelfs.artifact.tree import FileNode, Tree
from modelfs.errors import IntegrityError, ManifestError, ModelfsError
from modelfs.pieces import piece_span, pieces_covering
from modelfs.prefetch.hints import Hint
from modelfs.sources.interface import BlobSource, FetchedManifest
from modelfs.sources.referrers import find_referrer, publish_referrer
from modelfs.sources.registry import RegistryRepository
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

PROFILE_ARTIFACT_TYPE = "application/vnd.modelfs.profile.v1+json"
PROFILE_MEDIA_TYPE = "application/vnd.modelfs.profile.v1+json"
# One range per 4 MiB piece at most: 16 MiB of JSON is ~300 000 ranges, over a terabyte.
MAX_PROFILE_SIZE = 16 << 20
# A mount waits this long for the profile before it falls back to the built-in hints.
PROFILE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ProfiledRange:
    """Bytes [offset, offset+length) of the file at ``path``."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class Profile:
    manifest: str  # the digest of the manifest it was recorded against
    piece_size: int
    ranges: tuple[ProfiledRange, ...]

    @property
    def total_bytes(self) -> int:
        return sum(entry.length for entry in self.ranges)


# --- pure core ----------------------------------------------------------------------------


class ReadRecorder:
    """Records reads as the pieces they first touched, in order (see the module docstring)."""

    def __init__(self, piece_size: int) -> None:
        self.piece_size = piece_size
        self._seen: set[tuple[str, int]] = set()  # (blob digest, piece index)
        self._ranges: list[ProfiledRange] = []

    def note(self, node: FileNode, offset: int, size: int) -> None:
        """A read of ``size`` bytes of ``node`` from ``offset``."""
        size = min(size, node.size - offset)
        blob = node.blob
        for index in pieces_covering(node.offset + offset, size, blob.size, self.piece_size):
            if (blob.digest, index) in self._seen:
                continue
            self._seen.add((blob.digest, index))
            start, length = piece_span(index, blob.size, self.piece_size)
            # A tar member may share a piece with its neighbours: keep this file's part.
            first = max(start, node.offset) - node.offset
            end = min(start + length, node.offset + node.size) - node.offset
            self._add(ProfiledRange(node.path, first, end - first))

    def _add(self, entry: ProfiledRange) -> None:
        if self._ranges:
            last = self._ranges[-1]
            if last.path == entry.path and last.offset + last.length == entry.offset:
                self._ranges[-1] = ProfiledRange(last.path, last.offset, last.length + entry.length)
                return
        self._ranges.append(entry)

    def profile(self, manifest: str) -> Profile:
        return Profile(manifest, self.piece_size, tuple(self._ranges))


def encode_profile(profile: Profile) -> bytes:
    document = {
        "schemaVersion": 1,
        "manifest": profile.manifest,
        "pieceSize": profile.piece_size,
        "ranges": [[entry.path, entry.offset, entry.length] for entry in profile.ranges],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def parse_profile(data: bytes, manifest: str) -> Profile:
    """The profile, checked to be well formed and recorded against ``manifest``."""
    where = f"the read profile of {manifest}"
    try:
        document = loads_json(data)
        subject = str(document["manifest"])
        piece_size = int(document["pieceSize"])
        ranges = tuple(
            ProfiledRange(str(path), int(offset), int(length))
            for path, offset, length in document["ranges"]
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(
            f"{where} is malformed ({error}): record it again with `modelfs profile`"
        ) from None
    if subject != manifest:
        raise IntegrityError(f"{where} describes {subject}: record it again with `modelfs profile`")
    return Profile(subject, piece_size, ranges)


def profile_hints(tree: Tree, profile: Profile) -> tuple[list[Hint], list[ProfiledRange]]:
    """The profile's ranges as hints on ``tree``, in order; and the ranges it does not fit."""
    files = {node.path: node for node in tree.files()}
    hints: list[Hint] = []
    ignored: list[ProfiledRange] = []
    for entry in profile.ranges:
        node = files.get(entry.path)
        if (
            node is None
            or entry.offset < 0
            or entry.length <= 0
            or entry.offset + entry.length > node.size
        ):
            ignored.append(entry)
        else:
            hints.append(Hint(node, entry.offset, entry.length))
    return hints, ignored


# --- I/O edges ----------------------------------------------------------------------------


async def publish_profile(
    repository: RegistryRepository, manifest: FetchedManifest, profile: Profile
) -> str:
    """Push the profile as a referrer of ``manifest``; returns the referrer manifest's digest."""
    return await publish_referrer(
        repository, manifest, PROFILE_ARTIFACT_TYPE, PROFILE_MEDIA_TYPE, encode_profile(profile)
    )


async def find_profile(repository: RegistryRepository, manifest: str) -> Profile | None:
    """The newest read profile of manifest ``manifest``, or None when none was published."""
    data = await find_referrer(
        repository, manifest, {PROFILE_ARTIFACT_TYPE: PROFILE_MEDIA_TYPE}, MAX_PROFILE_SIZE
    )
    return None if data is None else parse_profile(data, manifest)


async def recorded_profile(
    source: BlobSource, manifest: str, timeout: float = PROFILE_TIMEOUT
) -> Profile | None:
    """The model's profile if a registry has one within ``timeout``; a failure is only logged."""
    if not isinstance(source, RegistryRepository):
        return None  # an OCI layout on disk has no referrers
    with trio.move_on_after(timeout):
        try:
            profile = await find_profile(source, manifest)
        except ModelfsError as error:
            log.warning("read profile of %s: %s (using the built-in hints)", source.name, error)
            return None
        if profile is None:
            log.info("%s has no read profile: using the built-in hints", source.name)
        return profile
    log.warning(
        "read profile of %s: no answer in %.0f s (using the built-in hints)", source.name, timeout
    )
    return None


def tree_hints(tree: Tree, profile: Profile) -> list[Hint]:
    """``profile_hints``, logging what does not fit the tree."""
    hints, ignored = profile_hints(tree, profile)
    if ignored:
        log.warning(
            "read profile: %d of %d ranges do not fit the tree and are ignored, first %s",
            len(ignored),
            len(profile.ranges),
            ignored[0],
        )
    return hints

"""The piece index: the digest of every piece of every layer of a model, published as a referrer.

A peer's bytes are checked against this index, never against anything the peer says: the index
comes from the registry, bound to the model manifest by its ``subject``, so it is exactly as
trustworthy as the manifest itself. It is published and found as a referrer
(``modelfs.sources.referrers``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import trio

from modelfs.cache import PieceCache
from modelfs.errors import IntegrityError, ManifestError, ModelfsError
from modelfs.fetcher.manifests import resolve_manifest
from modelfs.pieces import (
    DEFAULT_PIECE_HASH,
    DEFAULT_PIECE_SIZE,
    PIECE_DIGEST,
    PIECE_HASHES,
    piece_count,
    piece_matches,
)
from modelfs.sources.interface import BlobSource, FetchedManifest
from modelfs.sources.referrers import find_referrer, manifest_layers, publish_referrer
from modelfs.sources.registry import RegistryRepository
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

# Published as v2 (pieces as ``blake3:<hex>``); v1 (bare sha256 hex) is still read. An older
# modelfs looks for v1 only, so it finds no index in a v2 and checks blobs whole: never a piece
# against the wrong hash.
PIECE_INDEX_ARTIFACT_TYPE = "application/vnd.modelfs.piece-index.v2+json"
PIECE_INDEX_MEDIA_TYPE = "application/vnd.modelfs.piece-index.v2+json"
_V1_INDEX_TYPE = "application/vnd.modelfs.piece-index.v1+json"
# 140 GB of 4 MiB pieces is ~35 000 hashes, ~2.5 MB of JSON: room to spare, never unbounded.
MAX_INDEX_SIZE = 64 * 1024 * 1024
# How long the first read may wait for the index lookup before the model counts as without one.
INDEX_TIMEOUT = 15.0
# The cache's record of a model's index: ``piece-index/<manifest digest>``, the index as
# published, or NO_INDEX when the model had none when it was looked up.
INDEX_RECORD = "piece-index/"
NO_INDEX = b"none"


@dataclass(frozen=True)
class BlobPieces:
    """One blob's size and the digest of each of its pieces, in order (``blake3:<hex>``;
    ``sha256:<hex>`` from a v1 index)."""

    size: int
    pieces: tuple[str, ...]


@dataclass(frozen=True)
class PieceIndex:
    manifest: str
    piece_size: int
    blobs: dict[str, BlobPieces]

    def expected(self, digest: str, index: int) -> str | None:
        """The digest piece ``index`` of blob ``digest`` must have; None if not indexed."""
        blob = self.blobs.get(digest)
        if blob is None or not 0 <= index < len(blob.pieces):
            return None
        return blob.pieces[index]


# --- pure core ----------------------------------------------------------------------------


class PieceHasher:
    """Hashes a stream, piece by piece, whatever the chunk boundaries."""

    def __init__(self, piece_size: int) -> None:
        self.piece_size = piece_size
        self.pieces: list[str] = []
        self.size = 0
        self._current = PIECE_HASHES[DEFAULT_PIECE_HASH]()
        self._filled = 0

    def update(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            take = min(len(view), self.piece_size - self._filled)
            self._current.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == self.piece_size:
                self._close_piece()

    def finish(self) -> BlobPieces:
        if self._filled:
            self._close_piece()
        return BlobPieces(self.size, tuple(self.pieces))

    def _close_piece(self) -> None:
        self.pieces.append(f"{DEFAULT_PIECE_HASH}:{self._current.hexdigest()}")
        self._current = PIECE_HASHES[DEFAULT_PIECE_HASH]()
        self._filled = 0


def encode_index(index: PieceIndex) -> bytes:
    document = {
        "schemaVersion": 2,
        "manifest": index.manifest,
        "pieceSize": index.piece_size,
        "blobs": {
            digest: {"size": blob.size, "pieces": list(blob.pieces)}
            for digest, blob in sorted(index.blobs.items())
        },
    }
    return json.dumps(document, separators=(",", ":")).encode()


def parse_index(data: bytes, manifest: FetchedManifest) -> PieceIndex:
    """The index, checked to be well formed and to describe exactly ``manifest``'s layers."""
    where = f"the piece index of {manifest.digest}"
    try:
        document = loads_json(data)
        piece_size = int(document["pieceSize"])
        # Version 1 held bare sha256 hex.
        prefix = "sha256:" if document.get("schemaVersion") == 1 else ""
        blobs = {
            str(digest): BlobPieces(
                int(entry["size"]), tuple(prefix + str(p) for p in entry["pieces"])
            )
            for digest, entry in document["blobs"].items()
        }
        subject = str(document["manifest"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ManifestError(
            f"{where} is malformed ({error}): rebuild it with `modelfs index`"
        ) from None
    if subject != manifest.digest:
        raise IntegrityError(f"{where} describes {subject}: rebuild it with `modelfs index`")
    if piece_size <= 0:
        raise ManifestError(f"{where} has piece size {piece_size}: rebuild it with `modelfs index`")
    for layer in manifest_layers(manifest):
        blob = blobs.get(layer.digest)
        if (
            blob is None
            or blob.size != layer.size
            or len(blob.pieces) != piece_count(layer.size, piece_size)
            or not all(PIECE_DIGEST.match(piece) for piece in blob.pieces)
        ):
            raise ManifestError(
                f"{where} does not match layer {layer.digest}: rebuild it with `modelfs index`"
            )
    return PieceIndex(subject, piece_size, blobs)


# --- I/O edges ----------------------------------------------------------------------------


async def matches_index(data: bytes | bytearray | memoryview, expected: str) -> bool:
    """Whether ``data`` has the piece digest ``expected``, hashed in a worker thread (4 MiB
    takes 1-3 ms, too long to hold the event loop; both hashes release the GIL)."""
    return await trio.to_thread.run_sync(piece_matches, data, expected)


async def compute_index(
    repository: BlobSource,
    manifest: FetchedManifest,
    piece_size: int = DEFAULT_PIECE_SIZE,
    progress: Callable[[int], None] = lambda done: None,
) -> PieceIndex:
    """Stream every layer once, hashing pieces and checking the blob's own digest;
    ``progress`` is told the bytes of each chunk hashed."""
    blobs: dict[str, BlobPieces] = {}
    for layer in manifest_layers(manifest):
        if layer.digest in blobs:
            continue
        hasher = PieceHasher(piece_size)
        whole = hashlib.sha256()
        async with repository.stream_blob(layer.digest) as chunks:
            async for chunk in chunks:
                hasher.update(chunk)
                whole.update(chunk)
                progress(len(chunk))
        blob = hasher.finish()
        if "sha256:" + whole.hexdigest() != layer.digest or blob.size != layer.size:
            raise IntegrityError(
                f"blob {layer.digest} of {repository.name} arrived with other bytes: "
                "the registry or a proxy altered it; retry"
            )
        blobs[layer.digest] = blob
    return PieceIndex(manifest.digest, piece_size, blobs)


async def publish_index(
    repository: RegistryRepository, manifest: FetchedManifest, index: PieceIndex
) -> str:
    """Push the index as a referrer of ``manifest``; returns the referrer manifest's digest."""
    return await publish_referrer(
        repository,
        manifest,
        PIECE_INDEX_ARTIFACT_TYPE,
        PIECE_INDEX_MEDIA_TYPE,
        encode_index(index),
    )


async def find_index(
    repository: RegistryRepository, manifest: FetchedManifest
) -> PieceIndex | None:
    """The model's piece index, or None when none was published."""
    data = await find_referrer(
        repository,
        manifest.digest,
        {PIECE_INDEX_ARTIFACT_TYPE: PIECE_INDEX_MEDIA_TYPE, _V1_INDEX_TYPE: _V1_INDEX_TYPE},
        MAX_INDEX_SIZE,
    )
    return None if data is None else parse_index(data, manifest)


class IndexLookup:
    """A model's piece index, looked up once when first asked (``PieceIndexLookup``).

    Bounded in time: a registry that does not answer within ``INDEX_TIMEOUT`` leaves the model
    without an index for this mount (its blobs are then checked whole before they are served).
    An index found is kept in the cache under the manifest's digest, so a remount by digest
    needs no network for it.
    """

    def __init__(self, source: BlobSource, selector: str, cache: PieceCache) -> None:
        self._source = source
        self._selector = selector
        self._by_tag = not selector.startswith("sha256:")  # a tag's model may gain an index
        self._cache = cache
        self._lock = trio.Lock()
        self._resolved = False
        self._done = False  # looked up: every read asks, most after that, without the lock
        self.index: PieceIndex | None = None

    def pin(self, digest: str) -> None:
        """Look the index up for the manifest the mount pinned (found in the cache by its
        digest), not by asking the registry for the tag again."""
        if not self._resolved:
            self._selector = digest

    async def piece_index(self) -> PieceIndex | None:
        if self._done:
            return self.index
        async with self._lock:
            if not self._resolved:
                self._resolved = True
                with trio.move_on_after(INDEX_TIMEOUT):
                    try:
                        self.index = await self._look_up()
                    except ModelfsError as error:
                        log.warning("piece index of %s: %s", self._source.name, error)
                if self.index is None:
                    log.info(
                        "%s has no piece index: each blob is checked whole before it is served "
                        "(publish one with `modelfs index`)",
                        self._source.name,
                    )
                self._done = True
        return self.index

    async def _look_up(self) -> PieceIndex | None:
        manifest = await resolve_manifest(self._source, self._selector, self._cache)
        key = INDEX_RECORD + manifest.digest
        cached = self._cache.get_meta(key)
        # An index found before stands (it describes the manifest, which cannot change). That
        # there was none stands for a mount by digest; by tag the registry is asked again (one
        # may have been published since).
        if cached is not None and cached != NO_INDEX:
            return parse_index(cached, manifest)
        if cached is not None and not self._by_tag:
            return None
        if not isinstance(self._source, RegistryRepository):
            return None  # an OCI layout holds no referrers
        index = await find_index(self._source, manifest)
        self._cache.put_meta(key, NO_INDEX if index is None else encode_index(index))
        return index


class PieceIndexLookup(Protocol):
    """Where a model's piece index is found: looked up once, bounded in time."""

    def pin(self, digest: str) -> None:
        """The manifest the mount pinned: look the index up for it, not for a tag again."""
        ...

    async def piece_index(self) -> PieceIndex | None:
        """The index, or None when the model has none (or it could not be had in time)."""
        ...


@runtime_checkable
class IndexCheckedPieces(PieceIndexLookup, Protocol):
    """A source that checks every whole piece of an indexed blob against the piece index
    before it delivers it (the peer source: it must, to know a peer lied), and is the lookup."""

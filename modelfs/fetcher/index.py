"""The piece index: the sha256 of every piece of every layer of a model, published as a referrer.

A peer's bytes are checked against this index, never against anything the peer says: the index
comes from the registry, bound to the model manifest by its ``subject``, so it is exactly as
trustworthy as the manifest itself. It is an OCI artifact (a manifest whose one layer is the
JSON index) found through the referrers API, or through the referrers tag scheme
(``sha256-<hex>`` holding an OCI index of referrers) on registries without that API, such as
distribution 2.8.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from modelfs.errors import IntegrityError, ManifestError, NotFoundError
from modelfs.fetcher.registry import RegistryRepository, sha256_digest
from modelfs.fetcher.source import FetchedManifest
from modelfs.modelpack import OCI_EMPTY_JSON, OCI_INDEX, OCI_MANIFEST
from modelfs.pieces import DEFAULT_PIECE_SIZE, piece_count

PIECE_INDEX_ARTIFACT_TYPE = "application/vnd.modelfs.piece-index.v1+json"
PIECE_INDEX_MEDIA_TYPE = "application/vnd.modelfs.piece-index.v1+json"
# 140 GB of 4 MiB pieces is ~35 000 hashes, ~2.5 MB of JSON: room to spare, never unbounded.
MAX_INDEX_SIZE = 64 * 1024 * 1024
_EMPTY_CONFIG = b"{}"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BlobPieces:
    """One blob's size and the hex sha256 of each of its pieces, in order."""

    size: int
    pieces: tuple[str, ...]


@dataclass(frozen=True)
class PieceIndex:
    manifest: str
    piece_size: int
    blobs: dict[str, BlobPieces]

    def expected(self, digest: str, index: int) -> str | None:
        """The hex sha256 piece ``index`` of blob ``digest`` must have; None if not indexed."""
        blob = self.blobs.get(digest)
        if blob is None or not 0 <= index < len(blob.pieces):
            return None
        return blob.pieces[index]


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


# --- pure core ----------------------------------------------------------------------------


class PieceHasher:
    """Hashes a stream, piece by piece, whatever the chunk boundaries."""

    def __init__(self, piece_size: int) -> None:
        self.piece_size = piece_size
        self.pieces: list[str] = []
        self.size = 0
        self._current = hashlib.sha256()
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
        self.pieces.append(self._current.hexdigest())
        self._current = hashlib.sha256()
        self._filled = 0


def manifest_layers(manifest: FetchedManifest) -> list[Descriptor]:
    """The layer descriptors of an OCI image manifest."""
    try:
        document = json.loads(manifest.data)
        layers = [
            Descriptor(str(layer["mediaType"]), str(layer["digest"]), int(layer["size"]))
            for layer in document["layers"]
        ]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise ManifestError(
            f"manifest {manifest.digest} has no readable layer list ({error}): "
            "a piece index needs an OCI image manifest"
        ) from None
    return layers


def encode_index(index: PieceIndex) -> bytes:
    document = {
        "schemaVersion": 1,
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
        document = json.loads(data)
        piece_size = int(document["pieceSize"])
        blobs = {
            str(digest): BlobPieces(int(entry["size"]), tuple(str(p) for p in entry["pieces"]))
            for digest, entry in document["blobs"].items()
        }
        subject = str(document["manifest"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
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
            or not all(_HEX.match(piece) for piece in blob.pieces)
        ):
            raise ManifestError(
                f"{where} does not match layer {layer.digest}: rebuild it with `modelfs index`"
            )
    return PieceIndex(subject, piece_size, blobs)


def empty_config() -> Descriptor:
    return Descriptor(OCI_EMPTY_JSON, sha256_digest(_EMPTY_CONFIG), len(_EMPTY_CONFIG))


def referrer_manifest(subject: FetchedManifest, index_blob: Descriptor) -> bytes:
    """The artifact manifest carrying the index, pointing at the model through ``subject``."""
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": PIECE_INDEX_ARTIFACT_TYPE,
        "config": empty_config().to_json(),
        "layers": [index_blob.to_json()],
        "subject": Descriptor(subject.media_type, subject.digest, len(subject.data)).to_json(),
    }
    return json.dumps(document, separators=(",", ":")).encode()


def referrers_tag(digest: str) -> str:
    """The referrers tag scheme's tag for a subject: ``sha256:abc`` -> ``sha256-abc``."""
    if not _DIGEST.match(digest):
        raise ManifestError(f"{digest!r} is not a sha256 digest")
    return digest.replace(":", "-", 1)


def index_referrers(data: bytes) -> list[dict[str, Any]]:
    """The ``manifests`` of an OCI index of referrers (the API's answer or the tag's content)."""
    try:
        manifests = json.loads(data).get("manifests") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ManifestError("a referrers list is not an OCI index: remove the broken tag") from None
    return [entry for entry in manifests if isinstance(entry, dict)]


def with_referrer(existing: bytes | None, referrer: Descriptor) -> bytes:
    """The referrers tag's OCI index with ``referrer`` added (once) to what it held."""
    entries = index_referrers(existing) if existing is not None else []
    entries = [entry for entry in entries if entry.get("digest") != referrer.digest]
    entries.append({**referrer.to_json(), "artifactType": PIECE_INDEX_ARTIFACT_TYPE})
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return json.dumps(document, separators=(",", ":")).encode()


def pick_index_referrer(entries: list[dict[str, Any]]) -> str | None:
    """The digest of the newest piece-index referrer (the last one listed)."""
    found = [
        str(entry["digest"])
        for entry in entries
        if entry.get("artifactType") == PIECE_INDEX_ARTIFACT_TYPE
        and _DIGEST.match(str(entry.get("digest", "")))
    ]
    return found[-1] if found else None


# --- I/O edges ----------------------------------------------------------------------------


async def compute_index(
    repository: RegistryRepository,
    manifest: FetchedManifest,
    piece_size: int = DEFAULT_PIECE_SIZE,
) -> PieceIndex:
    """Stream every layer once, hashing pieces and checking the blob's own digest."""
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
        blob = hasher.finish()
        if "sha256:" + whole.hexdigest() != layer.digest or blob.size != layer.size:
            raise IntegrityError(
                f"blob {layer.digest} of {repository.name} arrived with other bytes: "
                "the registry or a proxy altered it; retry"
            )
        blobs[layer.digest] = blob
    return PieceIndex(manifest.digest, piece_size, blobs)


async def _bytes(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def publish_index(
    repository: RegistryRepository, manifest: FetchedManifest, index: PieceIndex
) -> str:
    """Push the index as a referrer of ``manifest``; returns the referrer manifest's digest.

    Registries without the referrers API also get the referrers tag updated, as the OCI
    distribution spec's fallback asks of clients.
    """
    body = encode_index(index)
    index_blob = Descriptor(PIECE_INDEX_MEDIA_TYPE, sha256_digest(body), len(body))
    config = empty_config()
    await repository.push_blob(config.digest, config.size, _bytes(_EMPTY_CONFIG))
    await repository.push_blob(index_blob.digest, index_blob.size, _bytes(body))
    referrer = referrer_manifest(manifest, index_blob)
    digest = await repository.push_manifest(sha256_digest(referrer), OCI_MANIFEST, referrer)
    if await repository.get_referrers(manifest.digest) is None:
        tag = referrers_tag(manifest.digest)
        try:
            existing: bytes | None = (await repository.get_manifest(tag)).data
        except NotFoundError:
            existing = None
        updated = with_referrer(existing, Descriptor(OCI_MANIFEST, digest, len(referrer)))
        await repository.push_manifest(tag, OCI_INDEX, updated)
    return digest


async def find_index(
    repository: RegistryRepository, manifest: FetchedManifest
) -> PieceIndex | None:
    """The model's piece index, or None when none was published."""
    listed = await repository.get_referrers(manifest.digest)
    if listed is None:
        try:
            listed = (await repository.get_manifest(referrers_tag(manifest.digest))).data
        except NotFoundError:
            return None
    referrer_digest = pick_index_referrer(index_referrers(listed))
    if referrer_digest is None:
        return None
    referrer = await repository.get_manifest(referrer_digest)
    layers = manifest_layers(referrer)
    if len(layers) != 1 or layers[0].media_type != PIECE_INDEX_MEDIA_TYPE:
        raise ManifestError(
            f"piece index referrer {referrer_digest} of {repository.name} has no index layer: "
            "rebuild it with `modelfs index`"
        )
    data = await repository.get_blob(layers[0].digest, MAX_INDEX_SIZE)
    return parse_index(data, manifest)

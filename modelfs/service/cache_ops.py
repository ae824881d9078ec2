"""What ``modelfs cache ls|gc|verify|rm`` do to the node's cache, apart from printing.

A model in the cache is a manifest record (``manifest/<digest>``, written by every mount and
preheat); its blobs are its layers, or for a compressed layer the decompressed stream stored in
its place (``LayerPlan.stream_digest``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from modelfs.artifact.tree import STREAM_SUFFIX, BlobRef, plan_layers
from modelfs.cache import PieceCache, piece_checksum
from modelfs.cache.store import BlobState
from modelfs.errors import CacheError, ModelfsError
from modelfs.fetcher.index import INDEX_RECORD, NO_INDEX, BlobPieces, parse_index
from modelfs.pieces import piece_count, piece_matches
from modelfs.service.preheat import plan_missing
from modelfs.sources.interface import FetchedManifest


@dataclass(frozen=True)
class CachedModel:
    digest: str
    config_digest: str
    blobs: list[BlobRef]
    present_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class VerifyReport:
    pieces_checked: int
    corrupt_pieces: list[tuple[str, int]]
    blobs_checked: int
    corrupt_blobs: list[str]


def _manifest(cache: PieceCache, digest: str) -> dict[str, object]:
    record = cache.get_meta(f"manifest/{digest}")
    if record is None:
        raise CacheError(f"the cache holds no model {digest}; `modelfs cache ls` lists them")
    manifest = json.loads(record.partition(b"\n")[2])
    if not isinstance(manifest, dict):
        raise CacheError(f"the cached manifest {digest} is not a JSON object; remove it")
    return manifest


def model_blobs(cache: PieceCache, manifest: dict[str, object]) -> list[BlobRef]:
    """The blobs a mount of this manifest reads, as the cache keys them."""
    blobs = []
    for plan in plan_layers(manifest):
        decompressed = cache.get_meta(f"decompressed-size/{plan.digest}")
        if plan.format in ("tar+gzip", "tar+zstd"):
            # Never stored compressed: unknown size until first decompressed, counted as missing.
            size = plan.size if decompressed is None else int(decompressed)
            blobs.append(BlobRef(plan.stream_digest, size))
        else:
            blobs.append(BlobRef(plan.digest, plan.size))
    return blobs


def cached_models(cache: PieceCache) -> list[CachedModel]:
    models = []
    for key in cache.meta_keys("manifest/"):
        digest = key.removeprefix("manifest/")
        try:
            manifest = _manifest(cache, digest)
            blobs = model_blobs(cache, manifest)
        except (ModelfsError, ValueError):
            continue  # an image index or foreign manifest someone resolved: not a model
        config = manifest.get("config")
        config_digest = config.get("digest", "") if isinstance(config, dict) else ""
        plan = plan_missing(cache, digest, blobs)
        models.append(
            CachedModel(
                digest,
                str(config_digest),
                blobs,
                plan.total_bytes - plan.missing_bytes,
                plan.total_bytes,
            )
        )
    return models


def remove_model(cache: PieceCache, digest: str) -> list[str]:
    """Drop a model's manifest and the blobs no other cached model uses; the blobs dropped."""
    target = next((model for model in cached_models(cache) if model.digest == digest), None)
    if target is None:
        _manifest(cache, digest)  # raises the "no such model" error
        cache.delete_meta(f"manifest/{digest}")  # not a model: just forget the record
        return []
    others = [model for model in cached_models(cache) if model.digest != digest]
    shared = {blob.digest for model in others for blob in model.blobs}
    dropped = [blob.digest for blob in target.blobs if blob.digest not in shared]
    for blob_digest in dropped:
        cache.drop_blob(blob_digest)
        cache.delete_meta(f"tar-index/{blob_digest}")
        cache.delete_meta(f"decompressed-size/{blob_digest.removesuffix(STREAM_SUFFIX)}")
    if target.config_digest not in {model.config_digest for model in others}:
        cache.delete_meta(f"config/{target.config_digest}")
    cache.delete_meta(f"manifest/{digest}")
    return dropped


def _indexed_blobs(cache: PieceCache) -> dict[str, BlobPieces]:
    """Every blob a piece index kept in the cache describes (with its model's manifest)."""
    blobs: dict[str, BlobPieces] = {}
    for key in cache.meta_keys(INDEX_RECORD):
        digest = key.removeprefix(INDEX_RECORD)
        record, manifest = cache.get_meta(key), cache.get_meta(f"manifest/{digest}")
        if record is None or manifest is None or record == NO_INDEX:
            continue
        media_type, _, data = manifest.partition(b"\n")
        try:
            index = parse_index(record, FetchedManifest(digest, media_type.decode(), data))
        except ModelfsError:
            continue  # an index that no longer fits its manifest vouches for nothing
        blobs.update(index.blobs)
    return blobs


def _blob_matches(cache: PieceCache, state: BlobState) -> list[int] | None:
    """The checksums of the blob's pieces as stored, if they hash to its digest; else None."""
    hasher, checksums = hashlib.sha256(), []
    for data in cache.stored_pieces(state.digest, state.size):
        if data is None:
            return None
        hasher.update(data)
        checksums.append(piece_checksum(data))
    return checksums if f"sha256:{hasher.hexdigest()}" == state.digest else None


def _check_pieces(cache: PieceCache, state: BlobState, pieces: BlobPieces) -> list[int]:
    """Check a partial blob's pieces against the piece index: those that match are vouched
    for, those that do not are dropped (and returned)."""
    bad = []
    for index, data in enumerate(cache.stored_pieces(state.digest, state.size)):
        if data is None:
            continue
        if piece_matches(data, pieces.pieces[index]):
            cache.vouch(state.digest, index)
        else:
            cache.drop_piece(state.digest, index)
            bad.append(index)
    return bad


def verify(cache: PieceCache) -> VerifyReport:
    """Check every piece's checksum, then every whole blob against its sha256 digest and the
    pieces of partial blobs against the piece index, where the cache holds one; whatever fails
    is dropped so it is fetched again, and what passes is vouched for."""
    pieces_checked = cache.stats().pieces
    corrupt_pieces = cache.drop_corrupt_pieces()
    indexed = _indexed_blobs(cache)
    checked, corrupt_blobs = 0, []
    for state in cache.blob_states():
        # A decompressed stream has no digest of its own; its pieces' checksums cover it.
        if state.digest.endswith(STREAM_SUFFIX):
            continue
        checked += 1
        if state.present == piece_count(state.size, cache.piece_size):
            checksums = _blob_matches(cache, state)
            if checksums is not None:
                cache.mark_verified(state.digest, state.size, checksums)
                continue
            corrupt_blobs.append(state.digest)
            cache.drop_blob(state.digest)
            continue
        pieces = indexed.get(state.digest)
        if pieces is not None and pieces.size == state.size:
            corrupt_pieces += [(state.digest, i) for i in _check_pieces(cache, state, pieces)]
    return VerifyReport(pieces_checked, corrupt_pieces, checked, corrupt_blobs)

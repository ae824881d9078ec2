"""Manifests and configs through the node's cache, so a remount by digest needs no network.

A manifest by tag is always asked for (tags move); by digest, the cache's copy is used if it
still hashes to that digest. A config likewise. A record that does not is dropped and fetched
again: the cache's checksum catches a flipped bit, the digest anything else.
"""

from __future__ import annotations

import hashlib
import logging

from modelfs.cache import PieceCache
from modelfs.sources.interface import BlobSource, FetchedManifest

log = logging.getLogger(__name__)


def _matches(digest: str, data: bytes) -> bool:
    return digest == "sha256:" + hashlib.sha256(data).hexdigest()


def _cached(cache: PieceCache, key: str, digest: str, data: bytes) -> bool:
    if _matches(digest, data):
        return True
    log.error("cache: the record %s does not match its digest; dropped, fetched again", key)
    cache.delete_meta(key)
    return False


async def resolve_manifest(source: BlobSource, selector: str, cache: PieceCache) -> FetchedManifest:
    """A manifest by tag (always asked: tags move) or by digest (the cache's copy if it has it)."""
    if selector.startswith("sha256:"):
        key = f"manifest/{selector}"
        record = cache.get_meta(key)
        if record is not None:
            media_type, _, data = record.partition(b"\n")
            if _cached(cache, key, selector, data):
                return FetchedManifest(selector, media_type.decode(), data)
    fetched = await source.get_manifest(selector)
    cache.put_meta(f"manifest/{fetched.digest}", fetched.media_type.encode() + b"\n" + fetched.data)
    return fetched


async def resolve_config(
    source: BlobSource, digest: str, cache: PieceCache, max_size: int
) -> bytes:
    """A config blob by digest: the cache's copy if it has it, else fetched (and kept)."""
    key = f"config/{digest}"
    record = cache.get_meta(key)
    if record is not None and _cached(cache, key, digest, record):
        return record
    config = await source.get_blob(digest, max_size)
    cache.put_meta(key, config)
    return config

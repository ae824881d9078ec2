"""From a reference to a file tree: the manifest, the config, and tar layers' member lists.

This is all the I/O a mount does before it is ready. Raw layers need nothing beyond the
manifest. An uncompressed tar layer needs its header blocks (small range reads). A compressed tar
layer has no random access, so it is fetched whole, checked, decompressed into the cache as a
derived blob, and read from there like an uncompressed one (``DecompressedStream``: again if the
cache lost any of it). When its annotations describe the
one file it holds (modctl's form), a mount does that on the file's first read instead
(``DeferredLayer``) and does not wait for it. Member lists, manifests and configs are kept in the
cache so a remount by digest needs no network at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import IO, Any

import trio

from modelfs.artifact.inflate import (
    FORMAT_ERRORS,
    ChunkReader,
    InflateBounds,
    InflateLimitError,
    InflateRoom,
    inflate,
    inflate_limit,
)
from modelfs.artifact.tar import HeaderWindow, TarMember, read_members
from modelfs.artifact.tree import (
    BlobRef,
    DirSpec,
    FileSpec,
    LayerPlan,
    Tree,
    deferred_layer_file,
    deferred_member,
    is_deferrable,
    plan_layers,
    raw_layer_file,
    tar_layer_entries,
)
from modelfs.cache import PieceCache, piece_checksum
from modelfs.errors import CacheError, IntegrityError, ManifestError
from modelfs.fetcher.manifests import resolve_config, resolve_manifest
from modelfs.fetcher.piece_fetcher import PieceFetcher
from modelfs.pieces import piece_count
from modelfs.sizes import format_size
from modelfs.sources.interface import BlobSource
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

MAX_CONFIG_SIZE = 4 << 20
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Model:
    """A pinned manifest and the tree it describes."""

    digest: str
    manifest: dict[str, Any]
    config: bytes
    tree: Tree
    blobs: list[BlobRef]  # every blob the tree reads from (for cache leases)
    deferred: list[str]  # blobs deferred layers will be read from once fetched (for leases)
    # Compressed layers' decompressed streams (deferred or not): no piece of them can be fetched
    # again alone, so a mount leases them whole (``PieceCache.lease``).
    decompressed: list[str]


class DecompressedStream:
    """A compressed layer's tar stream, kept in the cache as a derived blob.

    No piece of it can be fetched alone, so whenever the cache no longer holds it whole (a piece
    evicted, or dropped for failing its checksum) the next ``ensure`` fetches and decompresses
    the layer again; concurrent callers wait for that one fetch. The pieces still there are kept:
    the layer matched its digest, so any piece that passes its checksum is right.
    """

    def __init__(
        self, plan: LayerPlan, source: BlobSource, cache: PieceCache, bounds: InflateBounds
    ) -> None:
        self._plan = plan
        self._source = source
        self._cache = cache
        self._bounds = bounds
        self._lock = trio.Lock()

    @property
    def digest(self) -> str:
        return self._plan.stream_digest

    @property
    def blob(self) -> BlobRef | None:
        """The stream, if the cache holds it whole now."""
        return _cached_tar_blob(self._plan, self._cache)

    async def ensure(self) -> BlobRef:
        async with self._lock:
            blob = self.blob
            if blob is None:
                blob = await _decompress_into_cache(
                    self._plan, self.digest, self._source, self._cache, self._bounds
                )
            return blob


class StreamMember:
    """A file of a compressed tar layer, at its offset in the layer's decompressed stream."""

    def __init__(self, stream: DecompressedStream, offset: int) -> None:
        self._stream = stream
        self._offset = offset

    @property
    def location(self) -> tuple[BlobRef, int] | None:
        blob = self._stream.blob
        return None if blob is None else (blob, self._offset)

    async def locate(self) -> tuple[BlobRef, int]:
        return await self._stream.ensure(), self._offset


class DeferredLayer:
    """A compressed layer holding one file that its annotations describe: located on first read.

    The first ``locate`` fetches the layer whole, checks and decompresses it into the cache, and
    checks the archive holds exactly the promised file; concurrent callers wait for that one fetch.
    A failure is not remembered: the next read tries again (from the cache if the layer got there).
    """

    def __init__(
        self,
        plan: LayerPlan,
        source: BlobSource,
        cache: PieceCache,
        fetcher: PieceFetcher,
        bounds: InflateBounds,
    ) -> None:
        self._plan = plan
        self._source = source
        self._cache = cache
        self._fetcher = fetcher
        self._stream = DecompressedStream(plan, source, cache, bounds)
        self._lock = trio.Lock()
        self._offset: int | None = None  # of the file in the stream, once checked

    @property
    def blob_digest(self) -> str:
        return self._stream.digest

    @property
    def location(self) -> tuple[BlobRef, int] | None:
        blob = None if self._offset is None else self._stream.blob
        return None if blob is None or self._offset is None else (blob, self._offset)

    async def locate(self) -> tuple[BlobRef, int]:
        async with self._lock:
            blob = await self._stream.ensure()
            if self._offset is None:
                # A decompressed stream: checked whole, so its list is vouched for.
                members, _ = await _members(
                    self._plan, blob, self._source, self._cache, self._fetcher
                )
                self._offset = deferred_member(self._plan, members, blob).offset
            return blob, self._offset

    async def locate_if_cached(self) -> None:
        """Locate now if the layer was decompressed before and matches (a remount): no network."""
        if self._stream.blob is not None:
            # A lying layer stays unlocated: its reads fail, and say why, as on the first mount.
            with contextlib.suppress(ManifestError):
                await self.locate()


async def load_model(
    source: BlobSource,
    selector: str,
    cache: PieceCache,
    fetcher: PieceFetcher,
    *,
    defer_compressed: bool = False,
    inflate_bounds: InflateBounds | None = None,
) -> Model:
    """The model ``selector`` names; with ``defer_compressed`` (a mount), compressed layers
    that describe their one file are fetched on its first read rather than now; compressed
    layers may inflate within ``inflate_bounds`` (by default ``InflateBounds()``)."""
    inflate_bounds = inflate_bounds or InflateBounds()
    fetched = await resolve_manifest(source, selector, cache)
    try:
        manifest = loads_json(fetched.data)
    except ValueError as error:
        raise ManifestError(
            f"{source.name}@{fetched.digest}: manifest is not JSON ({error})"
        ) from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{source.name}@{fetched.digest}: manifest is not a JSON object")
    plans = plan_layers(manifest)
    config = await _config(source, manifest, cache)
    files: list[FileSpec] = []
    dirs: list[DirSpec] = []
    blobs: list[BlobRef] = []
    deferred: list[str] = []
    decompressed: list[str] = []
    for plan in plans:
        if plan.format == "raw":
            file = raw_layer_file(plan, default_mtime_ns=0)
            files.append(file)
            blobs.append(BlobRef(plan.digest, plan.size))
        elif defer_compressed and is_deferrable(plan):
            layer = DeferredLayer(plan, source, cache, fetcher, inflate_bounds)
            await layer.locate_if_cached()
            files.append(deferred_layer_file(plan, layer, default_mtime_ns=0))
            deferred.append(layer.blob_digest)
            decompressed.append(layer.blob_digest)
        elif plan.format == "tar":
            blob = BlobRef(plan.digest, plan.size)
            members, vouched = await _members(plan, blob, source, cache, fetcher)
            layer_files, layer_dirs = tar_layer_entries(plan, members, blob)
            if not vouched:
                unchecked = CheckedTarLayer(plan, blob, members, cache, fetcher)
                layer_files = [
                    replace(file, blob=TarMemberData(unchecked, file.offset))
                    for file in layer_files
                ]
            files += layer_files
            dirs += layer_dirs
            blobs.append(blob)
        else:
            stream = DecompressedStream(plan, source, cache, inflate_bounds)
            blob = await stream.ensure()
            members, _ = await _members(plan, blob, source, cache, fetcher)
            layer_files, layer_dirs = tar_layer_entries(plan, members, blob)
            files += [replace(file, blob=StreamMember(stream, file.offset)) for file in layer_files]
            dirs += layer_dirs
            blobs.append(blob)
            decompressed.append(blob.digest)
    tree = Tree(files, dirs)
    return Model(fetched.digest, manifest, config, tree, blobs, deferred, decompressed)


async def _config(source: BlobSource, manifest: dict[str, Any], cache: PieceCache) -> bytes:
    descriptor = manifest.get("config")
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise ManifestError(f"{source.name}: manifest has no config descriptor")
    return await resolve_config(source, descriptor["digest"], cache, MAX_CONFIG_SIZE)


def _cached_tar_blob(plan: LayerPlan, cache: PieceCache) -> BlobRef | None:
    """A compressed layer's tar stream if the cache holds it whole; None if not."""
    derived = plan.stream_digest
    size = cache.get_meta(f"decompressed-size/{plan.digest}")
    if size is not None and cache.is_verified(derived):
        return BlobRef(derived, int(size), cache_only=True)
    return None


async def _decompress_into_cache(
    plan: LayerPlan, derived: str, source: BlobSource, cache: PieceCache, bounds: InflateBounds
) -> BlobRef:
    """Fetch a compressed layer whole, check its digest, and store its tar stream as pieces.

    It inflates in a worker thread, a bounded step at a time, into a spool beside the cache
    (on its disk, private) that never passes the layer's limit (``inflate_limit``): a bomb fails
    here, with the limit it passed, and the spool goes with it.
    """
    # Its stream lives in the cache only: one out of use (its index damaged) cannot hold it.
    cache.raise_if_out_of_use()
    disk = os.statvfs(cache.path)
    room = InflateRoom(cache=cache.room(), disk=disk.f_bavail * disk.f_frsize)
    limit = inflate_limit(plan, room, bounds)
    log.info("fetching compressed layer %s (%d bytes) whole", plan.digest, plan.size)
    hasher = hashlib.sha256()
    received = 0
    with tempfile.TemporaryFile(dir=cache.path) as spool:
        async with source.stream_blob(plan.digest) as chunks:
            iterator = aiter(chunks)

            async def next_chunk() -> bytes:
                nonlocal received
                chunk = await anext(iterator, b"")
                received += len(chunk)
                if received > plan.size:
                    raise IntegrityError(
                        f"{plan.label} from {source.name} is longer than its {plan.size} bytes"
                    )
                hasher.update(chunk)
                return chunk

            reader = ChunkReader(partial(trio.from_thread.run, next_chunk))
            try:
                size = await trio.to_thread.run_sync(
                    inflate, plan.format, reader, spool.write, limit.size
                )
            except InflateLimitError as passed:
                raise ManifestError(
                    f"{plan.label}, {format_size(plan.size)} of {plan.format}, expanded to "
                    f"{format_size(passed.size)} and was stopped: past "
                    f"{format_size(limit.size)}, {limit.reason}; refusing it"
                ) from None
            except FORMAT_ERRORS as error:
                raise ManifestError(f"{plan.label} is not valid {plan.format}: {error}") from None
        if f"sha256:{hasher.hexdigest()}" != plan.digest:
            raise IntegrityError(
                f"layer {plan.index} from {source.name} does not match its digest {plan.digest}"
            )
        spool.seek(0)
        await trio.to_thread.run_sync(_store_pieces, cache, derived, spool, size)
    if not cache.is_verified(derived):
        # Pieces the cache could not keep (other mounts filled it meanwhile): drop the rest.
        cache.drop_blob(derived)
        raise CacheError(
            f"{plan.label}, {format_size(plan.size)} of {plan.format}, expanded to "
            f"{format_size(size)}, more than the cache can hold beside the blobs in use; "
            "use a bigger --cache-size"
        )
    cache.put_meta(f"decompressed-size/{plan.digest}", str(size).encode())
    return BlobRef(derived, size, cache_only=True)


def _store_pieces(cache: PieceCache, digest: str, spool: IO[bytes], size: int) -> None:
    # The stream came from a blob whose digest was just checked, so its pieces are known good.
    checksums = []
    for index in range(piece_count(size, cache.piece_size)):
        data = spool.read(cache.piece_size)
        cache.put(digest, index, data, size)
        checksums.append(piece_checksum(data))
    cache.mark_verified(digest, size, checksums)


async def _members(
    plan: LayerPlan, blob: BlobRef, source: BlobSource, cache: PieceCache, fetcher: PieceFetcher
) -> tuple[list[TarMember], bool]:
    """The layer's members, and whether something vouched for the bytes they were read from.

    A list in the cache was (it is stored only then). A decompressed stream's was: it was
    checked whole. An uncompressed layer's header blocks come straight from the source, a few
    KiB and not the pieces around them, so the mount is ready at once; that list is provisional
    until ``CheckedTarLayer`` lists the layer again from vouched bytes.
    """
    key = f"tar-index/{blob.digest}"
    cached = cache.get_meta(key)
    if cached is not None:
        return [TarMember(**fields) for fields in json.loads(cached)], True
    if blob.digest == plan.digest:

        async def read(offset: int, length: int) -> bytes:
            return bytes(await source.read_range(blob.digest, offset, length))

        return await _list_members(plan, blob, read), False
    members = await _list_members(plan, blob, partial(_read_vouched, fetcher, blob))
    _keep_members(cache, blob, members)
    return members, True


async def _read_vouched(fetcher: PieceFetcher, blob: BlobRef, offset: int, length: int) -> bytes:
    return bytes(await fetcher.read(blob, offset, length))


async def _list_members(
    plan: LayerPlan, blob: BlobRef, read: Callable[[int, int], Awaitable[bytes]]
) -> list[TarMember]:
    try:
        return await read_members(HeaderWindow(read, blob.size), blob.size)
    except ManifestError as error:
        raise ManifestError(f"{plan.label}: {error}") from None


def _keep_members(cache: PieceCache, blob: BlobRef, members: list[TarMember]) -> None:
    cache.put_meta(f"tar-index/{blob.digest}", json.dumps([asdict(m) for m in members]).encode())


class CheckedTarLayer:
    """An uncompressed tar layer listed from header blocks nothing vouched for yet.

    Its files are located (``TarMemberData``) only once the layer was listed again from
    vouched bytes, through the fetcher (pieces checked against the piece index, or the whole
    blob against its digest), and the two lists are the same: a header altered in transit (a
    renamed member, a size that swallows the next one) fails every read of the layer instead
    of serving a wrong file. The checked list is kept in the cache, so a remount trusts it.
    """

    def __init__(
        self,
        plan: LayerPlan,
        blob: BlobRef,
        members: list[TarMember],
        cache: PieceCache,
        fetcher: PieceFetcher,
    ) -> None:
        self._plan = plan
        self.blob = blob
        self._members = members
        self._cache = cache
        self._fetcher = fetcher
        self._lock = trio.Lock()
        self.checked = False

    async def check(self) -> None:
        async with self._lock:
            if self.checked:
                return
            read = partial(_read_vouched, self._fetcher, self.blob)
            if await _list_members(self._plan, self.blob, read) != self._members:
                raise IntegrityError(
                    f"{self._plan.label}: its tar headers as first read do not match its "
                    "checked bytes (altered on the way); remount to read them again"
                )
            _keep_members(self._cache, self.blob, self._members)
            self.checked = True


class TarMemberData:
    """Where a file of a ``CheckedTarLayer`` is, known once its layer checked out."""

    def __init__(self, layer: CheckedTarLayer, offset: int) -> None:
        self._layer = layer
        self._offset = offset

    @property
    def location(self) -> tuple[BlobRef, int] | None:
        return (self._layer.blob, self._offset) if self._layer.checked else None

    async def locate(self) -> tuple[BlobRef, int]:
        await self._layer.check()
        return self._layer.blob, self._offset

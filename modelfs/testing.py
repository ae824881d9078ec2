"""Real stand-ins for tests of the layers beneath a mount: no registry, no FUSE, no root.

``MemorySource`` is a ``BlobSource`` over blobs and manifests held in memory, as httpx ships
``MockTransport``: the piece fetcher and the model loader read from it exactly as from a
registry, and a test changes what it holds (alters a blob, removes one, makes its reads fail) to
meet the cases a registry would make hard to arrange. ``MemoryRunSource`` also fetches runs of
pieces in one call (``PieceRuns``), as the registry does.

There is no in-memory cache: the LMDB ``PieceCache`` in a temporary directory opens, stores and
closes in ~5 ms here, and a second cache would be a second set of rules to keep true.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

import trio

from modelfs.errors import IntegrityError, ManifestError, ModelfsError, NotFoundError
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    MODEL_ARTIFACT_TYPE,
    MODEL_CONFIG,
    OCI_MANIFEST,
    layer_media_type,
)
from modelfs.sources.interface import BlobBytes, Deliver, FetchedManifest

STREAM_CHUNK = 1 << 20


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class MemorySource:
    """A ``BlobSource`` holding ``blobs`` (each under its sha256 digest) and ``manifests`` (each
    under its digest and its tag).

    A test may change ``blobs`` (a digest then holds other bytes, or none: ``NotFoundError``) and
    ``failures`` (every read of that digest raises the error); ``reads`` lists the ranges asked
    for, (digest, start, length), whole-blob reads as length -1.
    """

    def __init__(
        self,
        blobs: Iterable[bytes] = (),
        manifests: Mapping[str, bytes] | None = None,
        *,
        name: str = "memory",
    ) -> None:
        self.name = name
        self.blobs = {digest_of(data): data for data in blobs}
        self.manifests: dict[str, FetchedManifest] = {}
        for tag, data in (manifests or {}).items():
            media_type = json.loads(data).get("mediaType", OCI_MANIFEST)
            fetched = FetchedManifest(digest_of(data), media_type, data)
            self.manifests[tag] = self.manifests[fetched.digest] = fetched
        self.failures: dict[str, ModelfsError] = {}
        self.reads: list[tuple[str, int, int]] = []

    async def get_manifest(self, selector: str) -> FetchedManifest:
        await trio.lowlevel.checkpoint()
        try:
            return self.manifests[selector]
        except KeyError:
            raise NotFoundError(f"{self.name}: no manifest {selector!r}") from None

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        data = await self._blob(digest, 0, -1)
        if len(data) > max_size:
            raise ManifestError(f"{self.name}: blob {digest} is more than {max_size} bytes")
        if digest_of(data) != digest:
            raise IntegrityError(f"{self.name}: blob {digest} does not match its digest")
        return data

    async def read_range(self, digest: str, start: int, length: int) -> BlobBytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length}")
        return (await self._blob(digest, start, length))[start : start + length]

    @asynccontextmanager
    async def stream_blob(self, digest: str) -> AsyncIterator[AsyncIterator[bytes]]:
        data = await self._blob(digest, 0, -1)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), STREAM_CHUNK):
                await trio.lowlevel.checkpoint()
                yield data[start : start + STREAM_CHUNK]

        yield chunks()

    async def _blob(self, digest: str, start: int, length: int) -> bytes:
        """The blob, once the read is counted; a checkpoint, as a network read would be."""
        await trio.lowlevel.checkpoint()
        self.reads.append((digest, start, length))
        if digest in self.failures:
            raise self.failures[digest]
        try:
            return self.blobs[digest]
        except KeyError:
            raise NotFoundError(f"{self.name}: no blob {digest}") from None


class MemoryRunSource(MemorySource):
    """A ``MemorySource`` that is also ``PieceRuns``: each run is one read, as one range GET."""

    async def read_pieces(
        self, digest: str, start: int, lengths: Sequence[int], deliver: Deliver
    ) -> None:
        data = await self.read_range(digest, start, sum(lengths))
        if len(data) < sum(lengths):
            raise IntegrityError(f"{self.name}: blob {digest} is shorter than the run asked for")
        offset = 0
        for place, length in enumerate(lengths):
            await deliver(place, data[offset : offset + length])
            offset += length


def model_source(
    files: Mapping[str, bytes],
    *,
    tag: str = "latest",
    source: type[MemorySource] = MemorySource,
) -> MemorySource:
    """A source holding a ModelPack model of ``files`` (path -> bytes), one raw layer each, as
    ``modelfs build`` makes it, tagged ``tag``."""
    config = b"{}"
    layers = [
        {
            "mediaType": layer_media_type("weight", "raw"),
            "digest": digest_of(data),
            "size": len(data),
            "annotations": {ANNOTATION_FILEPATH: path},
        }
        for path, data in files.items()
    ]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODEL_ARTIFACT_TYPE,
        "config": {"mediaType": MODEL_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": layers,
    }
    return source([config, *files.values()], {tag: json.dumps(manifest).encode()})

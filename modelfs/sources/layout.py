"""OCI image layout directories (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``).

``OciLayout`` writes and reads one: blobs are streamed into a temporary file beside their final
place, hashed while copied, and renamed into place once complete; ``index.json`` is replaced
whole by a rename. A reader therefore never sees a partial blob or index. Writers serialise on
an advisory lock file (``.lock``) so that concurrent builds cannot lose each other's tags.

``LayoutSource`` is the ``BlobSource`` for ``oci:PATH[:TAG]``: ranges are served with
``os.pread`` (in a worker thread, so the trio loop never waits on the disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from modelfs.errors import IntegrityError, ManifestError, ModelfsError, NotFoundError
from modelfs.modelpack import OCI_INDEX, OCI_MANIFEST
from modelfs.sources.interface import FetchedManifest
from modelfs.untrusted import loads_json

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"
# Manifests and index files are small; anything bigger is refused rather than read whole.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
CHUNK_SIZE = 4 * 1024 * 1024
_DIGEST_RE = re.compile(r"sha256:([a-f0-9]{64})")


class LayoutError(ModelfsError):
    """A directory that cannot be used as an OCI image layout."""


@dataclass(frozen=True)
class StoredBlob:
    """A blob now in the layout; ``created`` is False when it was there already."""

    digest: str
    size: int
    created: bool


def blob_hex(digest: str) -> str:
    """The hex part of a sha256 digest; anything else (a path in disguise) is refused."""
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise ManifestError(f"digest {digest!r} is not sha256: followed by 64 lowercase hex")
    return match[1]


class OciLayout:
    """An OCI image layout directory on disk."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> OciLayout:
        """An existing layout; NotFoundError if ``root`` is not one."""
        layout = cls(root)
        if not (layout.root / "oci-layout").is_file():
            raise NotFoundError(
                f"{layout.root} is not an OCI image layout (no oci-layout file):"
                " build into it first, or check the path"
            )
        return layout

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> OciLayout:
        """Open the layout at ``root``, making an empty one first if there is none."""
        layout = cls(root)
        if (
            layout.root.is_dir()
            and any(layout.root.iterdir())
            and not (layout.root / "oci-layout").exists()
        ):
            raise LayoutError(
                f"{layout.root} holds files but is not an OCI image layout:"
                " choose a new or empty directory for the store"
            )
        layout.blobs.mkdir(parents=True, exist_ok=True)
        if not (layout.root / "index.json").exists():
            layout._replace_file("index.json", _encode({"schemaVersion": 2, "manifests": []}))
        if not (layout.root / "oci-layout").exists():
            layout._replace_file("oci-layout", _encode({"imageLayoutVersion": LAYOUT_VERSION}))
        return layout

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / blob_hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def write_blob(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Stream ``chunks`` into a new blob, hashing as it goes; the temp file never stays."""
        hasher = hashlib.sha256()
        size = 0
        fd, temp_name = tempfile.mkstemp(prefix=".partial-", dir=self.blobs)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp_name, 0o644)
            digest = f"sha256:{hasher.hexdigest()}"
            final = self.blob_path(digest)
            if final.exists():
                os.unlink(temp_name)
                return StoredBlob(digest, size, created=False)
            os.rename(temp_name, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        _fsync_dir(self.blobs)
        return StoredBlob(digest, size, created=True)

    def remove_blob(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(digest).unlink()

    def read_small_blob(self, digest: str, max_size: int) -> bytes:
        """A whole blob of at most ``max_size`` bytes, checked against its digest."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as blob:
                size = os.fstat(blob.fileno()).st_size
                if size > max_size:
                    raise ManifestError(
                        f"blob {digest} in {self.root} is {size} bytes, more than the"
                        f" {max_size} allowed for it"
                    )
                data = blob.read()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the layout {self.root}") from None
        if hashlib.sha256(data).hexdigest() != blob_hex(digest):
            raise IntegrityError(
                f"blob {digest} in {self.root} does not match its digest: the file is damaged"
            )
        return data

    # -- index ---------------------------------------------------------------------------

    def read_index(self) -> dict[str, Any]:
        path = self.root / "index.json"
        try:
            with open(path, "rb") as index_file:
                data = index_file.read(MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            raise NotFoundError(f"{path} is missing: {self.root} is not an OCI layout") from None
        try:
            index = loads_json(data)
        except ValueError:
            index = None
        if len(data) > MAX_MANIFEST_SIZE or not isinstance(index, dict):
            raise ManifestError(f"{path} is not a valid OCI index: repair or remove it")
        manifests = index.get("manifests", [])
        if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
            raise ManifestError(f"{path} has a malformed 'manifests' list: repair or remove it")
        return index

    def tags(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, descriptor) for every named manifest in index.json, in index order."""
        return [
            (descriptor["annotations"][ANNOTATION_REF_NAME], descriptor)
            for descriptor in self.read_index().get("manifests", [])
            if isinstance(descriptor.get("annotations"), dict)
            and isinstance(descriptor["annotations"].get(ANNOTATION_REF_NAME), str)
        ]

    def resolve(self, name: str) -> dict[str, Any] | None:
        """The descriptor tagged ``name``, or None."""
        for tag, descriptor in self.tags():
            if tag == name:
                return descriptor
        return None

    def set_tag(self, name: str, descriptor: dict[str, Any]) -> None:
        """Point ``name`` at ``descriptor`` (replacing any old entry), atomically."""
        index = self.read_index()
        kept = [
            entry
            for entry in index.get("manifests", [])
            if (entry.get("annotations") or {}).get(ANNOTATION_REF_NAME) != name
        ]
        entry = dict(descriptor)
        entry["annotations"] = {**(descriptor.get("annotations") or {}), ANNOTATION_REF_NAME: name}
        # Other keys (e.g. annotations) are kept; the required ones go first, for readers' eyes.
        updated = {"schemaVersion": 2, "mediaType": OCI_INDEX, **index, "manifests": [*kept, entry]}
        self._replace_file("index.json", _encode(updated))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the layout's writer lock (blocks while another writer holds it)."""
        with open(self.root / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _replace_file(self, name: str, data: bytes) -> None:
        fd, temp_name = tempfile.mkstemp(prefix=f".{name}.", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp_name, 0o644)
            os.replace(temp_name, self.root / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        _fsync_dir(self.root)


class LayoutSource:
    """``BlobSource`` over an OCI layout directory (``oci:PATH[:TAG]``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.layout = OciLayout.open(root)

    @property
    def name(self) -> str:
        return f"oci:{self.layout.root}"

    async def get_manifest(self, selector: str) -> FetchedManifest:
        """The manifest tagged ``selector`` in index.json, or with that digest."""
        digest: object = selector
        media_type: object = None
        if not selector.startswith("sha256:"):
            descriptor = await trio.to_thread.run_sync(self.layout.resolve, selector)
            if descriptor is None:
                raise NotFoundError(
                    f"no manifest tagged {selector!r} in {self.name}: see `modelfs ls` for tags"
                )
            digest, media_type = descriptor.get("digest"), descriptor.get("mediaType")
        if not isinstance(digest, str):
            raise ManifestError(f"index.json of {self.name} has no digest for {selector!r}")
        data = await trio.to_thread.run_sync(self.layout.read_small_blob, digest, MAX_MANIFEST_SIZE)
        if not isinstance(media_type, str):
            media_type = _declared_media_type(data)
        return FetchedManifest(digest=digest, media_type=media_type, data=data)

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        return await trio.to_thread.run_sync(self.layout.read_small_blob, digest, max_size)

    async def read_range(self, digest: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length}")
        return await trio.to_thread.run_sync(self._pread, digest, start, length)

    def _pread(self, digest: str, start: int, length: int) -> bytes:
        fd = self._open(digest)
        try:
            pieces = []
            while length > 0:
                piece = os.pread(fd, length, start)
                if not piece:
                    break
                pieces.append(piece)
                start += len(piece)
                length -= len(piece)
            return b"".join(pieces)
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def stream_blob(self, digest: str) -> AsyncIterator[AsyncIterator[bytes]]:
        fd = await trio.to_thread.run_sync(self._open, digest)
        chunks = self._chunks(fd)
        try:
            yield chunks
        finally:
            # Finish the generator before its file descriptor goes away.
            await chunks.aclose()
            os.close(fd)

    async def _chunks(self, fd: int) -> AsyncGenerator[bytes, None]:
        offset = 0
        while chunk := await trio.to_thread.run_sync(os.pread, fd, CHUNK_SIZE, offset):
            offset += len(chunk)
            yield chunk

    def _open(self, digest: str) -> int:
        try:
            return os.open(self.layout.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self.name}") from None


def _declared_media_type(data: bytes) -> str:
    """A manifest's own mediaType field (for lookups by digest, which carry no descriptor)."""
    try:
        document = loads_json(data)
    except ValueError:
        raise ManifestError("the manifest is not valid JSON") from None
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return media_type if isinstance(media_type, str) else OCI_MANIFEST


def _encode(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

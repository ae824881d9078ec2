"""From a manifest to the file tree a mount shows: layer plans, path checks, inodes.

Pure: nothing here reads a blob. A raw layer is one file whose bytes are the blob's; a tar layer's
files come from its member headers (see ``tar.read_members``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Protocol

from modelfs.artifact.tar import HARDLINK_TYPE, TarMember
from modelfs.errors import InternalError, ManifestError
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    ANNOTATION_TITLE,
    DOCKER_MANIFEST_LIST,
    LEGACY_ANNOTATION_FILEPATH,
    LEGACY_ANNOTATION_METADATA,
    MAX_FILE_SIZE,
    MAX_TOTAL_SIZE,
    OCI_INDEX,
    Format,
    classify_layer,
    plain_layer_format,
)
from modelfs.untrusted import loads_json

ROOT_INODE = 1  # the FUSE protocol's fixed root (FUSE_ROOT_ID)
FILE_MODE = 0o444
DIR_MODE = 0o555
# Read-only and no setuid/setgid/sticky, whatever the artifact asks for.
_ALLOWED_MODE_BITS = 0o555
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
# A layer holds at most the whole model (a tar's headers add little to that).
MAX_LAYER_SIZE = MAX_TOTAL_SIZE
# What a file time may be: the kernel keeps nanoseconds since the epoch in a signed 64-bit
# number (1677-2262); a time outside is shown as the nearest end rather than crash the mount.
MIN_MTIME_NS = -(1 << 63)
MAX_MTIME_NS = (1 << 63) - 1

# modctl writes Go's tar.TypeReg ('0', 48); the spec's text says 0. Either is a regular file.
_REGULAR_TYPEFLAGS = (0, ord("0"))
_COMPRESSED_TAR = ("tar+gzip", "tar+zstd")

_MODEL_PREFIXES = ("application/vnd.cncf.model.", "application/vnd.cnai.model.")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


@dataclass(frozen=True)
class BlobRef:
    """Where a file's bytes live: a blob (or, for a compressed layer, its decompressed stream)."""

    digest: str  # the cache key; for a decompressed layer, an id derived from the blob digest
    size: int
    # A decompressed layer's stream: only the cache holds it (no source can give a piece of it).
    cache_only: bool = False


# A compressed layer's tar stream is kept in the cache under the layer's digest and this.
STREAM_SUFFIX = "+decompressed"


@dataclass(frozen=True)
class LayerPlan:
    """What one manifest layer says, before any blob is read."""

    index: int
    digest: str
    size: int
    media_type: str
    format: Format
    path: str | None
    mode: int | None
    mtime_ns: int | None
    meta_size: int | None
    meta_typeflag: int | None = None

    @property
    def label(self) -> str:
        """How messages name the layer."""
        return f"layer {self.index} ({self.digest})"

    @property
    def stream_digest(self) -> str:
        """The cache key of a compressed layer's tar stream."""
        return self.digest + STREAM_SUFFIX


class DeferredData(Protocol):
    """Bytes whose place is found only on the first read (a compressed layer, fetched then)."""

    @property
    def location(self) -> tuple[BlobRef, int] | None:
        """(blob, offset of the file's byte 0) once found; None before."""

    async def locate(self) -> tuple[BlobRef, int]:
        """Find the bytes (once; concurrent callers wait for the same search)."""


class DataNotLocatedError(InternalError):
    """A deferred file's blob was asked for before its first read located it (a bug)."""


@dataclass(frozen=True)
class FileSpec:
    path: str
    size: int
    mode: int
    mtime_ns: int
    blob: BlobRef | DeferredData
    offset: int  # where the file's byte 0 is in the blob (a deferred file's location says)


@dataclass(frozen=True)
class DirSpec:
    path: str
    mode: int
    mtime_ns: int


@dataclass(frozen=True)
class FileNode:
    inode: int
    path: str
    size: int
    mode: int
    mtime_ns: int
    data: BlobRef | DeferredData
    data_offset: int

    @property
    def located(self) -> bool:
        """Whether ``blob`` and ``offset`` are known (always, unless the file is deferred)."""
        return isinstance(self.data, BlobRef) or self.data.location is not None

    @property
    def blob(self) -> BlobRef:
        return self._location()[0]

    @property
    def offset(self) -> int:
        return self._location()[1]

    async def locate(self) -> None:
        """Make ``blob`` and ``offset`` known: a deferred file's first read fetches its layer."""
        if not isinstance(self.data, BlobRef):
            await self.data.locate()

    def _location(self) -> tuple[BlobRef, int]:
        if isinstance(self.data, BlobRef):
            return self.data, self.data_offset
        if self.data.location is None:
            raise DataNotLocatedError(f"{self.path}: its layer has not been fetched yet")
        return self.data.location


@dataclass
class DirNode:
    inode: int
    path: str
    mode: int
    mtime_ns: int
    children: dict[str, int] = field(default_factory=dict)  # name -> inode, in name order


def parse_rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch for an RFC 3339 time (as Go's time.Time marshals it)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 time")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    offset = timedelta(0) if zulu else timedelta(hours=int(off_h), minutes=int(off_m))
    when = datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second),
        tzinfo=timezone(-offset if sign == "-" else offset),
    )  # fmt: skip
    seconds = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
    return seconds * 1_000_000_000 + int((fraction or "")[:9].ljust(9, "0"))


def _too_big(what: str, size: int, limit: int) -> str:
    return (
        f"{what} {size} is more than the {limit} bytes modctl allows; the artifact is corrupt "
        "or not a model (split the file and rebuild it)"
    )


def clamp_mtime_ns(mtime_ns: int) -> int:
    """``mtime_ns`` within what the kernel can show."""
    return min(max(mtime_ns, MIN_MTIME_NS), MAX_MTIME_NS)


def check_sizes(files: Iterable[FileSpec]) -> int:
    """The files' total size, once each file and the total are within modctl's limits."""
    total = 0
    for spec in files:
        if spec.size > MAX_FILE_SIZE:
            raise ManifestError(f"file {spec.path!r}: {_too_big('size', spec.size, MAX_FILE_SIZE)}")
        total += spec.size
    if total > MAX_TOTAL_SIZE:
        raise ManifestError(
            f"the model's files add up to {total} bytes, more than the {MAX_TOTAL_SIZE} bytes "
            "modctl allows; the artifact is corrupt or not a model (split it into models)"
        )
    return total


def _layer_error(index: int, digest: object, problem: str) -> ManifestError:
    return ManifestError(f"manifest layer {index} ({digest}): {problem}")


def _metadata(
    index: int, digest: str, text: str
) -> tuple[int | None, int | None, int | None, int | None]:
    """(mode, mtime_ns, size, typeflag) from a file metadata annotation."""
    try:
        meta = loads_json(text)  # bounded: nesting, numbers
    except ValueError:
        raise _layer_error(
            index, digest, "file metadata annotation is not valid JSON; rebuild the artifact"
        ) from None
    if not isinstance(meta, dict):
        raise _layer_error(index, digest, "file metadata annotation is not a JSON object")
    values: list[int | None] = []
    for key in ("mode", "size", "typeflag"):
        value = meta.get(key)
        if value is not None and (type(value) is not int or value < 0):
            raise _layer_error(
                index, digest, f"file metadata {key!r} is {value!r}, not a non-negative integer"
            )
        values.append(value)
    mode, size, typeflag = values
    mtime = meta.get("mtime")
    try:
        mtime_ns = None if mtime is None else parse_rfc3339_ns(str(mtime))
    except ValueError:
        raise _layer_error(
            index, digest, f"file metadata 'mtime' {mtime!r} is not an RFC 3339 time"
        ) from None
    # Go's FileMode keeps its type bits above the nine permission bits.
    return (None if mode is None else mode & 0o777), mtime_ns, size, typeflag


def _plan_layer(index: int, layer: object, model_manifest: bool) -> LayerPlan:
    if not isinstance(layer, dict):
        raise _layer_error(index, "?", "layer descriptor is not a JSON object")
    digest = layer.get("digest")
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise _layer_error(
            index, digest, "digest is missing or not sha256:<64 hex digits> (modelfs needs sha256)"
        )
    size = layer.get("size")
    if type(size) is not int or size < 0:
        raise _layer_error(index, digest, f"size {size!r} is missing or not a non-negative integer")
    if size > MAX_LAYER_SIZE:
        raise _layer_error(index, digest, _too_big("size", size, MAX_LAYER_SIZE))
    media_type = layer.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise _layer_error(index, digest, "mediaType is missing")
    annotations = layer.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(value, str) for value in annotations.values()
    ):
        raise _layer_error(index, digest, "annotations are not a map of strings")
    layer_type = classify_layer(media_type) if model_manifest else None
    fmt = layer_type.format if layer_type else plain_layer_format(media_type, annotations)
    path = next(
        (
            annotations[key]
            for key in (ANNOTATION_FILEPATH, LEGACY_ANNOTATION_FILEPATH, ANNOTATION_TITLE)
            if annotations.get(key)
        ),
        None,
    )
    metadata = annotations.get(ANNOTATION_METADATA) or annotations.get(LEGACY_ANNOTATION_METADATA)
    mode, mtime_ns, meta_size, typeflag = (
        _metadata(index, digest, metadata) if metadata else (None,) * 4
    )
    if meta_size is not None and meta_size > MAX_FILE_SIZE:
        raise _layer_error(index, digest, _too_big("file metadata size", meta_size, MAX_FILE_SIZE))
    if fmt == "raw":
        if path is None:
            raise _layer_error(
                index,
                digest,
                f"raw layer has no file path annotation ({ANNOTATION_FILEPATH} or "
                f"{ANNOTATION_TITLE}); rebuild the artifact with file names",
            )
        try:
            check_path(path)
        except ManifestError as error:
            raise _layer_error(index, digest, str(error)) from None
        if meta_size is not None and meta_size != size:
            raise _layer_error(
                index,
                digest,
                f"file metadata says {meta_size} bytes but the descriptor says {size}; "
                "the artifact is inconsistent",
            )
    return LayerPlan(
        index, digest, size, media_type, fmt, path, mode, mtime_ns, meta_size, typeflag
    )


def plan_layers(manifest: dict[str, object]) -> list[LayerPlan]:
    """Plan every layer of a ModelPack (or legacy cnai, or plain ORAS) manifest."""
    if manifest.get("mediaType") in (OCI_INDEX, DOCKER_MANIFEST_LIST) or "manifests" in manifest:
        raise ManifestError(
            "the reference names an image index (a list of manifests), not a manifest; "
            "mount one of its manifests by digest"
        )
    config = manifest.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    model_manifest = any(
        isinstance(kind, str) and kind.startswith(_MODEL_PREFIXES)
        for kind in (manifest.get("artifactType"), config_type)
    )
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ManifestError("the manifest has no layers: there is no model to mount")
    return [_plan_layer(index, layer, model_manifest) for index, layer in enumerate(layers)]


def raw_layer_file(plan: LayerPlan, default_mtime_ns: int) -> FileSpec:
    """The one file a raw layer holds: blob byte N is file byte N."""
    if plan.path is None:
        raise ManifestError(f"{plan.label}: raw layer has no file path annotation")
    return FileSpec(
        path=plan.path,
        size=plan.size,
        mode=FILE_MODE if plan.mode is None else plan.mode,
        mtime_ns=default_mtime_ns if plan.mtime_ns is None else plan.mtime_ns,
        blob=BlobRef(plan.digest, plan.size),
        offset=0,
    )


def is_deferrable(plan: LayerPlan) -> bool:
    """Whether a compressed tar layer's file is known without its bytes: the annotations name
    one regular file (modctl's one-member archive) with its path and size."""
    return (
        plan.format in _COMPRESSED_TAR
        and plan.path is not None
        and plan.meta_size is not None
        and plan.meta_typeflag in _REGULAR_TYPEFLAGS
    )


def deferred_layer_file(plan: LayerPlan, data: DeferredData, default_mtime_ns: int) -> FileSpec:
    """The file a deferrable layer's annotations describe; its bytes are located on first read."""
    if plan.path is None or plan.meta_size is None:
        raise ManifestError(f"{plan.label}: the layer's annotations do not describe one file")
    return FileSpec(
        path=plan.path,
        size=plan.meta_size,
        mode=FILE_MODE if plan.mode is None else plan.mode,
        mtime_ns=default_mtime_ns if plan.mtime_ns is None else plan.mtime_ns,
        blob=data,
        offset=0,
    )


def deferred_member(plan: LayerPlan, members: Iterable[TarMember], blob: BlobRef) -> FileSpec:
    """The archive's one file, checked against what the annotations promised at mount time."""
    files, dirs = tar_layer_entries(plan, members, blob)
    found = [(file.path, file.size) for file in files] + [(d.path, "directory") for d in dirs]
    if len(files) != 1 or dirs or (files[0].path, files[0].size) != (plan.path, plan.meta_size):
        raise ManifestError(
            f"{plan.label}: the archive holds {found!r}, not the one file {plan.path!r} of "
            f"{plan.meta_size} bytes its annotations describe; the artifact is inconsistent"
        )
    return files[0]


def tar_layer_entries(
    plan: LayerPlan, members: Iterable[TarMember], blob: BlobRef
) -> tuple[list[FileSpec], list[DirSpec]]:
    """Files and directories of a tar layer; ``blob`` holds the uncompressed archive."""
    files: dict[str, FileSpec] = {}
    dirs: list[DirSpec] = []
    for member in members:
        if not member.name:  # the archive's own "./" entry is the model root
            continue
        try:
            check_path(member.name)
        except ManifestError as error:
            raise ManifestError(f"{plan.label}: {error}") from None
        if member.is_dir:
            dirs.append(DirSpec(member.name, member.mode, member.mtime_ns))
        elif member.is_file:
            files[member.name] = FileSpec(
                member.name, member.size, member.mode, member.mtime_ns, blob, member.data_offset
            )
        elif member.typeflag == HARDLINK_TYPE and member.linkname in files:
            # A hard link shares the bytes of a file stored earlier in the same archive.
            target = files[member.linkname]
            files[member.name] = FileSpec(
                member.name, target.size, target.mode, member.mtime_ns, blob, target.offset
            )
        else:
            raise ManifestError(
                f"{plan.label}: tar member {member.name!r} is of type {member.typeflag!r} "
                "(link, device or special file); modelfs serves regular files and directories"
            )
    return list(files.values()), dirs


def check_path(path: str) -> tuple[str, ...]:
    """Split a relative path into its components, refusing anything that could escape the root."""
    if not path:
        raise ManifestError("a file path is empty; every file needs a relative path")
    if path.startswith("/"):
        raise ManifestError(f"file path {path!r} is absolute; paths must be relative to the model")
    try:
        path_bytes = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise ManifestError(f"file path {path!r} is not valid UTF-8") from None
    if path_bytes > MAX_PATH_BYTES:
        raise ManifestError(f"file path {path[:60]!r}... is longer than {MAX_PATH_BYTES} bytes")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise ManifestError(
                f"file path {path!r} has an empty, '.' or '..' component; refusing a path "
                "that could leave the model directory"
            )
        if "\0" in part:
            raise ManifestError(f"file path {path!r} contains a NUL byte")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise ManifestError(
                f"file path {path!r} has a component longer than {MAX_NAME_BYTES} bytes"
            )
    return parts


class Tree:
    """The directory tree of one model: inodes, names and where each file's bytes are.

    Inode 1 is the root; the others follow sorted path order, so the same manifest always gets
    the same numbers.
    """

    def __init__(
        self,
        files: Iterable[FileSpec],
        dirs: Iterable[DirSpec] = (),
        *,
        default_mtime_ns: int = 0,
    ) -> None:
        file_specs: dict[tuple[str, ...], FileSpec] = {}
        for spec in files:
            parts = check_path(spec.path)
            if parts in file_specs:
                raise ManifestError(
                    f"file {spec.path!r} appears twice in the manifest; each path must be unique"
                )
            file_specs[parts] = spec
        if not file_specs:
            raise ManifestError("the manifest holds no files: there is no model to mount")
        self.total_size = check_sizes(file_specs.values())
        # Later directory entries win, as when a tar is extracted.
        dir_specs = {check_path(spec.path): spec for spec in dirs}
        dir_parts = set(dir_specs)
        for parts in (*file_specs, *dir_specs):
            dir_parts.update(parts[:end] for end in range(1, len(parts)))
        clashes = sorted(dir_parts & file_specs.keys())
        if clashes:
            raise ManifestError(
                f"{'/'.join(clashes[0])!r} is both a file and a directory in the manifest"
            )

        self.root = ROOT_INODE
        root = DirNode(ROOT_INODE, "", DIR_MODE, clamp_mtime_ns(default_mtime_ns))
        self._nodes: dict[int, FileNode | DirNode] = {ROOT_INODE: root}
        dirs_by_parts: dict[tuple[str, ...], DirNode] = {(): root}
        for inode, parts in enumerate(sorted(dir_parts | file_specs.keys()), start=ROOT_INODE + 1):
            path = "/".join(parts)
            node: FileNode | DirNode
            if parts in file_specs:
                spec = file_specs[parts]
                node = FileNode(
                    inode, path, spec.size, spec.mode & _ALLOWED_MODE_BITS,
                    clamp_mtime_ns(spec.mtime_ns), spec.blob, spec.offset,
                )  # fmt: skip
            else:
                dir_spec = dir_specs.get(parts)
                mode = DIR_MODE if dir_spec is None else dir_spec.mode & _ALLOWED_MODE_BITS
                mtime_ns = default_mtime_ns if dir_spec is None else dir_spec.mtime_ns
                node = dirs_by_parts[parts] = DirNode(inode, path, mode, clamp_mtime_ns(mtime_ns))
            # Sorted order visits a parent before its children, and siblings in name order.
            dirs_by_parts[parts[:-1]].children[parts[-1]] = inode
            self._nodes[inode] = node
        self._files = [node for node in self._nodes.values() if isinstance(node, FileNode)]

    def node(self, inode: int) -> FileNode | DirNode:
        """The node with this inode; KeyError if there is none."""
        return self._nodes[inode]

    def lookup(self, parent: int, name: str) -> int | None:
        """The inode of ``name`` in directory ``parent``; None if absent or parent is a file."""
        node = self._nodes[parent]
        return node.children.get(name) if isinstance(node, DirNode) else None

    def children(self, inode: int) -> list[tuple[str, int]]:
        """(name, inode) of a directory's entries, sorted by name."""
        node = self._nodes[inode]
        if not isinstance(node, DirNode):
            raise NotADirectoryError(node.path)
        return list(node.children.items())

    def files(self) -> list[FileNode]:
        """Every file, in inode order."""
        return list(self._files)

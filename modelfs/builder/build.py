"""Pack a model directory into a ModelPack artifact in an OCI layout (what `modelfs build` does).

Two steps, so that bad input never touches the store:

1. ``plan_build`` reads the Modelfile, expands its globs against the directory and checks every
   file and limit. It writes nothing.
2. ``write_build`` streams each file into the layout as one layer (``raw``: the file's bytes;
   ``tar``: a one-member tar), then writes the config and the manifest, and finally names the
   manifest in index.json. If anything fails, the blobs this build added are removed again.

Builds are reproducible: the layer metadata and tar headers use uid/gid 0 and the build's
``created`` time (fixed unless given) instead of the files' owners and mtimes, so the same
files and Modelfile give the same manifest digest.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelfs.builder.config import ModelDescription, build_model_config, encode_json
from modelfs.builder.modelfile import (
    FILE_DIRECTIVES,
    FileRule,
    ListedFile,
    Modelfile,
    ModelfileError,
    generate_modelfile,
    is_skipped,
    model_name,
    parse_modelfile,
)
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    ANNOTATION_MODELFILE,
    ANNOTATION_UNTESTED,
    MAX_FILE_SIZE,
    MAX_TOTAL_SIZE,
    MODEL_ARTIFACT_TYPE,
    MODEL_CONFIG,
    OCI_MANIFEST,
    Format,
    layer_media_type,
)
from modelfs.sources.layout import OciLayout

# The creation time written when none is given: fixed, so that builds are reproducible.
DEFAULT_CREATED = datetime(1970, 1, 1, tzinfo=UTC)
READ_CHUNK = 4 * 1024 * 1024
_KIND_ORDER = {kind: position for position, kind in enumerate(FILE_DIRECTIVES.values())}

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Limits:
    """modctl's limits on what one artifact may hold."""

    file_size: int = MAX_FILE_SIZE
    files: int = 2048
    total_size: int = MAX_TOTAL_SIZE


@dataclass(frozen=True)
class PlannedFile:
    """One file to pack: the rule that chose it, its path relative to the model directory."""

    rule: FileRule
    path: str
    size: int
    mode: int


@dataclass(frozen=True)
class BuildPlan:
    directory: Path
    modelfile: Modelfile
    files: tuple[PlannedFile, ...]

    @property
    def total_size(self) -> int:
        return sum(planned.size for planned in self.files)


@dataclass(frozen=True)
class BuildResult:
    digest: str
    size: int
    manifest: dict[str, Any]


# -- modelfile generate ------------------------------------------------------------------


def generate_for_directory(directory: Path) -> str:
    """Modelfile text for the files under ``directory`` (see ``generate_modelfile``)."""
    if not directory.is_dir():
        raise ModelfileError(f"{directory} is not a directory: give the model's directory")
    return generate_modelfile(
        model_name(directory.resolve().name), _list_files(directory), _read_hf_config(directory)
    )


def _list_files(directory: Path) -> list[ListedFile]:
    listed = []
    for current, subdirs, names in os.walk(directory):
        subdirs[:] = [name for name in subdirs if not is_skipped(name)]
        for name in names:
            path = Path(current, name)
            if is_skipped(name) or not path.is_file():
                continue
            relative = path.relative_to(directory).as_posix()
            listed.append(ListedFile(relative, path.stat().st_size))
    return listed


def _read_hf_config(directory: Path) -> dict[str, object]:
    """config.json merged with generation_config.json; unreadable ones are only hints, skipped."""
    merged: dict[str, object] = {}
    for name in ("config.json", "generation_config.json"):
        try:
            document = json.loads((directory / name).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict):
            merged.update(document)
    return merged


# -- planning ----------------------------------------------------------------------------


def plan_build(directory: Path, modelfile_path: Path, limits: Limits | None = None) -> BuildPlan:
    """Check everything a build needs and list the files in layer order; writes nothing."""
    limits = limits or Limits()
    if not directory.is_dir():
        raise ModelfileError(f"{directory} is not a directory: give the model's directory")
    try:
        text = modelfile_path.read_text()
    except FileNotFoundError:
        raise ModelfileError(
            f"no Modelfile at {modelfile_path}: write one, or run"
            f" `modelfs modelfile generate {directory} -o {modelfile_path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelfileError(f"cannot read Modelfile {modelfile_path}: {error}") from None
    modelfile = parse_modelfile(text, source=str(modelfile_path))
    files = _expand(directory, modelfile, str(modelfile_path))
    _check_limits(files, limits, str(modelfile_path))
    return BuildPlan(directory, modelfile, files)


def _expand(directory: Path, modelfile: Modelfile, source: str) -> tuple[PlannedFile, ...]:
    chosen: dict[str, PlannedFile] = {}
    for rule in modelfile.rules:
        where = f"{source} line {rule.line}"
        matches = glob.glob(rule.pattern, root_dir=directory, recursive=True, include_hidden=True)
        if not matches:
            raise ModelfileError(
                f"{where}: {rule.directive} {rule.pattern!r} matches no file in {directory}:"
                " fix the pattern or add the file"
            )
        for match in sorted(matches):
            path = posixpath.normpath(match)
            try:
                info = (directory / path).stat()
            except OSError as error:
                raise ModelfileError(f"{where}: cannot read {path}: {error.strerror}") from None
            if stat.S_ISDIR(info.st_mode):
                raise ModelfileError(
                    f"{where}: {rule.pattern!r} matches the directory {path!r}; a layer holds"
                    f" one file: name the files in it (e.g. {path}/*)"
                )
            if not stat.S_ISREG(info.st_mode):
                raise ModelfileError(f"{where}: {path!r} is not a regular file: leave it out")
            earlier = chosen.get(path)
            if earlier is not None and earlier.rule.directive != rule.directive:
                raise ModelfileError(
                    f"{where}: {path!r} is already a {earlier.rule.directive} file (line"
                    f" {earlier.rule.line}); a file can be in one layer only"
                )
            if earlier is None:
                chosen[path] = PlannedFile(rule, path, info.st_size, info.st_mode & 0o777)
    if not chosen:
        raise ModelfileError(f"{source} names no files: add CONFIG/MODEL/CODE/DOC lines")
    return tuple(sorted(chosen.values(), key=lambda f: (_KIND_ORDER[f.rule.kind], f.path)))


def _check_limits(files: tuple[PlannedFile, ...], limits: Limits, source: str) -> None:
    if len(files) > limits.files:
        raise ModelfileError(
            f"{source} selects {len(files)} files; an artifact holds at most {limits.files}:"
            " pack fewer, bigger files"
        )
    for planned in files:
        if planned.size > limits.file_size:
            raise ModelfileError(
                f"{planned.path} is {planned.size} bytes; a layer holds at most"
                f" {limits.file_size}: split the file"
            )
    total = sum(planned.size for planned in files)
    if total > limits.total_size:
        raise ModelfileError(
            f"{source} selects {total} bytes in all; an artifact holds at most"
            f" {limits.total_size}: split the model"
        )


# -- writing -----------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    """UTC, whole seconds, 'Z' (the form Go writes for a time without fractions)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_metadata(planned: PlannedFile, created: datetime) -> str:
    """The org.cncf.model.file.metadata+json value (field order as modctl writes it)."""
    return encode_json(
        {
            "name": posixpath.basename(planned.path),
            "mode": planned.mode,
            "uid": 0,
            "gid": 0,
            "size": planned.size,
            "mtime": rfc3339(created),
            "typeflag": 0,
        }
    ).decode()


def layer_annotations(planned: PlannedFile, created: datetime) -> dict[str, str]:
    return {
        ANNOTATION_FILEPATH: planned.path,
        ANNOTATION_METADATA: file_metadata(planned, created),
        ANNOTATION_UNTESTED: "false",
        **dict(planned.rule.labels),
    }


def tar_header(planned: PlannedFile, created: datetime) -> bytes:
    """The header block(s) of a one-member tar: ustar, plus pax records where needed."""
    info = tarfile.TarInfo(planned.path)
    info.size = planned.size
    info.mode = planned.mode
    info.mtime = int(created.timestamp())
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT)


def _file_chunks(directory: Path, planned: PlannedFile, progress: Progress) -> Iterator[bytes]:
    """Exactly the planned bytes of the file; a file that changed size meanwhile is an error."""
    remaining = planned.size
    with open(directory / planned.path, "rb") as source:
        while remaining:
            chunk = source.read(min(READ_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            progress(len(chunk))
            yield chunk
        if remaining or source.read(1):
            raise ModelfileError(
                f"{planned.path} changed size while being packed: build again once it is stable"
            )


def _tar_chunks(
    directory: Path, planned: PlannedFile, created: datetime, progress: Progress
) -> Iterator[bytes]:
    yield tar_header(planned, created)
    yield from _file_chunks(directory, planned, progress)
    padding = -planned.size % tarfile.BLOCKSIZE
    # Member padding, then the two zero blocks that end an archive.
    yield bytes(padding + 2 * tarfile.BLOCKSIZE)


def write_build(
    plan: BuildPlan,
    layout: OciLayout,
    tag: str,
    *,
    layer_format: Format = "raw",
    created: datetime = DEFAULT_CREATED,
    progress: Progress = lambda _: None,
) -> BuildResult:
    """Write the planned artifact into ``layout`` and tag it; all or nothing."""
    added: list[str] = []

    def store(chunks: Iterator[bytes] | list[bytes]) -> dict[str, Any]:
        blob = layout.write_blob(chunks)
        if blob.created:
            added.append(blob.digest)
        return {"digest": blob.digest, "size": blob.size}

    with layout.lock():
        try:
            layers = []
            for planned in plan.files:
                chunks = (
                    _tar_chunks(plan.directory, planned, created, progress)
                    if layer_format == "tar"
                    else _file_chunks(plan.directory, planned, progress)
                )
                layers.append(
                    {
                        "mediaType": layer_media_type(planned.rule.kind, layer_format),
                        **store(chunks),
                        "annotations": layer_annotations(planned, created),
                    }
                )
            config = build_model_config(
                _describe(plan.modelfile, created), [layer["digest"] for layer in layers]
            )
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": MODEL_ARTIFACT_TYPE,
                "config": {"mediaType": MODEL_CONFIG, **store([encode_json(config)])},
                "layers": layers,
                "annotations": {ANNOTATION_MODELFILE: plan.modelfile.text},
            }
            written = store([encode_json(manifest)])
            layout.set_tag(
                tag, {"mediaType": OCI_MANIFEST, "artifactType": MODEL_ARTIFACT_TYPE, **written}
            )
        except BaseException:
            for digest in added:
                layout.remove_blob(digest)
            raise
    return BuildResult(written["digest"], written["size"], manifest)


def _describe(modelfile: Modelfile, created: datetime) -> ModelDescription:
    return ModelDescription(
        created_at=rfc3339(created),
        name=modelfile.value("NAME"),
        family=modelfile.value("FAMILY"),
        architecture=modelfile.value("ARCH"),
        format=modelfile.value("FORMAT"),
        param_size=modelfile.value("PARAMSIZE"),
        precision=modelfile.value("PRECISION"),
        quantization=modelfile.value("QUANTIZATION"),
    )

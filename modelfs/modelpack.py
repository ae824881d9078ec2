"""ModelPack facts: media types and annotation keys (CNCF model-spec, plus the legacy cnai ones).

Pure constants and classifiers, shared by the reader (fs/) and the builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])

MODEL_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
OCI_EMPTY_JSON = "application/vnd.oci.empty.v1+json"

ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_METADATA = "org.cncf.model.file.metadata+json"
ANNOTATION_UNTESTED = "org.cncf.model.file.mediatype.untested"
LEGACY_ANNOTATION_FILEPATH = "org.cnai.model.filepath"
LEGACY_ANNOTATION_METADATA = "org.cnai.model.file.metadata+json"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_MODELFILE = "org.cncf.modctl.modelfile"
ANNOTATION_ORAS_UNPACK = "io.deis.oras.content.unpack"

_PREFIXES = ("application/vnd.cncf.model.", "application/vnd.cnai.model.")
KINDS = ("weight.config", "weight", "doc", "code", "dataset")

Format = Literal["raw", "tar", "tar+gzip", "tar+zstd"]

# modctl's limits on what one artifact may hold (``modelfs build`` keeps them too). A mount
# refuses bigger numbers: beyond them a size is a corrupt or hostile manifest, and sizes the
# kernel gets (st_size, statfs blocks) are signed 64-bit, summed in places.
MAX_FILE_SIZE = 128 * 1024**3
MAX_TOTAL_SIZE = 8 * 1024**4


@dataclass(frozen=True)
class LayerType:
    """What a layer media type says: its kind (weight, doc, ...) and how it is packed."""

    kind: str
    format: Format


def classify_layer(media_type: str) -> LayerType | None:
    """Classify a ModelPack layer media type; None for anything else (e.g. a plain ORAS file)."""
    for prefix in _PREFIXES:
        if not media_type.startswith(prefix):
            continue
        body = media_type[len(prefix) :]
        for kind in KINDS:
            for fmt in ("raw", "tar+gzip", "tar+zstd", "tar"):
                if body == f"{kind}.v1.{fmt}":
                    return LayerType(kind, fmt)
    return None


def layer_media_type(kind: str, fmt: Format) -> str:
    return f"application/vnd.cncf.model.{kind}.v1.{fmt}"


def plain_layer_format(media_type: str, annotations: dict[str, str]) -> Format:
    """How a non-ModelPack layer (a plain ORAS push) is packed.

    ORAS clients push a directory as a compressed tar but give a plain file the media type
    ``application/vnd.oci.image.layer.v1.tar`` without making it a tar, so an uncompressed
    ``.tar`` type is an archive only when the layer is marked for unpacking.
    """
    if media_type.endswith(("tar+zstd", ".tar.zstd")):
        return "tar+zstd"
    if media_type.endswith(("tar+gzip", ".tar.gzip", ".tar.gz")):
        return "tar+gzip"
    if media_type.endswith((".tar", "+tar")) and annotations.get(ANNOTATION_ORAS_UNPACK) == "true":
        return "tar"
    return "raw"

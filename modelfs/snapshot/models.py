"""How a ModelPack model reaches containerd through the snapshotter (pure).

containerd pulls images, not ModelPack artifacts (their config has no ``rootfs.diff_ids``, their
layers are not image layers), so a model travels as a small **model image**: an ordinary OCI
image whose top layer is a *marker layer*, a tar holding one file, ``.modelfs-model``, that names
the model pinned by digest; the layer's descriptor carries the same name in the annotation
``containerd.io/snapshot/modelfs.model``. ``modelfs model-image`` publishes it next to the model,
or the snapshotter's mirror (``mirror``) answers it for the model's own reference. containerd
fetches the image (a few hundred bytes), not the model; the snapshotter puts the lazily mounted
model where the marker layer would be:

- through containerd's unpacker (CRI, nerdctl, ``client.Pull`` with unpack), ``Prepare`` of the
  marker layer carries the annotation as a label with ``containerd.io/snapshot.ref`` (the layer's
  chain id): the snapshotter mounts the model, commits it under that name and answers
  AlreadyExists, and containerd does not even fetch the marker layer;
- through ``ctr images pull`` (no labels), containerd applies the marker layer: at ``Commit`` the
  snapshotter finds the marker alone in the new layer and commits the model in its place.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass

from modelfs.errors import BadReferenceError
from modelfs.modelpack import MODEL_CONFIG
from modelfs.reference import Reference, parse_reference
from modelfs.snapshot.metadata import Code, SnapshotError
from modelfs.untrusted import loads_json

MODEL_LABEL = "containerd.io/snapshot/modelfs.model"
SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
MARKER = ".modelfs-model"
MARKER_MAX = 4096  # a marker larger than this is no marker
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def model_reference(text: str) -> Reference:
    """The model a label or marker names: a registry reference pinned by digest, so that the
    image names exactly one model whatever its tags become."""
    try:
        reference = parse_reference(text)
    except BadReferenceError as error:
        raise SnapshotError(Code.INVALID_ARGUMENT, f"model image: {error}") from None
    if reference.digest is None:
        raise SnapshotError(
            Code.INVALID_ARGUMENT, f"model image: {text!r} is not pinned by digest (@sha256:...)"
        )
    return reference


@dataclass(frozen=True)
class RemoteLayer:
    """A Prepare the snapshotter answers itself: commit ``model`` as ``chain_id``."""

    chain_id: str
    model: Reference


def remote_layer(labels: Mapping[str, str]) -> RemoteLayer | None:
    """The model layer an unpacker's Prepare asks for, or None for an ordinary layer."""
    model = labels.get(MODEL_LABEL)
    chain_id = labels.get(SNAPSHOT_REF_LABEL)
    if model is None or not chain_id:
        return None
    return RemoteLayer(chain_id, model_reference(model))


def parse_marker(data: bytes) -> Reference:
    """The model a marker file names (``{"model": "host/repo@sha256:..."}``)."""
    try:
        document = loads_json(data)
    except ValueError as error:
        raise SnapshotError(Code.INVALID_ARGUMENT, f"{MARKER}: not JSON: {error}") from None
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, str):
        raise SnapshotError(Code.INVALID_ARGUMENT, f'{MARKER}: no "model" string')
    return model_reference(model)


def marker_layer(model: Reference) -> bytes:
    """The marker layer of ``model``'s image: the same bytes for the same model, so every image
    of a model shares one layer digest."""
    data = json.dumps({"model": str(model)}, sort_keys=True).encode() + b"\n"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(MARKER)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def marker_descriptor(model: Reference, layer: bytes) -> dict[str, object]:
    """The manifest's descriptor of a marker layer, with the annotation the unpacker passes on."""
    return {
        "mediaType": OCI_LAYER,
        "digest": "sha256:" + hashlib.sha256(layer).hexdigest(),
        "size": len(layer),
        "annotations": {MODEL_LABEL: str(model)},
    }


OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# The platforms a model image lists: containerd pulls only an image that names the node's
# platform, and a model is the same bytes on every one.
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"), ("linux", "ppc64le"), ("linux", "s390x"))


@dataclass(frozen=True)
class ModelImage:
    """What a model image is in a registry: blobs, one manifest per platform, the index."""

    blobs: dict[str, bytes]  # digest -> the marker layer and the configs
    manifests: dict[str, bytes]  # digest -> manifest
    index: bytes


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def _json(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def model_image(model: Reference, manifest_media_type: str, index_media_type: str) -> ModelImage:
    """The model image of ``model``: an index of one single-layer image per platform, the layer
    being the model's marker (the same bytes for the same model, so the image is too)."""
    layer = marker_layer(model)
    layer_descriptor = marker_descriptor(model, layer)
    blobs = {str(layer_descriptor["digest"]): layer}
    manifests: dict[str, bytes] = {}
    entries = []
    for os_name, architecture in PLATFORMS:
        config = _json(
            {
                "architecture": architecture,
                "os": os_name,
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [layer_descriptor["digest"]]},
            }
        )
        config_descriptor = _descriptor(OCI_CONFIG, config)
        blobs[str(config_descriptor["digest"])] = config
        manifest = _json(
            {
                "schemaVersion": 2,
                "mediaType": manifest_media_type,
                "config": config_descriptor,
                "layers": [layer_descriptor],
                "annotations": {MODEL_LABEL: str(model)},
            }
        )
        descriptor = _descriptor(manifest_media_type, manifest)
        manifests[str(descriptor["digest"])] = manifest
        entries.append({**descriptor, "platform": {"os": os_name, "architecture": architecture}})
    index = _json({"schemaVersion": 2, "mediaType": index_media_type, "manifests": entries})
    return ModelImage(blobs, manifests, index)


def model_config_type(data: bytes) -> str | None:
    """The config media type of a manifest, if it is one (None for an index or anything else)."""
    try:
        manifest = loads_json(data)
    except ValueError:
        return None
    config = manifest.get("config") if isinstance(manifest, dict) else None
    media_type = config.get("mediaType") if isinstance(config, dict) else None
    return media_type if isinstance(media_type, str) else None


def check_model_manifest(reference: Reference, data: bytes) -> None:
    """Refuse to make an image of anything but a ModelPack model's manifest."""
    media_type = model_config_type(data)
    if media_type not in MODEL_CONFIGS:
        raise SnapshotError(
            Code.INVALID_ARGUMENT,
            f"{reference} is not a ModelPack model (its config is {media_type!r})",
        )


MODEL_CONFIGS = (MODEL_CONFIG, "application/vnd.cnai.model.config.v1+json")

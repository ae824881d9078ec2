"""What a kubelet's NodePublishVolume asks for, and what a published volume is (pure).

A pod's inline volume names its model in ``volumeAttributes`` with the reference driver's key,
so a pod spec written for that driver works unchanged; kubelet adds its own keys (the pod's
name, namespace, uid, service account, and ``csi.storage.k8s.io/ephemeral``). Credentials come
from the volume's ``nodePublishSecretRef``: a ``kubernetes.io/dockerconfigjson`` secret (key
``.dockerconfigjson``) or one with ``username`` and ``password``. Every refusal is a
``VolumeError`` carrying the gRPC status the CSI spec names for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from modelfs.csi import DEFAULT_DRIVER
from modelfs.errors import BadReferenceError, ModelfsError
from modelfs.prefetch.prefetcher import PrefetchMode
from modelfs.reference import Reference, parse_reference
from modelfs.sources.credentials import Credentials, credentials_in_config
from modelfs.untrusted import loads_json

# The attributes keep the reference driver's prefix whatever the driver is named, so its pod
# specs work as they are.
ATTRIBUTES = DEFAULT_DRIVER + "/"
REFERENCE = ATTRIBUTES + "reference"
PREFETCH = ATTRIBUTES + "prefetch"
KUBELET = "csi.storage.k8s.io/"  # the keys kubelet adds (podInfoOnMount, ephemeral)
# The reference driver's other attributes: a pod that relies on one would silently get
# something else here, so each is refused by name.
UNSUPPORTED = {
    ATTRIBUTES + "type": "modelfs mounts models only",
    ATTRIBUTES + "mount-id": "modelfs mounts a model once per node, shared by every pod",
    ATTRIBUTES + "check-disk-quota": "nothing is downloaded before the pod starts",
    ATTRIBUTES + "exclude-model-weights": "modelfs fetches only what is read: drop it",
    ATTRIBUTES + "exclude-file-patterns": "modelfs fetches only what is read: drop it",
}
DOCKER_CONFIG_SECRET = ".dockerconfigjson"


class VolumeError(ModelfsError):
    """A call refused: ``code`` is the gRPC status kubelet gets, ``str()`` the one line a pod's
    events show."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PublishRequest:
    """A NodePublishVolume, checked: what to mount where."""

    volume_id: str
    target: Path
    reference: Reference
    prefetch: PrefetchMode


def parse_publish(
    volume_id: str,
    target_path: str,
    *,
    has_capability: bool,
    block: bool,
    context: Mapping[str, str],
) -> PublishRequest:
    """The request's fields and volume attributes, or the VolumeError that refuses them."""
    if not volume_id:
        raise VolumeError(grpc.StatusCode.INVALID_ARGUMENT, "the request has no volume_id")
    target = _target(target_path)
    if not has_capability:
        raise VolumeError(grpc.StatusCode.INVALID_ARGUMENT, "the request has no volume_capability")
    if block:
        raise VolumeError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "a model is a directory: use the volume as a filesystem, not a block device",
        )
    for key in context:
        if key in UNSUPPORTED:
            raise VolumeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"volume attribute {key} is not supported by modelfs ({UNSUPPORTED[key]})",
            )
        if key not in (REFERENCE, PREFETCH) and not key.startswith(KUBELET):
            raise VolumeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown volume attribute {key!r}: modelfs knows {REFERENCE} and {PREFETCH}",
            )
    text = context.get(REFERENCE, "")
    if not text:
        raise VolumeError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the volume names no model: set volumeAttributes {REFERENCE}: REGISTRY/REPO:TAG",
        )
    try:
        reference = parse_reference(text)
    except BadReferenceError as error:
        raise VolumeError(grpc.StatusCode.INVALID_ARGUMENT, f"{REFERENCE}: {error}") from None
    prefetch = context.get(PREFETCH, PrefetchMode.HINTS.value)
    if prefetch not in {mode.value for mode in PrefetchMode}:
        raise VolumeError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{PREFETCH} {prefetch!r} is not one of none, hints, all",
        )
    return PublishRequest(volume_id, target, reference, PrefetchMode(prefetch))


def parse_unpublish(volume_id: str, target_path: str) -> Path:
    if not volume_id:
        raise VolumeError(grpc.StatusCode.INVALID_ARGUMENT, "the request has no volume_id")
    return _target(target_path)


def _target(text: str) -> Path:
    if not text or not os.path.isabs(text) or "\0" in text:
        raise VolumeError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"target_path {text!r} is not an absolute path",
        )
    return Path(os.path.normpath(text))


def secret_credentials(secrets: Mapping[str, str], host: str) -> Credentials | None:
    """The credentials a ``nodePublishSecretRef`` secret holds for ``host``; None if it holds
    none for it (the node's own login then applies)."""
    if not secrets:
        return None
    if DOCKER_CONFIG_SECRET in secrets:
        try:
            config = loads_json(secrets[DOCKER_CONFIG_SECRET].encode())
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise VolumeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the volume's secret: {DOCKER_CONFIG_SECRET} is not a JSON object (make it "
                "with kubectl create secret docker-registry)",
            )
        try:
            return credentials_in_config(config, DOCKER_CONFIG_SECRET, host)
        except ModelfsError:  # its message tells to run modelfs login: not what fixes a secret
            raise VolumeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the volume's secret: the {DOCKER_CONFIG_SECRET} entry for {host} is not "
                "user:password in base64 (make it with kubectl create secret docker-registry)",
            ) from None
    username, password = secrets.get("username"), secrets.get("password")
    if username and password is not None:
        return Credentials(username, password)
    raise VolumeError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the volume's secret has neither {DOCKER_CONFIG_SECRET} nor username and password "
        f"(it has {', '.join(sorted(secrets))})",
    )


@dataclass(frozen=True)
class Published:
    """A volume published on this node, as written down: a plugin that restarts reads it."""

    volume_id: str
    target: str
    reference: str  # as the pod named it
    prefetch: str
    model: str  # the reference pinned to the digest it had when published

    @property
    def digest(self) -> str:
        return self.model.rpartition("@")[2]

    def same_volume(self, request: PublishRequest) -> bool:
        """Whether ``request`` asks for what this is (a repeated call: idempotent)."""
        return (self.volume_id, self.reference, self.prefetch) == (
            request.volume_id,
            str(request.reference),
            request.prefetch.value,
        )

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes) -> Published:
        document = loads_json(data)
        if not isinstance(document, dict) or set(document) != set(cls.__dataclass_fields__):
            raise ValueError("not a published volume's record")
        if not all(isinstance(value, str) for value in document.values()):
            raise ValueError("not a published volume's record")
        return cls(**document)


def record_name(target: Path) -> str:
    """The file name of the record of the volume at ``target``."""
    return hashlib.sha256(str(target).encode()).hexdigest()[:32] + ".json"

"""The CSI plugin's pure part: a publish's fields and attributes, a volume's secret, the record
of a published volume (no socket, registry or mount)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest

from modelfs.csi.volumes import (
    PREFETCH,
    REFERENCE,
    Published,
    PublishRequest,
    VolumeError,
    parse_publish,
    parse_unpublish,
    secret_credentials,
)
from modelfs.prefetch.prefetcher import PrefetchMode
from modelfs.sources.credentials import Credentials

KUBELET_KEYS = {
    "csi.storage.k8s.io/pod.name": "p",
    "csi.storage.k8s.io/ephemeral": "true",
}
DIGEST = "sha256:" + "ab" * 32


def _publish(
    context: dict[str, str],
    target: str = "/var/lib/kubelet/pods/u/mount",
    *,
    has_capability: bool = True,
    block: bool = False,
) -> PublishRequest:
    return parse_publish(
        "csi-1", target, has_capability=has_capability, block=block, context=context
    )


def test_a_pod_spec_written_for_the_reference_driver_parses() -> None:
    request = _publish({REFERENCE: "registry.example.com/models/qwen:v1", **KUBELET_KEYS})
    assert str(request.reference) == "registry.example.com/models/qwen:v1"
    assert request.prefetch is PrefetchMode.HINTS
    assert request.target == Path("/var/lib/kubelet/pods/u/mount")
    pinned = _publish({REFERENCE: f"r.example.com/m@{DIGEST}", PREFETCH: "none"})
    assert pinned.reference.digest == DIGEST and pinned.prefetch is PrefetchMode.NONE


@pytest.mark.parametrize(
    ("context", "target", "flags", "code", "says"),
    [
        ({}, "/t", {}, grpc.StatusCode.INVALID_ARGUMENT, "names no model"),
        ({REFERENCE: "r.example.com/m:v1"}, "t", {}, grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
        (
            {REFERENCE: "r.example.com/m:v1"},
            "/t",
            {"has_capability": False},
            grpc.StatusCode.INVALID_ARGUMENT,
            "volume_capability",
        ),
        (
            {REFERENCE: "r.example.com/m:v1"},
            "/t",
            {"block": True},
            grpc.StatusCode.FAILED_PRECONDITION,
            "block",
        ),
        (
            {REFERENCE: "r.example.com/m:v1", "model.csi.modelpack.org/mount-id": "x"},
            "/t",
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            "not supported by modelfs",
        ),
        (
            {REFERENCE: "r.example.com/m:v1", "referense": "typo"},
            "/t",
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown volume attribute 'referense'",
        ),
    ],
)
def test_a_refused_publish_names_its_fault(
    context: dict[str, str], target: str, flags: dict[str, bool], code: grpc.StatusCode, says: str
) -> None:
    with pytest.raises(VolumeError) as refused:
        _publish(context, target, **flags)
    assert refused.value.code == code and says in str(refused.value)


def test_unpublish_needs_a_volume_and_an_absolute_target() -> None:
    assert parse_unpublish("csi-1", "/a/../b/mount") == Path("/b/mount")
    for volume_id, target in (("", "/t"), ("csi-1", ""), ("csi-1", "rel")):
        with pytest.raises(VolumeError):
            parse_unpublish(volume_id, target)


def _docker_config(host: str, entry: dict[str, str]) -> dict[str, str]:
    return {".dockerconfigjson": json.dumps({"auths": {host: entry}})}


def test_a_secret_s_credentials_for_the_model_s_registry() -> None:
    host = "registry.example.com"
    auth = base64.b64encode(b"alice:s3cret").decode()
    assert secret_credentials({}, host) is None
    assert secret_credentials(_docker_config(host, {"auth": auth}), host) == Credentials(
        "alice", "s3cret"
    )
    # A docker config for other registries: the node's login applies.
    assert secret_credentials(_docker_config("other.example.com", {"auth": auth}), host) is None
    plain = {"username": "bob", "password": "pw"}
    assert secret_credentials(plain, host) == Credentials("bob", "pw")
    token = secret_credentials(_docker_config(host, {"identitytoken": "t0k"}), host)
    assert token is not None and token.is_identity_token


@pytest.mark.parametrize(
    "secrets",
    [
        {".dockerconfigjson": "not json"},
        {".dockerconfigjson": "[]"},
        _docker_config("registry.example.com", {"auth": "!!"}),
        {"password": "pw"},
    ],
)
def test_a_malformed_secret_is_refused(secrets: dict[str, str]) -> None:
    with pytest.raises(VolumeError) as refused:
        secret_credentials(secrets, "registry.example.com")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "secret" in str(refused.value) and "pw" not in str(refused.value)


def test_a_published_volume_s_record() -> None:
    volume = Published("csi-1", "/t", "r.example.com/m:v1", "hints", f"r.example.com/m:v1@{DIGEST}")
    assert Published.from_json(volume.as_json().encode()) == volume
    assert volume.digest == DIGEST
    assert volume.same_volume(_publish({REFERENCE: "r.example.com/m:v1"}, "/t"))
    assert not volume.same_volume(_publish({REFERENCE: "r.example.com/m:v2"}, "/t"))
    for bad in ({**json.loads(volume.as_json()), "extra": "x"}, {"volume_id": 1}):
        with pytest.raises(ValueError):
            Published.from_json(json.dumps(bad).encode())

"""The pure parts of trust (modelfs.trust): the signature policy, cosign's formats, keys,
safetensors headers and the scan policy. Milliseconds, no I/O."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from modelfs.mount import trust as mount_trust
from modelfs.reference import parse_any_reference, parse_reference
from modelfs.trust import TrustError
from modelfs.trust.cosign import (
    IN_TOTO,
    dsse_bundle,
    pae,
    read_bundle,
    read_simple_signing,
    signature_layer,
    signature_of_layer,
    simple_signed,
    simple_signing_payload,
    statement,
)
from modelfs.trust.keys import PrivateKey, private_key, public_key, public_of, sign
from modelfs.trust.policy import ACCEPT_ALL, evaluate, parse_policy
from modelfs.trust.safetensors import header_length, header_problems
from modelfs.trust.scan import scan_file
from modelfs.trust.scan_policy import PICKLE, SAFETENSORS, ScanPolicy, file_kind

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
REPO = "registry.example.com/models/qwen"


def pem_public(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem_private(key: PrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


KEYS = {
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_each_key_kind_signs_and_verifies_and_nothing_else_does(kind: str) -> None:
    key = private_key(pem_private(KEYS[kind]()), "key.pem", None)
    trusted = public_key(pem_public(key), "key.pub")
    payload = simple_signing_payload(DIGEST, REPO)
    signature = sign(key, payload)
    assert trusted.verifies(signature, payload)
    assert not trusted.verifies(signature, payload + b" ")
    assert not public_of(KEYS[kind](), "other").verifies(signature, payload)
    assert trusted.fingerprint == public_of(key, "same").fingerprint


def test_keys_that_are_not_keys_are_one_line() -> None:
    with pytest.raises(TrustError, match=r"not-a-key\.pub is not a PEM public key"):
        public_key(b"hello", "not-a-key.pub")
    encrypted = pem_private(ed25519.Ed25519PrivateKey.generate(), b"secret")
    with pytest.raises(TrustError, match="MODELFS_KEY_PASSWORD"):
        private_key(encrypted, "enc.pem", None)
    assert private_key(encrypted, "enc.pem", b"secret") is not None
    cosign_key = b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nabc\n"
    with pytest.raises(TrustError, match="cosign's own encrypted format"):
        private_key(cosign_key, "cosign.key", None)


def test_simple_signing_payload_is_cosigns() -> None:
    document = json.loads(simple_signing_payload(DIGEST, REPO))
    assert document == {
        "critical": {
            "identity": {"docker-reference": REPO},
            "image": {"docker-manifest-digest": DIGEST},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    claim = read_simple_signing(simple_signing_payload(DIGEST, REPO))
    assert (claim.digest, claim.identity) == (DIGEST, REPO)
    layer = signature_layer(b"payload", b"\x01\x02")
    assert layer["annotations"] == {"dev.cosignproject.cosign/signature": "AQI="}
    assert signature_of_layer(layer) == b"\x01\x02"
    assert simple_signed("x", b"{}", b"s").problem == "its payload is not a simple-signing document"


def test_bundle_round_trip_and_what_is_signed() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    payload = statement(DIGEST, REPO)
    bundle = dsse_bundle(payload, sign(key, pae(IN_TOTO, payload)), "hint")
    (signed,) = read_bundle("b", bundle)
    assert signed.claim is not None and signed.claim.digest == DIGEST
    assert public_of(key, "k").verifies(signed.signature, signed.message)
    # PAE as DSSE defines it: the type and body, each with its length.
    assert pae("t", b"ab") == b"DSSEv1 1 t 2 ab"
    assert read_bundle("b", b"{}")[0].problem == "it is not a bundle with a DSSE envelope"


def _policy(document: dict[str, object], keys: dict[str, bytes]) -> object:
    return parse_policy(json.dumps(document), "policy.json", lambda path: keys[path])


def test_scopes_most_specific_first() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    policy = parse_policy(
        json.dumps(
            {
                "default": [{"type": "reject"}],
                "transports": {
                    "docker": {
                        "registry.example.com": [{"type": "insecureAcceptAnything"}],
                        "registry.example.com/models": [
                            {"type": "sigstoreSigned", "keyPath": "k.pub"}
                        ],
                        "registry.example.com/models/qwen:v1": [{"type": "reject"}],
                    }
                },
            }
        ),
        "policy.json",
        lambda path: pem_public(key),
    )
    scope = lambda text: policy.rule_for(parse_any_reference(text)).scope  # noqa: E731
    assert scope("registry.example.com/models/qwen:v1") == "registry.example.com/models/qwen:v1"
    assert scope("registry.example.com/models/qwen:v2") == "registry.example.com/models"
    assert scope("registry.example.com/other/x:v1") == "registry.example.com"
    assert scope("elsewhere.example.com/x:v1") == "default"
    assert scope("oci:/srv/layout:v1") == "default"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{", "policy.json is not JSON"),
        ("{}", 'policy.json has no "default"'),
        ('{"default": []}', "policy.json default: needs a non-empty list"),
        ('{"default": [{"type": "signedBy"}]}', "requirement type 'signedBy' is not supported"),
        ('{"default": [{"type": "sigstoreSigned"}]}', "needs keyPath, keyPaths or keyData"),
        (
            '{"default": [{"type": "sigstoreSigned", "fulcio": {}}]}',
            "keyless \\(fulcio/rekor\\) signatures are not supported",
        ),
        ('{"default": [{"type": "sigstoreSigned", "keyData": "%%"}]}', "keyData is not base64"),
    ],
)
def test_a_wrong_policy_is_one_line(document: str, message: str) -> None:
    with pytest.raises(TrustError, match=message):
        parse_policy(document, "policy.json", lambda path: b"")


def _signed_rule(key: PrivateKey, identity: str | None = None) -> object:
    entry: dict[str, object] = {
        "type": "sigstoreSigned",
        "keyData": base64.b64encode(pem_public(key)).decode(),
    }
    if identity:
        entry["signedIdentity"] = {"type": identity}
    policy = parse_policy(json.dumps({"default": [entry]}), "p.json", lambda path: b"")
    return policy


def test_evaluate_each_way_a_signature_fails() -> None:
    key, stranger = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    policy = _signed_rule(key, "matchRepository")
    reference = parse_reference(f"{REPO}:v1")
    rule = policy.rule_for(reference)  # type: ignore[attr-defined]

    def signed(by: PrivateKey, digest: str = DIGEST, identity: str = REPO) -> object:
        payload = simple_signing_payload(digest, identity)
        return simple_signed("tag x.sig signature 1", payload, sign(by, payload))

    good = evaluate(rule, reference, DIGEST, [signed(key)])  # type: ignore[list-item]
    assert good.accepted and good.keys and "keyData" in good.keys[0]
    assert not evaluate(rule, reference, DIGEST, []).accepted
    assert evaluate(rule, reference, DIGEST, []).reason.endswith("no signature found")
    wrong_key = evaluate(rule, reference, DIGEST, [signed(stranger)])  # type: ignore[list-item]
    assert "is not signed by a trusted key" in wrong_key.reason
    other = evaluate(rule, reference, DIGEST, [signed(key, OTHER)])  # type: ignore[list-item]
    assert f"is for another manifest, {OTHER}" in other.reason
    elsewhere = evaluate(
        rule,
        reference,
        DIGEST,
        [signed(key, identity="registry.example.com/evil")],  # type: ignore[list-item]
    )
    assert "names 'registry.example.com/evil'" in elsewhere.reason
    # One good signature among bad ones is enough.
    mixed = [signed(stranger), signed(key, OTHER), signed(key)]
    assert evaluate(rule, reference, DIGEST, mixed).accepted  # type: ignore[arg-type]


def test_match_repo_digest_or_exact_wants_the_tag_for_a_tag() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    rule = _signed_rule(key).rule_for(parse_reference(f"{REPO}:v1"))  # type: ignore[attr-defined]
    payload = simple_signing_payload(DIGEST, REPO)
    found = [simple_signed("s", payload, sign(key, payload))]
    assert not evaluate(rule, parse_reference(f"{REPO}:v1"), DIGEST, found).accepted
    assert evaluate(rule, parse_reference(f"{REPO}@{DIGEST}"), DIGEST, found).accepted


def test_reject_and_accept_anything() -> None:
    reference = parse_reference(f"{REPO}:v1")
    assert evaluate(ACCEPT_ALL.rule_for(reference), reference, DIGEST, []).accepted
    policy = parse_policy('{"default": [{"type": "reject"}]}', "p.json", lambda path: b"")
    verdict = evaluate(policy.rule_for(reference), reference, DIGEST, [])
    assert not verdict.accepted
    assert verdict.reason == "p.json default (reject) rejects every model there"


def _safetensors(header: dict[str, object], data_size: int, length: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + bytes(data_size)


def _check(file: bytes) -> list[str]:
    length, problem = header_length(file[:8], len(file))
    if length is None:
        return [str(problem)]
    return header_problems(file[8 : 8 + length], len(file))


def test_safetensors_headers() -> None:
    good = {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
        "__metadata__": {"format": "pt"},
    }
    assert _check(_safetensors(good, 24)) == []
    overlapping = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    assert _check(_safetensors(overlapping, 24)) == ["tensors 'a' and 'b' overlap (at byte 8)"]
    past_eof = _safetensors(good, 24, length=10_000)
    assert "past the end of the file" in _check(past_eof)[0]
    assert "run past the file's data" in _check(_safetensors(good, 20))[0]
    wrong_size = {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 8]}}
    assert "F16 of shape [3] is 6 bytes" in _check(_safetensors(wrong_size, 8))[0]
    backwards = {"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}
    assert "out of order" in _check(_safetensors(backwards, 8))[0]
    assert "unknown dtype" in _check(_safetensors({"a": {"dtype": "X"}}, 0))[0]
    not_json = struct.pack("<Q", 4) + b"{{{{"
    assert "not JSON within its declared length" in _check(not_json)[0]
    assert "shorter than" in _check(b"\x01")[0]


def test_scan_policy() -> None:
    assert ScanPolicy().as_text() == "pickle=refuse-file,safetensors=refuse-file"
    policy = ScanPolicy.parse("pickle=refuse-model, safetensors=off")
    assert (policy.pickle, policy.safetensors) == ("refuse-model", "off")
    assert ScanPolicy.parse(policy.as_text()) == policy
    with pytest.raises(TrustError, match="scan policy 'onnx=warn'"):
        ScanPolicy.parse("onnx=warn")
    assert file_kind("w/model.safetensors") == SAFETENSORS
    assert file_kind("pytorch_model.BIN") == PICKLE
    assert file_kind("config.json") is None


def _scan(path: str, data: bytes) -> list[str]:
    async def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    kind = file_kind(path)
    assert kind is not None
    return trio.run(scan_file, path, kind, len(data), read).problems


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_pickle_scans() -> None:
    checkpoint = io.BytesIO()
    torch.save({"w": torch.zeros(8)}, checkpoint)
    assert _scan("pytorch_model.bin", checkpoint.getvalue()) == []
    assert _scan("evil.pkl", pickle.dumps(_Evil())) == ["imports posix.system (dangerous)"]
    assert _scan("weights.bin", bytes(64)) == []  # not a pickle: nothing a pickle loader reads
    assert _scan("weights.bin", b"\x80\x07" + bytes(64)) == []  # no such pickle protocol
    assert _scan("weights.bin", pickle.dumps(_Evil(), protocol=2)) != []
    corrupt = _scan("model.pt", b"PK\x03\x04" + bytes(100))
    assert corrupt == ["cannot be scanned as a pickle (BadZipFile: File is not a zip file)"]
    assert _scan("empty.pkl", b"") == ["is empty, not a pickle"]


def test_the_nodes_policy_file_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_policy = tmp_path / "policy.json"
    monkeypatch.setattr(mount_trust, "DEFAULT_SIGNATURE_POLICY", node_policy)
    assert mount_trust.load_signature_policy(None) is ACCEPT_ALL  # the node has none
    node_policy.write_text('{"default": [{"type": "reject"}]}')
    assert mount_trust.load_signature_policy(None).origin == str(node_policy)
    other = tmp_path / "other.json"
    with pytest.raises(TrustError, match="cannot read the signature policy"):
        mount_trust.load_signature_policy(other)  # named, so it must be there

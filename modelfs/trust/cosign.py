"""cosign's signature formats, made and read: pure (bytes in, bytes or claims out).

Two kinds exist in registries today:

- the simple-signing payload (cosign's classic signatures): a JSON document naming the manifest
  digest (``critical.image.docker-manifest-digest``) and the repository
  (``critical.identity.docker-reference``), stored as a layer of media type
  ``SIMPLE_SIGNING`` whose annotation ``dev.cosignproject.cosign/signature`` holds the base64
  signature of the payload's bytes. They live under the tag ``sha256-<hex>.sig`` (or, cosign's
  OCI 1.1 mode, as a referrer of artifact type ``COSIGN_SIGNATURE_ARTIFACT``).
- a sigstore bundle (cosign v3's ``--new-bundle-format``): a referrer whose one layer is the
  bundle JSON, holding a DSSE envelope around an in-toto statement whose subject is the
  manifest digest (predicate type ``SIGN_PREDICATE``); the key signs the envelope's PAE.

Keyless signatures (a Fulcio certificate, a Rekor entry) need the public sigstore services and
are not checked here: a bundle is verified with a policy's public key, as ``cosign verify
--key --insecure-ignore-tlog`` does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from modelfs.trust import TrustError
from modelfs.untrusted import loads_json

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
BUNDLE_PREFIX = "application/vnd.dev.sigstore.bundle"
BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT = "https://in-toto.io/Statement/v1"
SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
SIMPLE_SIGNING_TYPE = "cosign container image signature"
MAX_SIGNATURE_BLOB = 1 << 20  # a payload or bundle is a few KiB


@dataclass(frozen=True)
class Claim:
    """What a signed message says: the manifest it is for, and the repository it names."""

    digest: str
    identity: str | None


@dataclass(frozen=True)
class Signed:
    """One signature found for a model: what the key signed, the signature, where it was."""

    where: str  # e.g. "tag sha256-....sig layer 1"
    message: bytes
    signature: bytes
    claim: Claim | None  # None: the message says nothing readable (``problem`` says why)
    problem: str | None = None


# --- simple signing -------------------------------------------------------------------------


def simple_signing_payload(digest: str, identity: str) -> bytes:
    """cosign's payload for the manifest ``digest`` of repository ``identity`` (host/repo)."""
    document = {
        "critical": {
            "identity": {"docker-reference": identity},
            "image": {"docker-manifest-digest": digest},
            "type": SIMPLE_SIGNING_TYPE,
        },
        "optional": None,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def read_simple_signing(payload: bytes) -> Claim:
    try:
        critical = loads_json(payload)["critical"]
        digest = critical["image"]["docker-manifest-digest"]
        identity = critical.get("identity", {}).get("docker-reference")
        kind = critical.get("type")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TrustError("its payload is not a simple-signing document") from None
    if kind not in (SIMPLE_SIGNING_TYPE, SIGN_PREDICATE) or not isinstance(digest, str):
        raise TrustError(f"its payload is of type {kind!r}, not a cosign image signature")
    return Claim(digest, identity if isinstance(identity, str) else None)


def signature_layer(payload: bytes, signature: bytes) -> dict[str, Any]:
    """The layer descriptor of one simple-signing signature in a ``.sig`` manifest."""
    return {
        "mediaType": SIMPLE_SIGNING,
        "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()},
    }


def signature_of_layer(layer: dict[str, Any]) -> bytes | None:
    """The signature a simple-signing layer's annotation holds; None if it has none."""
    annotations = layer.get("annotations")
    encoded = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
    if not isinstance(encoded, str):
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None


def simple_signed(where: str, payload: bytes, signature: bytes) -> Signed:
    try:
        return Signed(where, payload, signature, read_simple_signing(payload))
    except TrustError as error:
        return Signed(where, payload, signature, None, str(error))


# --- sigstore bundles (DSSE) -----------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the key signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def statement(digest: str, identity: str) -> bytes:
    """The in-toto statement cosign v3 signs for an image: its subject is the manifest."""
    document = {
        "_type": IN_TOTO_STATEMENT,
        "subject": [{"name": identity, "digest": {"sha256": digest.removeprefix("sha256:")}}],
        "predicateType": SIGN_PREDICATE,
        "predicate": {},
    }
    return json.dumps(document, separators=(",", ":")).encode()


def dsse_bundle(payload: bytes, signature: bytes, key_hint: str) -> bytes:
    """A sigstore bundle (v0.3) holding the DSSE envelope of ``payload`` (a statement)."""
    document = {
        "mediaType": BUNDLE,
        "verificationMaterial": {"publicKey": {"hint": key_hint}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": IN_TOTO,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}],
        },
    }
    return json.dumps(document, separators=(",", ":")).encode()


def read_bundle(where: str, data: bytes) -> list[Signed]:
    """The signatures of a bundle's DSSE envelope, each with the statement's claim."""
    try:
        envelope = loads_json(data)["dsseEnvelope"]
        payload_type = envelope["payloadType"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = [base64.b64decode(s["sig"], validate=True) for s in envelope["signatures"]]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return [Signed(where, b"", b"", None, "it is not a bundle with a DSSE envelope")]
    message = pae(str(payload_type), payload)
    claim, problem = None, None
    try:
        claim = _statement_claim(payload_type, payload)
    except TrustError as error:
        problem = str(error)
    return [Signed(where, message, signature, claim, problem) for signature in signatures]


def _statement_claim(payload_type: object, payload: bytes) -> Claim:
    if payload_type != IN_TOTO:
        raise TrustError(f"its envelope holds {payload_type!r}, not an in-toto statement")
    try:
        document = loads_json(payload)
        kind = document["predicateType"]
        subjects = document["subject"]
        digests = [subject["digest"]["sha256"] for subject in subjects]
        names = [subject.get("name") for subject in subjects]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TrustError("its statement is not an in-toto statement with subjects") from None
    if kind != SIGN_PREDICATE or len(digests) != 1 or not isinstance(digests[0], str):
        raise TrustError(
            f"its statement ({kind!r}, {len(digests)} subjects) is not a cosign image signature"
        )
    name = names[0]
    return Claim("sha256:" + digests[0], name if isinstance(name, str) else None)

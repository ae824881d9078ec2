"""Signatures of a model in its registry: found both ways cosign stores them, and published.

Found: under cosign's tag ``sha256-<hex>.sig`` (an OCI manifest whose layers are simple-signing
payloads, each signature in an annotation), and among the manifest's OCI referrers (the
referrers API, or its fallback tag ``sha256-<hex>`` on registries without it, such as
distribution 2.8): cosign's OCI 1.1 signatures and sigstore bundles. A lookup costs the tag's
manifest, the referrers list, and a few KiB of payloads; never the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from modelfs.errors import NotFoundError
from modelfs.modelpack import OCI_MANIFEST
from modelfs.reference import Reference
from modelfs.sources.interface import BlobSource, FetchedManifest
from modelfs.sources.referrers import empty_config, list_referrers, publish_referrer
from modelfs.sources.registry import RegistryRepository
from modelfs.trust.cosign import (
    BUNDLE,
    BUNDLE_PREFIX,
    COSIGN_SIGNATURE_ARTIFACT,
    IN_TOTO,
    MAX_SIGNATURE_BLOB,
    SIMPLE_SIGNING,
    Signed,
    dsse_bundle,
    pae,
    read_bundle,
    signature_layer,
    signature_of_layer,
    simple_signed,
    simple_signing_payload,
    statement,
)
from modelfs.trust.keys import PrivateKey, TrustedKey, public_of, sign
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

# A registry that lists more than this many signatures for one model is not believed further:
# each costs a request and a verification.
MAX_SIGNATURES = 32


def signature_tag(digest: str) -> str:
    """cosign's tag for the signatures of manifest ``digest``: ``sha256-<hex>.sig``."""
    return digest.replace(":", "-", 1) + ".sig"


async def find_signatures(source: BlobSource, digest: str) -> list[Signed]:
    """Every signature stored for manifest ``digest``, verified or not (``policy.evaluate``
    decides)."""
    found: list[Signed] = []
    tag = signature_tag(digest)
    try:
        manifest = await source.get_manifest(tag)
    except NotFoundError:
        pass
    else:
        found += await _simple_signatures(source, manifest, f"tag {tag}")
    if isinstance(source, RegistryRepository):
        for entry in (await list_referrers(source, digest))[:MAX_SIGNATURES]:
            kind = str(entry.get("artifactType", ""))
            if kind == COSIGN_SIGNATURE_ARTIFACT or kind.startswith(BUNDLE_PREFIX):
                referrer = await source.get_manifest(str(entry.get("digest")))
                found += await _referrer_signatures(source, referrer)
    return found[:MAX_SIGNATURES]


def _layers(manifest: FetchedManifest) -> list[dict[str, Any]]:
    try:
        layers = loads_json(manifest.data).get("layers")
    except (ValueError, AttributeError):
        return []
    return (
        [layer for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else []
    )


async def _simple_signatures(
    source: BlobSource, manifest: FetchedManifest, where: str
) -> list[Signed]:
    found = []
    for number, layer in enumerate(_layers(manifest)[:MAX_SIGNATURES], 1):
        signature = signature_of_layer(layer)
        if layer.get("mediaType") != SIMPLE_SIGNING or signature is None:
            continue
        payload = await source.get_blob(str(layer.get("digest")), MAX_SIGNATURE_BLOB)
        found.append(simple_signed(f"{where} signature {number}", payload, signature))
    return found


async def _referrer_signatures(source: BlobSource, referrer: FetchedManifest) -> list[Signed]:
    where = f"referrer {referrer.digest}"
    found = await _simple_signatures(source, referrer, where)
    for layer in _layers(referrer):
        if str(layer.get("mediaType", "")).startswith(BUNDLE_PREFIX):
            data = await source.get_blob(str(layer.get("digest")), MAX_SIGNATURE_BLOB)
            found += read_bundle(f"{where} bundle", data)
    return found


# --- publishing ----------------------------------------------------------------------------


async def _bytes(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def publish_signature(
    repository: RegistryRepository, subject: FetchedManifest, payload: bytes, signature: bytes
) -> str:
    """Add a simple-signing signature under cosign's tag (kept beside the ones already there);
    returns the tag."""
    tag = signature_tag(subject.digest)
    try:
        layers = _layers(await repository.get_manifest(tag))
    except NotFoundError:
        layers = []
    layer = signature_layer(payload, signature)
    if layer not in layers:
        layers.append(layer)
    config = empty_config()
    await repository.push_blob(config.digest, config.size, _bytes(b"{}"))
    await repository.push_blob(layer["digest"], layer["size"], _bytes(payload))
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": layers,
    }
    await repository.push_manifest(tag, OCI_MANIFEST, json.dumps(document).encode())
    return tag


async def publish_bundle(
    repository: RegistryRepository, subject: FetchedManifest, bundle: bytes
) -> str:
    """Publish a sigstore bundle as a referrer of the model; returns the referrer's digest."""
    return await publish_referrer(repository, subject, BUNDLE, BUNDLE, bundle)


@dataclass(frozen=True)
class Signature:
    """A signature ``sign_model`` published: for which manifest, by which key, where."""

    digest: str
    key: TrustedKey
    where: str  # the tag, or the referrer's digest


async def sign_model(
    repository: RegistryRepository,
    reference: Reference,
    key: PrivateKey,
    key_name: str,
    *,
    bundle: bool = False,
) -> Signature:
    """Sign the manifest ``reference`` names now (its tag resolved once) and publish the
    signature: cosign's simple signing under its tag, or (``bundle``) a sigstore bundle as a
    referrer. The identity signed is the repository, as cosign's."""
    subject = await repository.get_manifest(reference.selector)
    identity = f"{reference.registry}/{reference.repository}"
    trusted = public_of(key, key_name)
    if bundle:
        payload = statement(subject.digest, identity)
        signature = sign(key, pae(IN_TOTO, payload))
        envelope = dsse_bundle(payload, signature, trusted.fingerprint)
        where = await publish_bundle(repository, subject, envelope)
    else:
        payload = simple_signing_payload(subject.digest, identity)
        where = await publish_signature(repository, subject, payload, sign(key, payload))
    return Signature(subject.digest, trusted, where)

"""OCI referrers: small JSON artifacts bound to a model manifest through their ``subject``.

modelfs publishes two kinds (the piece index and the read profile); both are an OCI image
manifest with an empty config and one layer holding the JSON, found through the referrers API,
or through the referrers tag scheme (``sha256-<hex>`` holding an OCI index of referrers) on
registries without that API, such as distribution 2.8. A referrer is as trustworthy as the
registry's answer about the manifest it names, never more: its readers check what it says.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from modelfs.errors import ManifestError, NotFoundError
from modelfs.modelpack import OCI_EMPTY_JSON, OCI_INDEX, OCI_MANIFEST
from modelfs.sources.interface import FetchedManifest
from modelfs.sources.registry import RegistryRepository, sha256_digest
from modelfs.untrusted import loads_json

_EMPTY_CONFIG = b"{}"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


# --- pure core ----------------------------------------------------------------------------


def manifest_layers(manifest: FetchedManifest) -> list[Descriptor]:
    """The layer descriptors of an OCI image manifest."""
    try:
        document = loads_json(manifest.data)
        layers = [
            Descriptor(str(layer["mediaType"]), str(layer["digest"]), int(layer["size"]))
            for layer in document["layers"]
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(
            f"manifest {manifest.digest} has no readable layer list ({error}): "
            "an OCI image manifest is needed"
        ) from None
    return layers


def empty_config() -> Descriptor:
    return Descriptor(OCI_EMPTY_JSON, sha256_digest(_EMPTY_CONFIG), len(_EMPTY_CONFIG))


def referrer_manifest(subject: FetchedManifest, artifact_type: str, blob: Descriptor) -> bytes:
    """The artifact manifest carrying ``blob``, pointing at the model through ``subject``."""
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": empty_config().to_json(),
        "layers": [blob.to_json()],
        "subject": Descriptor(subject.media_type, subject.digest, len(subject.data)).to_json(),
    }
    return json.dumps(document, separators=(",", ":")).encode()


def referrers_tag(digest: str) -> str:
    """The referrers tag scheme's tag for a subject: ``sha256:abc`` -> ``sha256-abc``."""
    if not _DIGEST.match(digest):
        raise ManifestError(f"{digest!r} is not a sha256 digest")
    return digest.replace(":", "-", 1)


def index_referrers(data: bytes) -> list[dict[str, Any]]:
    """The ``manifests`` of an OCI index of referrers (the API's answer or the tag's content)."""
    try:
        manifests = loads_json(data).get("manifests") or []
    except (ValueError, AttributeError):
        raise ManifestError("a referrers list is not an OCI index: remove the broken tag") from None
    return [entry for entry in manifests if isinstance(entry, dict)]


def with_referrer(existing: bytes | None, referrer: Descriptor, artifact_type: str) -> bytes:
    """The referrers tag's OCI index with ``referrer`` added (once) to what it held."""
    entries = index_referrers(existing) if existing is not None else []
    entries = [entry for entry in entries if entry.get("digest") != referrer.digest]
    entries.append({**referrer.to_json(), "artifactType": artifact_type})
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return json.dumps(document, separators=(",", ":")).encode()


def pick_referrer(entries: list[dict[str, Any]], artifact_type: str) -> str | None:
    """The digest of the newest referrer of ``artifact_type`` (the last one listed)."""
    found = [
        str(entry["digest"])
        for entry in entries
        if entry.get("artifactType") == artifact_type
        and _DIGEST.match(str(entry.get("digest", "")))
    ]
    return found[-1] if found else None


# --- I/O edges ----------------------------------------------------------------------------


async def _bytes(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def publish_referrer(
    repository: RegistryRepository,
    subject: FetchedManifest,
    artifact_type: str,
    media_type: str,
    body: bytes,
) -> str:
    """Push ``body`` as a referrer of ``subject``; returns the referrer manifest's digest.

    Registries without the referrers API also get the referrers tag updated, as the OCI
    distribution spec's fallback asks of clients.
    """
    blob = Descriptor(media_type, sha256_digest(body), len(body))
    config = empty_config()
    await repository.push_blob(config.digest, config.size, _bytes(_EMPTY_CONFIG))
    await repository.push_blob(blob.digest, blob.size, _bytes(body))
    referrer = referrer_manifest(subject, artifact_type, blob)
    digest = await repository.push_manifest(sha256_digest(referrer), OCI_MANIFEST, referrer)
    if await repository.get_referrers(subject.digest) is None:
        tag = referrers_tag(subject.digest)
        try:
            existing: bytes | None = (await repository.get_manifest(tag)).data
        except NotFoundError:
            existing = None
        updated = with_referrer(
            existing, Descriptor(OCI_MANIFEST, digest, len(referrer)), artifact_type
        )
        await repository.push_manifest(tag, OCI_INDEX, updated)
    return digest


async def list_referrers(repository: RegistryRepository, subject: str) -> list[dict[str, Any]]:
    """The referrers of manifest ``subject``: from the referrers API, else its fallback tag."""
    listed = await repository.get_referrers(subject)
    if listed is None:
        try:
            listed = (await repository.get_manifest(referrers_tag(subject))).data
        except NotFoundError:
            return []
    return index_referrers(listed)


async def find_referrer(
    repository: RegistryRepository,
    subject: str,
    kinds: Mapping[str, str],
    max_size: int,
) -> bytes | None:
    """The JSON of the newest referrer of manifest ``subject`` of the first of ``kinds``
    (artifact type: its layer's media type, the preferred first) it has, or None."""
    listed = await list_referrers(repository, subject)
    for artifact_type in kinds:
        referrer_digest = pick_referrer(listed, artifact_type)
        if referrer_digest is not None:
            break
    else:
        return None
    media_type = kinds[artifact_type]
    referrer = await repository.get_manifest(referrer_digest)
    layers = manifest_layers(referrer)
    if len(layers) != 1 or layers[0].media_type != media_type:
        raise ManifestError(
            f"{artifact_type} referrer {referrer_digest} of {repository.name} has no "
            f"{media_type} layer: publish it again"
        )
    return await repository.get_blob(layers[0].digest, max_size)

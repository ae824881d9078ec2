"""The signature policy: containers' ``policy.json`` (containers-policy.json(5)), read and applied.

A policy names, per scope, the requirements a model must meet to be mounted; all of a scope's
requirements must hold. Scopes are looked up as containers does for its ``docker`` transport:
``host/repo:tag`` or ``host/repo@digest``, then ``host/repo``, then each parent namespace, then
``host``; else ``default``. Requirements: ``insecureAcceptAnything``, ``reject`` and
``sigstoreSigned`` (``keyPath``, ``keyPaths`` or ``keyData``; ``signedIdentity``
``matchRepoDigestOrExact``, the default, ``matchRepository``, ``matchExact`` or
``exactRepository``). A layout (``oci:PATH``) gets ``default``, its identity unchecked.

Pure: the text comes in, and key files through ``read_key``; ``evaluate`` takes the signatures
found and gives the verdict.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modelfs.reference import LayoutReference, Reference
from modelfs.trust import TrustError
from modelfs.trust.cosign import Signed
from modelfs.trust.keys import TrustedKey, public_key
from modelfs.untrusted import loads_json

ACCEPT_ANYTHING = "insecureAcceptAnything"
REJECT = "reject"
SIGSTORE_SIGNED = "sigstoreSigned"
_IDENTITIES = ("matchRepoDigestOrExact", "matchRepository", "matchExact", "exactRepository")


@dataclass(frozen=True)
class Requirement:
    type: str
    keys: tuple[TrustedKey, ...] = ()
    identity: str = "matchRepoDigestOrExact"
    repository: str | None = None  # exactRepository's dockerRepository


@dataclass(frozen=True)
class Rule:
    """The requirements of the scope a reference falls in."""

    origin: str  # the policy file
    scope: str  # "default" or the scope's name
    requirements: tuple[Requirement, ...]

    def describe(self) -> str:
        kinds = "+".join(requirement.type for requirement in self.requirements)
        where = "default" if self.scope == "default" else f'scope "{self.scope}"'
        return f"{self.origin} {where} ({kinds})"

    @property
    def needs_signatures(self) -> bool:
        """Whether signatures must be looked up (not for accept-anything or reject alone)."""
        kinds = {requirement.type for requirement in self.requirements}
        return SIGSTORE_SIGNED in kinds and REJECT not in kinds


@dataclass(frozen=True)
class SignaturePolicy:
    origin: str
    default: tuple[Requirement, ...]
    scopes: dict[str, tuple[Requirement, ...]]  # the docker transport's

    def rule_for(self, reference: Reference | LayoutReference) -> Rule:
        if isinstance(reference, Reference):
            for scope in _scopes(reference):
                if scope in self.scopes:
                    return Rule(self.origin, scope, self.scopes[scope])
        return Rule(self.origin, "default", self.default)


ACCEPT_ALL = SignaturePolicy("(no policy)", (Requirement(ACCEPT_ANYTHING),), {})


def _scopes(reference: Reference) -> list[str]:
    """The scopes that may name ``reference``, most specific first."""
    repository = f"{reference.registry}/{reference.repository}"
    exact = [str(reference)] if reference.tag or reference.digest else []
    parts = repository.split("/")
    return exact + ["/".join(parts[:end]) for end in range(len(parts), 0, -1)]


def parse_policy(text: str, origin: str, read_key: Callable[[str], bytes]) -> SignaturePolicy:
    """The policy in ``text``; each mistake is one line naming ``origin`` and the place."""
    try:
        document = loads_json(text)
    except ValueError as error:
        raise TrustError(f"{origin} is not JSON ({error})") from None
    if not isinstance(document, dict) or "default" not in document:
        raise TrustError(f'{origin} has no "default" requirements (containers-policy.json(5))')
    default = _requirements(document["default"], f"{origin} default", read_key)
    transports = document.get("transports") or {}
    if not isinstance(transports, dict):
        raise TrustError(f'{origin}: "transports" must be an object')
    scopes = {}
    docker = transports.get("docker") or {}
    if not isinstance(docker, dict):
        raise TrustError(f'{origin}: transports "docker" must be an object of scopes')
    for scope, requirements in docker.items():
        scopes[scope] = _requirements(requirements, f'{origin} scope "{scope}"', read_key)
    return SignaturePolicy(origin, default, scopes)


def _requirements(
    value: object, where: str, read_key: Callable[[str], bytes]
) -> tuple[Requirement, ...]:
    if not isinstance(value, list) or not value:
        raise TrustError(f"{where}: needs a non-empty list of requirements")
    return tuple(_requirement(entry, where, read_key) for entry in value)


def _requirement(entry: object, where: str, read_key: Callable[[str], bytes]) -> Requirement:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise TrustError(f'{where}: a requirement must be an object with a "type"')
    kind = entry["type"]
    if kind in (ACCEPT_ANYTHING, REJECT):
        return Requirement(kind)
    if kind != SIGSTORE_SIGNED:
        raise TrustError(
            f"{where}: requirement type {kind!r} is not supported "
            f"({ACCEPT_ANYTHING}, {REJECT}, {SIGSTORE_SIGNED})"
        )
    if "fulcio" in entry or "rekorPublicKeyPath" in entry or "rekorPublicKeyData" in entry:
        raise TrustError(f"{where}: keyless (fulcio/rekor) signatures are not supported; use a key")
    keys = [public_key(read_key(path), path) for path in _key_paths(entry, where)]
    if "keyData" in entry:
        try:
            data = base64.b64decode(str(entry["keyData"]), validate=True)
        except (binascii.Error, ValueError):
            raise TrustError(f"{where}: keyData is not base64") from None
        keys.append(public_key(data, "keyData"))
    if not keys:
        raise TrustError(f"{where}: sigstoreSigned needs keyPath, keyPaths or keyData")
    identity = entry.get("signedIdentity") or {"type": "matchRepoDigestOrExact"}
    if not isinstance(identity, dict) or identity.get("type") not in _IDENTITIES:
        raise TrustError(f"{where}: signedIdentity must be one of {', '.join(_IDENTITIES)}")
    repository = identity.get("dockerRepository")
    if identity["type"] == "exactRepository" and not isinstance(repository, str):
        raise TrustError(f"{where}: exactRepository needs dockerRepository")
    return Requirement(SIGSTORE_SIGNED, tuple(keys), identity["type"], repository)


def _key_paths(entry: dict[str, object], where: str) -> list[str]:
    paths = entry.get("keyPaths") or []
    if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
        raise TrustError(f"{where}: keyPaths must be a list of paths")
    single = entry.get("keyPath")
    if single is not None and not isinstance(single, str):
        raise TrustError(f"{where}: keyPath must be a path")
    return [str(path) for path in paths] + ([single] if single else [])


# --- the verdict -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Accepted (``keys``: what verified it, one per sigstoreSigned requirement) or not
    (``reason``: one line)."""

    accepted: bool
    reason: str
    keys: tuple[str, ...] = ()


def evaluate(
    rule: Rule, reference: Reference | LayoutReference, digest: str, found: Sequence[Signed]
) -> Verdict:
    """Whether the model ``digest`` meets every requirement of ``rule``, given the signatures
    ``found`` for it."""
    keys: list[str] = []
    for requirement in rule.requirements:
        if requirement.type == REJECT:
            return Verdict(False, f"{rule.describe()} rejects every model there")
        if requirement.type == SIGSTORE_SIGNED:
            key, reason = _signed(requirement, reference, digest, found)
            if key is None:
                return Verdict(False, f"{rule.describe()}: {reason}")
            keys.append(key)
    if keys:
        return Verdict(True, f"signed by {', '.join(keys)}", tuple(keys))
    return Verdict(True, f"accepted unsigned by {rule.describe()}")


def _signed(
    requirement: Requirement,
    reference: Reference | LayoutReference,
    digest: str,
    found: Sequence[Signed],
) -> tuple[str | None, str]:
    """The key (described) that verified a signature meeting ``requirement``, or None and why
    not, from the signature that got furthest."""
    if not found:
        return None, "no signature found"
    best = (-1, "")
    for signed in found:
        if signed.claim is None:
            best = max(best, (0, f"{signed.where}: {signed.problem}"))
            continue
        key = next(
            (k for k in requirement.keys if k.verifies(signed.signature, signed.message)), None
        )
        if key is None:
            keys = ", ".join(k.describe() for k in requirement.keys)
            best = max(best, (1, f"{signed.where} is not signed by a trusted key ({keys})"))
            continue
        if signed.claim.digest != digest:
            best = max(best, (2, f"{signed.where} is for another manifest, {signed.claim.digest}"))
            continue
        mismatch = _identity_mismatch(requirement, reference, signed.claim.identity)
        if mismatch is not None:
            best = max(best, (3, f"{signed.where} {mismatch}"))
            continue
        return f"{key.describe()} ({signed.where})", ""
    return None, best[1]


def _identity_mismatch(
    requirement: Requirement, reference: Reference | LayoutReference, identity: str | None
) -> str | None:
    if isinstance(reference, LayoutReference):
        return None
    repository = f"{reference.registry}/{reference.repository}"
    kind = requirement.identity
    if kind == "matchRepoDigestOrExact":
        kind = "matchRepository" if reference.digest else "matchExact"
    if kind == "exactRepository":
        wanted = requirement.repository
    elif kind == "matchRepository":
        wanted = repository
    else:
        wanted = f"{repository}:{reference.tag or 'latest'}"
    claimed = identity if kind == "matchExact" else _repository_of(identity)
    if claimed == wanted:
        return None
    return f"names {identity!r}, not {wanted!r} ({kind})"


def _repository_of(identity: str | None) -> str | None:
    """``host/repo`` of ``host/repo:tag`` or ``host/repo@digest`` (a port's colon kept)."""
    if identity is None:
        return None
    name = identity.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: name.rfind(":")]
    return name

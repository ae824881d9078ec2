"""Public and private keys as cosign uses them: ECDSA (P-256/P-384/P-521), Ed25519 and RSA.

Signatures are what cosign makes and checks: ECDSA over SHA-256 (P-256; SHA-384 and SHA-512
for the larger curves) in ASN.1 DER, Ed25519 over the message itself, RSA PKCS#1 v1.5 over
SHA-256. Pure: keys come in as PEM bytes; all the cryptography is the ``cryptography`` package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from modelfs.trust import TrustError

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

_CURVE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


@dataclass(frozen=True)
class TrustedKey:
    """A public key a policy trusts, and where it came from (for messages and status)."""

    name: str  # its keyPath, or "keyData" of the policy
    key: PublicKey

    @property
    def fingerprint(self) -> str:
        """sha256 of its SubjectPublicKeyInfo (DER): the same for the same key in any file."""
        der = self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "sha256:" + hashlib.sha256(der).hexdigest()

    def describe(self) -> str:
        return f"{self.name} ({self.fingerprint[:19]})"

    def verifies(self, signature: bytes, message: bytes) -> bool:
        key = self.key
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, message, ec.ECDSA(_curve_hash(key.curve.name)()))
            else:
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True


def _curve_hash(curve: str) -> type[hashes.HashAlgorithm]:
    try:
        return _CURVE_HASHES[curve]
    except KeyError:
        raise TrustError(
            f"ECDSA keys on curve {curve} are not supported (P-256, P-384, P-521)"
        ) from None


def public_key(data: bytes, name: str) -> TrustedKey:
    """The PEM public key ``data`` (cosign.pub, or ``openssl pkey -pubout``)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise TrustError(f"{name} is not a PEM public key ({_first_line(error)})") from None
    if not isinstance(key, PublicKey):
        raise TrustError(f"{name} is a {type(key).__name__}: use an ECDSA, Ed25519 or RSA key")
    if isinstance(key, ec.EllipticCurvePublicKey):
        _curve_hash(key.curve.name)
    return TrustedKey(name, key)


def private_key(data: bytes, name: str, password: bytes | None) -> PrivateKey:
    """The PEM private key ``data`` (PKCS#8 or traditional; encrypted ones need ``password``)."""
    if b"ENCRYPTED SIGSTORE PRIVATE KEY" in data or b"ENCRYPTED COSIGN PRIVATE KEY" in data:
        raise TrustError(
            f"{name} is in cosign's own encrypted format, which modelfs does not read: sign with "
            "a PEM key (openssl genpkey -algorithm ed25519 -out key.pem)"
        )
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError:
        raise TrustError(
            f"{name} is encrypted: give its password in MODELFS_KEY_PASSWORD"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise TrustError(f"{name} is not a PEM private key ({_first_line(error)})") from None
    if not isinstance(key, PrivateKey):
        raise TrustError(f"{name} is a {type(key).__name__}: use an ECDSA, Ed25519 or RSA key")
    return key


def sign(key: PrivateKey, message: bytes) -> bytes:
    """The signature of ``message`` that ``TrustedKey.verifies`` accepts (cosign's)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(_curve_hash(key.curve.name)()))
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def public_of(key: PrivateKey, name: str) -> TrustedKey:
    return TrustedKey(name, key.public_key())


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]

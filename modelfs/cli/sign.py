"""``modelfs sign``: sign a model in cosign's format, so the trust loop needs no other tool."""

from __future__ import annotations

import os
from pathlib import Path

import click
import trio

from modelfs.cli.options import source_options
from modelfs.reference import parse_reference
from modelfs.sources.mirrors import find_hosts
from modelfs.sources.registry import RegistryClient
from modelfs.trust import TrustError
from modelfs.trust.keys import private_key
from modelfs.trust.signatures import sign_model

PASSWORD_VARIABLE = "MODELFS_KEY_PASSWORD"


@click.command()
@click.argument("reference")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A PEM private key: ECDSA P-256, Ed25519 or RSA (encrypted: its password in "
    f"{PASSWORD_VARIABLE}).",
)
@click.option(
    "--bundle",
    is_flag=True,
    help="Publish a sigstore bundle as a referrer of the model (cosign v3's format) instead of "
    "a simple-signing signature under the tag sha256-<digest>.sig (cosign's classic one).",
)
@source_options
def sign(
    reference: str, key_path: Path, bundle: bool, plain_http: bool, insecure: bool, hosts_dir: Path
) -> None:
    """Sign the model REFERENCE names (its digest, a tag resolved now) with KEY and publish the
    signature in its registry, where mounts look for it (docs/trust.md). `cosign verify --key`
    accepts it too.

    \b
    Example:
      modelfs sign --key /etc/modelfs/signing.pem registry.example.com/models/qwen:v1
    """
    parsed = parse_reference(reference)
    try:
        data = key_path.read_bytes()
    except OSError as error:
        raise TrustError(f"cannot read the key {key_path}: {error.strerror}") from None
    password = os.environ.get(PASSWORD_VARIABLE)
    key = private_key(data, str(key_path), None if password is None else password.encode())

    async def run() -> str:
        # Signatures go to the registry's server, never a mirror.
        *_, server = find_hosts(
            parsed.registry, parsed.api_host, plain_http=plain_http, hosts_dir=hosts_dir
        )
        async with RegistryClient(server.netloc, insecure=insecure, endpoint=server) as c:
            signed = await sign_model(
                c.repository(parsed.repository), parsed, key, str(key_path), bundle=bundle
            )
        kind = "referrer" if bundle else "tag"
        return (
            f"signed {parsed} ({signed.digest}) with {signed.key.describe()}: {kind} {signed.where}"
        )

    click.echo(trio.run(run))

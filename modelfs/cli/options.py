"""Options and values several commands share: sizes, the node's cache, registry access."""

from __future__ import annotations

from pathlib import Path

import click

from modelfs import sizes
from modelfs.cli import F
from modelfs.errors import ModelfsError
from modelfs.mount.session import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE
from modelfs.sources.hosts import DEFAULT_HOSTS_DIR
from modelfs.trust.scan_policy import ScanPolicy


def parse_size(text: str) -> int:
    """A size given on the command line (``modelfs.sizes``): a bad one is a usage error."""
    try:
        return sizes.parse_size(text)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def cache_options(command: F) -> F:
    command = click.option(
        "--cache-size",
        default=str(DEFAULT_CACHE_SIZE >> 30) + "G",
        show_default=True,
        help="Most bytes the cache may hold (K, M, G, T suffixes).",
    )(command)
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_CACHE_DIR,
        show_default=True,
        help="The node's LMDB piece cache.",
    )(command)


def hosts_dir_option(command: F) -> F:
    """``--hosts-dir``: where a command that talks to a registry finds its mirrors."""
    return click.option(
        "--hosts-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_HOSTS_DIR,
        show_default=True,
        help="containerd's registry hosts directory: the mirrors a registry's hosts.toml "
        "there names are read through first (docs/mirrors.md).",
    )(command)


def source_options(command: F) -> F:
    command = hosts_dir_option(command)
    command = click.option(
        "--plain-http", is_flag=True, help="Talk HTTP, not HTTPS, to this registry."
    )(command)
    return click.option(
        "--insecure", is_flag=True, help="Accept a registry certificate that fails checks."
    )(command)


def mib(size: int) -> str:
    """Bytes as commands print them."""
    return f"{size / (1 << 20):.1f} MiB"


def trust_options(command: F) -> F:
    """The trust policy of a mount (docs/trust.md): ``signature_policy`` and ``scan``."""
    command = click.option(
        "--scan",
        "scan",
        default="",
        metavar="FORMAT=ACTION[,...]",
        help="What a file that fails its scan gets, per format (pickle, safetensors): off, "
        "warn, refuse-file (reads EIO) or refuse-model (scanned before ready; the mount is "
        "refused). Default: pickle=refuse-file,safetensors=refuse-file.",
    )(command)
    return click.option(
        "--signature-policy",
        type=click.Path(dir_okay=False, path_type=Path),
        help="A containers policy.json saying which keys must have signed the models of each "
        "registry or repository (default: /etc/modelfs/policy.json if it exists, else any model "
        "is mounted unsigned).",
    )(command)


def scan_policy(text: str) -> ScanPolicy:
    """``--scan``'s value; a wrong one is a usage error."""
    try:
        return ScanPolicy.parse(text)
    except ModelfsError as error:
        raise click.BadParameter(str(error), param_hint="--scan") from None

"""Options and values several commands share: sizes, the node's cache, registry access."""

from __future__ import annotations

import re
from pathlib import Path

import click

from modelfs.cli import F
from modelfs.fs.mount import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``100G``, ``512MiB``, ``1.5t`` or plain bytes; binary units."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size (examples: 100G, 512M, 1073741824)")
    number, unit = match.groups()
    factor = 1024 ** ("kmgtp".index(unit.lower()) + 1) if unit else 1
    return int(float(number) * factor)


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


def source_options(command: F) -> F:
    command = click.option(
        "--plain-http", is_flag=True, help="Talk HTTP, not HTTPS, to this registry."
    )(command)
    return click.option(
        "--insecure", is_flag=True, help="Accept a registry certificate that fails checks."
    )(command)

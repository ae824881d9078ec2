"""``modelfs scan``: the trust policy's verdict on a model and its files, without mounting it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import trio

from modelfs.cli.options import (
    cache_options,
    parse_size,
    scan_policy,
    source_options,
    trust_options,
)
from modelfs.errors import ModelfsError
from modelfs.mount.scanning import scan_model
from modelfs.mount.session import MountOptions
from modelfs.reference import parse_any_reference


@click.command()
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@trust_options
@cache_options
@source_options
def scan(reference: str, as_json: bool, **settings: Any) -> None:
    """Check REFERENCE as a mount would: its signature against the signature policy, and each
    file the scan policy covers (safetensors headers; pickles for imports outside the safe
    list). A scan fetches what it reads into the node's cache: a safetensors header, or a
    pickle's bytes (a zip-wrapped torch checkpoint: its pickle members only). Exits 1 if a
    mount would refuse the model or any of its files.

    \b
    Example:
      modelfs scan --json registry.example.com/models/qwen:v1
    """
    options = MountOptions(
        reference=parse_any_reference(reference),
        mountpoint=Path(),
        cache_dir=settings["cache_dir"],
        cache_size=parse_size(settings["cache_size"]),
        plain_http=settings["plain_http"],
        insecure=settings["insecure"],
        hosts_dir=settings["hosts_dir"],
        signature_policy=settings["signature_policy"],
        scan=scan_policy(settings["scan"]),
    )
    report = trio.run(scan_model, options)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        click.echo(f"{report.reference} {report.digest}")
        click.echo(f"signature: {report.signature}")
        for file in report.files:
            click.echo(
                f"scanned {file['path']} ({file['format']}): {file['findings']} findings, "
                f"{file['bytes_read']} of {file['size']} bytes read, {file['seconds']:.3f} s"
            )
        for finding in report.findings:
            click.echo(f"finding: {finding.line()}")
    if report.refused:
        raise ModelfsError(f"{report.reference}: a mount would refuse the model or its files")

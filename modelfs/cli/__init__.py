"""The ``modelfs`` command line (click). Each group of commands lives in its own module."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from modelfs.errors import ModelfsError

F = TypeVar("F", bound=Callable[..., Any])


class _Group(click.Group):
    """Print a ModelfsError as one line and exit 1, instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModelfsError as error:
            click.echo(f"modelfs: error: {error}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Mount ModelPack OCI artifacts as lazily loaded, read-only directories."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="modelfs: %(message)s")


def main() -> None:
    # Importing registers the commands on ``cli``.
    from modelfs.cli import auth, build, cluster, mount, service  # noqa: F401

    cli()

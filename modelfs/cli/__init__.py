"""The ``modelfs`` command line (click). Each group of commands lives in its own module."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from modelfs.errors import ModelfsError
from modelfs.logs import LOG_FORMAT_VARIABLE, LOG_FORMATS, configure_logging

F = TypeVar("F", bound=Callable[..., Any])


class _Group(click.Group):
    """Print a ModelfsError as one line and exit 1, instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModelfsError as error:
            if os.environ.get(LOG_FORMAT_VARIABLE) == "json":
                logging.getLogger("modelfs").error("error: %s", error)  # stays one JSON line
            else:
                click.echo(f"modelfs: error: {error}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar=LOG_FORMAT_VARIABLE,
    help="json: one JSON object per line, with the reference and digest on a mount's lines "
    "(the processes started by the daemon inherit it).",
)
def cli(verbose: int, log_format: str) -> None:
    """Mount ModelPack OCI artifacts as lazily loaded, read-only directories."""
    level = logging.WARNING - 10 * verbose
    configure_logging(max(level, logging.DEBUG), log_format)


def main() -> None:
    # Importing registers the commands on ``cli``.
    from modelfs.cli import auth, build, cluster, mount, service  # noqa: F401

    cli()

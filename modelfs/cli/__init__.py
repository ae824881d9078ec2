"""The ``modelfs`` command line (click). Each group of commands lives in its own module.

The group knows its commands by name and imports a command's module only when that command runs
(``--help`` imports them all, to list them): ``modelfs mount`` then pays for the imports of the
mount alone, not the builder's, the daemon's or the scheduler's, and the directory lists sooner.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from modelfs.errors import ModelfsError
from modelfs.logs import LOG_FORMAT_VARIABLE, LOG_FORMATS, configure_logging

F = TypeVar("F", bound=Callable[..., Any])

# httpx imports its own command line (rich, pygments: ~60 ms) whenever they are installed, which
# the ``model`` extra does through transformers; modelfs never runs it. None in sys.modules makes
# that import fail, and httpx then skips it.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

# Command name -> "module:attribute" of the click command.
COMMANDS = {
    "build": "modelfs.cli.build:build",
    "cache": "modelfs.cli.service:cache",
    "daemon": "modelfs.cli.service:daemon",
    "index": "modelfs.cli.cluster:index",
    "login": "modelfs.cli.auth:login",
    "logout": "modelfs.cli.auth:logout",
    "ls": "modelfs.cli.build:list_store",
    "modelfile": "modelfs.cli.build:modelfile_group",
    "mount": "modelfs.cli.mount:mount",
    "preheat": "modelfs.cli.service:preheat",
    "profile": "modelfs.cli.mount:profile",
    "push": "modelfs.cli.build:push",
    "scheduler": "modelfs.cli.cluster:scheduler",
    "status": "modelfs.cli.service:status",
    "tag": "modelfs.cli.build:tag",
    "umount": "modelfs.cli.mount:umount",
}


class _Group(click.Group):
    """Commands imported when used (``COMMANDS``); a ModelfsError printed as one line, exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command

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
    cli()

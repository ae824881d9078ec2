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
from dataclasses import dataclass
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
    "cache": "modelfs.cli.cache:cache",
    "cluster": "modelfs.cli.cluster:cluster_group",
    "csi": "modelfs.cli.csi:csi",
    "daemon": "modelfs.cli.daemon:daemon",
    "index": "modelfs.cli.cluster:index",
    "login": "modelfs.cli.login:login",
    "logout": "modelfs.cli.login:logout",
    "ls": "modelfs.cli.build:list_store",
    "model-image": "modelfs.cli.model_image:model_image_command",
    "modelfile": "modelfs.cli.build:modelfile_group",
    "mount": "modelfs.cli.mount:mount",
    "preheat": "modelfs.cli.preheat:preheat",
    "profile": "modelfs.cli.mount:profile",
    "push": "modelfs.cli.build:push",
    "scan": "modelfs.cli.scan:scan",
    "scheduler": "modelfs.cli.cluster:scheduler",
    "sign": "modelfs.cli.sign:sign",
    "snapshotter": "modelfs.cli.snapshotter:snapshotter",
    "status": "modelfs.cli.status:status",
    "tag": "modelfs.cli.build:tag",
    "umount": "modelfs.cli.mount:umount",
}


@dataclass(frozen=True)
class Section:
    """One part of the tour ``modelfs --help`` gives: its commands, a line each, and an example."""

    title: str
    commands: tuple[tuple[str, str], ...]  # (command name, what it is for)
    example: str


# The tour: every command of COMMANDS in exactly one section, in the order a newcomer meets them.
SECTIONS = (
    Section(
        "Mount a model",
        (
            ("mount", "Mount a model: the directory lists at once, bytes come when read."),
            ("umount", "Unmount it (through the daemon when the daemon keeps it)."),
            ("profile", "Record what a command reads; mounts then fetch that first."),
            ("login", "Check and save credentials for a registry (Basic or token)."),
            ("logout", "Forget a registry's saved credentials."),
        ),
        "modelfs mount registry.example.com/models/qwen:v1 /models",
    ),
    Section(
        "Build and publish a model",
        (
            ("modelfile", "Write a Modelfile for a model directory, as modctl does."),
            ("build", "Pack a directory as a ModelPack artifact."),
            ("push", "Push a build to its registry, with its piece index."),
            ("index", "Publish the piece index of a model another tool pushed."),
            ("ls", "List the builds in the local store."),
            ("tag", "Give a build in the store a second name."),
            ("model-image", "Publish the image containerd pulls to mount a model lazily."),
        ),
        "modelfs build -t registry.example.com/models/qwen:v1 ./qwen",
    ),
    Section(
        "Trust a model (docs/trust.md)",
        (
            ("sign", "Sign a model in cosign's format; mounts check it by policy."),
            ("scan", "Check a model's signature and files as a mount would."),
        ),
        "modelfs sign --key signing.pem registry.example.com/models/qwen:v1",
    ),
    Section(
        "Run a node",
        (
            ("daemon", "The node service: configured mounts, control socket, metrics."),
            ("status", "The node's mounts, where their bytes came from, the cache."),
            ("preheat", "Fetch models into the cache of this node or of chosen nodes."),
            ("cache", "List, verify, shrink or clear the node's piece cache."),
            ("snapshotter", "containerd's proxy snapshotter: images; models mounted lazily."),
            ("csi", "Kubernetes CSI node plugin: models as pods' volumes, lazily."),
        ),
        "modelfs preheat registry.example.com/models/qwen:v1",
    ),
    Section(
        "Run a cluster (mounts join it with --scheduler)",
        (
            ("scheduler", "Tell nodes which peer holds a piece; ration registry trips."),
            ("cluster", "Which nodes are up, and how much of each model each holds."),
        ),
        "modelfs scheduler --cluster-secret-file /etc/modelfs/cluster-secret",
    ),
)


class _Group(click.Group):
    """Commands imported when used (``COMMANDS``), listed as the tour ``SECTIONS`` gives;
    a ModelfsError printed as one line, exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Usage, what modelfs is, the tour of the commands, then the options."""
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_commands(ctx, formatter)
        click.Command.format_options(self, ctx, formatter)
        self.format_epilog(ctx, formatter)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands by section, one line each, and one example per section (no imports)."""
        width = max(len(name) for section in SECTIONS for name, _ in section.commands)
        for section in SECTIONS:
            with formatter.section(section.title):
                formatter.write_dl([(name.ljust(width), text) for name, text in section.commands])
                formatter.write(f"{'':>{formatter.current_indent}}e.g. {section.example}\n")

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModelfsError as error:
            if os.environ.get(LOG_FORMAT_VARIABLE) == "json":
                logging.getLogger("modelfs").error("error: %s", error)  # stays one JSON line
            else:
                click.echo(f"modelfs: error: {error}", err=True)
            sys.exit(1)


@click.group(
    cls=_Group,
    epilog="Each command's --help says more, with an example. "
    "The docs/ folder of the repository has a page per concern.",
)
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
    """Mount AI models kept in OCI registries (ModelPack artifacts) as read-only directories
    that list at once and fetch only the bytes a reader touches."""
    level = logging.WARNING - 10 * verbose
    configure_logging(max(level, logging.DEBUG), log_format)


def main() -> None:
    cli()

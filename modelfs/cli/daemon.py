"""``modelfs daemon``: the node service."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
import trio

from modelfs.service.config import (
    DEFAULT_CONFIG,
    DaemonConfig,
    load_config,
)
from modelfs.service.daemon import Daemon
from modelfs.service.reload import block_daemon_signals, take_handover


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The daemon's config file (see systemd/config.toml.example).",
)
@click.option("--metrics-addr", help="Serve Prometheus metrics on HOST:PORT (default: off).")
def daemon(config_path: Path, metrics_addr: str | None) -> None:
    """Run the node service: the config's mounts, the control socket, metrics.

    SIGHUP (systemctl reload) re-reads the config and re-executes, keeping the mounts up.

    \b
    Example:
      modelfs daemon --metrics-addr 127.0.0.1:9464
    """
    block_daemon_signals()
    handover = take_handover()

    def current_config() -> DaemonConfig:
        config = load_config(config_path)
        return replace(config, metrics_addr=metrics_addr) if metrics_addr else config

    trio.run(Daemon(current_config(), current_config, handover).run)

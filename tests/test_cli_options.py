import subprocess
import sys

import click
import pytest

from modelfs.cli import COMMANDS, cli
from modelfs.cli.options import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100G", 100 << 30),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("1.5t", int(1.5 * (1 << 40))),
        ("4096", 4096),
        ("2k", 2048),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(click.BadParameter, match="not a size"):
        parse_size("lots")


def test_every_command_is_found_under_its_name() -> None:
    context = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(context, name)  # imports the command's module
        assert isinstance(command, click.Command)
        assert command.name == name
    assert cli.get_command(context, "no-such-command") is None


def test_mount_imports_no_other_command() -> None:
    """``modelfs mount`` loads the mount's modules, not the daemon's, builder's or scheduler's."""
    script = (
        "import sys, click\n"
        "from modelfs.cli import cli\n"
        "cli.get_command(click.Context(cli), 'mount')\n"
        "print(' '.join(sorted(name for name in sys.modules if sys.modules[name])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    assert "modelfs.cli.mount" in loaded
    unwanted = {
        "modelfs.cli.login",
        "modelfs.cli.build",
        "modelfs.cli.cache",
        "modelfs.cli.daemon",
        "modelfs.cli.preheat",
        "modelfs.cli.status",
        "modelfs.service.daemon",
        "modelfs.scheduler.service",
        "prometheus_client",
        "rich",  # through httpx's own command line
    }
    assert loaded & unwanted == set()

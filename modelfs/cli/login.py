"""``modelfs login`` / ``modelfs logout``: docker-compatible credentials in config.json."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import trio

from modelfs.cli.options import source_options
from modelfs.errors import BadReferenceError
from modelfs.reference import DOCKER_HUB, DOCKER_HUB_API
from modelfs.sources.credentials import (
    Credentials,
    docker_config_path,
    normalize_host,
    remove_credentials,
    save_credentials,
)
from modelfs.sources.mirrors import find_hosts
from modelfs.sources.registry import RegistryClient


def _api_host(host: str) -> str:
    """The host to talk to: Docker Hub's API lives on another name than the one users type."""
    return DOCKER_HUB_API if host in (DOCKER_HUB, "index.docker.io") else host


def _host_argument(text: str) -> str:
    host = normalize_host(text)
    if not host:
        raise BadReferenceError(f"invalid registry host {text!r}: expected HOST[:PORT]")
    return host


async def _check_login(
    host: str, creds: Credentials, plain_http: bool, insecure: bool, hosts_dir: Path
) -> None:
    # The registry's server (hosts.toml's, if it names one): credentials never go to a mirror.
    *_, server = find_hosts(host, _api_host(host), plain_http=plain_http, hosts_dir=hosts_dir)
    async with RegistryClient(
        server.netloc, insecure=insecure, credentials=creds, endpoint=server
    ) as client:
        await client.ping()


@click.command()
@click.argument("host")
@click.option("-u", "--username", help="Registry user name (prompted for when omitted).")
@click.option("-p", "--password", help="Password or token (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@source_options
def login(
    host: str,
    username: str | None,
    password: str | None,
    password_stdin: bool,
    plain_http: bool,
    insecure: bool,
    hosts_dir: Path,
) -> None:
    """Check credentials for registry HOST and save them in docker's config.json.

    \b
    Example:
      modelfs login registry.example.com -u alice --password-stdin < token.txt
    """
    host = _host_argument(host)
    if password is not None and password_stdin:
        raise click.UsageError("--password and --password-stdin are mutually exclusive")
    if password_stdin:
        if not username:
            raise click.UsageError("--password-stdin needs --username")
        password = sys.stdin.read().rstrip("\r\n")
    elif password is not None:
        click.echo(
            "WARNING! Using --password on the command line is insecure; use --password-stdin.",
            err=True,
        )
    if not username:
        username = click.prompt("Username", type=str)
    if password is None:
        password = click.prompt("Password", type=str, hide_input=True)
    if not username or not password:
        raise click.UsageError("both a username and a password are needed")
    creds = Credentials(username, password)
    trio.run(_check_login, host, creds, plain_http, insecure, hosts_dir)
    save_credentials(host, creds)
    click.echo(f"Login Succeeded (saved in {docker_config_path()})")


@click.command()
@click.argument("host")
def logout(host: str) -> None:
    """Forget the saved credentials for registry HOST.

    \b
    Example:
      modelfs logout registry.example.com
    """
    host = _host_argument(host)
    if remove_credentials(host):
        click.echo(f"Removed login credentials for {host}")
    else:
        click.echo(f"Not logged in to {host}")

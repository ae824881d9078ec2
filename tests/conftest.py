"""Shared fixtures: real registries (anonymous and htpasswd), a proxy in front, docker config."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_tools import Proxy, Registry, TokenServer, isolated_docker_config

AUTH_USERNAME = "modelfs"
AUTH_PASSWORD = "correct horse battery staple"


def pytest_unconfigure(config: pytest.Config) -> None:
    """A test that leaves a thread running would keep the interpreter (and CI) waiting forever
    after the summary: wait a little for stragglers, then name them, show where they are and exit
    with a failure."""
    deadline = time.monotonic() + 15
    while (left := _threads_left()) and time.monotonic() < deadline:
        left[0].join(deadline - time.monotonic())
    if not left:
        return
    frames = sys._current_frames()
    for thread in left:
        stack = "".join(traceback.format_stack(frames[thread.ident])) if thread.ident else ""
        print(f"\nthread {thread.name!r} still running after the tests:\n{stack}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _threads_left() -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
    ]


@pytest.fixture(scope="session", autouse=True)
def docker_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's DOCKER_CONFIG: empty, so no test reads or writes the user's logins."""
    return isolated_docker_config(tmp_path_factory.mktemp("docker-config"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous registry shared by the session: push under a repository unique to the test."""
    server = Registry(tmp_path_factory.mktemp("registry"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry behind htpasswd (bcrypt) basic auth; ``.username`` / ``.password``."""
    server = Registry(
        tmp_path_factory.mktemp("auth-registry"), username=AUTH_USERNAME, password=AUTH_PASSWORD
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous registry on HTTPS with a self-signed certificate (``.tls_cert``)."""
    server = Registry(tmp_path_factory.mktemp("tls-registry"), tls=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry using docker token auth; ``.token_server`` issues the tokens and logs requests."""
    root = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(root / "token-server", username=AUTH_USERNAME, password=AUTH_PASSWORD)
    server = Registry(root, token_server=tokens)
    server.start()
    yield server
    server.stop()
    tokens.close()


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry of the test's own, which the test may stop, restart or pause."""
    server = Registry(tmp_path / "fresh-registry")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[Proxy]:
    """A counting proxy in front of ``registry``; set ``.tamper`` / ``.redirect`` as needed."""
    with Proxy(registry) as server:
        yield server


@pytest.fixture
def auth_proxy(auth_registry: Registry) -> Iterator[Proxy]:
    """The same proxy in front of ``auth_registry``."""
    with Proxy(auth_registry) as server:
        yield server

"""Several nodes on one machine: separate mount processes, each with its own cache and peer port,
one scheduler, the real registry behind a counting proxy."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from mounting import mounted
from registry_tools import Layer, Proxy, Registry, free_port, push_artifact

from modelfs.cli import (
    cli,
    cluster,  # noqa: F401  (registers the commands)
)
from modelfs.modelpack import ANNOTATION_FILEPATH, layer_media_type

MIB = 1 << 20
SECRET = b"cluster-test-secret-0123456789abcdef"
READER = """
import hashlib, sys, time
started = time.monotonic()
digest = hashlib.sha256()
with open(sys.argv[1], "rb", buffering=0) as file:
    while chunk := file.read(1 << 20):
        digest.update(chunk)
print(digest.hexdigest(), time.monotonic() - started)
"""


def publish(registry: Registry, repository: str, path: Path) -> str:
    """Push a one-file model and its piece index; returns the reference."""
    layer = Layer(layer_media_type("weight", "raw"), path, {ANNOTATION_FILEPATH: "model.bin"})
    push_artifact(registry.host, repository, "v1", [layer])
    result = CliRunner().invoke(cli, ["index", f"{registry.host}/{repository}:v1", "--plain-http"])
    assert result.exit_code == 0, result.output
    return f"{repository}:v1"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster-secret"
    path.write_bytes(SECRET)
    return path


@contextmanager
def scheduler_process(secret_file: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelfs",
            "scheduler",
            "--listen",
            f"127.0.0.1:{port}",
            "--cluster-secret-file",
            str(secret_file),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(10)


def read_all(paths: list[Path]) -> tuple[list[str], float]:
    """Read each file in its own process, all at once; (sha256 of each, wall time)."""
    started = time.monotonic()
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(path)], stdout=subprocess.PIPE, text=True
        )
        for path in paths
    ]
    outputs = [reader.communicate(timeout=300)[0].split() for reader in readers]
    return [output[0] if output else "" for output in outputs], time.monotonic() - started


@contextmanager
def nodes(reference: str, proxy: Proxy, root: Path, count: int, *args: str) -> Iterator[list[Path]]:
    """``count`` mounts of ``reference`` through ``proxy``, each with its own cache (and port)."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                mounted(
                    f"{proxy.host}/{reference}",
                    root / f"node{n}",
                    root / f"cache{n}",
                    *args,
                    *(("--peer-listen", f"127.0.0.1:{free_port()}") if args else ()),
                )
            )
            for n in range(count)
        ]


def test_four_nodes_fetch_the_model_about_once(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    size = 256 * MIB
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(os.urandom(size))
    expected = hashlib.sha256(data_path.read_bytes()).hexdigest()
    reference = publish(registry, "cluster/four", data_path)

    # Baseline: the same four nodes without peers, each pulling the model from the registry.
    with nodes(reference, proxy, tmp_path / "alone", 4) as mounts:
        proxy.reset()
        hashes, alone_time = read_all([mnt / "model.bin" for mnt in mounts])
        alone_bytes = proxy.blob_bytes
    assert hashes == [expected] * 4

    with (
        scheduler_process(secret_file) as (scheduler, _),
        nodes(
            reference,
            proxy,
            tmp_path / "peers",
            4,
            "--scheduler",
            scheduler,
            "--cluster-secret-file",
            str(secret_file),
        ) as mounts,
    ):
        proxy.reset()
        hashes, together_time = read_all([mnt / "model.bin" for mnt in mounts])
        registry_bytes = proxy.blob_bytes
    print(
        f"\n4 nodes, 256 MiB: registry bytes {registry_bytes / size:.2f} x model with peers, "
        f"{alone_bytes / size:.2f} x without; time {together_time:.2f} s with peers, "
        f"{alone_time:.2f} s without ({together_time / alone_time:.2f} x)"
    )
    assert hashes == [expected] * 4
    assert registry_bytes <= 1.25 * size

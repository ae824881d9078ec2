"""Several nodes on one machine, for the cluster tests and the benchmark's cluster case.

Each node is a real ``modelfs mount`` process with its own cache directory and peer port; the
scheduler is a real ``modelfs scheduler`` process; files are read by separate processes at once,
as the jobs of several GPU hosts would.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from mounting import mounted
from registry_tools import Layer, free_port, free_ports, push_artifact

from modelfs.modelpack import ANNOTATION_FILEPATH, layer_media_type

MIB = 1 << 20
READER = """
import hashlib, sys, time
started = time.monotonic()
digest = hashlib.sha256()
with open(sys.argv[1], "rb", buffering=0) as file:
    while chunk := file.read(1 << 20):
        digest.update(chunk)
print(digest.hexdigest(), time.monotonic() - started)
"""


def publish(registry_host: str, repository: str, path: Path, index: bool = True) -> str:
    """Push a one-file model and (unless told not to) its piece index; returns the reference."""
    layer = Layer(layer_media_type("weight", "raw"), path, {ANNOTATION_FILEPATH: "model.bin"})
    push_artifact(registry_host, repository, "v1", [layer], piece_index=index)
    return f"{repository}:v1"


@contextmanager
def scheduler_process(secret_file: Path, *extra: str) -> Iterator[str]:
    """``modelfs scheduler`` in its own process; yields its URL once it accepts connections."""
    port = free_port()
    command = [sys.executable, "-m", "modelfs", "scheduler", "--listen", f"127.0.0.1:{port}"]
    command += ["--cluster-secret-file", str(secret_file), *extra]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
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
def nodes(
    reference: str, registry_host: str, root: Path, count: int, *args: str
) -> Iterator[list[Path]]:
    """``count`` mounts of ``reference``, each with its own cache (and peer port, given args)."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                mounted(
                    f"{registry_host}/{reference}",
                    root / f"node{n}",
                    root / f"cache{n}",
                    *args,
                    *(("--peer-listen", f"127.0.0.1:{free_ports(1)}") if args else ()),
                )
            )
            for n in range(count)
        ]

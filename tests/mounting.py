"""Running the real ``modelfs`` command to mount and unmount, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MODELFS = [sys.executable, "-m", "modelfs"]


def modelfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MODELFS, *args], capture_output=True, text=True, timeout=timeout)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


def unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)
    deadline = time.monotonic() + 10
    while is_mounted(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def mount_pid(mountpoint: Path) -> int:
    """The pid of the ``modelfs mount`` process serving ``mountpoint`` (given as it was mounted)."""
    wanted = [b"mount", str(mountpoint).encode()]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"modelfs" in argv and all(word in argv for word in wanted):
                return int(entry.name)
    raise LookupError(f"no modelfs mount process serves {mountpoint}")


@contextmanager
def mounted(
    reference: str, mountpoint: Path, cache_dir: Path, *extra: str, verbose: int = 0
) -> Iterator[Path]:
    """``modelfs mount`` in the background; unmounted on exit, whatever happened. ``verbose``:
    how many ``-v`` (the mount's log is under ``cache_dir``'s ``logs/``)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    result = modelfs(
        *["-v"] * verbose,
        "mount",
        reference,
        str(mountpoint),
        "--cache-dir",
        str(cache_dir),
        "--plain-http",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)

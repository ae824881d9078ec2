"""The mirrors case (issue 23): one model read cold through a mount four ways, side by side:

- ``direct``: the mount reads the origin registry;
- ``mirror_cold``: through a pull-through cache (a second docker-registry in distribution's proxy
  mode, as Harbor's proxy projects are) that a hosts.toml names, holding nothing yet: it fills
  the blobs from the origin while modelfs waits for them;
- ``mirror_warm``: through the same cache once it holds the model (a second node's cold read);
- ``proxy``: straight to the origin, but through Debian's tinyproxy (``HTTP_PROXY``): range
  GETs in absolute form on the lean path.

Every read starts cold (a fresh modelfs cache, the page cache dropped); the origin's blob bytes
come from its access log. Needs tinyproxy (scripts/setup installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from mounting import modelfs, unmount
from registry_tools import Registry, free_port

from bench.reading import read_all
from bench.report import MB, Results, Sample, median

CASES = ("direct", "mirror_cold", "mirror_warm", "proxy")


class Meter(Protocol):
    """The origin's blob bytes since a mark (``bench.run.RegistryMeter``)."""

    def mark(self) -> Any: ...

    def blob_bytes_since(self, mark: Any) -> int: ...


class MirrorsCase:
    """The origin, a pull-through cache of it, tinyproxy, and the hosts dirs that name them."""

    def __init__(self, work: Path, origin: Registry, reference: str, names: list[str]) -> None:
        self.work, self.origin, self.reference, self.names = (
            work / "mirrors",
            origin,
            reference,
            names,
        )
        self.work.mkdir(parents=True)
        self.direct_hosts = self.work / "no-hosts"  # an empty hosts dir: no mirror
        self.direct_hosts.mkdir()
        self.mirror: Registry | None = None
        self.proxy_port = free_port()
        config = self.work / "tinyproxy.conf"
        config.write_text(
            f"Port {self.proxy_port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 200\n"
            "LogLevel Critical\n"
        )
        self.tinyproxy = subprocess.Popen(
            ["tinyproxy", "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.proxy_port, "tinyproxy")

    def _fresh_mirror(self, run: int) -> Path:
        """A pull-through cache holding nothing, and a hosts dir naming it for the origin."""
        if self.mirror is not None:
            self.mirror.stop()
        mirror = Registry(self.work / f"mirror-{run}")
        config = json.loads(mirror.config_path.read_text())
        config["proxy"] = {"remoteurl": self.origin.url}
        mirror.config_path.write_text(json.dumps(config))
        mirror.start()
        self.mirror = mirror
        hosts = self.work / f"hosts-{run}"
        (hosts / self.origin.host).mkdir(parents=True)
        (hosts / self.origin.host / "hosts.toml").write_text(
            f'server = "{self.origin.url}"\n\n'
            f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        return hosts

    def run_once(
        self,
        run: int,
        cold_start: Callable[[], None],
        meter: Meter,
        record: Callable[[str, Sample], None],
    ) -> None:
        hosts = self._fresh_mirror(run)
        for case, hosts_dir, environment in (
            ("direct", self.direct_hosts, {}),
            ("mirror_cold", hosts, {}),
            ("mirror_warm", hosts, {}),
            ("proxy", self.direct_hosts, {"HTTP_PROXY": f"http://127.0.0.1:{self.proxy_port}"}),
        ):
            cold_start()
            mark = meter.mark()
            cache = self.work / f"cache-{case}-{run}"
            with self._mounted(cache, hosts_dir, environment) as mountpoint:
                started = time.monotonic()
                count = read_all([mountpoint / name for name in self.names])
                seconds = time.monotonic() - started
            shutil.rmtree(cache, ignore_errors=True)
            record(f"mirrors_{case}", Sample(seconds, count, meter.blob_bytes_since(mark)))

    @contextmanager
    def _mounted(self, cache: Path, hosts: Path, environment: dict[str, str]) -> Iterator[Path]:
        mountpoint = self.work / "mnt"
        mountpoint.mkdir(exist_ok=True)
        saved = {name: os.environ.get(name) for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY")}
        for name in saved:
            os.environ.pop(name, None)
        os.environ.update(environment)  # the mount process (started in the background) keeps it
        try:
            result = modelfs(
                "mount", self.reference, str(mountpoint), "--no-daemon", "--plain-http",
                "--cache-dir", str(cache), "--hosts-dir", str(hosts),
            )  # fmt: skip
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None)
                if value is not None:
                    os.environ[name] = value
        if result.returncode != 0:
            raise RuntimeError(f"mirrors case: modelfs mount failed: {result.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            unmount(mountpoint)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.stop()
        self.tinyproxy.terminate()
        self.tinyproxy.wait(timeout=10)


def _wait_listening(port: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on {port} within 10 s") from None
            time.sleep(0.05)


def render_mirrors(results: Results, size: int) -> str:
    """The four cold reads: median time and MB/s, and the origin's bytes per model byte."""
    lines = [
        f"mirrors: cold reads of a {size / MB:.0f} MB model, each from a fresh modelfs cache",
        "",
        "| case | median s | MB/s | origin sent (x model) |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        samples = results.get(f"mirrors_{case}", [])
        if not samples:
            continue
        seconds = median(samples, lambda sample: sample.seconds) or 0.0
        origin = median(samples, lambda sample: sample.registry_bytes) or 0.0
        speed = size / MB / seconds if seconds else 0.0
        lines.append(f"| {case} | {seconds:.2f} | {speed:.0f} | {origin / size:.2f} |")
    return "\n".join(lines)

"""The benchmark: modelfs against curl, oras, a trivial FUSE filesystem and the local disk.

``python -m bench.run [--quick] [--runs N]`` (``scripts/bench``) starts its own docker-registry,
generates a Llama-shaped model (sharded safetensors, index, config, tokenizer; 2.2 GB and a
200 MB one), pushes it once, then runs every case N times, dropping the page cache before each,
and prints a markdown table of medians with ratios plus the verdict on each target of issue 4.
Then the cluster case (``bench/cluster.py``): 2, 4 and 8 nodes reading one model together,
with and without peers (``--only cluster`` runs just that one). ``--only memory`` instead
reads a 200 MB, a 2.2 GB and a 6.1 GB model cold, for the mount's peak RSS against model size.
Results also go to ``bench/results/<time>.md`` and ``.json`` (raw samples).

Registry bytes come from the registry's own access log (no proxy in the data path to slow it);
the peak RSS of a mount is its process's VmHWM, read before unmounting, and its CPU time too;
the registry's CPU time is counted over each case (it shares the machine's cores). Needs root
(to drop the page cache and to raise the readahead of the reference FUSE mount).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from bench import model as models
from bench.report import (
    MB,
    Results,
    Sample,
    evaluate,
    evaluate_production,
    held_seconds,
    render_cores,
    render_cpu,
    render_growth,
    render_table,
    render_verdicts,
    summarize_profile,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the registry fixtures of the test suite, reused as is

from mounting import modelfs, mount_pid, unmount  # noqa: E402
from registry_tools import Layer, Nginx, Registry, push_artifact  # noqa: E402

from bench.cluster import NODE_COUNTS, ClusterCase, ClusterError, render_cluster  # noqa: E402
from bench.containerd import ContainerdCase, render_containerd  # noqa: E402
from bench.mirrors import MirrorsCase, render_mirrors  # noqa: E402
from bench.reading import read_all  # noqa: E402
from modelfs.modelpack import (  # noqa: E402
    ANNOTATION_FILEPATH,
    ANNOTATION_TITLE,
    OCI_MANIFEST,
    layer_media_type,
)
from modelfs.service.control import ask  # noqa: E402
from modelfs.sources.stats import MountStats  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
PROFILE_RATE = 200  # py-spy samples per second
_BLOB_LOG_LINE = re.compile(rb'"GET /v2/\S+/blobs/sha256:[0-9a-f]{64} HTTP/[\d.]+" 20[06] (\d+)')
_READY_IN = re.compile(r"ready in ([\d.]+)s")


class BenchError(Exception):
    """A case could not run; the message says which and why."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cold_start() -> None:
    """Drop the page cache, then load the programs the cases run back into it.

    Every case starts with no model byte cached anywhere, but with warm code: interpreter start-up
    from a cold disk (~1 s here) is not what the figures are about.
    """
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    modelfs("--help")
    subprocess.run([sys.executable, "-c", "import bench.tasks, bench.memfs"], check=True, cwd=ROOT)
    subprocess.run(["curl", "--version"], check=True, capture_output=True)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User plus system CPU time of process ``pid`` so far (/proc/PID/stat), or of one of its
    threads."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cores_busy(pid: int, interval: float = 0.2) -> Iterator[list[float]]:
    """The cores process ``pid`` kept busy in each ``interval`` seconds while the block ran (its
    CPU seconds per second, from /proc at 100 ticks a second): the list yielded, filled on exit."""
    series: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        before = (time.monotonic(), cpu_seconds(pid))
        while not stop.wait(interval):
            now = (time.monotonic(), cpu_seconds(pid))
            series.append((now[1] - before[1]) / (now[0] - before[0]))
            before = now

    sampler = threading.Thread(target=sample, name="cores-busy")
    sampler.start()
    try:
        yield series
    finally:
        stop.set()
        sampler.join()


def timed(action: Callable[[], int]) -> tuple[float, int]:
    started = time.monotonic()
    result = action()
    return time.monotonic() - started, result


def disk_bytes(path: Path) -> int:
    """Bytes the block device holding ``path`` has read and written since boot."""
    device = os.stat(path).st_dev
    fields = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat").read_text().split()
    return (int(fields[2]) + int(fields[6])) * 512  # sectors read, sectors written


def pin_to_cores(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` on ``cores`` only (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cores)


def run_task(*arguments: str) -> dict[str, float]:
    """One of ``bench.tasks`` in its own process; its JSON result."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.tasks", *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"bench.tasks {' '.join(arguments)} failed: {tail[0]}")
    parsed: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def bdi_read_ahead(mountpoint: Path) -> Path:
    """The readahead knob of the filesystem mounted at ``mountpoint`` (stat from outside it)."""
    device = os.stat(mountpoint).st_dev
    return Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")


@dataclass(frozen=True)
class RegistryMark:
    log_size: int
    cpu_seconds: float


class RegistryMeter:
    """What the registry did since a mark: blob bytes sent, from its access log (combined format,
    bytes written), and CPU seconds used (it shares the machine's cores with the cases)."""

    def __init__(self, log_path: Path, pid: int) -> None:
        self.log_path = log_path
        self.pid = pid

    def mark(self) -> RegistryMark:
        return RegistryMark(self.log_path.stat().st_size, cpu_seconds(self.pid))

    def blob_bytes_since(self, mark: RegistryMark) -> int:
        # A line is written just after its response ends: wait for the log to settle.
        size = -1
        while size != self.log_path.stat().st_size:
            size = self.log_path.stat().st_size
            time.sleep(0.1)
        with self.log_path.open("rb") as file:
            file.seek(mark.log_size)
            return sum(int(m.group(1)) for m in _BLOB_LOG_LINE.finditer(file.read()))

    def cpu_since(self, mark: RegistryMark) -> float:
        return cpu_seconds(self.pid) - mark.cpu_seconds


def start_registry(root: Path) -> Registry:
    registry = Registry(root)
    config = json.loads(registry.config_path.read_text())
    config["log"]["accesslog"] = {"disabled": False}  # the byte counts of each case
    registry.config_path.write_text(json.dumps(config))
    registry.start()
    return registry


def start_redirecting(root: Path, storage: Path) -> tuple[Registry, Nginx]:
    """The production shape: a registry (distribution's ``redirect`` storage middleware) that
    answers blob GETs with a 307 to nginx (``sendfile on``) serving its storage, as object
    storage or a CDN would. It shares ``storage`` with the direct registry: the same models."""
    nginx = Nginx(root / "nginx", storage)
    registry = Registry(root / "registry", redirect_to=nginx.url)
    config = json.loads(registry.config_path.read_text())
    config["storage"]["filesystem"]["rootdirectory"] = str(storage)
    registry.config_path.write_text(json.dumps(config))
    nginx.start()
    registry.start()
    return registry, nginx


@contextmanager
def in_memory(root: Path) -> Iterator[Path]:
    """A tmpfs of its own at ``root`` (dropping the page cache leaves it in memory)."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)


class StorageMeter:
    """What a redirecting registry and its storage did since a mark: blob bytes nginx sent (its
    access log) and the CPU seconds of both."""

    def __init__(self, registry: Registry, nginx: Nginx) -> None:
        self.registry = registry
        self.nginx = nginx

    def _cpu(self) -> float:
        return cpu_seconds(self.registry.pid) + cpu_seconds(self.nginx.pid)

    def mark(self) -> RegistryMark:
        return RegistryMark(len(self.nginx.served()), self._cpu())

    def blob_bytes_since(self, mark: RegistryMark) -> int:
        served = self.nginx.served()[mark.log_size :]
        return sum(entry.sent for entry in served if entry.path.endswith("/data"))

    def cpu_since(self, mark: RegistryMark) -> float:
        return self._cpu() - mark.cpu_seconds


Meter = RegistryMeter | StorageMeter


@dataclass(frozen=True)
class PushedModel:
    reference: str
    files: list[Path]  # on local disk, in load order
    blob_urls: dict[str, str]  # file name -> its layer blob in the registry

    @property
    def size(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def names(self) -> list[str]:
        return [path.name for path in self.files]

    def on(self, registry: Registry) -> PushedModel:
        """The same model on another registry that serves the same storage."""
        host = self.reference.split("/", 1)[0]
        return dataclasses.replace(
            self,
            reference=self.reference.replace(host, registry.host, 1),
            blob_urls={
                name: url.replace(f"//{host}/", f"//{registry.host}/", 1)
                for name, url in self.blob_urls.items()
            },
        )


def push_model(registry: Registry, repository: str, files: list[Path]) -> PushedModel:
    layers = []
    for path in files:
        kind = "weight" if path.suffix == ".safetensors" else "weight.config"
        annotations = {ANNOTATION_FILEPATH: path.name, ANNOTATION_TITLE: path.name}
        layers.append(Layer(layer_media_type(kind, "raw"), path, annotations))
    push_artifact(registry.host, repository, "v1", layers)
    connection = http.client.HTTPConnection(registry.host, timeout=30)
    try:
        connection.request(
            "GET", f"/v2/{repository}/manifests/v1", headers={"Accept": OCI_MANIFEST}
        )
        manifest = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    blob_urls = {
        layer["annotations"][ANNOTATION_TITLE]: f"{registry.url}/v2/{repository}/blobs/"
        + layer["digest"]
        for layer in manifest["layers"]
    }
    return PushedModel(f"{registry.host}/{repository}:v1", files, blob_urls)


@dataclass
class Mount:
    path: Path
    pid: int
    listed_after: float  # seconds from running ``modelfs mount`` to a full listing
    ready_in: float  # what the mount process reports: its own start to ready
    stats_socket: Path  # where it answers for its counters

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match is None:
            raise BenchError(f"no VmHWM in /proc/{self.pid}/status")
        return int(match.group(1)) * 1024

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def loop_cpu_seconds(self) -> float:
        """The main thread's CPU time: trio's event loop, where the GIL-bound work runs."""
        return cpu_seconds(self.pid, thread=self.pid)

    def counters(self) -> tuple[int, int, int]:
        """From the mount's own counters so far: its reads, those over 10 ms, and the piece
        buffers its pool mapped."""
        stats = MountStats.from_json(trio.run(ask, self.stats_socket, {"command": "stats"}))
        return stats.read_seconds.count, stats.slow_reads(), stats.piece_buffers

    def files(self, names: list[str]) -> list[Path]:
        return [self.path / name for name in names]


def _wait_gone(pid: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} (pid {pid}) still runs 30 s after unmounting")
        time.sleep(0.02)


@contextmanager
def mounted(pushed: PushedModel, mountpoint: Path, cache_dir: Path) -> Iterator[Mount]:
    """``modelfs mount`` as a user runs it; unmounted, and its process gone, on exit."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stats_socket = cache_dir.with_name(cache_dir.name + ".stats.sock")
    result = modelfs(
        "mount",
        pushed.reference,
        str(mountpoint),
        "--cache-dir",
        str(cache_dir),
        "--plain-http",
        "--stats-socket",
        str(stats_socket),
    )
    if result.returncode != 0:
        raise BenchError(f"modelfs mount {pushed.reference} failed: {result.stderr.strip()}")
    try:
        pid = mount_pid(mountpoint)
        listing = os.listdir(mountpoint)
        listed_after = time.monotonic() - started
        if sorted(listing) != sorted(pushed.names()):
            raise BenchError(f"{mountpoint} lists {sorted(listing)}, not the model's files")
        ready = _READY_IN.search(result.stderr)
        ready_in = float(ready.group(1)) if ready else 0.0
        yield Mount(mountpoint, pid, listed_after, ready_in, stats_socket)
    except (OSError, LookupError, BenchError) as error:
        logs = sorted((cache_dir / "logs").glob("*.log"))
        tail = logs[0].read_text(errors="replace").strip().splitlines()[-3:] if logs else []
        raise BenchError(f"{error}; the mount log ends: {' | '.join(tail) or '(empty)'}") from None
    finally:
        unmount(mountpoint)
    _wait_gone(pid, "the mount process")


class Bench:
    def __init__(
        self,
        work: Path,
        large: PushedModel,
        small: PushedModel,
        registry: RegistryMeter,
        redirected: tuple[PushedModel, StorageMeter] | None = None,
    ) -> None:
        """``redirected``: the large model on the redirecting registry, and its meter."""
        self.work = work
        self.large = large
        self.small = small
        self.registry = registry
        self.redirected = redirected
        self.results: Results = {}
        self.read_ahead_kb: str | None = None  # modelfs's, copied to the reference FUSE mount
        self.profile_dir: Path | None = None  # set during the profile and GIL passes
        self.spy_options: list[str] = []  # py-spy's, in those passes

    def record(self, key: str, sample: Sample) -> None:
        self.results.setdefault(key, []).append(sample)
        rate = f", {sample.payload / sample.seconds / MB:.0f} MB/s" if sample.payload else ""
        log(f"  {key}: {sample.seconds:.2f} s{rate}")

    def fresh_cache(self, name: str) -> Path:
        path = self.work / "cache" / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def run_once(self) -> None:
        downloads = self.work / "downloads"
        self.curl()
        self.download_then_load(downloads)
        self.disk_read(downloads)
        self.cache_fill()
        self.disk_both()
        self.oras()
        self.first_tensor()
        self.cold_and_warm_read()
        self.cold_load()
        self.small_model()
        self.memfs_read()
        self.memfs_read("memfs_disk_read", from_disk=True)
        if self.redirected is not None:
            self.redirected_cases(*self.redirected)
        self.skopeo(downloads)

    def redirected_cases(self, pushed: PushedModel, meter: StorageMeter) -> None:
        """The production path: blobs redirected to storage, curl -L against modelfs."""
        outputs = ["/dev/null"] * len(pushed.blob_urls)
        self.record("curl_redirect", self._curl(outputs, pushed, meter))
        cache = self.fresh_cache("redirect")
        self.mounted_read("cold_read_redirect", pushed, cache, meter)
        shutil.rmtree(cache)
        # The same read with the mount held to one core: what a second core gives it.
        cache = self.fresh_cache("redirect-one-core")
        self.mounted_read("cold_read_redirect_one_core", pushed, cache, meter, cores={0})
        shutil.rmtree(cache)
        self.cold_load("cold_load_redirect", pushed, meter)

    def skopeo(self, target: Path) -> None:
        """``skopeo copy docker://... dir:`` (containers/image: what CRI-O pulls with; it checks
        every blob's digest) from the direct registry, then a full read and a load of what it
        wrote (its pages still cached, as after a download)."""
        shutil.rmtree(target, ignore_errors=True)
        cold_start()
        mark = self.registry.mark()
        started = time.monotonic()
        copy = subprocess.run(
            [
                *("skopeo", "copy", "--src-tls-verify=false"),
                *(f"docker://{self.large.reference}", f"dir:{target}"),
            ],
            capture_output=True,
            text=True,
        )
        copied = time.monotonic() - started
        if copy.returncode != 0:
            raise BenchError(f"skopeo copy failed: {copy.stderr.strip()[-300:]}")
        fetched, registry_cpu = self.registry.blob_bytes_since(mark), self.registry.cpu_since(mark)
        # skopeo names blobs by digest: the model's files are links to them.
        model = target / "model"
        model.mkdir()
        for name, url in self.large.blob_urls.items():
            (model / name).symlink_to(target / url.rsplit(":", 1)[1])
        elapsed, count = timed(lambda: read_all([model / name for name in self.large.names()]))
        if count != self.large.size:
            raise BenchError(f"skopeo copy wrote {count} bytes of a {self.large.size}-byte model")
        parts = {"copy": copied, "read": elapsed}
        self.record(
            "skopeo_read",
            Sample(copied + elapsed, count, fetched, parts=parts, registry_cpu=registry_cpu),
        )
        load = run_task("load-all", str(model))
        parts = {"copy": copied, "load": load["seconds"]}
        self.record(
            "skopeo_load",
            Sample(
                copied + load["seconds"], count, fetched, parts=parts, registry_cpu=registry_cpu
            ),
        )
        shutil.rmtree(target)

    def _curl(
        self, outputs: list[str], pushed: PushedModel | None = None, meter: Meter | None = None
    ) -> Sample:
        """One curl fetching every layer blob in turn over one connection, into ``outputs``
        (following redirects: ``-L``)."""
        pushed, meter = pushed or self.large, meter or self.registry
        command = ["curl", "--silent", "--show-error", "--fail", "--location"]
        for output, url in zip(outputs, pushed.blob_urls.values(), strict=True):
            command += ["-o", output, url]
        cold_start()
        mark = meter.mark()
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            raise BenchError(f"curl failed: {result.stderr.strip()}")
        fetched = meter.blob_bytes_since(mark)
        registry_cpu = meter.cpu_since(mark)
        return Sample(elapsed, pushed.size, fetched, registry_cpu=registry_cpu)

    def curl(self) -> None:
        """The wire limit: nothing is written anywhere."""
        self.record("curl", self._curl(["/dev/null"] * len(self.large.blob_urls)))

    def download_then_load(self, downloads: Path) -> None:
        """Download to local disk, then load from there (its pages still cached, as in life)."""
        shutil.rmtree(downloads, ignore_errors=True)
        downloads.mkdir(parents=True)
        download = self._curl([str(downloads / name) for name in self.large.blob_urls])
        load = run_task("load-all", str(downloads))
        parts = {"download": download.seconds, "load": load["seconds"]}
        total = download.seconds + load["seconds"]
        self.record(
            "download_load",
            dataclasses.replace(download, seconds=total, parts=parts),
        )

    def disk_read(self, downloads: Path) -> None:
        cold_start()
        elapsed, count = timed(lambda: read_all([downloads / n for n in self.large.names()]))
        self.record("disk_read", Sample(elapsed, count))

    def cache_fill(self) -> None:
        """Write the model's size into a new file, page cache only (no fsync): what one of the
        page-cache fills of a cold read costs on this machine at this hour (a cold read fills
        one, the FUSE file's: the cache writes its pieces with direct I/O; download-then-load
        one)."""
        target = self.work / "fill"
        chunk = os.urandom(16 << 20)
        cold_start()

        def fill() -> int:
            written = 0
            with target.open("wb", buffering=0) as file:
                while written < self.large.size:
                    written += file.write(chunk[: self.large.size - written])
            return written

        elapsed, count = timed(fill)
        target.unlink()
        self.record("cache_fill", Sample(elapsed, count))

    def disk_both(self) -> None:
        """The disk reading the model's files and writing their size to a new file at once,
        direct I/O in 4 MiB blocks, one thread each: what a cold read asks of it here, where the
        registry's storage and the cache share it."""
        target = self.work / "both"
        size = self.large.size
        cold_start()
        before = disk_bytes(self.work)

        def move(call: Callable[[int, list[mmap.mmap], int], int], fd: int, length: int) -> None:
            block, offset = mmap.mmap(-1, 4 << 20), 0
            while offset < length and call(fd, [block], offset) > 0:
                offset += len(block)

        readers = [os.open(path, os.O_RDONLY | os.O_DIRECT) for path in self.large.files]
        writer = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(2) as pool:
                done = [pool.submit(move, os.pwritev, writer, size)]
                done += [
                    pool.submit(move, os.preadv, fd, path.stat().st_size)
                    for fd, path in zip(readers, self.large.files, strict=True)
                ]
                for future in done:
                    future.result()
            elapsed = time.monotonic() - started
        finally:
            for fd in (*readers, writer):
                os.close(fd)
            target.unlink()
        self.record("disk_both", Sample(elapsed, disk_bytes=disk_bytes(self.work) - before))

    def oras(self) -> None:
        target = self.work / "oras"
        shutil.rmtree(target, ignore_errors=True)
        cold_start()
        mark = self.registry.mark()
        pulled = run_task("oras-pull", self.large.reference, str(target))
        fetched = self.registry.blob_bytes_since(mark)
        registry_cpu = self.registry.cpu_since(mark)
        sample = Sample(pulled["seconds"], int(pulled["bytes"]), fetched, registry_cpu=registry_cpu)
        self.record("oras", sample)
        shutil.rmtree(target)

    def first_tensor(self) -> None:
        cold_start()
        mark = self.registry.mark()
        with mounted(self.large, self.work / "mnt" / "modelfs", self.fresh_cache("ttft")) as mount:
            self.read_ahead_kb = bdi_read_ahead(mount.path).read_text().strip()
            loaded = run_task("first-tensor", str(mount.path))
            rss, mount_cpu = mount.peak_rss(), mount.cpu_seconds()
            counted = mount.counters()
        fetched, registry_cpu = self.registry.blob_bytes_since(mark), self.registry.cpu_since(mark)
        listing = Sample(mount.listed_after, parts={"mount process ready": mount.ready_in})
        self.record("listing_large", listing)
        tensor = int(loaded["bytes"])
        sample = Sample(
            loaded["seconds"], tensor, fetched, rss, {}, mount_cpu, registry_cpu, *counted
        )
        self.record("first_tensor", sample)

    @contextmanager
    def profiled(self, key: str) -> Iterator[Callable[[int], None]]:
        """In the profile pass, ``attach(pid)`` starts py-spy on a mount process; it stops when
        that process exits, which this waits for on the way out."""
        spies: list[subprocess.Popen[bytes]] = []

        def attach(pid: int) -> None:
            if self.profile_dir is None:
                return
            command = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid)]
            command += ["--rate", str(PROFILE_RATE), "--format", "raw", "--nonblocking"]
            command += self.spy_options
            command += ["--output", str(self.profile_dir / f"{key}.txt")]
            spies.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )

        try:
            yield attach
        finally:
            for spy in spies:
                spy.wait(timeout=60)

    def mounted_read(
        self,
        key: str,
        pushed: PushedModel,
        cache: Path,
        meter: Meter | None = None,
        cores: set[int] | None = None,
    ) -> Mount:
        """A full read of ``pushed`` through a fresh mount on ``cache``, after a cold start;
        ``cores``: the only cores the mount process may run on."""
        meter = meter or self.registry
        cold_start()
        mark, disk_before = meter.mark(), disk_bytes(self.work)
        with (
            self.profiled(key) as attach,
            mounted(pushed, self.work / "mnt" / "modelfs", cache) as mount,
        ):
            attach(mount.pid)
            if cores is not None:
                pin_to_cores(mount.pid, cores)
            with cores_busy(mount.pid) as busy:
                elapsed, count = timed(lambda: read_all(mount.files(pushed.names())))
            rss, mount_cpu, loop_cpu = (
                mount.peak_rss(),
                mount.cpu_seconds(),
                mount.loop_cpu_seconds(),
            )
            counted = mount.counters()
            disk = disk_bytes(self.work) - disk_before
        fetched = meter.blob_bytes_since(mark)
        registry_cpu = meter.cpu_since(mark)
        parts = {"mount": mount.listed_after}
        sample = Sample(
            elapsed,
            count,
            fetched,
            rss,
            parts,
            mount_cpu,
            registry_cpu,
            *counted,
            loop_cpu,
            disk,
            tuple(busy),
        )
        self.record(key, sample)
        if count != pushed.size:
            raise BenchError(f"{key}: read {count} bytes of a {pushed.size}-byte model")
        return mount

    def cold_and_warm_read(self) -> None:
        cache = self.fresh_cache("read")
        self.mounted_read("cold_read", self.large, cache)
        self.mounted_read("warm_read", self.large, cache)
        shutil.rmtree(cache)

    def cold_load(
        self, key: str = "cold_load", pushed: PushedModel | None = None, meter: Meter | None = None
    ) -> None:
        pushed, meter = pushed or self.large, meter or self.registry
        cold_start()
        mark = meter.mark()
        with (
            self.profiled(key) as attach,
            mounted(pushed, self.work / "mnt" / "modelfs", self.fresh_cache("load")) as mount,
        ):
            attach(mount.pid)
            load = run_task("load-all", str(mount.path))
            rss, mount_cpu = mount.peak_rss(), mount.cpu_seconds()
            counted = mount.counters()
        fetched = meter.blob_bytes_since(mark)
        registry_cpu = meter.cpu_since(mark)
        parts = {"mount": mount.listed_after, "load": load["seconds"]}
        total = mount.listed_after + load["seconds"]
        sample = Sample(total, pushed.size, fetched, rss, parts, mount_cpu, registry_cpu, *counted)
        self.record(key, sample)
        shutil.rmtree(self.work / "cache" / "load")

    def small_model(self) -> None:
        cache = self.fresh_cache("small")
        mount = self.mounted_read("cold_read_small", self.small, cache)
        listing = Sample(mount.listed_after, parts={"mount process ready": mount.ready_in})
        self.record("listing_small", listing)
        shutil.rmtree(cache)

    def memfs_read(self, key: str = "memfs_read", from_disk: bool = False) -> None:
        """A full read through the trivial filesystem: from memory (the FUSE ceiling), or
        ``from_disk`` (a FUSE filesystem at its simplest reading its bytes from this disk, as a
        warm read's come from the cache's file once the page cache is dropped)."""
        mountpoint = self.work / "mnt" / "memfs"
        with self._memfs_mounted(mountpoint, from_disk):
            cold_start()
            paths = [mountpoint / name for name in self.large.names()]
            elapsed, count = timed(lambda: read_all(paths))
        self.record(key, Sample(elapsed, count))

    @contextmanager
    def _memfs_mounted(self, mountpoint: Path, from_disk: bool) -> Iterator[None]:
        """The trivial filesystem for its own case only: left running, its copy of the model
        (2.2 GB of memory) slowed the next rounds' modelfs cases by ~1.2-1.5 x on this VM."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        source = self.large.files[0].parent
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.memfs"]
            + (["--from-disk"] if from_disk else [])
            + [str(source), str(mountpoint)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                process.wait()
                raise BenchError(f"bench.memfs exited with {process.returncode} before mounting")
            if self.read_ahead_kb is not None:
                bdi_read_ahead(mountpoint).write_text(self.read_ahead_kb)
            yield
        finally:
            if process.poll() is None:
                unmount(mountpoint)
                process.wait(timeout=30)

    @contextmanager
    def results_apart(self) -> Iterator[Results]:
        """The block's samples go to the results yielded, not to the run's (the table's)."""
        kept, self.results = self.results, {}
        try:
            yield self.results
        finally:
            self.results = kept

    @contextmanager
    def under_py_spy(self, directory: Path, options: list[str]) -> Iterator[Results]:
        """The block's mounts run under py-spy (its raw stacks in ``directory``), their samples
        apart from the run's."""
        directory.mkdir(parents=True, exist_ok=True)
        self.profile_dir, self.spy_options = directory, options
        try:
            with self.results_apart() as measured:
                yield measured
        finally:
            self.profile_dir, self.spy_options = None, []

    def gil_pass(self, directory: Path) -> dict[str, tuple[float, Sample]]:
        """A cold and a warm read once more with py-spy sampling only the thread that holds the
        GIL (``record --gil``), not timed: per case, the seconds the GIL was held (samples over
        the rate) and the case's sample (the mount's CPU time)."""
        with self.under_py_spy(directory, ["--gil"]) as measured:
            self.cold_and_warm_read()
        return {
            key: (held_seconds((directory / f"{key}.txt").read_text(), PROFILE_RATE), samples[0])
            for key, samples in measured.items()
        }

    def profile_pass(self, directory: Path) -> dict[str, str]:
        """The mount process's cases once more under py-spy (not timed); raw stacks per case."""
        with self.under_py_spy(directory, []) as measured:
            self.cold_and_warm_read()
            self.cold_load()
        seconds = {key: samples[0].seconds for key, samples in measured.items()}
        return {
            key: summarize_profile((directory / f"{key}.txt").read_text(), PROFILE_RATE, elapsed)
            for key, elapsed in seconds.items()
        }


def memory_case(
    registry: Registry, meter: RegistryMeter, work: Path, shapes: list[models.Shape], runs: int
) -> tuple[Results, list[tuple[str, int]]]:
    """Cold full reads of each model in turn, ``runs`` times, for the mount's peak RSS against
    model size; the results and (results key, model bytes), smallest model first."""
    pushed: list[PushedModel] = []
    for number, shape in enumerate(shapes):
        files = models.generate(shape, work / f"model-memory-{number}")
        pushed.append(push_model(registry, f"memory{number}", files))
    log("bench: models of " + ", ".join(f"{model.size / MB:.0f}" for model in pushed) + " MB")
    # Only ``mounted_read`` is used: the largest and the smallest model fill its two slots.
    bench = Bench(work, large=pushed[-1], small=pushed[0], registry=meter)
    for run in range(1, runs + 1):
        log(f"bench: memory run {run} of {runs}")
        for model in pushed:
            bench.mounted_read(memory_key(model), model, bench.fresh_cache("memory"))
    return bench.results, [(memory_key(model), model.size) for model in pushed]


def cores_case(bench: Bench, storage: Path, work: Path, runs: int) -> Results:
    """The redirected cold read with the registry's storage and the mount's cache in memory, on
    both cores and on one, alternated: what the mount's own work does with a second core when
    neither the disk nor the network bounds it (the reader and nginx still share the cores).
    Also the warm read from that cache against the trivial memory filesystem, alternated.

    A copy of ``storage`` on a tmpfs is served by a redirecting registry and nginx of its own,
    as a registry on another machine would be; the first read is not counted (it takes the
    tmpfs's pages from the host, up to 2 x the time on this VM)."""
    with in_memory(work / "in-memory") as root:
        shutil.copytree(storage, root / "storage")
        registry, nginx = start_redirecting(root / "redirecting", root / "storage")
        try:
            pushed, meter = bench.large.on(registry), StorageMeter(registry, nginx)
            cache = root / "cache"
            with bench.results_apart() as measured:
                for run in range(runs + 1):
                    log(f"bench: cores run {run} of {runs}" + ("" if run else " (not counted)"))
                    bench.mounted_read("cold_read_in_memory", pushed, cache, meter)
                    bench.mounted_read("warm_read_in_memory", pushed, cache, meter)
                    shutil.rmtree(cache)
                    bench.memfs_read("memfs_read_in_memory")
                    bench.mounted_read("cold_read_in_memory_one_core", pushed, cache, meter, {0})
                    shutil.rmtree(cache)
                    if not run:
                        measured.clear()
        finally:
            nginx.stop()
            registry.stop()
    return measured


def memory_key(model: PushedModel) -> str:
    return f"memory_{model.size / MB:.0f}MB"


def containerd_case(registry: Registry, work: Path, pushed: PushedModel, runs: int) -> Results:
    log(f"bench: containerd case, a {pushed.size / MB:.0f} MB model")
    results: Results = {}
    case = ContainerdCase(work, registry, pushed.reference, pushed.files)
    try:
        for run in range(1, runs + 1):
            log(f"bench: containerd run {run} of {runs}")
            case.run_once(
                cold_start, lambda key, sample: results.setdefault(key, []).append(sample)
            )
    finally:
        case.close()
    return results


def mirrors_case(
    registry: Registry, meter: RegistryMeter, work: Path, pushed: PushedModel, runs: int
) -> Results:
    log(f"bench: mirrors case, a {pushed.size / MB:.0f} MB model")
    results: Results = {}

    def record(key: str, sample: Sample) -> None:
        results.setdefault(key, []).append(sample)
        log(f"  {key}: {sample.seconds:.2f} s, origin {sample.registry_bytes} bytes")

    case = MirrorsCase(work, registry, pushed.reference, pushed.names())
    try:
        for run in range(1, runs + 1):
            log(f"bench: mirrors run {run} of {runs}")
            case.run_once(run, cold_start, meter, record)
    finally:
        case.close()
    return results


def cluster_case(cluster: ClusterCase, runs: int) -> Results:
    log(f"bench: cluster case, a {cluster.model_size >> 20} MiB model, nodes {cluster.node_counts}")
    results: Results = {}

    def record(key: str, sample: Sample) -> None:
        results.setdefault(key, []).append(sample)
        log(f"  {key}: {sample.seconds:.2f} s, registry {sample.registry_bytes} bytes")

    for run in range(1, runs + 1):
        log(f"bench: cluster run {run} of {runs}")
        cluster.run_once(cold_start, record)
    return results


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a ~64 MiB and a ~14 MB model, one run (smoke test)"
    )
    parser.add_argument("--runs", type=int, help="runs of every case (default 3; 1 with --quick)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then run the cold read, warm read and cold load once more under py-spy, and "
        "summarize where the mount process spends its time",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("/var/tmp"), help="where the scratch directory goes"
    )
    parser.add_argument(
        "--only",
        choices=["cores", "cluster", "memory", "containerd", "mirrors"],
        help="run only this case (cores: the redirected cold read with the storage and the "
        "cache in memory, on both cores and one; cluster: N nodes with peers; memory: cold "
        "reads of three model sizes, peak RSS against size; containerd: pull to first tensor "
        "and whole model in a container, overlayfs against the modelfs snapshotter; mirrors: "
        "cold reads direct, through a pull-through cache named in a hosts.toml, through tinyproxy)",
    )
    parser.add_argument(
        "--cluster-size",
        type=int,
        help="MiB of the cluster case's model (default 256; 32 with --quick)",
    )
    parser.add_argument(
        "--cluster-nodes",
        default=",".join(map(str, NODE_COUNTS)),
        help="node counts of the cluster case (default %(default)s)",
    )
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    runs = arguments.runs or (1 if arguments.quick else 3)
    if os.geteuid() != 0:
        sys.exit("bench: needs root to drop the page cache between cases; run it as root")
    large_shape, small_shape = (
        (models.QUICK_LARGE, models.QUICK_SMALL)
        if arguments.quick
        else (models.LARGE, models.SMALL)
    )
    cluster_size = (arguments.cluster_size or (32 if arguments.quick else 256)) << 20
    node_counts = tuple(int(count) for count in arguments.cluster_nodes.split(","))
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-", dir=arguments.work_dir))
    registry = start_registry(work / "registry")
    meter = RegistryMeter(registry.log_path, registry.pid)
    redirecting, nginx = start_redirecting(work / "redirecting", registry.storage)
    bench: Bench | None = None
    try:
        sections: list[str] = []
        load_before, started = os.getloadavg()[0], time.monotonic()
        if arguments.only is None:
            log(f"bench: generating and pushing the models in {work}")
            large = push_model(
                registry, "large", models.generate(large_shape, work / "model-large")
            )
            small = push_model(
                registry, "small", models.generate(small_shape, work / "model-small")
            )
            log(
                f"bench: large model {large.size / MB:.0f} MB, small model {small.size / MB:.0f} MB"
            )
            redirected = (large.on(redirecting), StorageMeter(redirecting, nginx))
            bench = Bench(work, large, small, meter, redirected)
            for run in range(1, runs + 1):
                log(f"bench: run {run} of {runs}")
                bench.run_once()
            log("bench: GIL pass")
            gil = bench.gil_pass(work / "gil")
            sections += [
                f"modelfs benchmark: large model {large.size / MB:.0f} MB "
                f"({len(large.files)} files), small model {small.size / MB:.0f} MB; "
                f"medians of {runs} run(s); readahead {bench.read_ahead_kb} KiB on both FUSE "
                f"mounts; {os.cpu_count()} CPUs, load average {load_before:.1f} before and "
                f"{os.getloadavg()[0]:.1f} after; the runs took "
                f"{(time.monotonic() - started) / 60:.1f} min",
                render_table(bench.results),
                render_verdicts(evaluate(bench.results, large.size)),
                "issue 20, the production path:\n"
                + render_verdicts(evaluate_production(bench.results)),
                render_cpu(bench.results, gil, large.size, PROFILE_RATE),
            ]
            log("\n\n".join(sections))  # now: a later case that fails must not take it along
        extra_results: Results = {}  # the other cases' samples, for the raw file
        if arguments.only == "cores":
            large = push_model(registry, "large", models.generate(large_shape, work / "model"))
            bench = Bench(work, large, large, meter)
        if bench is not None and arguments.only in (None, "cores"):
            cores_results = cores_case(bench, registry.storage, work, runs)
            extra_results.update(cores_results)
            sections.append(render_cores(cores_results, runs))
        if arguments.only == "memory":
            shapes = (
                [models.QUICK_SMALL, models.QUICK_LARGE, models.SMALL]
                if arguments.quick
                else [models.SMALL, models.LARGE, models.LARGER]
            )
            memory_results, sized = memory_case(registry, meter, work, shapes, runs)
            extra_results.update(memory_results)
            sections += [
                f"memory: cold full reads of three model sizes in turn; medians of {runs} "
                f"run(s); {os.cpu_count()} CPUs",
                render_growth(memory_results, sized),
            ]
        if arguments.only in (None, "cluster"):
            cluster_results = cluster_case(
                ClusterCase(registry.host, meter, work, cluster_size, node_counts), runs
            )
            extra_results.update(cluster_results)
            sections += [
                f"cluster: N nodes reading one {cluster_size >> 20} MiB model together (separate "
                f"mount processes, each its own cache and peer port, one scheduler); medians of "
                f"{runs} run(s); {os.cpu_count()} CPUs",
                render_cluster(cluster_results, cluster_size),
            ]
        if arguments.only in (None, "containerd"):
            files = models.generate(large_shape, work / "model-containerd")
            pushed = push_model(registry, "containerd", files)
            containerd_results = containerd_case(registry, work, pushed, runs)
            extra_results.update(containerd_results)
            sections.append(render_containerd(containerd_results, pushed.size))
        if arguments.only in (None, "mirrors"):
            files = models.generate(small_shape, work / "model-mirrors")
            pushed = push_model(registry, "mirrors", files)
            mirrors_results = mirrors_case(registry, meter, work, pushed, runs)
            extra_results.update(mirrors_results)
            sections.append(render_mirrors(mirrors_results, pushed.size))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if arguments.profile and bench is not None:
            log("bench: profile pass")
            profiles = bench.profile_pass(RESULTS_DIR / f"{stamp}-profiles")
            sections += [f"py-spy, mount process, {key}:\n{text}" for key, text in profiles.items()]
        report = "\n\n".join(sections)
        print(report)
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / f"{stamp}.md").write_text(report + "\n")
        all_results = {**(bench.results if bench is not None else {}), **extra_results}
        raw = {
            key: [dataclasses.asdict(s) for s in samples] for key, samples in all_results.items()
        }
        (RESULTS_DIR / f"{stamp}.json").write_text(json.dumps(raw, indent=1))
    except (BenchError, ClusterError) as error:
        sys.exit(f"bench: {error}")
    finally:
        redirecting.stop()
        nginx.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

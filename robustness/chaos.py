"""``scripts/chaos``: readers that compare every byte they read from real mounts against the
source, while faults are injected at random moments (seeded, printed). Loopback only; bounded
in time; everything it started is stopped, and what it could not stop is counted as leaked.

Set-up: a real docker-registry behind the fault-injecting proxy of tests/registry_tools.py,
which redirects every blob GET to a second origin (as a registry on S3 does); a model of raw
layers (with a piece index) and one tar+gzip layer fetched whole on first read; Redis and a
``modelfs scheduler`` on it; ``MOUNTS`` ``modelfs mount`` processes of the model that are each
other's peers (the first with its cache on a small tmpfs); and a ``modelfs daemon`` with one
mount of the same model. Every cache is smaller than the model.

Faults: SIGKILL of a mount process (a peer; then umount and mount again), of the daemon, the
scheduler and Redis (each started again after a while); the registry stopped and started, or
frozen (SIGSTOP) for a while; its answers slowed to a trickle, 500 or 429, bodies cut mid-way,
bytes flipped; every redirect given so far expired (its target answers 403); the tmpfs cache
filled up for a while; a cache's LMDB index or piece file damaged on disk between two mounts
(a mount that then refuses the cache and says to remove it has it removed). ``--only KIND``
injects one kind of fault alone.
"""

from __future__ import annotations

import argparse
import errno
import gzip
import io
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mounting import MODELFS, is_mounted, mount_pid
from registry_tools import Layer, Proxy, Registry, free_port, push_artifact

from modelfs.cache import PieceCache
from modelfs.cache.store import PIECES_FILE
from modelfs.errors import CacheError
from modelfs.modelpack import ANNOTATION_FILEPATH, ANNOTATION_METADATA, layer_media_type
from modelfs.sizes import parse_size
from modelfs.sources.registry import DEFAULT_READ_TIMEOUT

MOUNTS = 2
READERS = 4
READ_SIZE = 256 << 10
READ_TIMEOUT = 5.0  # --read-timeout of the mounts
# docs/limits.md: a read waiting for the registry fails within --read-timeout per piece it
# waits for; a read of READ_SIZE spans at most two pieces, and the kernel may split it in two.
READ_BOUND = 2 * READ_TIMEOUT + 2.0
DAEMON_READ_BOUND = 2 * DEFAULT_READ_TIMEOUT + 2.0  # the daemon's mount keeps the default
TMPFS_SIZE = 64 << 20
CACHE_SIZE = "16M"  # under the model's 38 MiB: pieces are evicted and fetched again


@dataclass
class Figures:
    faults: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    bytes_read: int = 0
    wrong_bytes: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    # Failed reads by the fault last injected when they failed, and the mount they were on.
    failed_during: Counter[str] = field(default_factory=Counter)
    longest_wait: float = 0.0
    longest_failed_wait: float = 0.0
    over_bound: int = 0  # reads that waited past their mount's bound
    remounts: int = 0
    # ``modelfs mount`` refused (the registry down, say), tried again: how often, and why.
    mount_refusals: Counter[str] = field(default_factory=Counter)
    registry_bytes: int = 0  # blob bytes the registry sent through the proxy
    # Caches whose size counted against their limit is not what their pieces add up to, once
    # every process stopped (a mount killed while writing must leave nothing counted).
    miscounted_caches: list[str] = field(default_factory=list)
    caches_removed: int = 0  # a mount refused a damaged cache and said to remove it
    lock: threading.Lock = field(default_factory=threading.Lock)


def model_files(rng: random.Random) -> dict[str, bytes]:
    return {
        # Random bytes: named so that no scan applies (a .safetensors or .bin of random bytes
        # is refused by the mount's scan, which is not what this run is about).
        "weights-00001.raw": rng.randbytes(24 << 20),
        "weights-00002.raw": rng.randbytes(12 << 20),
        "config.json": rng.randbytes(3000),
        "tokenizer.model": rng.randbytes(2 << 20),  # in the tar+gzip layer
    }


def gzip_layer(name: str, data: bytes) -> Layer:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(data))
    metadata = f'{{"name": "{name}", "mode": 420, "size": {len(data)}, "typeflag": 48}}'
    return Layer(
        layer_media_type("weight", "tar+gzip"),
        gzip.compress(raw.getvalue(), compresslevel=1),
        {ANNOTATION_FILEPATH: name, ANNOTATION_METADATA: metadata},
    )


class Service:
    """A process the run starts, SIGKILLs and starts again: Redis, the scheduler, the daemon."""

    def __init__(self, argv: list[str], ready: Callable[[], bool], log: Path) -> None:
        self.argv = argv
        self.ready = ready
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 60
        while not self.ready():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[:3]} did not start: see {self.log}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _answers(port: int, probe: bytes = b"", reply: bytes = b"") -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if probe:
                sock.sendall(probe)
                return sock.recv(16).startswith(reply)
            return True
    except OSError:
        return False


# Every kind of fault, by the name of the method that injects it.
FAULTS = (
    "kill_mount", "registry_restart", "registry_freeze", "trickle", "answer_500", "answer_429",
    "cut_bodies", "flip_bytes", "fill_cache", "damage_cache", "kill_daemon", "kill_scheduler",
    "kill_redis", "expire_redirects",
)  # fmt: skip


class Chaos:
    def __init__(self, root: Path, seed: int, seconds: float, only: str | None = None) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.seconds = seconds
        self.only = only  # the one kind of fault injected, else every kind
        self.figures = Figures()
        self.stop = threading.Event()
        self.current = "none yet"  # the fault last injected
        self.registry = Registry(root / "registry")
        self.proxy: Proxy | None = None
        self.files: dict[str, bytes] = {}
        self.reference = ""
        # The ``modelfs mount`` processes', then the daemon's mount (the last).
        self.mountpoints = [root / f"mnt{n}" for n in range(MOUNTS + 1)]
        self.caches = [root / f"cache{n}" for n in range(MOUNTS + 1)]
        self.peer_ports = [free_port() for _ in range(MOUNTS)]
        self.tmpfs = root / "tmpfs"
        # Set while a mount is being replaced: readers leave it alone (its directory is empty).
        self.replacing = [threading.Event() for _ in range(MOUNTS + 1)]
        self.secret = root / "cluster-secret"
        redis_port, scheduler_port = free_port(), free_port()
        (root / "redis").mkdir()
        self.redis = Service(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root / "redis")],
            lambda: _answers(redis_port, b"PING\r\n", b"+PONG"),
            root / "redis.log",
        )  # fmt: skip
        self.scheduler_url = f"http://127.0.0.1:{scheduler_port}"
        self.scheduler = Service(
            [*MODELFS, "scheduler", "--listen", f"127.0.0.1:{scheduler_port}",
             "--cluster-secret-file", str(self.secret),
             "--redis", f"redis://127.0.0.1:{redis_port}"],
            lambda: _answers(scheduler_port),
            root / "scheduler.log",
        )  # fmt: skip
        self.config = root / "daemon.toml"
        self.control_socket = root / "daemon" / "control.sock"
        self.daemon = Service(
            [*MODELFS, "daemon", "--config", str(self.config)],
            lambda: is_mounted(self.mountpoints[MOUNTS]),
            root / "daemon.log",
        )

    # -- set-up and tear-down ----------------------------------------------------------------

    def set_up(self) -> None:
        self.tmpfs.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(self.tmpfs)],
            check=True,
        )
        self.caches[0] = self.tmpfs / "cache"
        self.registry.start()
        self.proxy = Proxy(self.registry)
        self.proxy.redirect = True
        for server in self.proxy._servers:  # a connection the faults reset is no news here
            server.handle_error = lambda request, address: None  # type: ignore[method-assign, assignment]
        self.files = model_files(self.rng)
        raw = [
            Layer(layer_media_type("weight", "raw"), data, {ANNOTATION_FILEPATH: name})
            for name, data in self.files.items()
            if name != "tokenizer.model"
        ]
        repository = f"chaos/{uuid.uuid4().hex[:8]}"
        layers = [*raw, gzip_layer("tokenizer.model", self.files["tokenizer.model"])]
        push_artifact(self.registry.host, repository, "v1", layers)
        self.reference = f"{self.proxy.host}/{repository}:v1"
        self.secret.write_text(os.urandom(32).hex())
        self.redis.start()
        self.scheduler.start()
        for number in range(MOUNTS):
            self.mount(number)
        self.mountpoints[MOUNTS].mkdir()
        self.config.write_text(
            f'control_socket = "{self.control_socket}"\n'
            f'[cache]\ndir = "{self.caches[MOUNTS]}"\nsize = "{CACHE_SIZE}"\n'
            f'[registries."{self.proxy.host}"]\nplain_http = true\n'
            f'[[mounts]]\nref = "{self.reference}"\npath = "{self.mountpoints[MOUNTS]}"\n'
        )
        self.daemon.start()

    def mount(self, number: int) -> None:
        mountpoint = self.mountpoints[number]
        mountpoint.mkdir(exist_ok=True)
        argv = [*MODELFS, "mount", self.reference, str(mountpoint), "--plain-http", "--no-daemon",
                "--cache-dir", str(self.caches[number]), "--cache-size", CACHE_SIZE,
                "--read-timeout", str(READ_TIMEOUT), "--timeout", "3",
                "--scheduler", self.scheduler_url, "--cluster-secret-file", str(self.secret),
                "--peer-listen", f"127.0.0.1:{self.peer_ports[number]}"]  # fmt: skip
        # The registry may be down or failing right now: a mount is retried until it works.
        deadline = time.monotonic() + 120
        refusals: list[str] = []
        while True:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=180)
            if result.returncode == 0:
                return
            refusals.append(_refusal(result.stderr))
            self.figures.mount_refusals[refusals[-1]] += 1
            if "remove the cache" in result.stderr:  # as an operator would, told so
                shutil.rmtree(self.caches[number])
                self.figures.caches_removed += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot mount {mountpoint}, refused: {Counter(refusals)}")
            time.sleep(1)

    def umount(self, number: int) -> None:
        """Unmount, waiting out the reads in flight: a mount with a file open is busy and
        refuses, as any filesystem does (each read is bounded)."""
        deadline = time.monotonic() + 2 * READ_BOUND
        argv = [*MODELFS, "umount", str(self.mountpoints[number])]
        while subprocess.run(argv, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot unmount {self.mountpoints[number]}: still busy")
            time.sleep(0.2)

    def tear_down(self) -> tuple[int, int]:
        """Unmount, stop everything; the mounts and processes that outlived an orderly stop."""
        for number in range(MOUNTS):
            pid = self._pid(number)
            self.umount(number)
            if pid is not None:
                _wait_gone(pid, 15)
        self.daemon.stop()  # a plain SIGTERM: it unmounts its mounts
        self.scheduler.stop()
        self.redis.stop()
        if self.proxy is not None:
            self.figures.registry_bytes = self.proxy.blob_bytes
            self.proxy.close()
        self.registry.stop()
        leaked_mounts = [path for path in self.mountpoints if is_mounted(path)]
        leaked_processes = _processes_under(self.root)
        for path in leaked_mounts:
            print(f"leaked: a mount on {path}")
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
        for pid in leaked_processes:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            print(f"leaked: process {pid}: {argv.decode(errors='replace')[:300]}")
            os.kill(pid, signal.SIGKILL)
        self.audit_caches()
        subprocess.run(["umount", "-l", str(self.tmpfs)], capture_output=True)
        return len(leaked_mounts), len(leaked_processes)

    def audit_caches(self) -> None:
        """Open each cache (which frees the slots of writers that died mid-write) and compare
        the size it counts with its pieces'. A cache a fault left damaged is refused by its next
        mount, or put out of use by it: not audited."""
        for path in self.caches:
            try:
                cache = PieceCache(path, parse_size(CACHE_SIZE))
            except CacheError as error:
                print(f"cache {path.name} not audited: {error}")
                continue
            try:
                counted, held = cache.accounting()
            except CacheError as error:  # damage opening it did not reach
                print(f"cache {path.name} not audited: {error}")
                continue
            finally:
                cache.close()
            if counted != held:
                self.figures.miscounted_caches.append(f"{path.name}: {counted} for {held} bytes")

    def _pid(self, number: int) -> int | None:
        try:
            return mount_pid(self.mountpoints[number])
        except LookupError:
            return None

    # -- readers ----------------------------------------------------------------------------

    def reader(self, rng: random.Random) -> None:
        figures = self.figures
        names = sorted(self.files)
        while not self.stop.is_set():
            number = rng.randrange(MOUNTS + 1)
            bound = DAEMON_READ_BOUND if number == MOUNTS else READ_BOUND
            name = rng.choice(names)
            source = self.files[name]
            offset = rng.randrange(len(source))
            length = min(rng.randint(1, READ_SIZE), len(source) - offset)
            if self.replacing[number].is_set():
                time.sleep(0.05)
                continue
            started = time.monotonic()
            try:
                fd = os.open(self.mountpoints[number] / name, os.O_RDONLY)
                try:
                    # Its pages out of the kernel's cache: the read reaches the mount.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    data = os.pread(fd, length, offset)
                finally:
                    os.close(fd)
            except OSError as error:
                waited = time.monotonic() - started
                with figures.lock:
                    code = errno.errorcode.get(error.errno or 0, "?")
                    figures.failed[code] += 1
                    figures.failed_during[f"{code} on mount {number} after {self.current}"] += 1
                    figures.longest_failed_wait = max(figures.longest_failed_wait, waited)
                    figures.longest_wait = max(figures.longest_wait, waited)
                    figures.over_bound += waited > bound
                time.sleep(0.05)
                continue
            waited = time.monotonic() - started
            expected = source[offset : offset + length]
            wrong = sum(a != b for a, b in zip(data, expected, strict=False))
            wrong += abs(len(expected) - len(data))
            with figures.lock:
                figures.reads += 1
                figures.bytes_read += len(data)
                figures.wrong_bytes += wrong
                figures.longest_wait = max(figures.longest_wait, waited)
                figures.over_bound += waited > bound

    # -- faults -----------------------------------------------------------------------------

    def faults(self) -> list[Callable[[], None]]:
        """The faults to inject: every kind, or the one asked for."""
        return [getattr(self, name) for name in FAULTS if self.only in (None, name)]

    def kill_daemon(self) -> None:
        self.daemon.kill()  # its mount process goes on serving; the next daemon adopts it
        self._hold()
        self.daemon.start()

    def kill_scheduler(self) -> None:
        self.scheduler.kill()
        self._hold()
        self.scheduler.start()

    def kill_redis(self) -> None:
        self.redis.kill()
        self._hold()
        self.redis.start()

    def expire_redirects(self) -> None:
        assert self.proxy is not None
        self.proxy.expire_redirects()

    def _hold(self) -> None:
        self.stop.wait(self.rng.uniform(1, 4))

    def kill_mount(self) -> None:
        number = self.rng.randrange(MOUNTS)
        pid = self._pid(number)
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)  # reads in flight meet it
        _wait_gone(pid, 10)
        self.replace(number, lambda: None)

    def replace(self, number: int, meanwhile: Callable[[], None]) -> None:
        """Unmount, do ``meanwhile``, mount again: readers leave the mount alone meanwhile."""
        self.replacing[number].set()
        try:
            self.umount(number)
            meanwhile()
            self.mount(number)
            self.figures.remounts += 1
        finally:
            self.replacing[number].clear()

    def registry_restart(self) -> None:
        self.registry.stop()
        self._hold()
        self.registry.start()

    def registry_freeze(self) -> None:
        self.registry.pause()
        self._hold()
        self.registry.resume()

    def trickle(self) -> None:
        assert self.proxy is not None
        self.proxy.trickle = 2000.0
        self._hold()
        self.proxy.trickle = 0.0

    def answer_500(self) -> None:
        assert self.proxy is not None
        self.proxy.fail_next(self.rng.randint(1, 20), 500)

    def answer_429(self) -> None:
        assert self.proxy is not None
        self.proxy.fail_next(self.rng.randint(1, 20), 429)

    def cut_bodies(self) -> None:
        assert self.proxy is not None
        self.proxy.cut_blobs(self.rng.randrange(4 << 20), self.rng.randint(1, 5))

    def flip_bytes(self) -> None:
        assert self.proxy is not None
        self.proxy.patch_blobs(self.rng.randrange(4 << 20), b"\xff\x00", self.rng.randint(1, 5))

    def fill_cache(self) -> None:
        filler = self.tmpfs / "filler"
        try:
            with filler.open("wb") as out:
                while True:
                    out.write(bytes(8 << 20))
        except OSError:
            pass  # full: that is the point
        self._hold()
        filler.unlink(missing_ok=True)

    def damage_cache(self) -> None:
        number = self.rng.randrange(MOUNTS)
        # The LMDB index or the file of piece bytes, overwritten in a few places.
        data = self.caches[number] / self.rng.choice(["data.mdb", PIECES_FILE])

        def damage() -> None:
            if data.exists():
                with data.open("r+b") as out:
                    # LMDB's file runs on past its pages, sparse, to the map's length.
                    index = data.name == "data.mdb"
                    size = os.lseek(out.fileno(), 0, os.SEEK_HOLE) if index else data.stat().st_size
                    for _ in range(self.rng.randint(1, 8)):
                        out.seek(self.rng.randrange(8192, max(size, 8193)))
                        out.write(self.rng.randbytes(self.rng.randint(1, 64)))

        self.replace(number, damage)

    def inject(self, count: int) -> None:
        deadline = time.monotonic() + self.seconds
        injected = 0
        deck: list[Callable[[], None]] = []
        while time.monotonic() < deadline and injected < count:
            if self.stop.wait(self.rng.uniform(0.5, 3.0)):
                return
            if not deck:  # every kind once per round, in a random order
                deck = self.faults()
                self.rng.shuffle(deck)
            fault = deck.pop()
            self.figures.faults[fault.__name__] += 1
            self.current = fault.__name__
            injected += 1
            fault()


def _refusal(stderr: str) -> str:
    """A refused mount's error, with what differs from one run to the next left out."""
    line = stderr.strip().splitlines()[-1] if stderr.strip() else "(nothing said)"
    return re.sub(r"127\.0\.0\.1:\d+|/tmp/modelfs-chaos-\w+|sha256:[0-9a-f]+", "...", line)[:160]


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            status = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1]
            if status == "Z":
                return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.05)


def _processes_under(root: Path) -> list[int]:
    """Live processes whose command line names ``root`` (mount processes, the registry)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                argv = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().split(") ")[-1][:1]
            except OSError:
                continue
            if str(root).encode() in argv and state != "Z":
                found.append(int(entry.name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=120, help="How long faults are injected.")
    parser.add_argument("--faults", type=int, default=200, help="Most faults injected.")
    parser.add_argument("--seed", type=int, help="Seed of the run (default: a random one).")
    parser.add_argument(
        "--only",
        choices=FAULTS,
        help="Inject this kind of fault only (every 0.5-3 s), to look at one closely.",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    print(
        f"scripts/chaos: seed {seed}, {args.seconds:g} s, at most {args.faults} faults"
        + (f" ({args.only} only)" if args.only else ""),
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="modelfs-chaos-"))
    chaos = Chaos(root, seed, args.seconds, args.only)
    leaked = (0, 0)
    started = time.monotonic()
    try:
        chaos.set_up()
        readers = [
            threading.Thread(
                target=chaos.reader, args=(random.Random(seed + n),), name=f"reader{n}"
            )
            for n in range(READERS)
        ]
        for thread in readers:
            thread.start()
        try:
            chaos.inject(args.faults)
        finally:
            chaos.stop.set()
            for thread in readers:
                thread.join()
    finally:
        leaked = chaos.tear_down()
    figures = chaos.figures
    elapsed = time.monotonic() - started
    print(f"ran {elapsed:.0f} s, faults injected: {sum(figures.faults.values())}")
    for name, count in sorted(figures.faults.items()):
        print(f"  {name:<24} {count}")
    print(
        f"reads: {figures.reads} ok, {figures.bytes_read / (1 << 20):.1f} MiB read; "
        f"{figures.registry_bytes / (1 << 20):.1f} MiB of blobs from the registry"
    )
    print(f"wrong bytes: {figures.wrong_bytes}")
    failed = ", ".join(f"{name} {count}" for name, count in figures.failed.most_common())
    print(f"failed reads: {sum(figures.failed.values())} ({failed or 'none'})")
    for during, count in sorted(figures.failed_during.items()):
        print(f"  {count:>6}  {during}")
    print(
        f"longest read wait: {figures.longest_wait:.2f} s; reads past their bound: "
        f"{figures.over_bound} (bound {READ_BOUND:.0f} s for the mounts with --read-timeout "
        f"{READ_TIMEOUT:g}, {DAEMON_READ_BOUND:.0f} s for the daemon's; longest failed read "
        f"{figures.longest_failed_wait:.2f} s)"
    )
    print(
        f"remounts: {figures.remounts} ({sum(figures.mount_refusals.values())} refused first, "
        "tried again); "
        f"leaked mounts: {leaked[0]}, processes: {leaked[1]}"
    )
    for refusal, count in figures.mount_refusals.most_common():
        print(f"  {count:>6}  {refusal}")
    print(
        f"caches removed as a refused mount said: {figures.caches_removed}; caches whose "
        f"counted size is not their pieces': {len(figures.miscounted_caches)}"
        + "".join(f"\n  {line}" for line in figures.miscounted_caches)
    )
    ok = (
        figures.wrong_bytes == 0
        and leaked == (0, 0)
        and figures.over_bound == 0
        and not figures.miscounted_caches
    )
    if ok:
        shutil.rmtree(root)
    else:
        print(f"logs and caches kept in {root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

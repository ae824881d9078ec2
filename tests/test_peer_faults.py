"""Peers and schedulers that do not do their part (issue 24, points 3, 7 and 10): a node reads
on from the registry at once, with exact bytes. Real mount processes, a real scheduler process
and the real registry; the bad peer is a tiny socket server that answers 503, or nothing."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from cluster_tools import MIB, nodes, publish, read_all, scheduler_process
from mounting import mounted
from registry_tools import Registry, free_ports
from test_cluster import SECRET, LyingPeer, lying_peer

from modelfs.peer.client import BUSY_REPORT, PeerClient, PeerFailure
from modelfs.pieces import DEFAULT_PIECE_SIZE
from modelfs.scheduler.client import SchedulerClient
from modelfs.scheduler.ranking import FailureKind, NodeInfo

BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster-secret"
    path.write_bytes(SECRET)
    return path


class BadPeer:
    """A member's peer port that never serves a piece: ``busy`` answers 503 to every request,
    ``silent`` takes requests and says nothing (hung, or held up by a slow-loris)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(target=self._serve, args=(connection,))
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(0.1)
        buffer = b""
        with connection:
            while not self._stop.is_set():
                try:
                    chunk = connection.recv(64 * 1024)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\r\n\r\n" in buffer:
                    buffer = buffer.split(b"\r\n\r\n", 1)[1]
                    with self._lock:
                        self.requests += 1
                    if self.mode == "busy":
                        connection.sendall(BUSY)

    def close(self) -> None:
        self._stop.set()
        # On Linux, close() alone does not wake a thread blocked in accept(); shutdown() does.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(10)


@contextmanager
def bad_member(mode: str, scheduler: str, digest: str, size: int) -> Iterator[BadPeer]:
    """A registered node announcing every piece of the blob, served by a ``BadPeer``."""
    peer = BadPeer(mode)

    async def join() -> None:
        async with SchedulerClient(scheduler, SECRET, NodeInfo(peer.address)) as client:
            assert await client.register()
            count = -(-size // DEFAULT_PIECE_SIZE)
            assert await client.announce([(digest, index) for index in range(count)])

    try:
        trio.run(join)
        yield peer
    finally:
        peer.close()


def offered(scheduler: str, digest: str, peer: str) -> bool:
    """Whether the scheduler would send a node (registered now) to ``peer`` for piece 0."""

    async def ask() -> bool:
        async with SchedulerClient(scheduler, SECRET, NodeInfo("127.0.0.2:9")) as client:
            assert await client.register()
            decision = await client.ask(digest, 0)
            return decision is not None and peer in decision.peers

    result: bool = trio.run(ask)
    return result


def model(registry: Registry, tmp_path: Path, name: str) -> tuple[str, str, bytes]:
    """A 32 MiB one-file model with a piece index: (reference, blob digest, bytes)."""
    data = os.urandom(32 * MIB)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    return publish(registry.host, f"faults/{name}", path), digest_of(data), data


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mode", ["busy", "silent"])
def test_a_busy_or_silent_peer_costs_a_read_little(
    mode: str, registry: Registry, tmp_path: Path, secret_file: Path
) -> None:
    """Point 7: a node whose only peer answered 503 retried it every ~20 ms until its 10 s
    budget per piece ran out (32 MiB in 50 s); a silent peer cost 5 s a try. Now the peer is
    tried once, skipped a while, and the registry serves the pieces at once."""
    reference, digest, data = model(registry, tmp_path, mode)
    with (
        scheduler_process(secret_file) as scheduler,
        bad_member(mode, scheduler, digest, len(data)) as peer,
    ):
        assert offered(scheduler, digest, peer.address)
        args = ("--scheduler", scheduler, "--cluster-secret-file", str(secret_file))
        with nodes(reference, registry.host, tmp_path, 1, *args) as (mnt,):
            (got,), elapsed = read_all([mnt / "model.bin"])
        print(f"\n32 MiB through a node whose only peer is {mode}: {elapsed:.2f} s")
        assert got == hashlib.sha256(data).hexdigest()
        assert elapsed < (3.0 if mode == "busy" else 6.0)
        assert 1 <= peer.requests <= 8  # once per piece at most, not every 20 ms
        if mode == "silent":
            assert not offered(scheduler, digest, peer.address)  # reported: timed out


def test_a_peer_always_busy_is_reported(registry: Registry, secret_file: Path) -> None:
    """A peer that answers 503 time after time is reported as failed after ``BUSY_REPORT``."""
    reports: list[PeerFailure] = []
    digest = "sha256:" + "ab" * 32
    peer = BadPeer("busy")

    async def main() -> None:
        async with PeerClient(SECRET, report=reports.append) as client:
            for index in range(2 * BUSY_REPORT):
                assert await client.fetch_piece(peer.address, digest, index, None) is None

    try:
        trio.run(main)
    finally:
        peer.close()
    assert peer.requests == 2 * BUSY_REPORT
    assert [failure.kind for failure in reports] == [FailureKind.FAILED] * 2
    assert [failure.index for failure in reports] == [BUSY_REPORT - 1, 2 * BUSY_REPORT - 1]


def test_an_address_httpx_refuses_is_a_reported_failure() -> None:
    """Point 3: httpx raises InvalidURL (no HTTPError) for such addresses; it escaped
    ``fetch_piece`` and every reader of the announced pieces got EIO."""
    reports: list[PeerFailure] = []
    digest = "sha256:" + "ab" * 32

    async def main() -> None:
        async with PeerClient(SECRET, report=reports.append) as client:
            for address in ("::::1", "127.0.0.1:1\n", "[::1", "a:99999", "h\x00:1"):
                assert await client.fetch_piece(address, digest, 0, None) is None, address

    trio.run(main)
    assert [failure.peer for failure in reports] == [
        "::::1",
        "127.0.0.1:1\n",
        "[::1",
        "a:99999",
        "h\x00:1",
    ]
    assert all(failure.kind is FailureKind.FAILED for failure in reports)


def test_a_hung_scheduler_costs_a_read_one_timeout(
    registry: Registry, tmp_path: Path, secret_file: Path
) -> None:
    """Point 10: a hung scheduler (or Redis) made every piece pay the 2 s timeout (32 MiB:
    8 pieces, 16 s and more); the node now skips it for a growing interval after a timeout."""
    reference, _, data = model(registry, tmp_path, "hung-scheduler")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # connections wait in its backlog, never answered
        scheduler = f"http://127.0.0.1:{hung.getsockname()[1]}"
        args = ("--scheduler", scheduler, "--cluster-secret-file", str(secret_file))
        with nodes(reference, registry.host, tmp_path, 1, *args) as (mnt,):
            (got,), elapsed = read_all([mnt / "model.bin"])
    print(f"\n32 MiB through a node whose scheduler hangs: {elapsed:.2f} s")
    assert got == hashlib.sha256(data).hexdigest()
    assert elapsed < 5.0


def test_the_log_names_the_peers_of_a_blob_that_failed_its_check(
    registry: Registry, tmp_path: Path, secret_file: Path
) -> None:
    """Point 10: with --peers-without-index, a blob made of a liar's pieces failed its check
    and the log blamed the registry."""
    data = os.urandom(16 * MIB)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    reference = publish(registry.host, "faults/unindexed", path, index=False)
    cache = tmp_path / "cache"
    with (
        scheduler_process(secret_file) as scheduler,
        lying_peer(scheduler, tmp_path / "liar-cache", data, digest_of(data)) as liar,
        mounted(
            f"{registry.host}/{reference}",
            tmp_path / "mnt",
            cache,
            *("--scheduler", scheduler, "--cluster-secret-file", str(secret_file)),
            "--peers-without-index",
            "--peer-listen",
            f"127.0.0.1:{free_ports(1)}",
        ) as mnt,
    ):
        (got,), _ = read_all([mnt / "model.bin"])
    assert got == hashlib.sha256(data).hexdigest() and LyingPeer.served > 0
    (log,) = (cache / "logs").iterdir()
    failed = [line for line in log.read_text().splitlines() if "failed its check" in line]
    assert failed and all(f"from peers {liar}" in line for line in failed), failed
    # The fetcher's own line names peers as a possible supplier, not the registry alone.
    mismatches = [line for line in log.read_text().splitlines() if "its digest (got" in line]
    assert mismatches and all("from peers or " in line for line in mismatches), mismatches

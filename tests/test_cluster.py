"""Several nodes on one machine: separate mount processes, each with its own cache and peer port,
one scheduler, the real registry behind a counting proxy."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from cluster_tools import MIB, READER, nodes, publish, read_all, scheduler_process
from mounting import mount_pid, mounted
from registry_tools import Proxy, Registry, free_port, free_ports
from test_peer import make_ca, make_node_cert
from test_scheduler import Redis, redis_fixture  # noqa: F401  (the fixture)

from modelfs.cache.store import PieceCache, piece_checksum
from modelfs.peer.server import PeerServer
from modelfs.scheduler.client import SchedulerClient
from modelfs.scheduler.ranking import Decision, NodeInfo

SECRET = b"cluster-test-secret-0123456789abcdef"
HEAD_READER = """
import hashlib, sys
with open(sys.argv[1], "rb", buffering=0) as file:
    print(hashlib.sha256(file.read(1 << 20)).hexdigest())
"""


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster-secret"
    path.write_bytes(SECRET)
    return path


def test_four_nodes_fetch_the_model_about_once(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    size = 256 * MIB
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(os.urandom(size))
    expected = hashlib.sha256(data_path.read_bytes()).hexdigest()
    reference = publish(registry.host, "cluster/four", data_path)

    # Baseline: the same four nodes without peers, each pulling the model from the registry.
    with nodes(reference, proxy.host, tmp_path / "alone", 4) as mounts:
        proxy.reset()
        hashes, alone_time = read_all([mnt / "model.bin" for mnt in mounts])
        alone_bytes = proxy.blob_bytes
    assert hashes == [expected] * 4

    with (
        scheduler_process(secret_file) as scheduler,
        nodes(
            reference,
            proxy.host,
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


class LyingPeer(PeerServer):
    """A compromised node: holds the right pieces but serves them with one bit flipped."""

    served = 0

    def piece(self, digest: str, index: int) -> bytes | None:
        data = super().piece(digest, index)
        if data is None:
            return None
        LyingPeer.served += 1
        return bytes([data[0] ^ 1]) + data[1:]


@contextmanager
def lying_peer(scheduler: str, cache_dir: Path, data: bytes, digest: str) -> Iterator[str]:
    """A liar in a thread of its own: registered, announcing every piece of the blob."""
    piece_size = 4 * MIB
    cache = PieceCache(cache_dir, 256 * MIB)
    for index in range(0, len(data), piece_size):
        cache.put(digest, index // piece_size, data[index : index + piece_size], len(data))
    checksums = [piece_checksum(data[i : i + piece_size]) for i in range(0, len(data), piece_size)]
    cache.mark_verified(digest, len(data), checksums)
    address = f"127.0.0.1:{free_port()}"
    stop = threading.Event()
    ready = threading.Event()

    async def main() -> None:
        node = NodeInfo(address)
        async with SchedulerClient(scheduler, SECRET, node) as client, trio.open_nursery() as n:
            liar = LyingPeer(cache, SECRET, lambda digest, index: None)
            await n.start(liar.serve, "127.0.0.1", int(address.split(":")[1]))
            assert await client.register()
            pieces = [(digest, i) for i in range((len(data) + piece_size - 1) // piece_size)]
            assert await client.announce(pieces)
            ready.set()
            await trio.to_thread.run_sync(stop.wait)
            n.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,))
    thread.start()
    try:
        assert ready.wait(10)
        yield address
    finally:
        stop.set()
        thread.join(10)
        cache.close()


def blob_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ask_as_stranger(scheduler: str, digest: str, index: int) -> Decision | None:
    async def main() -> Decision | None:
        async with SchedulerClient(scheduler, SECRET, NodeInfo("127.0.0.1:1")) as client:
            return await client.ask(digest, index)

    decision: Decision | None = trio.run(main)
    return decision


def model_bytes(proxy: Proxy, data: bytes) -> int:
    """Bytes of the model's blob the registry sent; the piece index, a small blob that a mount
    looks up in the background, may arrive at any time and is not the model."""
    return proxy.bytes_by_blob.get(blob_digest(data), 0)


def test_a_lying_peer_never_poisons_and_is_avoided(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    data = os.urandom(32 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/liar", data_path)
    digest = blob_digest(data)
    with (
        scheduler_process(secret_file) as scheduler,
        lying_peer(scheduler, tmp_path / "liar-cache", data, digest) as liar,
        nodes(
            reference,
            proxy.host,
            tmp_path,
            1,
            "--scheduler",
            scheduler,
            "--cluster-secret-file",
            str(secret_file),
        ) as (mnt,),
    ):
        proxy.reset()
        (got,), _ = read_all([mnt / "model.bin"])
        assert got == hashlib.sha256(data).hexdigest()
        # Every piece came from the registry in the end, after the liar was caught.
        assert model_bytes(proxy, data) == len(data)
        assert 0 < LyingPeer.served <= 8
        decision = ask_as_stranger(scheduler, digest, 0)
        assert decision is not None and liar not in decision.peers


def test_without_an_index_a_lying_peer_is_caught_by_the_whole_blob_check(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    data = os.urandom(32 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/unindexed", data_path, index=False)
    digest = blob_digest(data)
    peer_args = ("--cluster-secret-file", str(secret_file))
    LyingPeer.served = 0
    with (
        scheduler_process(secret_file) as scheduler,
        lying_peer(scheduler, tmp_path / "liar-cache", data, digest) as liar,
    ):
        # Not allowed by the operator: no peer is asked for a piece of an unindexed blob.
        with nodes(
            reference, proxy.host, tmp_path / "strict", 1, "--scheduler", scheduler, *peer_args
        ) as (mnt,):
            proxy.reset()
            (got,), _ = read_all([mnt / "model.bin"])
        assert got == hashlib.sha256(data).hexdigest() and LyingPeer.served == 0
        assert model_bytes(proxy, data) == len(data)

        allowed = ("--scheduler", scheduler, *peer_args, "--peers-without-index")
        with nodes(reference, proxy.host, tmp_path / "allowed", 1, *allowed) as (mnt,):
            proxy.reset()
            # Readers of the start and of the whole file at once: no corrupt byte reaches either
            # (the liar's pieces are held back until the blob fails its check).
            head = subprocess.Popen(
                [sys.executable, "-c", HEAD_READER, str(mnt / "model.bin")],
                stdout=subprocess.PIPE,
                text=True,
            )
            (got,), _ = read_all([mnt / "model.bin"])
            assert (
                head.communicate(timeout=120)[0].strip() == hashlib.sha256(data[:MIB]).hexdigest()
            )
            assert got == hashlib.sha256(data).hexdigest()
            assert LyingPeer.served > 0
            # Purged and fetched again from the registry only: the registry served it once.
            assert model_bytes(proxy, data) == len(data)
            decision = ask_as_stranger(scheduler, digest, 0)
            assert decision is not None and liar not in decision.peers  # reported, avoided


def test_pieces_from_peers_nothing_vouched_for_reach_no_other_mount_of_the_cache(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    # A node's two mounts share one cache: one allows peers without an index (and gets the
    # liar's pieces), the other does not. Stored unvouched, the liar's pieces are never served
    # to the other mount, whichever reads first.
    data = os.urandom(25 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/mixed", data_path, index=False)
    LyingPeer.served = 0
    cache_dir = tmp_path / "cache"
    with (
        scheduler_process(secret_file) as scheduler,
        lying_peer(scheduler, tmp_path / "liar-cache", data, blob_digest(data)),
        mounted(
            f"{proxy.host}/{reference}",
            tmp_path / "with-peers",
            cache_dir,
            *("--scheduler", scheduler, "--cluster-secret-file", str(secret_file)),
            "--peers-without-index",
            "--peer-listen",
            f"127.0.0.1:{free_ports(1)}",
        ) as with_peers,
        mounted(f"{proxy.host}/{reference}", tmp_path / "plain", cache_dir) as plain,
    ):
        hashes, _ = read_all([with_peers / "model.bin", plain / "model.bin"])
    assert LyingPeer.served > 0
    assert hashes == [hashlib.sha256(data).hexdigest()] * 2


def test_without_an_index_honest_peers_still_spare_the_registry(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    data = os.urandom(24 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/unindexed-honest", data_path, index=False)
    expected = hashlib.sha256(data).hexdigest()
    with scheduler_process(secret_file) as scheduler:
        allowed = ("--scheduler", scheduler, "--cluster-secret-file", str(secret_file))
        allowed += ("--peers-without-index",)
        with (
            nodes(reference, proxy.host, tmp_path / "a", 1, *allowed) as (a,),
            nodes(reference, proxy.host, tmp_path / "b", 1, *allowed) as (b,),
        ):
            (got,), _ = read_all([a / "model.bin"])
            assert got == expected
            proxy.reset()
            (got,), _ = read_all([b / "model.bin"])
            assert got == expected and model_bytes(proxy, data) < len(data) / 4


def test_peers_over_mutual_tls(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    data = os.urandom(16 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/tls", data_path)
    expected = hashlib.sha256(data).hexdigest()
    ca = make_ca(tmp_path, "cluster")

    def tls_args(name: str, signer: tuple[Path, Path] = ca) -> list[str]:
        node = make_node_cert(tmp_path, name, signer)
        return [
            f"--peer-tls-cert={node.cert}",
            f"--peer-tls-key={node.key}",
            f"--peer-tls-ca={node.ca}",
        ]

    with scheduler_process(secret_file) as scheduler:
        peer_args = ("--scheduler", scheduler, "--cluster-secret-file", str(secret_file))
        with (
            nodes(reference, proxy.host, tmp_path / "a", 1, *peer_args, *tls_args("a")) as (a,),
            nodes(reference, proxy.host, tmp_path / "b", 1, *peer_args, *tls_args("b")) as (b,),
        ):
            (got,), _ = read_all([a / "model.bin"])
            assert got == expected
            proxy.reset()
            (got,), _ = read_all([b / "model.bin"])
            assert got == expected and model_bytes(proxy, data) < len(data) / 4  # from A, over TLS

            # A node whose certificate another CA signed knows the secret, and still gets
            # nothing from A or B: the whole model comes from the registry.
            outsider = tls_args("outsider", make_ca(tmp_path, "other"))
            with nodes(reference, proxy.host, tmp_path / "c", 1, *peer_args, *outsider) as (c,):
                proxy.reset()
                (got,), _ = read_all([c / "model.bin"])
                assert got == expected and model_bytes(proxy, data) == len(data)


def test_dead_scheduler_and_killed_peer_never_fail_reads(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    data = os.urandom(24 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/faults", data_path)
    expected = hashlib.sha256(data).hexdigest()
    peer_args = ("--cluster-secret-file", str(secret_file))

    nobody = f"http://127.0.0.1:{free_port()}"
    with nodes(
        reference, proxy.host, tmp_path / "lonely", 1, "--scheduler", nobody, *peer_args
    ) as (mnt,):
        (got,), elapsed = read_all([mnt / "model.bin"])
        assert got == expected and elapsed < 30

    with (
        scheduler_process(secret_file) as scheduler,
        nodes(reference, proxy.host, tmp_path / "a", 1, "--scheduler", scheduler, *peer_args) as (
            a,
        ),
        nodes(reference, proxy.host, tmp_path / "b", 1, "--scheduler", scheduler, *peer_args) as (
            b,
        ),
    ):
        (got,), _ = read_all([a / "model.bin"])
        assert got == expected
        os.kill(mount_pid(a.resolve()), signal.SIGKILL)
        proxy.reset()
        (got,), elapsed = read_all([b / "model.bin"])
        assert got == expected and elapsed < 30
        # The dead peer's pieces came from the registry.
        assert model_bytes(proxy, data) == len(data)


def test_replicas_sharing_redis_survive_its_restart(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path, redis: Redis
) -> None:
    data = os.urandom(48 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/redis", data_path)
    expected = hashlib.sha256(data).hexdigest()
    peer_args = ("--cluster-secret-file", str(secret_file))
    with (
        scheduler_process(secret_file, "--redis", redis.url) as one,
        scheduler_process(secret_file, "--redis", redis.url) as two,
        nodes(reference, proxy.host, tmp_path / "a", 1, "--scheduler", one, *peer_args) as (a,),
        nodes(reference, proxy.host, tmp_path / "b", 1, "--scheduler", two, *peer_args) as (b,),
    ):
        (got,), _ = read_all([a / "model.bin"])
        assert got == expected
        proxy.reset()
        # B's replica learnt from A's through Redis: B takes the model from A.
        (got,), _ = read_all([b / "model.bin"])
        assert got == expected and model_bytes(proxy, data) < len(data) / 4

        # Redis restarts while a node reads: it loses the state, the read goes on.
        with nodes(reference, proxy.host, tmp_path / "c", 1, "--scheduler", one, *peer_args) as (
            c,
        ):
            reader = subprocess.Popen(
                [sys.executable, "-c", READER, str(c / "model.bin")],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.2)
            redis.stop()
            time.sleep(0.5)
            redis.start()
            assert reader.communicate(timeout=120)[0].split()[0] == expected


def model_gets(proxy: Proxy, data: bytes) -> int:
    """Range GETs of the model's blob the registry answered."""
    return sum(blob_digest(data) in request.path for request in proxy.blob_requests)


def test_pieces_no_peer_holds_come_from_the_registry_in_runs(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    """The scheduler leaves consecutive pieces to a node: one range GET for several of them; a
    piece a peer holds splits the run and comes from that peer."""
    data = os.urandom(64 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/runs", data_path)
    expected = hashlib.sha256(data).hexdigest()
    pieces = len(data) // (4 * MIB)
    peer_args = ("--cluster-secret-file", str(secret_file))
    with scheduler_process(secret_file) as scheduler:
        with nodes(
            reference, proxy.host, tmp_path / "a", 1, "--scheduler", scheduler, *peer_args
        ) as (a,):
            proxy.reset()
            (got,), _ = read_all([a / "model.bin"])
            assert got == expected
            assert model_bytes(proxy, data) == len(data)
            # One GET per piece before runs through peers: 16.
            assert model_gets(proxy, data) <= pieces // 2, proxy.blob_requests

        # Node C holds one piece in the middle (read with no prefetch); node D reads it all.
        node_args = ("--scheduler", scheduler, *peer_args)
        with (
            nodes(reference, proxy.host, tmp_path / "c", 1, *node_args, "--prefetch", "none") as (
                c,
            ),
            nodes(reference, proxy.host, tmp_path / "d", 1, *node_args) as (d,),
        ):
            with (c / "model.bin").open("rb", buffering=0) as file:
                file.seek(32 * MIB)
                assert file.read(MIB) == data[32 * MIB : 33 * MIB]
            held = model_bytes(proxy, data) - len(data)
            assert 4 * MIB <= held < len(data) // 2
            time.sleep(0.5)  # C announces what it stored
            proxy.reset()
            (got,), _ = read_all([d / "model.bin"])
            assert got == expected
            assert model_bytes(proxy, data) == len(data) - held  # C's pieces came from C
            assert model_gets(proxy, data) <= pieces // 2, proxy.blob_requests


def test_a_run_the_registry_altered_fails_its_reads_and_nothing_wrong_is_served(
    registry: Registry, proxy: Proxy, tmp_path: Path, secret_file: Path
) -> None:
    """Pieces of a registry run are each checked against the piece index: altered bytes fail
    the read with EIO, reach no reader and no peer, and the mount goes on once they are right."""
    data = os.urandom(32 * MIB)
    data_path = tmp_path / "model.bin"
    data_path.write_bytes(data)
    reference = publish(registry.host, "cluster/altered", data_path)
    with scheduler_process(secret_file) as scheduler:
        args = ("--scheduler", scheduler, "--cluster-secret-file", str(secret_file))
        with nodes(reference, proxy.host, tmp_path / "n", 1, *args, "--prefetch", "none") as (mnt,):
            with (mnt / "model.bin").open("rb", buffering=0) as file:
                assert file.read(MIB) == data[:MIB]  # the index is in by now
                proxy.tamper = True
                file.seek(16 * MIB)
                with pytest.raises(OSError) as failed:
                    file.read(MIB)
                assert failed.value.errno == errno.EIO
                proxy.tamper = False
                file.seek(16 * MIB)
                assert file.read(MIB) == data[16 * MIB : 17 * MIB]
            (got,), _ = read_all([mnt / "model.bin"])
            assert got == hashlib.sha256(data).hexdigest()

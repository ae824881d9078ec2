"""Preheat chosen nodes and ask where a model is: three node services (``modelfs daemon``, each
its own config, cache, control socket and peer ports, with a ``[cluster]`` table naming the node
and its labels), one real scheduler, a real registry behind a counting proxy. ``modelfs preheat
--nodes`` / ``--selector`` asks them through the scheduler; ``modelfs cluster models`` says who
holds what, as the node services reported it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from cluster_tools import MIB, publish, scheduler_process
from mounting import MODELFS, modelfs
from registry_tools import Layer, Proxy, Registry, free_ports, push_artifact
from test_preheat import push_model
from test_service import Notifications, running_daemon, stop_daemon, wait_until

from modelfs.cache import PieceCache
from modelfs.modelpack import ANNOTATION_FILEPATH, layer_media_type
from modelfs.pieces import DEFAULT_PIECE_SIZE as PIECE
from modelfs.service.cache_ops import cached_models

SECRET = b"preheat-nodes-test-secret-0123456789abcdef"
NODES = {"node-a": "pool = 'gpu'", "node-b": "pool = 'gpu'", "node-c": "pool = 'spare'"}


class Cluster:
    def __init__(self, root: Path, scheduler: str, secret: Path) -> None:
        self.root = root
        self.options = ("--scheduler", scheduler, "--cluster-secret-file", str(secret))
        self.daemons: dict[str, subprocess.Popen[str]] = {}
        self.starts = 0

    def config(self, name: str, proxy: Proxy, labels: str) -> Path:
        root = self.root / name
        root.mkdir()
        port = free_ports(2)
        config = root / "config.toml"
        config.write_text(
            f'control_socket = "{root / "run" / "control.sock"}"\n'
            f'[cache]\ndir = "{root / "cache"}"\nsize = "1G"\n'
            f'[registries."{proxy.host}"]\nplain_http = true\n'
            f'[cluster]\nscheduler = "{self.options[1]}"\nsecret_file = "{self.options[3]}"\n'
            f'peer_listen = "127.0.0.1"\npeer_ports = "{port}-{port + 1}"\n'
            f'node_name = "{name}"\nlabels = {{ {labels} }}\n'
        )
        return config

    def start(self, stack: ExitStack, name: str) -> None:
        """Node ``name``'s service, once READY; killed (if still up) when ``stack`` closes."""
        root = self.root / name
        self.starts += 1
        notifications = Notifications(root / f"notify-{self.starts}.sock")
        config = root / "config.toml"
        self.daemons[name] = stack.enter_context(running_daemon(config, notifications))
        notifications.wait_for("READY=1")

    def modelfs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return modelfs(*args, *self.options, timeout=60)

    def held(self, name: str) -> dict[str, tuple[int, int]]:
        """What node ``name``'s cache holds, read from the cache itself: digest -> (present,
        total) bytes."""
        cache = PieceCache(self.root / name / "cache", 1 << 30)
        try:
            return {m.digest: (m.present_bytes, m.total_bytes) for m in cached_models(cache)}
        finally:
            cache.close()

    def models(self) -> list[dict[str, Any]]:
        result = self.modelfs("cluster", "models", "--json")
        assert result.returncode == 0, result.stderr
        found: list[dict[str, Any]] = json.loads(result.stdout)["models"]
        return found

    def live(self) -> list[str]:
        result = self.modelfs("cluster", "nodes", "--json")
        assert result.returncode == 0, result.stderr
        return [node["name"] for node in json.loads(result.stdout)["nodes"]]


@contextmanager
def running_cluster(proxy: Proxy, root: Path) -> Iterator[Cluster]:
    """A scheduler and the three node services of ``NODES``, each reported to it."""
    secret = root / "cluster-secret"
    secret.write_bytes(SECRET)
    with scheduler_process(secret) as scheduler, ExitStack() as stack:
        nodes = Cluster(root, scheduler, secret)
        for name, labels in NODES.items():
            nodes.config(name, proxy, labels)
            nodes.start(stack, name)
        wait_until(lambda: nodes.live() == sorted(NODES), timeout=20)
        yield nodes


@pytest.fixture
def cluster(proxy: Proxy, tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(proxy, tmp_path) as nodes:
        yield nodes


def test_preheat_two_of_three_nodes_then_where_the_model_is(
    registry: Registry, proxy: Proxy, cluster: Cluster
) -> None:
    reference, files = push_model(registry)
    ref = f"{proxy.host}/{reference}"
    proxy.reset()
    started = time.monotonic()
    result = cluster.modelfs("preheat", "--nodes", "node-a,node-b", ref)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    # Progress per node, then each one done.
    lines = result.stderr.splitlines()
    for name in ("node-a", "node-b"):
        assert f"{ref}: {name}: done, " in result.stderr, result.stderr
        assert any(line.startswith(f"{ref}: {name}: ") for line in lines[:-2])
    assert "node-c" not in result.stderr

    # The bytes landed in those two caches only, each whole.
    (digest,) = cluster.held("node-a")
    present, total = cluster.held("node-a")[digest]
    assert present == total >= sum(len(data) for data in files.values())
    assert cluster.held("node-b") == {digest: (total, total)}
    assert cluster.held("node-c") == {}
    print(
        f"\npreheat of {total} bytes on 2 nodes: {took:.2f} s, command to every node done; "
        f"the registry sent {proxy.blob_bytes / total:.2f} x the model"
    )

    # Each node's status says what it ran for the scheduler.
    control = str(cluster.root / "node-a" / "run" / "control.sock")
    node = json.loads(modelfs("status", "--json", "--control-socket", control).stdout)["cluster"]
    assert (node["node"], node["labels"]) == ("node-a", {"pool": "gpu"})
    (job,) = node["preheats"]
    assert (job["reference"], job["state"], job["held_bytes"]) == (ref, "done", total)
    text = modelfs("status", "--control-socket", control).stdout
    assert "node node-a at the scheduler (pool=gpu)" in text
    assert f"  preheat {ref}: done, " in text and "(100%)" in text

    # The scheduler knows who holds it, and by what name.
    expected_nodes = [
        {"name": "node-a", "present_bytes": total, "percent": 100},
        {"name": "node-b", "present_bytes": total, "percent": 100},
    ]
    wait_until(lambda: [m["nodes"] for m in cluster.models()] == [expected_nodes], timeout=10)
    (model,) = cluster.models()
    assert model["digest"] == digest and model["total_bytes"] == total
    assert model["references"] == [ref]
    # For people: a table; a model named by reference or digest, or one nobody holds.
    table = cluster.modelfs("cluster", "models", ref)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["MODEL", "REFERENCES", "NODE", "HELD"]
    assert [line.split()[2] for line in table.stdout.splitlines()[1:]] == ["node-a", "node-b"]
    by_digest = cluster.modelfs("cluster", "models", "--json", f"{ref}@{digest}")
    assert json.loads(by_digest.stdout)["models"] == [model]
    other = cluster.modelfs("cluster", "models", "--json", "sha256:" + "0" * 64)
    assert json.loads(other.stdout)["models"] == []

    # Again: resumable, so nothing is fetched; by label selector, the spare node gets it.
    proxy.reset()
    again = cluster.modelfs("preheat", "--json", "--nodes", "node-a", ref)
    assert again.returncode == 0, again.stderr
    (done,) = [json.loads(line) for line in again.stdout.splitlines()][-1:]
    assert done["node"] == "node-a" and done["state"] == "done"
    assert (done["held_bytes"], done["total_bytes"], done["digest"]) == (total, total, digest)
    assert proxy.blob_bytes == 0
    spare = cluster.modelfs("preheat", "--selector", "pool=spare", ref)
    assert spare.returncode == 0, spare.stderr
    assert f"{ref}: node-c: done" in spare.stderr and "node-a" not in spare.stderr
    assert cluster.held("node-c") == {digest: (total, total)}


def test_nodes_preheating_at_once_share_pieces(
    registry: Registry, proxy: Proxy, cluster: Cluster, tmp_path: Path
) -> None:
    """Each node's preheat takes pieces from peers first, as a mount does: three nodes
    preheating one model at once cost the registry about one copy of it, not three."""
    size = 32 * MIB
    data = tmp_path / "model.bin"
    data.write_bytes(os.urandom(size))
    reference = publish(registry.host, f"preheat/shared-{uuid.uuid4().hex[:8]}", data)
    ref = f"{proxy.host}/{reference}"
    proxy.reset()
    result = cluster.modelfs("preheat", "--nodes", "node-a,node-b,node-c", ref)
    assert result.returncode == 0, result.stderr
    weights = "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    for name in NODES:
        ((present, total),) = cluster.held(name).values()
        assert present == total == size
    print(f"\n3 nodes preheated {size >> 20} MiB: the registry sent "
          f"{proxy.bytes_by_blob[weights] / size:.2f} x the weights")  # fmt: skip
    assert proxy.bytes_by_blob[weights] <= 1.5 * size


def test_preheat_resumes_after_an_interruption_and_a_node_restart(
    fresh_registry: Registry, tmp_path: Path
) -> None:
    reference, files = push_model(fresh_registry)
    size = len(files["model.safetensors"])
    weights = "sha256:" + hashlib.sha256(files["model.safetensors"]).hexdigest()
    with Proxy(fresh_registry) as proxy, running_cluster(proxy, tmp_path) as cluster:
        ref = f"{proxy.host}/{reference}"
        # The registry goes away 6 MiB into the download: the weights' first 4 MiB piece gets
        # in (or two: each answer may send what was left of the budget as it started), and the
        # node's preheat fails after its retries.
        proxy.blob_budget = 6 << 20
        cut = cluster.modelfs("preheat", "--nodes", "node-c", ref)
        assert cut.returncode == 1
        assert f"{ref}: node-c: failed: " in cut.stderr, cut.stderr
        assert "not preheated on 1 node(s): node-c (failed)" in cut.stderr
        ((present, total),) = cluster.held("node-c").values()
        assert PIECE <= present < total
        # The scheduler tells how much of it the node holds.
        wait_until(
            lambda: [n["present_bytes"] for m in cluster.models() for n in m["nodes"]] == [present],
            timeout=10,
        )

        # Asked again while the registry hangs, then the node service is killed mid-preheat
        # (its preheat process with it) and started again: it takes the preheat up, and the
        # command, still following, sees it done.
        proxy.reset()
        fresh_registry.pause()
        follow = subprocess.Popen(
            [*MODELFS, "preheat", "--json", "--nodes", "node-c", ref, *cluster.options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert follow.stdout is not None
            assert json.loads(follow.stdout.readline())["state"] == "queued"
            assert json.loads(follow.stdout.readline())["state"] == "running"
            daemon = cluster.daemons["node-c"]
            for child in Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split():
                os.kill(int(child), signal.SIGKILL)  # the preheat process
            daemon.kill()
            daemon.wait()
            fresh_registry.resume()
            with ExitStack() as stack:
                cluster.start(stack, "node-c")
                output, errors = follow.communicate(timeout=60)
                assert follow.returncode == 0, errors
                stop_daemon(cluster.daemons["node-c"])
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
            fresh_registry.resume()
        last = json.loads(output.splitlines()[-1])
        assert (last["node"], last["state"], last["held_bytes"]) == ("node-c", "done", total)
        ((present_after, total_after),) = cluster.held("node-c").values()
        assert present_after == total_after == total
        # Only what was missing came from the registry: of the weights, all but the whole
        # pieces the node held; besides, a few KiB (the piece index, the config).
        print(f"\nheld {present} of {total} bytes; the rest took {proxy.blob_bytes} registry bytes")
        held_weights = size - proxy.bytes_by_blob[weights]
        assert held_weights >= PIECE and held_weights % PIECE == 0, held_weights
        assert proxy.blob_bytes <= total - present + 64 * 1024


def test_down_node_and_bad_requests_are_reported_per_node(
    registry: Registry, proxy: Proxy, cluster: Cluster, tmp_path: Path
) -> None:
    reference, _ = push_model(registry)
    ref = f"{proxy.host}/{reference}"
    # A node service that stops says so: it is down at once, and the others go on.
    stop_daemon(cluster.daemons["node-b"])
    result = cluster.modelfs("preheat", "--nodes", "node-a,node-b,node-x", ref)
    assert result.returncode == 1
    assert f"{ref}: node-a: done" in result.stderr, result.stderr
    for name in ("node-b", "node-x"):
        assert f"{ref}: {name}: down: its node service has not reported" in result.stderr
    assert "not preheated on 2 node(s): node-b (down), node-x (down)" in result.stderr
    assert cluster.held("node-b") == {}

    # A tag the registry does not know: each node says so.
    unknown = cluster.modelfs("preheat", "--nodes", "node-a,node-c", ref + "-nope")
    assert unknown.returncode == 1
    for name in ("node-a", "node-c"):
        line = next(x for x in unknown.stderr.splitlines() if f"{name}: failed" in x)
        print(line)
        assert line.startswith(f"{ref}-nope: {name}: failed: ")
        assert "v1-nope" in line and "not found" in line, line
    # A hostile model (a file path out of the model's tree): each node refuses it, in the
    # line a mount gives, and keeps none of it.
    hostile = f"preheat/hostile-{uuid.uuid4().hex[:8]}"
    layer = Layer(layer_media_type("weight", "raw"), b"x" * 100, {ANNOTATION_FILEPATH: "../evil"})
    push_artifact(registry.host, hostile, "v1", [layer])
    refused = cluster.modelfs("preheat", "--nodes", "node-c", f"{proxy.host}/{hostile}:v1")
    assert refused.returncode == 1
    line = next(x for x in refused.stderr.splitlines() if "node-c: failed: " in x)
    print(line)
    assert "../evil" in line, line
    assert cluster.held("node-c") == {} or all(p == 0 for p, _ in cluster.held("node-c").values())
    # Not a registry reference: refused before any node is asked; a node would refuse it too.
    local = cluster.modelfs("preheat", "--nodes", "node-a", "oci:/etc")
    assert local.returncode != 0 and "invalid reference 'oci:/etc'" in local.stderr
    # No selector match, an unsupported selector: one line each.
    nobody = cluster.modelfs("preheat", "--selector", "pool=tpu", ref)
    assert "no live node service has labels that match 'pool=tpu'" in nobody.stderr
    sets = cluster.modelfs("preheat", "--selector", "pool in (gpu)", ref)
    assert "set-based requirements (in, notin) are not supported" in sets.stderr

    # Only cluster members may ask: a wrong secret is refused by the scheduler.
    wrong = tmp_path / "wrong-secret"
    wrong.write_bytes(b"not-the-cluster-secret-0123456789")
    options = ("--scheduler", cluster.options[1], "--cluster-secret-file", str(wrong))
    refused = modelfs("preheat", "--nodes", "node-a", ref, *options)
    assert refused.returncode == 1
    assert "refused the request (403): use the cluster secret" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_no_scheduler_is_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    config = tmp_path / "config.toml"
    down = (
        "--scheduler",
        f"http://127.0.0.1:{free_ports(1)}",
        "--cluster-secret-file",
        str(secret),
    )
    for args, message in (
        (("cluster", "models", *down), "did not answer (ConnectError"),
        (("preheat", "--nodes", "n1", "r.example/m:v1", *down), "did not answer (ConnectError"),
        (("cluster", "nodes", "--config", str(config)), f"({config} does not exist)"),
        (("preheat", "--nodes", "n1", "--selector", "a=b", "r.example/m:v1"), "not both"),
        (("preheat", "--nodes", "n1", "--plain-http", "r.example/m:v1"), "apply to a preheat here"),
    ):
        result = modelfs(*args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    config.write_text('control_socket = "/run/x.sock"\n')
    result = modelfs("cluster", "models", "--config", str(config))
    assert f"{config} has no [cluster] table: pass --scheduler" in result.stderr

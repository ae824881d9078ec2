"""The scheduler: pure ranking and rationing, its state in memory and in a real Redis, its API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from registry_tools import free_port

from modelfs.scheduler.client import BACKOFF_FIRST, SchedulerClient, bounded_wait
from modelfs.scheduler.ranking import (
    MAX_CANDIDATES,
    Action,
    Decision,
    FailureKind,
    NodeInfo,
    decide,
    rank,
    score,
)
from modelfs.scheduler.redis import RedisError, RedisKeyValue, encode_command, parse_redis_url
from modelfs.scheduler.service import LONG_POLL, run_scheduler
from modelfs.scheduler.state import (
    FIRST_LEASE,
    FIRST_PENALTY,
    LOAD_WINDOW,
    MAX_PENALTY,
    NODE_TTL,
    SOURCE_LEASE,
    KeyValue,
    MemoryKeyValue,
    SchedulerState,
)
from modelfs.transport.server import parse_listen
from modelfs.transport.tokens import sign

SECRET = b"scheduler-secret-0123456789abcdef"
BLOB = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


# --- pure ranking ---------------------------------------------------------------------------


def test_rank_prefers_idle_then_near_peers() -> None:
    me = NodeInfo("10.0.0.1:7481", zone="z1", rack="r1")
    same_rack = NodeInfo("10.0.0.2:7481", zone="z1", rack="r1")
    same_zone = NodeInfo("10.0.0.3:7481", zone="z1", rack="r2")
    far = NodeInfo("10.0.0.4:7481", zone="z2", rack="r1")
    far_too = NodeInfo("10.0.0.5:7481", zone="z2")
    holders = [far_too, far, same_zone, same_rack, me]
    assert rank(me, me.address, holders, {}, set()) == (
        same_rack.address,
        same_zone.address,
        far.address,  # ties broken by address: replicas agree
    )
    # A busy neighbour loses to an idle stranger: load weighs most.
    busy = {same_rack.address: 4, same_zone.address: 4}
    assert rank(me, me.address, holders, busy, set())[:2] == (far.address, far_too.address)
    assert score(me, same_rack, 100) == pytest.approx(0.4)
    assert rank(me, me.address, holders, {}, {same_rack.address}) == (
        same_zone.address,
        far.address,
        far_too.address,
    )
    assert rank(None, "unknown:1", holders, {}, set())[0] == me.address  # no locality
    assert len(rank(None, "x:1", holders, {}, set())) == MAX_CANDIDATES
    assert rank(me, me.address, [me], {}, set()) == ()


def test_decide() -> None:
    assert decide(("a:1",), False) == Decision(Action.PEERS, ("a:1",))
    assert decide((), True) == Decision(Action.SOURCE)
    waiting = decide((), False)
    assert waiting.action is Action.WAIT and waiting.retry_after > 0


def test_node_validation() -> None:
    assert NodeInfo("10.0.0.1:7481", "z", "r", 8).problem() is None
    assert NodeInfo("[::1]:7481").problem() is None
    assert "host:port" in (NodeInfo("no-port").problem() or "")
    assert "labels" in (NodeInfo("a:1", zone="bad zone").problem() or "")
    assert "capacity" in (NodeInfo("a:1", capacity=0).problem() or "")


def test_redis_url_and_protocol() -> None:
    assert parse_redis_url("redis://localhost") == ("localhost", 6379, None, 0)
    assert parse_redis_url("redis://:pw@10.0.0.9:6380/2") == ("10.0.0.9", 6380, "pw", 2)
    for bad in ("http://x", "redis://", "redis://h:port", "redis://h/db"):
        with pytest.raises(RedisError, match="is not a Redis URL"):
            parse_redis_url(bad)
    assert encode_command("GET", "k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert parse_listen("0.0.0.0:7480") == ("0.0.0.0", 7480)
    assert parse_listen("[::]:1") == ("::", 1)
    with pytest.raises(ValueError, match="not host:port"):
        parse_listen("7480")


# --- state, on both backends ----------------------------------------------------------------


class Redis:
    """A real redis-server on a loopback port, without persistence; restartable."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(name="redis")
def redis_fixture(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


@asynccontextmanager
async def store_of(kind: str, redis_url: str | None) -> AsyncIterator[KeyValue]:
    if kind == "memory":
        yield MemoryKeyValue()
    else:
        assert redis_url is not None
        async with RedisKeyValue(redis_url) as store:
            yield store


A, B, C, D = (NodeInfo(f"127.0.0.1:{port}", zone="z1") for port in (7001, 7002, 7003, 7004))


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_state_rations_the_registry_and_spreads_load(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis").url if kind == "redis" else None

    async def main() -> None:
        async with store_of(kind, url) as store:
            state = SchedulerState(store)
            for node in (A, B, C, D):
                await state.register(node)
            # Four nodes want piece 0 at once: one goes to the registry, the others wait.
            first = await state.ask(A.address, BLOB, 0)
            others = [await state.ask(n.address, BLOB, 0) for n in (B, C, D)]
            assert first.action is Action.SOURCE
            assert [d.action for d in others] == [Action.WAIT] * 3
            assert (await state.ask(A.address, BLOB, 0)).action is Action.SOURCE  # still its turn
            await state.announce(A.address, [(BLOB, 0)])
            assert await state.ask(B.address, BLOB, 0) == Decision(Action.PEERS, (A.address,))
            await state.announce(B.address, [(BLOB, 0)])
            await state.announce(C.address, [(BLOB, 0)])
            # Load spreads: A was just handed out, so the next asker is sent to another peer.
            picks = [(await state.ask(D.address, BLOB, 0)).peers[0] for _ in range(3)]
            assert len(set(picks)) == 3
            # Another piece is rationed on its own.
            assert (await state.ask(D.address, BLOB, 1)).action is Action.SOURCE
            # Bad peers: corrupt is avoided, a peer that lost the piece is no longer offered.
            await state.report(D.address, A.address, BLOB, 0, FailureKind.CORRUPT)
            await state.report(D.address, B.address, BLOB, 0, FailureKind.MISSING)
            assert (await state.ask(D.address, BLOB, 0)).peers == (C.address,)
            await state.report(D.address, C.address, BLOB, 0, FailureKind.FAILED)
            assert (await state.ask(D.address, BLOB, 0)).action is Action.SOURCE
            # Unregistered peers are never offered, whatever they announced (nor stored).
            assert await state.announce("127.0.0.1:7999", [(OTHER, 0)]) == 0
            assert (await state.ask(D.address, OTHER, 0)).action is Action.SOURCE

    trio.run(main)


def test_everything_expires() -> None:
    now = [1000.0]
    state = SchedulerState(MemoryKeyValue(lambda: now[0]))

    async def main() -> None:
        for node in (A, B):
            await state.register(node)
        assert (await state.ask(A.address, BLOB, 0)).action is Action.SOURCE
        assert (await state.ask(B.address, BLOB, 0)).action is Action.WAIT
        now[0] += SOURCE_LEASE + 1  # A died with its claim: B may go now
        assert (await state.ask(B.address, BLOB, 0)).action is Action.SOURCE
        await state.register(A)
        await state.announce(A.address, [(BLOB, 1)])
        await state.report(B.address, A.address, BLOB, 1, FailureKind.FAILED)
        assert (await state.ask(B.address, BLOB, 1)).action is Action.SOURCE
        now[0] += FIRST_PENALTY[FailureKind.FAILED] + 1  # the penalty of a failure is short
        await state.register(A)
        assert (await state.ask(B.address, BLOB, 1)).peers == (A.address,)
        now[0] += LOAD_WINDOW + NODE_TTL  # A stopped registering
        assert (await state.ask(C.address, BLOB, 1)).action is Action.SOURCE

    trio.run(main)


# --- the API: authentication, replicas sharing Redis, failures ------------------------------


@asynccontextmanager
async def scheduler(redis_url: str | None) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(run_scheduler, "127.0.0.1", 0, SECRET, redis_url)
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def node_client(url: str, node: NodeInfo) -> AsyncIterator[SchedulerClient]:
    async with SchedulerClient(url, SECRET, node, timeout=2.0) as client:
        yield client


def test_api_refuses_strangers_and_bad_requests() -> None:
    async def main() -> None:
        async with scheduler(None) as url, httpx.AsyncClient() as http:
            answer = await http.post(f"{url}/v1/ask", json={"address": A.address})
            assert (answer.status_code, answer.content) == (401, b"")
            async with node_client(url, NodeInfo("bad address")) as client:
                assert await client.register() is False
                assert await client.ask("sha256:short", 0) is None
            async with node_client(url, A) as client:
                assert await client.register() is True
                assert await client.ask(BLOB, 0) == Decision(Action.SOURCE)
                assert await client.announce([(BLOB, 0)]) is True

    trio.run(main)


def test_a_node_may_ask_without_waiting() -> None:
    """Asked with ``wait`` false, the scheduler answers "wait" at once instead of holding the
    request until the piece is announced (up to ``LONG_POLL``)."""

    async def main() -> None:
        async with scheduler(None) as url, node_client(url, A) as a, node_client(url, B) as b:
            assert await a.register() and await b.register()
            assert await a.ask(BLOB, 0) == Decision(Action.SOURCE)
            started = trio.current_time()
            assert (await b.ask(BLOB, 0, wait=False)).action is Action.WAIT  # type: ignore[union-attr]
            assert trio.current_time() - started < LONG_POLL / 2
            started = trio.current_time()
            assert (await b.ask(BLOB, 0)).action is Action.WAIT  # type: ignore[union-attr]
            assert trio.current_time() - started >= LONG_POLL
            body = json.dumps({"address": B.address, "digest": BLOB, "index": 0, "wait": "no"})
            signed = sign(SECRET, "POST", "/v1/ask", time.time(), body.encode())
            async with httpx.AsyncClient() as http:
                answer = await http.post(f"{url}/v1/ask", content=body, headers=signed)
            assert (answer.status_code, answer.json()) == (
                400,
                {"error": "wait must be true or false"},
            )

    trio.run(main)


def test_two_replicas_sharing_redis_agree(redis: Redis) -> None:
    async def main() -> None:
        async with (
            scheduler(redis.url) as one,
            scheduler(redis.url) as two,
            node_client(one, A) as a_one,
            node_client(two, B) as b_two,
            node_client(one, C) as c_one,
            node_client(two, C) as c_two,
        ):
            assert await a_one.register() and await b_two.register()
            await c_one.register()
            # The rationing holds across replicas: one registry trip in all.
            assert (await a_one.ask(BLOB, 0)).action is Action.SOURCE  # type: ignore[union-attr]
            assert (await b_two.ask(BLOB, 0)).action is Action.WAIT  # type: ignore[union-attr]
            assert await a_one.announce([(BLOB, 0)])
            assert await b_two.announce([(BLOB, 0)])
            await trio.sleep(LOAD_WINDOW)  # let the load counters lapse: same state, same answer
            first = await c_one.ask(BLOB, 0)
            await trio.sleep(LOAD_WINDOW)
            second = await c_two.ask(BLOB, 0)
            assert first == second and first is not None and first.action is Action.PEERS
            assert await b_two.report(A.address, BLOB, 0, FailureKind.CORRUPT)
            assert (await c_one.ask(BLOB, 0)).peers == (B.address,)  # type: ignore[union-attr]

    trio.run(main)


def test_redis_restart_and_dead_scheduler_never_hang(redis: Redis) -> None:
    async def main() -> None:
        async with scheduler(redis.url) as url, node_client(url, A) as client:
            assert await client.register()
            redis.stop()
            started = trio.current_time()
            assert await client.ask(BLOB, 0) is None  # 503: the node goes to the registry
            assert trio.current_time() - started < 3
            redis.start()
            await trio.sleep(BACKOFF_FIRST)  # the 503 made the node skip the scheduler a while
            assert await client.register()
            assert await client.ask(BLOB, 0) == Decision(Action.SOURCE)
        dead = f"http://127.0.0.1:{free_port()}"
        async with node_client(dead, A) as client:
            assert await client.ask(BLOB, 0) is None
            assert await client.register() is False

    trio.run(main)


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfs", "scheduler", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    cases = {
        ("--cluster-secret-file", str(tmp_path / "absent")): "cannot read the cluster secret",
        ("--cluster-secret-file", str(secret), "--redis", "http://x"): "is not a Redis URL",
        (
            "--cluster-secret-file",
            str(secret),
            "--listen",
            "127.0.0.1:0",
            "--redis",
            f"redis://127.0.0.1:{free_port()}",
        ): "did not answer PING",
        ("--cluster-secret-file", str(secret), "--listen", "nonsense"): "not host:port",
    }
    for args, message in cases.items():
        result = run_cli(*args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_cli_serves(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
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
            str(secret),
        ],
        stderr=subprocess.PIPE,
    )
    try:

        async def main() -> Decision | None:
            async with node_client(f"http://127.0.0.1:{port}", A) as client:
                for _ in range(100):
                    if await client.register():
                        return await client.ask(BLOB, 0)
                    await trio.sleep(0.05)
            return None

        assert trio.run(main) == Decision(Action.SOURCE)
    finally:
        process.terminate()
        process.wait(10)


def test_metrics_count_the_decisions() -> None:
    async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{url}/metrics")  # no token: Prometheus scrapes it
        assert answer.status_code == 200
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples
        }

    async def main() -> None:
        async with (
            scheduler(None) as url,
            node_client(url, A) as a,
            node_client(url, B) as b,
            node_client(url, C) as c,
        ):
            for client in (a, b, c, a):
                assert await client.register()
            assert (await a.ask(BLOB, 0)).action is Action.SOURCE  # type: ignore[union-attr]
            assert (await b.ask(BLOB, 0)).action is Action.WAIT  # type: ignore[union-attr]
            assert await a.announce([(BLOB, 0), (BLOB, 1)])
            assert (await b.ask(BLOB, 0)).peers == (A.address,)  # type: ignore[union-attr]
            assert await b.report(A.address, BLOB, 0, FailureKind.CORRUPT)
            assert (await c.ask(BLOB, 0)).action is Action.SOURCE  # type: ignore[union-attr]
            metrics = await scrape(url)

        def value(name: str, **labels: str) -> float:
            return metrics[(f"modelfs_scheduler_{name}", tuple(sorted(labels.items())))]

        assert value("answers_total", action="source") == 2
        assert value("answers_total", action="wait") == 1
        assert value("answers_total", action="peers") == 1
        assert value("candidates_total") == 1
        assert value("avoided_peers_total") == 1  # A, reported corrupt, left out for C
        assert value("reports_total", kind="corrupt") == 1
        assert value("reports_total", kind="failed") == 0
        assert value("registrations_total") == 4
        assert value("nodes") == 3
        assert value("announced_pieces_total") == 2
        assert value("backend_errors_total") == 0

    trio.run(main)


# --- issue 24: addresses, registry slots, reports, announcements, a hung scheduler ----------


def test_node_addresses_are_parsed_strictly() -> None:
    good = ["10.0.0.1:7481", "[::1]:7481", "[2001:db8::7]:80", "node-1.example.com:1", "h:65535"]
    bad = [
        "::::1",
        "127.0.0.1:1\n",  # "$" matched before the newline
        "[::1]:1\n",
        "[::::1]:1",
        "[fe80::1%eth0]:1",
        "a:0",
        "a:65536",
        "300.1.1.1:5",
        "1.2.3:4",
        "-a:1",
        "a..b:1",
        "h:1:2",
        "h:+1",
        "\uff11\uff12\uff17.0.0.1:1",  # full-width digits
    ]
    for address in good:
        assert NodeInfo(address).problem() is None, address
    for address in bad:
        assert "is not host:port" in (NodeInfo(address).problem() or ""), address

    async def main() -> None:
        async with scheduler(None) as url:
            for address in ("::::1", "127.0.0.1:1\n"):
                async with node_client(url, NodeInfo(address)) as client:
                    assert await client.register() is False

    trio.run(main)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_one_asker_holds_few_registry_slots_briefly(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A member asking for every piece and announcing nothing made honest nodes wait ~10 s a
    piece: now it holds ``max_claims`` slots at most, each for ``FIRST_LEASE`` only."""
    url = request.getfixturevalue("redis").url if kind == "redis" else None

    async def main() -> None:
        async with store_of(kind, url) as store:
            state = SchedulerState(store, max_claims=4)
            for node in (A, B, C):
                await state.register(node)
            for index in range(10):
                assert (await state.ask(A.address, BLOB, index)).action is Action.SOURCE
            answers = [(await state.ask(B.address, BLOB, index)).action for index in range(6)]
            assert answers == [Action.WAIT] * 4 + [Action.SOURCE] * 2
            # An address nobody registered holds no slot at all.
            assert (await state.ask("10.9.9.9:1", OTHER, 0)).action is Action.SOURCE
            assert (await state.ask(B.address, OTHER, 0)).action is Action.SOURCE
            # A node that delivers (announces) keeps its slots the full lease.
            assert await state.announce(B.address, [(BLOB, 4)]) == 1
            assert (await state.ask(B.address, BLOB, 20)).action is Action.SOURCE
            await trio.sleep(FIRST_LEASE + 0.2)
            assert (await state.ask(C.address, BLOB, 0)).action is Action.SOURCE
            assert (await state.ask(C.address, BLOB, 20)).action is Action.WAIT
            assert FIRST_LEASE * 4 <= SOURCE_LEASE

    trio.run(main)


T, H1, H1_OTHER_PORT, H2, H3 = (
    NodeInfo(address)
    for address in (
        "10.0.0.9:7481",
        "10.0.0.1:7481",
        "10.0.0.1:7482",
        "10.0.0.2:7481",
        "10.0.0.3:1",
    )
)


async def corrupt_block_left(store: KeyValue, peer: str) -> float:
    """Seconds left of ``peer``'s block for corrupt bytes, as the backend keeps it."""
    key = f"modelfs:blocked:corrupt:{peer}"
    if isinstance(store, RedisKeyValue):
        left = await store.command("PTTL", key)
        assert isinstance(left, int)
        return max(left, 0) / 1000
    assert isinstance(store, MemoryKeyValue)
    found = store._values.get(key)
    return 0.0 if found is None else found[1] - time.monotonic()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_reports_are_weighed(kind: str, request: pytest.FixtureRequest) -> None:
    """One forged ``corrupt`` report blocked an honest node for 24 h: now one reporter costs it
    a minute, repeating the report or using another port of the same host adds nothing, and each
    further distinct host multiplies the penalty."""
    url = request.getfixturevalue("redis").url if kind == "redis" else None
    first = FIRST_PENALTY[FailureKind.CORRUPT]

    async def main() -> None:
        async with store_of(kind, url) as store:
            state = SchedulerState(store)
            for node in (T, H1, H1_OTHER_PORT, H2, H3):
                await state.register(node)
            await state.announce(T.address, [(BLOB, 0)])
            assert (await state.ask(H2.address, BLOB, 0)).peers == (T.address,)
            await state.report(H1.address, T.address, BLOB, 0, FailureKind.CORRUPT)
            assert (await state.ask(H2.address, BLOB, 0)).action is Action.SOURCE
            assert first - 5 < await corrupt_block_left(store, T.address) <= first
            await trio.sleep(0.5)
            for reporter in (H1.address, H1_OTHER_PORT.address, "10.0.0.50:1", T.address):
                await state.report(reporter, T.address, BLOB, 0, FailureKind.CORRUPT)
            assert await corrupt_block_left(store, T.address) <= first - 0.4  # not extended
            await state.report(H2.address, T.address, BLOB, 0, FailureKind.CORRUPT)
            assert await corrupt_block_left(store, T.address) > 9 * first
            await state.report(H3.address, T.address, BLOB, 0, FailureKind.CORRUPT)
            assert await corrupt_block_left(store, T.address) > 90 * first
            # A later "failed" report does not shorten a block for corrupt bytes.
            await state.report(H2.address, T.address, BLOB, 0, FailureKind.FAILED)
            assert await corrupt_block_left(store, T.address) > 90 * first

    trio.run(main)


def test_one_report_blocks_briefly() -> None:
    now = [1000.0]
    state = SchedulerState(MemoryKeyValue(lambda: now[0]))

    async def main() -> None:
        for node in (T, H1, H2):
            await state.register(node)
        await state.announce(T.address, [(BLOB, 0)])
        await state.report(H1.address, T.address, BLOB, 0, FailureKind.CORRUPT)
        assert (await state.ask(H2.address, BLOB, 0)).action is Action.SOURCE
        now[0] += FIRST_PENALTY[FailureKind.CORRUPT] + 1
        for node in (T, H1, H2):
            await state.register(node)
        assert (await state.ask(H2.address, BLOB, 0)).peers == (T.address,)
        assert MAX_PENALTY[FailureKind.CORRUPT] == 24 * 3600.0  # only for many reporters

    trio.run(main)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_announcements_are_capped(kind: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis").url if kind == "redis" else None

    async def main() -> None:
        async with store_of(kind, url) as store:
            state = SchedulerState(store, max_held=100)
            for node in (A, B):
                await state.register(node)
            assert await state.announce(A.address, [(BLOB, i) for i in range(150)]) == 100
            assert await state.announce(A.address, [(BLOB, i) for i in range(150)]) == 0
            assert (await state.ask(B.address, BLOB, 99)).peers == (A.address,)
            assert (await state.ask(B.address, BLOB, 120)).action is Action.SOURCE
            # An address nobody registered stores nothing.
            assert await state.announce("10.9.9.9:1", [(OTHER, 0)]) == 0
            assert await store.members(f"modelfs:holders:{OTHER}/0") == set()

    trio.run(main)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(pid)


def test_half_a_million_announced_pieces_stay_small(tmp_path: Path) -> None:
    """500,000 announced pieces grew the scheduler by 276 MiB for 24 h; the per-node cap
    (``MAX_HELD``) bounds what one node can make it keep."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    port = free_port()
    command = [sys.executable, "-m", "modelfs", "scheduler", "--listen", f"127.0.0.1:{port}"]
    process = subprocess.Popen([*command, "--cluster-secret-file", str(secret)])
    try:

        async def main() -> int:
            async with node_client(f"http://127.0.0.1:{port}", A) as client:
                while not await client.register():
                    await trio.sleep(0.05)
                before = rss_kib(process.pid)
                for batch in range(50):
                    pieces = [(BLOB, batch * 10_000 + n) for n in range(10_000)]
                    assert await client.announce(pieces)
                return rss_kib(process.pid) - before

        grown = trio.run(main)
    finally:
        process.terminate()
        process.wait(10)
    print(f"\nscheduler RSS after 500,000 announced pieces: +{grown / 1024:.1f} MiB")
    assert grown < 80 * 1024


def test_a_hung_scheduler_is_skipped_for_a_growing_while() -> None:
    """A hung scheduler (or Redis) made each piece pay the full timeout."""

    async def elapsed(client: SchedulerClient, index: int) -> float:
        started = trio.current_time()
        assert await client.ask(BLOB, index) is None
        return trio.current_time() - started

    async def main(url: str) -> None:
        async with SchedulerClient(url, SECRET, A, timeout=0.5) as client:
            assert await elapsed(client, 0) >= 0.5
            assert sum([await elapsed(client, index) for index in range(1, 101)]) < 0.2
            await trio.sleep(BACKOFF_FIRST)
            assert await elapsed(client, 101) >= 0.5  # asked again: still hung
            assert await elapsed(client, 102) < 0.1
            await trio.sleep(BACKOFF_FIRST)  # the interval doubled
            assert await elapsed(client, 103) < 0.1

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # connections wait in the backlog: accepted by nobody, never answered
        trio.run(main, f"http://127.0.0.1:{hung.getsockname()[1]}")


@pytest.mark.parametrize(
    ("asked", "waited"),
    [(0.02, 0.02), (1e300, 1.0), (float("inf"), 1.0), (float("nan"), 0.0), (-5.0, 0.0)],
)
def test_a_wait_the_scheduler_asks_for_is_bounded(asked: float, waited: float) -> None:
    assert bounded_wait(asked) == waited

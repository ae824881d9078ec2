"""The scheduler's node services and preheats, in milliseconds: names, labels and selectors;
the queue and progress of preheats over memory and Redis; what the API refuses; the [cluster]
keys that name a node. The same parts run end to end in tests/test_preheat_nodes.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from test_scheduler import redis_fixture, store_of  # noqa: F401 (the fixture is used by name)

from modelfs.scheduler.fleet import (
    MAX_QUEUED,
    SERVICE_TTL,
    Fleet,
    JobState,
    NodeReport,
    Progress,
    where_models_are,
)
from modelfs.scheduler.placement import (
    Holding,
    label_patch,
    labels_problem,
    model_labels,
    node_name_problem,
    parse_selector,
)
from modelfs.scheduler.service import SchedulerService
from modelfs.scheduler.state import MemoryKeyValue, SchedulerState
from modelfs.service.cluster_agent import preheats_in
from modelfs.service.config import ConfigError, load_config, parse_config
from modelfs.service.mount_table import MountTable
from modelfs.transport.server import Request

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def test_node_names_and_labels_follow_kubernetes() -> None:
    for good in ("node-a", "gpu-1.eu-west.internal", "a"):
        assert node_name_problem(good) is None
    for bad in ("Node-A", "-a", "a_b", "", "a" * 254, "a..b", "a\n"):
        assert node_name_problem(bad) is not None, bad
    assert labels_problem({"pool": "gpu", "example.com/tier": "", "a.b_c-d": "x.y"}) is None
    for bad in ({"pool": "a b"}, {"/pool": "a"}, {"x" * 64: "a"}, {"pool": "v" * 64}):
        assert labels_problem(bad) is not None, bad
    assert "at most 64 labels" in str(labels_problem({f"k{n}": "v" for n in range(65)}))


def test_selectors_match_as_kubernetes_equality_selectors() -> None:
    gpu = {"pool": "gpu", "zone": "a"}
    spare = {"pool": "spare"}
    cases = {
        "pool=gpu": (True, False),
        "pool==gpu": (True, False),
        "pool!=gpu": (False, True),
        "zone": (True, False),
        "!zone": (False, True),
        "pool=gpu,zone=a": (True, False),
        "pool!=gpu,!zone": (False, True),
        "zone!=b": (True, True),  # a node without the label is not zone=b
    }
    for text, expected in cases.items():
        selector = parse_selector(text)
        assert (selector.matches(gpu), selector.matches(spare)) == expected, text
    for bad, message in (
        ("pool in (gpu)", "set-based requirements (in, notin) are not supported"),
        ("pool=gpu,", "has an empty requirement"),
        ("pool=a b", "must be at most 63"),
        ("=gpu", "the name after the prefix"),
    ):
        with pytest.raises(ValueError) as raised:
            parse_selector(bad)
        assert message in str(raised.value), bad


def test_what_a_node_holds_and_its_node_labels() -> None:
    holdings = [
        Holding(DIGEST, 999, 1000),
        Holding(OTHER, 1000, 1000),
        Holding("sha256:" + "ef" * 32, 0, 1000),
    ]
    assert [h.percent for h in holdings] == [99, 100, 0]  # 100 only when whole
    assert Holding(DIGEST, 0, 0).percent == 100
    labels = model_labels(holdings)
    assert labels == {"modelfs.io/model-abababababab": "99", "modelfs.io/model-cdcdcdcdcdcd": "100"}
    assert all(labels_problem({key: value}) is None for key, value in labels.items())
    # The merge patch to a node's labels: changed and new set, stale model labels removed,
    # others left alone.
    current = {
        "kubernetes.io/hostname": "n1",
        "modelfs.io/model-abababababab": "50",
        "modelfs.io/model-cdcdcdcdcdcd": "100",
        "modelfs.io/model-000000000000": "100",
    }
    assert label_patch(current, labels) == {
        "modelfs.io/model-000000000000": None,
        "modelfs.io/model-abababababab": "99",
    }
    assert label_patch(labels, labels) == {}


def test_where_models_are_most_held_first() -> None:
    nodes = {
        "n1": NodeReport("n1", {}, (Holding(DIGEST, 10, 100, ("r/m:v1",)),)),
        "n2": NodeReport("n2", {}, (Holding(DIGEST, 100, 100, ("r/m@" + DIGEST,)),)),
        "n3": NodeReport("n3", {}, (Holding(OTHER, 0, 100),)),  # holds none of it
    }
    assert where_models_are(nodes) == [
        {
            "digest": DIGEST,
            "references": ["r/m:v1", "r/m@" + DIGEST],
            "total_bytes": 100,
            "nodes": [
                {"name": "n2", "present_bytes": 100, "percent": 100},
                {"name": "n1", "present_bytes": 10, "percent": 10},
            ],
        }
    ]


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_preheat_stays_queued_until_its_node_finishes_it(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis").url if kind == "redis" else None

    async def main() -> None:
        async with store_of(kind, url) as store:
            fleet = Fleet(store)
            await fleet.report(NodeReport("n1", {"pool": "gpu"}))
            await fleet.report(NodeReport("n2", {"pool": "spare"}))
            assert await fleet.select(parse_selector("pool=gpu")) == ["n1"]
            job = await fleet.create("r.example/m:v1", ["n1", "n2", "n9", "n1"])
            assert job.nodes == ("n1", "n2", "n9")  # once each, in order
            _, progress = await _status(fleet, job.id)
            assert [p.state for p in progress.values()] == [
                JobState.QUEUED,
                JobState.QUEUED,
                JobState.DOWN,  # never reported: not queued, said down at once
            ]
            assert [j.id for j in await fleet.jobs_for("n1", set())] == [job.id]
            assert await fleet.jobs_for("n1", {job.id}) == []
            assert await fleet.jobs_for("n9", set()) == []
            # Progress from a node the preheat does not name, or a state nodes do not report,
            # is not taken.
            running = Progress(JobState.RUNNING, DIGEST, 10, 100)
            assert not await fleet.progress("n8", job.id, running)
            assert not await fleet.progress("n1", job.id, Progress(JobState.DOWN))
            assert not await fleet.progress("n1", "0" * 16, running)
            assert await fleet.progress("n1", job.id, running)
            # A node service restarted mid-way knows no preheat: it is given this one again.
            assert [j.id for j in await fleet.jobs_for("n1", set())] == [job.id]
            assert await fleet.progress("n1", job.id, Progress(JobState.DONE, DIGEST, 100, 100))
            assert await fleet.jobs_for("n1", set()) == []
            failed = Progress(JobState.FAILED, error="manifest unknown")
            assert await fleet.progress("n2", job.id, failed)
            _, progress = await _status(fleet, job.id)
            assert progress == {
                "n1": Progress(JobState.DONE, DIGEST, 100, 100),
                "n2": failed,
                "n9": progress["n9"],
            }
            # A node that stops says so: down at once, while its preheat waits in its queue.
            second = await fleet.create("r.example/m:v2", ["n2"])
            await fleet.leave("n2")
            _, progress = await _status(fleet, second.id)
            assert progress["n2"].state is JobState.DOWN
            assert "has not reported" in progress["n2"].error
            assert await fleet.status("f" * 16) is None

    trio.run(main)


def test_a_silent_node_is_down_and_queues_are_bounded() -> None:
    now = [1000.0]
    fleet = Fleet(MemoryKeyValue(clock=lambda: now[0]), clock=lambda: now[0])

    async def main() -> None:
        await fleet.report(NodeReport("n1", {}, (Holding(DIGEST, 5, 10),)))
        job = await fleet.create("r.example/m:v1", ["n1"])
        await fleet.progress("n1", job.id, Progress(JobState.RUNNING, DIGEST, 5, 10))
        now[0] += SERVICE_TTL + 1  # no report since
        _, progress = await _status(fleet, job.id)
        assert progress["n1"].state is JobState.DOWN
        assert progress["n1"].held_bytes == 5  # how far it got
        assert await fleet.live() == {}
        await fleet.report(NodeReport("n1"))
        for _ in range(MAX_QUEUED - 1):
            await fleet.create("r.example/m:v1", ["n1"])
        full = await fleet.create("r.example/m:v1", ["n1"])
        _, progress = await _status(fleet, full.id)
        assert progress["n1"].state is JobState.FAILED
        assert f"{MAX_QUEUED} preheats are queued" in progress["n1"].error
        assert len(await fleet.jobs_for("n1", set())) == MAX_QUEUED

    trio.run(main)


async def _status(fleet: Fleet, job_id: str) -> tuple[Any, dict[str, Progress]]:
    found = await fleet.status(job_id)
    assert found is not None
    return found


def _ask(service: SchedulerService, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async def main() -> tuple[int, Any]:
        response = await service.handle(Request("POST", path, json.dumps(body).encode()))
        return response.status, json.loads(response.body)

    return trio.run(main)


def test_the_api_refuses_what_it_cannot_take() -> None:
    store = MemoryKeyValue()
    service = SchedulerService(SchedulerState(store), Fleet(store))
    model = {"digest": DIGEST, "present_bytes": 1, "total_bytes": 2}
    refused = [
        ("/v1/node/report", {"name": "Bad Name"}, "not a DNS subdomain"),
        ("/v1/node/report", {"name": "n1", "labels": {"a": 1}}, "label values must be strings"),
        ("/v1/node/report", {"name": "n1", "labels": {"a": "b c"}}, "must be at most 63"),
        ("/v1/node/report", {"name": "n1", "models": [{**model, "present_bytes": 3}]}, "above"),
        ("/v1/node/report", {"name": "n1", "models": [{**model, "digest": "x"}]}, "sha256"),
        ("/v1/node/report", {"name": "n1", "models": [model] * 1001}, "at most 1000"),
        ("/v1/node/progress", {"name": "n1", "job": "x", "state": "done"}, "preheat id"),
        ("/v1/node/progress", {"name": "n1", "job": "0" * 16, "state": "gone"}, "state must"),
        ("/v1/node/progress", {"name": "n1", "job": "0" * 16, "state": "done"}, "no such"),
        ("/v1/preheat", {"reference": "oci:/etc", "nodes": ["n1"]}, "a local OCI layout"),
        ("/v1/preheat", {"reference": "r.example/M:v1", "nodes": ["n1"]}, "invalid reference"),
        ("/v1/preheat", {"reference": "r.example/m:v1"}, "one of them"),
        ("/v1/preheat", {"reference": "r.example/m:v1", "nodes": []}, "name 1 to 1000"),
        ("/v1/preheat", {"reference": "r.example/m:v1", "nodes": ["N1"]}, "DNS subdomain"),
        ("/v1/preheat", {"reference": "r.example/m:v1", "selector": "a in (b)"}, "set-based"),
        ("/v1/preheat", {"reference": "r.example/m:v1", "selector": "a=b"}, "no live node"),
        ("/v1/preheat", {"reference": "r" * 600, "nodes": ["n1"]}, "longer than 512"),
        ("/v1/preheat/status", {"id": "0" * 16}, "no preheat"),
    ]
    for path, body, message in refused:
        status, answer = _ask(service, path, body)
        assert status == 400 and message in answer["error"], (path, body, answer)
    assert _ask(service, "/v1/node/report", {"name": "n1", "models": [model]}) == (200, {})
    status, job = _ask(service, "/v1/preheat", {"reference": "r.example/m:v1", "nodes": ["n1"]})
    assert status == 200 and job["nodes"] == ["n1"]
    assert _ask(service, "/v1/node/jobs", {"name": "n1", "known": []}) == (200, {"jobs": [job]})
    done = {"name": "n1", "job": job["id"], "state": "done", "held_bytes": 2, "total_bytes": 2}
    assert _ask(service, "/v1/node/progress", done) == (200, {})
    metrics = service.metrics.registry
    assert metrics.get_sample_value("modelfs_scheduler_preheats_total") == 1
    ends = "modelfs_scheduler_preheat_ends_total"
    assert metrics.get_sample_value(ends, {"state": "done"}) == 1
    assert metrics.get_sample_value(ends, {"state": "failed"}) == 0
    status, models = _ask(service, "/v1/models", {})
    assert models["models"][0]["nodes"] == [{"name": "n1", "present_bytes": 1, "percent": 50}]


CLUSTER = """
[cluster]
scheduler = "http://scheduler.internal:7480"
secret_file = "/etc/modelfs/cluster-secret"
peer_ports = "7481-7483"
"""


def test_a_node_is_named_and_labelled_in_its_config() -> None:
    config = parse_config(CLUSTER + 'node_name = "gpu-1"\nlabels = { pool = "a100" }\n', "c.toml")
    assert config.cluster is not None
    assert (config.cluster.node_name, config.cluster.labels) == ("gpu-1", {"pool": "a100"})
    assert parse_config(CLUSTER, "c.toml").cluster.node_name is None  # type: ignore[union-attr]
    for wrong, message in (
        ('node_name = "GPU 1"', "is not a DNS subdomain"),
        ("labels = { pool = 1 }", "label values must be strings"),
        ('labels = { "a b" = "x" }', "the name after the prefix"),
        ('labels = "pool=a"', "labels must be a table"),
    ):
        with pytest.raises(ConfigError) as raised:
            parse_config(f"{CLUSTER}{wrong}\n", "c.toml")
        assert message in str(raised.value), wrong


def test_kubernetes_labels_need_the_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a pod, asking for node labels is refused when the config loads (the labels
    themselves are computed by ``model_labels`` and ``label_patch``, tested above; the API
    calls are not run here: no API server)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef")
    config = tmp_path / "config.toml"
    text = CLUSTER.replace("/etc/modelfs/cluster-secret", str(secret)) + 'node_name = "n1"\n'
    config.write_text(text)
    assert load_config(config).cluster is not None
    config.write_text(text + "kubernetes_labels = true\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert "kubernetes_labels needs the API server: KUBERNETES_SERVICE_HOST" in str(raised.value)


def test_a_node_takes_only_readable_preheats_from_the_scheduler() -> None:
    """Whatever answers in the scheduler's place, the node service takes well-formed preheats
    only (and never stops over the rest)."""
    good = {"id": "0123456789abcdef", "reference": "r.example/m:v1", "nodes": ["n1"]}
    answer = {"jobs": [good, {"id": "../x", "reference": "r"}, {"id": "0" * 16}, "x", None]}
    assert [(p.id, p.reference) for p in preheats_in(answer)] == [(good["id"], good["reference"])]
    assert preheats_in({"jobs": "all"}) == [] and preheats_in({}) == []


def test_a_node_takes_its_preheats_in_the_order_asked() -> None:
    now = [1000.0]
    fleet = Fleet(MemoryKeyValue(clock=lambda: now[0]), clock=lambda: now[0])

    async def main() -> None:
        await fleet.report(NodeReport("n1"))
        asked = []
        for number in range(5):
            asked.append((await fleet.create(f"r.example/m:v{number}", ["n1"])).reference)
            now[0] += 1
        assert [job.reference for job in await fleet.jobs_for("n1", set())] == asked

    trio.run(main)


def test_a_preheat_takes_a_peer_port_only_while_one_stays_for_a_mount() -> None:
    config = parse_config(CLUSTER, "c.toml")  # peer_ports 7481-7483

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            table = MountTable(nursery, config)
            assert table.reserve_port() == 7482  # the lowest stays for the next mount
            assert table.reserve_port() == 7483
            assert table.reserve_port() is None  # only 7481 is free: it is a mount's
            table.release_port(7482)
            assert table.reserve_port() == 7482

    trio.run(main)

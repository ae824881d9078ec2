"""Live per-mount counters through the daemon: /metrics scraped with prometheus-client's parser
and checked against the counting proxy, ``modelfs status`` columns, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from mounting import MODELFS, modelfs, unmount
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from registry_tools import Proxy, Registry, free_port
from test_preheat import push_model
from test_service import Notifications, status

from modelfs.cli.status import describe_fetched, describe_sources, describe_waits, short_digest
from modelfs.sources.buffers import PIECE_BUFFERS


def write_config(tmp_path: Path, proxy: Proxy, reference: str, mountpoints: list[Path]) -> Path:
    config = tmp_path / "config.toml"
    mounts = "".join(
        f'[[mounts]]\nref = "{proxy.host}/{reference}"\npath = "{path}"\nprefetch = "none"\n'
        for path in mountpoints
    )
    config.write_text(
        f'control_socket = "{tmp_path / "run" / "control.sock"}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\nsize = "1G"\n'
        f'[registries."{proxy.host}"]\nplain_http = true\n' + mounts
    )
    return config


@contextmanager
def running_daemon(config: Path, tmp_path: Path, *options: str) -> Iterator[tuple[int, Path]]:
    """The daemon as systemd starts it, until READY; yields its metrics port and log file."""
    notifications = Notifications(tmp_path / "notify.sock")
    port = free_port()
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log_file:
        daemon = subprocess.Popen(
            [*MODELFS, *options, "daemon", "--config", str(config),
             "--metrics-addr", f"127.0.0.1:{port}"],
            env={**os.environ, "NOTIFY_SOCKET": str(notifications.path)},
            stderr=log_file,
        )  # fmt: skip
    try:
        notifications.wait_for("READY=1")
        yield port, log_path
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        notifications.close()


def scrape(port: int) -> list[Sample]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, mountpoint: Path, **labels: str) -> float:
    """The sample's value; 0 for a counter not exported yet (nothing counted)."""
    wanted = {"mountpoint": str(mountpoint), **labels}
    found = [
        sample.value
        for sample in samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    ]
    assert len(found) <= 1, (name, wanted, found)
    return found[0] if found else 0.0


def read_all(mountpoint: Path, files: dict[str, bytes]) -> int:
    for name, data in files.items():
        assert (mountpoint / name).read_bytes() == data, name
    return sum(len(data) for data in files.values())


@pytest.fixture
def two_mounts(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    first, second = tmp_path / "models" / "first", tmp_path / "models" / "second"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    yield first, second
    unmount(first)
    unmount(second)


def test_metrics_match_the_registry_traffic_and_reads(
    registry: Registry, proxy: Proxy, tmp_path: Path, two_mounts: tuple[Path, Path]
) -> None:
    reference, files = push_model(registry)
    first, second = two_mounts
    config = write_config(tmp_path, proxy, reference, [first, second])
    with running_daemon(config, tmp_path) as (port, _):
        control = tmp_path / "run" / "control.sock"
        assert [mount["state"] for mount in status(control)["mounts"]] == ["mounted"] * 2  # type: ignore[index]
        before = scrape(port)
        proxy_before = proxy.blob_bytes
        assert value(before, "modelfs_mount_fetched_ratio", first) < 1

        read = read_all(first, files)
        after_first = scrape(port)

        def delta(name: str, mountpoint: Path, samples: list[Sample], **labels: str) -> float:
            return value(samples, name, mountpoint, **labels) - value(
                before, name, mountpoint, **labels
            )

        assert delta("modelfs_read_bytes_total", first, after_first) == read
        assert delta("modelfs_read_duration_seconds_count", first, after_first) > 0
        registry_bytes = delta("modelfs_fetched_bytes_total", first, after_first, source="registry")
        assert registry_bytes > 0
        assert registry_bytes == proxy.blob_bytes - proxy_before
        fetches = delta("modelfs_fetches_total", first, after_first, kind="on_demand")
        timed = delta("modelfs_fetch_duration_seconds_count", first, after_first, source="registry")
        assert fetches >= 1 and timed >= fetches  # every piece fetch is a timed range read
        assert value(after_first, "modelfs_mount_fetched_ratio", first) == 1.0
        assert value(after_first, "modelfs_mount_fetched_ratio", second) == 1.0
        # The pieces landed in pooled buffers, none past the pool's bound.
        assert 1 <= value(after_first, "modelfs_piece_buffers", first) <= PIECE_BUFFERS.capacity
        assert value(after_first, "modelfs_plain_piece_buffers_total", first) == 0

        # The same files through the second mount (another process): all from the cache.
        proxy_after_first = proxy.blob_bytes
        assert read_all(second, files) == read
        after_second = scrape(port)
        total_bytes = status(control)["mounts"][1]["total_bytes"]  # type: ignore[index]
        assert delta("modelfs_read_bytes_total", second, after_second) == read
        # Every piece of the weights came from the cache; the small tar pieces may have been
        # loaded (counted) already while the mount listed its layers.
        from_cache = delta("modelfs_fetched_bytes_total", second, after_second, source="cache")
        assert len(files["model.safetensors"]) <= from_cache <= total_bytes
        assert delta("modelfs_fetched_bytes_total", second, after_second, source="registry") == 0
        assert delta("modelfs_fetches_total", second, after_second, kind="on_demand") == 0
        # Every read is timed: the first mount's waited on the registry, the second's did not.
        waited = delta("modelfs_read_duration_seconds_sum", first, after_first)
        assert delta("modelfs_read_duration_seconds_count", second, after_second) > 0
        assert delta("modelfs_read_duration_seconds_sum", second, after_second) < waited
        assert proxy.blob_bytes == proxy_after_first
        # The cache held everything: the node-wide eviction counter is exported, at zero.
        evicted = [s.value for s in after_second if s.name == "modelfs_cache_evicted_pieces_total"]
        assert evicted == [0.0]

        # Whatever the two processes fetched since they started, startup included.
        assert (
            sum(
                value(after_second, "modelfs_fetched_bytes_total", mount, source="registry")
                for mount in (first, second)
            )
            == proxy.blob_bytes
        )


def test_status_columns_errors_and_json_logs(
    registry: Registry, proxy: Proxy, tmp_path: Path, two_mounts: tuple[Path, Path]
) -> None:
    reference, files = push_model(registry)
    mountpoint = two_mounts[0]
    config = write_config(tmp_path, proxy, reference, [mountpoint])
    control = tmp_path / "run" / "control.sock"
    with running_daemon(config, tmp_path, "--log-format", "json") as (_, log_path):
        assert (mountpoint / "tokenizer.json").read_bytes() == files["tokenizer.json"]
        proxy.tamper = True  # blob bytes altered in flight: the digest check must refuse them
        with pytest.raises(OSError):
            (mountpoint / "model.safetensors").read_bytes()
        proxy.tamper = False

        (mount,) = status(control)["mounts"]  # type: ignore[misc]
        live = mount["live"]
        assert live["errors"]["digest_mismatch"] >= 1
        assert "does not match the piece index" in live["last_error"]
        assert live["files"] == len(files)

        result = modelfs("status", "--control-socket", str(control))
        assert result.returncode == 0, result.stderr
        header, row, *rest = result.stdout.splitlines()
        assert header.split() == [
            "REFERENCE", "DIGEST", "MOUNTPOINT", "STATE", "FILES", "FETCHED", "SOURCES", "READS",
            "WAITED",
        ]  # fmt: skip
        assert row.split()[:5] == [
            mount["reference"], short_digest(mount["digest"]), str(mountpoint), "mounted",
            str(len(files)),
        ]  # fmt: skip
        assert describe_fetched(mount["present_bytes"], mount["total_bytes"]) in row
        assert describe_sources(live["fetched_bytes"]) in row
        assert row.endswith(describe_waits(live))
        assert live["read_seconds"]["counts"][-1] == 0  # no read took over 30 s
        assert any(line.startswith(f"{mountpoint}: last error: piece 0 of blob ") for line in rest)
        assert "hit ratio" in rest[-1] and "1 models" in rest[-1]

    # Every line the daemon and its mount process wrote is one JSON object; the mount's carry
    # its reference and pinned digest.
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    mount_lines = [line for line in lines if line["pid"] == mount["pid"]]
    assert any("does not match the piece index" in line["message"] for line in mount_lines)
    for line in mount_lines:
        assert line["reference"] == mount["reference"]
        assert line["digest"] == mount["digest"]

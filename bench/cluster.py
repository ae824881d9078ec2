"""The cluster case: N nodes (2, 4, 8) reading one model together, with and without peers.

Each node is a real mount process with its own cache directory and peer port (the cluster
tests' tooling, ``tests/cluster_tools.py``), each file read by its own process, all at once. With
peers the nodes share a fresh scheduler; without, each pulls the model from the registry. Bytes
are what the registry's access log says it sent. Printed as ratios: registry bytes / model size,
and the time with peers / the time of the same N nodes without, and / one node alone.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cluster_tools import nodes, publish, read_all, scheduler_process

from bench.report import Results, Sample, median

NODE_COUNTS = (2, 4, 8)
_WRITE_CHUNK = 16 << 20


class ClusterError(Exception):
    """The cluster case could not run, or read wrong bytes."""


Mark = TypeVar("Mark")


class ByteCounter(Protocol[Mark]):
    def mark(self) -> Mark: ...

    def blob_bytes_since(self, mark: Mark) -> int: ...


class ClusterCase:
    """One random single-file model, published with its piece index, read by N nodes."""

    def __init__(
        self,
        registry_host: str,
        counter: ByteCounter[Any],
        work: Path,
        model_size: int,
        node_counts: tuple[int, ...] = NODE_COUNTS,
    ) -> None:
        self.registry_host = registry_host
        self.counter = counter
        self.work = work / "cluster"
        self.model_size = model_size
        self.node_counts = node_counts
        self.work.mkdir(parents=True, exist_ok=True)
        model = self.work / "model.bin"
        digest = hashlib.sha256()
        with model.open("wb") as file:
            for start in range(0, model_size, _WRITE_CHUNK):
                chunk = os.urandom(min(_WRITE_CHUNK, model_size - start))
                digest.update(chunk)
                file.write(chunk)
        self.expected = digest.hexdigest()
        self.reference = publish(registry_host, "cluster", model)
        self.secret = self.work / "cluster-secret"
        self.secret.write_text(secrets.token_hex(32))

    def run_once(
        self, before_each: Callable[[], None], record: Callable[[str, Sample], None]
    ) -> None:
        record("cluster_1", self._read_together(before_each, "one", 1))
        for count in self.node_counts:
            record(f"cluster_{count}_alone", self._read_together(before_each, "alone", count))
            # A fresh scheduler each time: no node of an earlier case is named as a holder.
            with scheduler_process(self.secret) as scheduler:
                peers = ("--scheduler", scheduler, "--cluster-secret-file", str(self.secret))
                sample = self._read_together(before_each, "peers", count, *peers)
            record(f"cluster_{count}_peers", sample)

    def _read_together(
        self, before_each: Callable[[], None], name: str, count: int, *peers: str
    ) -> Sample:
        root = self.work / f"{name}-{count}"
        shutil.rmtree(root, ignore_errors=True)
        before_each()
        mark = self.counter.mark()
        with nodes(self.reference, self.registry_host, root, count, *peers) as mounts:
            hashes, seconds = read_all([mount / "model.bin" for mount in mounts])
        fetched = self.counter.blob_bytes_since(mark)
        shutil.rmtree(root, ignore_errors=True)
        if hashes != [self.expected] * count:
            raise ClusterError(f"{count} nodes ({name}): a reader got wrong bytes or failed")
        return Sample(seconds, count * self.model_size, fetched)


def render_cluster(results: Results, model_size: int) -> str:
    """The table of ratios, one row per node count measured (pure)."""
    header = (
        "| nodes | registry bytes / model size, without peers | with peers | time without "
        "peers s | with peers s | time with / without peers | time with peers / one node alone |"
    )
    lines = [header, "|" + " --- |" * 7]
    alone_one = median(results.get("cluster_1", []), lambda sample: sample.seconds)
    counts = sorted(
        int(key.split("_")[1]) for key in results if key.startswith("cluster_") and "peers" in key
    )
    for count in counts:
        without, peers = results[f"cluster_{count}_alone"], results[f"cluster_{count}_peers"]
        cells = [
            median(without, lambda sample: (sample.registry_bytes or 0) / model_size),
            median(peers, lambda sample: (sample.registry_bytes or 0) / model_size),
            median(without, lambda sample: sample.seconds),
            median(peers, lambda sample: sample.seconds),
        ]
        slower = cells[3] / cells[2] if cells[2] and cells[3] else None
        than_one = cells[3] / alone_one if alone_one and cells[3] else None
        figures = [*cells, slower, than_one]
        lines.append(
            f"| {count} | "
            + " | ".join("—" if value is None else f"{value:.2f}" for value in figures)
            + " |"
        )
    return "\n".join(lines)

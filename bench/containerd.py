"""The containerd case (issue 18): from "pull requested" to the first tensor read in a container
and to the whole model read, one model pulled two ways side by side in each run:

- ``overlayfs``: containerd's own snapshotter pulls the model wrapped as an ordinary image
  (busybox, then one uncompressed layer holding the files under /model): every byte is
  downloaded and unpacked before the container starts;
- ``modelfs``: the modelfs snapshotter pulls the model's own reference through its mirror (its
  model image: the one marker layer the model is mounted in place of), and a busybox container
  gets the image's view bound read-only on /model, as a pod's image volume does (a view of a
  one-layer image is a bind of that layer: the model's mount): nothing of the model is fetched
  before the container reads it.

One container per pull reads the first tensor of the first shard, says so, reads every file
whole, and says so; the times are taken when its lines arrive. Every pull starts cold: images
removed and collected, the model unmounted and its cache gone, the page cache dropped.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from containerd_tools import (
    NAMESPACE,
    Containerd,
    Snapshotter,
    containerd_missing,
    push_busybox_image,
    push_wrapped_model,
)
from registry_tools import Registry, free_port

from bench.report import MB, Results, Sample, median

CASES = ("overlayfs", "modelfs")
FIRST_TENSOR_GOAL = 1.5  # seconds from pull requested, whatever the model's size (the issue's)


def first_tensor(path: Path) -> tuple[int, int]:
    """(offset, length) of the first tensor of a safetensors file, from its header."""
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    start, end = min(
        tuple(entry["data_offsets"]) for name, entry in header.items() if name != "__metadata__"
    )
    return 8 + header_size + start, end - start


def _reader_script(directory: str, files: list[Path]) -> str:
    shard = next(path for path in files if path.suffix == ".safetensors")
    offset, length = first_tensor(shard)
    dd = "dd bs=1M iflag=skip_bytes,count_bytes of=/dev/null 2>/dev/null"
    return (
        f"{dd} if={directory}/{shard.name} skip={offset} count={length} && echo first && "
        f"cat {' '.join(f'{directory}/{path.name}' for path in files)} > /dev/null && echo whole"
    )


class ContainerdCase:
    """A containerd with the modelfs snapshotter beside its own, and the model's two images."""

    def __init__(self, work: Path, registry: Registry, model: str, files: list[Path]) -> None:
        missing = containerd_missing()
        if missing is not None:
            raise RuntimeError(f"the containerd case cannot run: {missing}")
        self.work, self.files, self.model = work / "containerd", files, model
        (self.work / "snapshotter").mkdir(parents=True)
        (self.work / "containerd").mkdir()
        self.cache = self.work / "model-cache"
        mirror = free_port()
        self.snapshotter = Snapshotter(
            self.work / "snapshotter",
            *("--plain-http-registry", registry.host, "--cache-dir", str(self.cache)),
            *("--mirror-addr", f"127.0.0.1:{mirror}"),
        )
        self.containerd = Containerd(self.work / "containerd", self.snapshotter)
        self.hosts = self.work / "certs.d"
        (self.hosts / registry.host).mkdir(parents=True)
        (self.hosts / registry.host / "hosts.toml").write_text(
            f'server = "http://{registry.host}"\n'
            f'[host."http://127.0.0.1:{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        repository = model.split("/", 1)[1].rsplit(":", 1)[0]
        self.wrapped = push_wrapped_model(
            registry.host, f"{repository}-wrapped", "v1", files, self.work / "wrapped.tar"
        )
        (self.work / "wrapped.tar").unlink()
        self.busybox = push_busybox_image(registry.host, f"{repository}-busybox", "v1", b"")
        self.snapshotter.start()
        self.containerd.start()
        self.containerd.ctr("images", "pull", "--hosts-dir", str(self.hosts), self.busybox)

    def close(self) -> None:
        self.containerd.stop()
        self.snapshotter.stop()
        self.snapshotter.unmount_models()

    def run_once(
        self, cold_start: Callable[[], None], record: Callable[[str, Sample], None]
    ) -> None:
        for case in CASES:
            image = self.model if case == "modelfs" else self.wrapped
            self._forget(image)
            cold_start()
            pulled, first, whole = self._pull_and_read(case, image)
            record(f"containerd_{case}_pull", Sample(pulled))
            record(f"containerd_{case}_first", Sample(first))
            size = sum(path.stat().st_size for path in self.files)
            record(f"containerd_{case}_whole", Sample(whole, payload=size))

    def _pull_and_read(self, case: str, image: str) -> tuple[float, float, float]:
        snapshotter = "modelfs" if case == "modelfs" else "overlayfs"
        started = time.monotonic()
        self.containerd.ctr(
            "images", "pull", "--hosts-dir", str(self.hosts), "--snapshotter", snapshotter, image,
            timeout=1800,
        )  # fmt: skip
        pulled = time.monotonic() - started
        if case == "modelfs":
            [model] = self.snapshotter.model_mounts()
            volume = f"type=bind,src={model},dst=/model,options=rbind:ro"
            run = ["--mount", volume, self.busybox]
        else:
            run = ["--snapshotter", snapshotter, image]
        command = [
            "ctr", "-a", str(self.containerd.address), "-n", NAMESPACE, "run", "--rm", *run,
            f"bench-{case}", "/bin/sh", "-c", _reader_script("/model", self.files),
        ]  # fmt: skip
        marks: dict[str, float] = {}
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as reader:
            assert reader.stdout is not None
            for line in reader.stdout:
                marks[line.strip()] = time.monotonic() - started
        if set(marks) != {"first", "whole"}:
            raise RuntimeError(f"the {case} container did not read the model: {marks}")
        return pulled, marks["first"], marks["whole"]

    def _forget(self, image: str) -> None:
        """No trace of an earlier run: the image, its content and snapshots, the model mount
        and the pieces it cached."""
        self.containerd.ctr("images", "rm", "--sync", image, check=False)
        deadline = time.monotonic() + 30
        while self.snapshotter.model_mounts() and time.monotonic() < deadline:
            time.sleep(0.1)  # the snapshotter unmounts the model with its last snapshot
        self.snapshotter.unmount_models()
        shutil.rmtree(self.cache, ignore_errors=True)


def render_containerd(results: Results, model_bytes: int) -> str:
    """The case's table (medians, seconds from pull requested) and its verdicts."""
    lines = [
        f"containerd (issue 18): a {model_bytes / MB:.0f} MB model, seconds from pull requested",
        f"{'snapshotter':<12} {'pull done':>10} {'first tensor':>13} {'whole model':>12}",
    ]
    figures: dict[tuple[str, str], float | None] = {}
    for case in CASES:
        row = []
        for step in ("pull", "first", "whole"):
            value = median(results.get(f"containerd_{case}_{step}", []), lambda s: s.seconds)
            figures[case, step] = value
            row.append("—" if value is None else f"{value:.2f}")
        lines.append(f"{case:<12} {row[0]:>10} {row[1]:>13} {row[2]:>12}")
    first, whole = figures["modelfs", "first"], figures["modelfs", "whole"]
    plain = figures["overlayfs", "whole"]
    if first is not None:
        verdict = "met" if first < FIRST_TENSOR_GOAL else "NOT met"
        lines.append(
            f"first tensor in a container < {FIRST_TENSOR_GOAL} s: {verdict} ({first:.2f} s)"
        )
    if whole is not None and plain is not None:
        verdict = "met" if whole <= plain else "NOT met"
        lines.append(
            f"whole model no slower than overlayfs: {verdict} ({whole:.2f} s against {plain:.2f} s)"
        )
    return "\n".join(lines)

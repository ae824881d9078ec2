"""The containerd case of the benchmark, its pure parts: where the first tensor lies, the table
and the issue's two verdicts (the case itself runs with ``scripts/bench --only containerd``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save

from bench.containerd import first_tensor, render_containerd
from bench.report import Sample


def test_the_first_tensor_is_the_lowest_data_offset(tmp_path: Path) -> None:
    data = save({"b": np.zeros(4, np.float32), "a": np.ones(2, np.float32)})
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    offset, length = first_tensor(path)
    header = int.from_bytes(data[:8], "little")
    assert offset == 8 + header and length == 8  # "a" sorts first: 2 float32
    assert np.frombuffer(data[offset : offset + length], np.float32).tolist() == [1.0, 1.0]


def _results(modelfs_first: float, modelfs_whole: float) -> dict[str, list[Sample]]:
    return {
        "containerd_overlayfs_pull": [Sample(9.0)],
        "containerd_overlayfs_first": [Sample(9.5)],
        "containerd_overlayfs_whole": [Sample(10.0)],
        "containerd_modelfs_pull": [Sample(0.5)],
        "containerd_modelfs_first": [Sample(modelfs_first)],
        "containerd_modelfs_whole": [Sample(modelfs_whole)],
    }


def test_the_verdicts_follow_the_issues_goals() -> None:
    met = render_containerd(_results(0.8, 9.0), 2_000_000_000)
    assert "a 2000 MB model" in met
    assert "first tensor in a container < 1.5 s: met (0.80 s)" in met
    assert "whole model no slower than overlayfs: met (9.00 s against 10.00 s)" in met
    missed = render_containerd(_results(2.0, 11.0), 2_000_000_000)
    assert "< 1.5 s: NOT met (2.00 s)" in missed
    assert "no slower than overlayfs: NOT met (11.00 s against 10.00 s)" in missed

